"""LoRA and DoRA through peft, the baselines users would pick instead of MISA.

Adapters go on the seven projections MISA samples (q, k, v, o, gate, up, down), the setting of the
paper's comparison. peft keeps the adapters in fp32 when the model is bf16/fp16 (its
`autocast_adapter_dtype`), which is the master-weight handling LoRA's users get: the trainable weights
are full precision and need no separate master.
"""

from __future__ import annotations

from typing import List

from torch import Tensor, nn

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_MISSING = "LoRA and DoRA need peft: pip install misa-kernels[hf]"


class PeftMissing(ImportError):
    pass


def peft_available() -> bool:
    try:
        import peft  # noqa: F401
    except ImportError:
        return False
    return True


def attach_lora(model: nn.Module, r: int, alpha: float, dora: bool = False) -> List[Tensor]:
    """Injects LoRA (or DoRA) adapters into `model` in place, freezes everything else, and returns the
    adapter parameters (the only trainable ones)."""
    try:
        from peft import LoraConfig, inject_adapter_in_model
    except ImportError:
        raise PeftMissing(PEFT_MISSING) from None
    targets = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, m in model.named_modules()
            if isinstance(m, nn.Linear) and name.rsplit(".", 1)[-1] in PROJECTIONS
        }
    )
    if not targets:
        raise ValueError(f"model: no linear layer named {', '.join(PROJECTIONS)} to put adapters on")
    config = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, lora_dropout=0.0, use_dora=dora)
    for p in model.parameters():
        p.requires_grad_(False)
    inject_adapter_in_model(config, model)
    adapters = [p for name, p in model.named_parameters() if "lora_" in name]
    for p in adapters:
        p.requires_grad_(True)
        if p.dtype != p.float().dtype:  # low-precision model: fp32 adapters (peft's autocast_adapter_dtype)
            p.data = p.data.float()
    return adapters
