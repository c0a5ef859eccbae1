"""What a training method holds in memory beyond the frozen model, counted from the tensors themselves.

Comparing MISA with LoRA at equal memory needs the same ledger for every method: the trainable
parameters, the weights a method adds (LoRA/DoRA adapters), the gradients alive at the step, the
optimizer's Adam states and its fp32 master copies. `MemoryMeter` reads them at every step (gradients
just before `step()`, states just after it, when both coexist) and keeps the peak of their sum. On the
CPU this is the exact accounting; on a GPU the measured peak of the step comes beside it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, Iterable

import torch
from torch import Tensor, nn


def _nbytes(t: Tensor) -> int:
    return t.numel() * t.element_size()


@dataclass
class Accounted:
    trainable_params: int = 0
    adapter_bytes: int = 0  # weights the method adds to the model (LoRA/DoRA); 0 for MISA, LISA, BAdam, AdamW
    grad_bytes: int = 0
    state_bytes: int = 0  # Adam's first and second moments (and their step counters)
    master_bytes: int = 0  # fp32 master copies of low-precision weights

    @property
    def total_bytes(self) -> int:
        return self.adapter_bytes + self.grad_bytes + self.state_bytes + self.master_bytes

    def as_dict(self) -> Dict[str, int]:
        return {**asdict(self), "total_bytes": self.total_bytes}


def optimizer_bytes(opt: torch.optim.Optimizer) -> Dict[str, int]:
    """{"states": ..., "masters": ...}: what the optimizer holds. MISA says it itself (its arena is
    allocated up front for the largest active set); a torch optimizer holds the tensors in its state."""
    own = getattr(opt, "memory_bytes", None)
    if callable(own):
        return own()
    states = masters = 0
    for st in opt.state.values():
        for key, value in st.items():
            if torch.is_tensor(value):
                if key == "master":
                    masters += _nbytes(value)
                else:
                    states += _nbytes(value)
    return {"states": states, "masters": masters}


class MemoryMeter:
    """The peak, over steps, of adapters + gradients + optimizer states + masters (see the module doc).
    `base_params`: the parameters of the model before a method added any (adapters are the others)."""

    def __init__(self, model: nn.Module, base_params: Iterable[Tensor]):
        self.model = model
        base = {id(p) for p in base_params}
        self._adapters = [p for p in model.parameters() if id(p) not in base]
        self.peak = Accounted()
        self._grads = 0
        self._trainable = 0

    def before_step(self) -> None:
        params = list(self.model.parameters())
        self._grads = sum(_nbytes(p.grad) for p in params if p.grad is not None)
        self._trainable = sum(p.numel() for p in params if p.requires_grad)

    def after_step(self, opt: torch.optim.Optimizer) -> None:
        held = optimizer_bytes(opt)
        now = Accounted(trainable_params=self._trainable, adapter_bytes=sum(map(_nbytes, self._adapters)),
                        grad_bytes=self._grads, state_bytes=held["states"], master_bytes=held["masters"])
        if now.total_bytes > self.peak.total_bytes:
            self.peak = now
        self.peak.trainable_params = max(self.peak.trainable_params, now.trainable_params)


# ---------------------------------------------------------------- predicting a step's peak from a measured one
@dataclass(frozen=True)
class PeakInputs:
    """What a MISA configuration adds to a training step's memory beyond everything else (weights,
    activations, logits, workspace), all in bytes: its arena (states and masters, allocated up front for
    the largest active set) and the gradients alive at once (every active one, or under release_grads
    the largest single tensor's)."""
    arena_bytes: int
    grad_bytes: int


def peak_inputs(opt, grad_dtype: torch.dtype = torch.bfloat16) -> PeakInputs:
    """PeakInputs of a constructed MISA (construct it on the meta device to size a model that does not
    fit here): its arena's real size, and gradient bytes of the largest active set its budget allows."""
    size = torch.empty((), dtype=grad_dtype).element_size()
    if opt.release_grads:
        grads = max(p.numel() for m in opt.partition.modules for _, p in m.params) * size
    else:
        grads = int(opt.budget) * size
    return PeakInputs(arena_bytes=sum(opt.memory_bytes().values()), grad_bytes=grads)


def predict_peak(measured_peak: float, measured: PeakInputs, config: PeakInputs) -> float:
    """The peak of a configuration from the measured peak of another on the same model, sequence, batch
    and checkpointing: what differs between them is only the arena and the gradients alive at once."""
    return measured_peak - measured.arena_bytes - measured.grad_bytes + config.arena_bytes + config.grad_bytes
