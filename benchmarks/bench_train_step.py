"""End-to-end training step: time and peak memory of a LLaMA-shaped model (random init from a
transformers config, bf16) for MISA with our kernels, MISA on the pure-torch path, full AdamW (fused),
LoRA r=16 (peft), BAdam-style block switching and LISA-style layer sampling.

    python benchmarks/bench_train_step.py                       # GPU: 1B and 8B shapes, seq 512 and 2048
    python benchmarks/bench_train_step.py --quick               # CPU smoke run on a tiny config
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import misa  # noqa: E402

import common  # noqa: E402

SHAPES = {  # LLaMA-3.2-1B and LLaMA-3-8B
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256),
}
METHODS = ("misa_kernels", "misa_torch", "adamw_fused", "lora_r16", "badam", "lisa")


def build(shape: str, seq: int, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 128))
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(dtype)
    return model


def make_optimizer(method: str, model, delta: float, interval: int):
    if method in ("misa_kernels", "misa_torch"):
        return model, misa.MISA(model, lr=1e-5, delta=delta, interval=interval,
                                backend="auto" if method == "misa_kernels" else "torch")
    if method == "adamw_fused":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=next(model.parameters()).is_cuda)
    if method == "lora_r16":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    order = "ascending" if method == "badam" else "uniform"
    layer = max(sum(p.numel() for p in m.parameters()) for m in model.model.layers)
    total = sum(p.numel() for p in model.parameters())
    # one block at a time (BAdam), or two blocks (LISA's usual gamma=2)
    blocks = 1 if method == "badam" else 2
    return model, misa.MISA(model, lr=1e-5, delta=min(1.0, blocks * layer / total * 1.001), interval=interval,
                            granularity="layer", order=order)


def measure(shape, seq, method, ckpt, args, device) -> Dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    model = build(shape, seq, device, dtype)
    if ckpt:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, opt = make_optimizer(method, model, args.delta, args.interval)
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (args.batch, seq), device=device)

    def step(i):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    t = common.time_ms(step, device, reps=args.steps, warmup=args.warmup)
    mem = {}
    if device.type == "cuda":
        mem = {"peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
               "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30}
    trainable = getattr(opt, "trainable_fraction", None)
    if trainable is None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / sum(
            p.numel() for p in model.parameters())
    return {"bench": "train_step", "impl": method, "model": shape, "seq_len": seq, "batch": args.batch,
            "grad_checkpointing": ckpt, "param_dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
            "trainable_fraction": trainable, "delta": args.delta if method.startswith("misa") else None,
            "tokens_per_s": args.batch * seq / (t["ms_p50"] * 1e-3), **t, **mem}


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--shapes", default=None, help="comma list from 1b,8b,tiny")
    p.add_argument("--seqs", default=None, help="comma list of sequence lengths")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--delta", type=float, default=0.03)
    p.add_argument("--interval", type=int, default=5, help="small, so that the timed steps include switches")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--budget-s", type=float, default=240.0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    shapes = (args.shapes or ("tiny" if args.quick else "1b,8b")).split(",")
    seqs = [int(s) for s in (args.seqs or ("32" if args.quick else "512,2048")).split(",")]
    args.steps = args.steps or (2 if args.quick else 10)
    if args.quick:
        args.delta = 0.3
    methods = [m for m in args.methods.split(",") if m]
    try:
        import peft  # noqa: F401
    except ImportError:
        methods = [m for m in methods if m != "lora_r16"]
    rows: List[Dict] = []
    deadline = time.monotonic() + args.budget_s
    for shape in shapes:
        for seq in seqs:
            for ckpt in (False, True):
                for method in methods:
                    if time.monotonic() > deadline:
                        break
                    try:
                        r = measure(shape, seq, method, ckpt, args, device)
                    except torch.cuda.OutOfMemoryError:
                        r = {"bench": "train_step", "impl": method, "model": shape, "seq_len": seq,
                             "grad_checkpointing": ckpt, "oom": True}
                    rows.append(r)
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
                    gc.collect()
    return common.save(device, args.out, rows)


if __name__ == "__main__":
    main()
