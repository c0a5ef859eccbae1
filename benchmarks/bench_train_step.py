"""End-to-end training step: time and peak memory of a LLaMA-shaped model (random init from a
transformers config, bf16) for MISA with our kernels, MISA on the pure-torch path, full AdamW (fused),
LoRA r=16 (peft), BAdam-style block switching and LISA-style layer sampling.

Memory: the model is built directly in the training dtype on the device, and the peak counter is
reset after the build, so `peak_allocated_gb` is the training step's peak (weights, optimizer states
made at construction, activations, gradients), never the construction's. Time: every step is timed
on its own; steps that end an outer loop (flush, importance update, new active set) are reported
apart (`switch_ms_p50`) from the steady steps (`ms_p50`).

    python benchmarks/bench_train_step.py                       # GPU: 1B and 8B shapes, seq 512 and 2048
    python benchmarks/bench_train_step.py --shapes 8b --memory-cap-gb 24 --seqs 512,1024,2048,4096
                                                                # what fits on a 24 GB card (RTX 4090)
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
    "1b": dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "8b": dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        vocab_size=128256,
    ),
    "tiny": dict(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
    ),
}
METHODS = ("misa_kernels", "misa_torch", "adamw_fused", "lora_r16", "badam", "lisa")
# MISA with the compact state formats (README "State formats"); gpu_check.sh prints the memory planner's peak
# beside each measured one (benchmarks/plan_vs_measured.py).
FORMATS = {
    "misa_8bit": {"states": "8bit"},
    "misa_8bit_kahan": {"states": "8bit", "master_weights": "kahan"},
    "misa_8bit_sr": {"states": "8bit", "rounding": "stochastic"},
    "misa_8bit_kahan_release": {
        "states": "8bit",
        "master_weights": "kahan",
        "release_grads": True,
        "check_finite": False,
    },
    "misa_8bit_sr_release": {"states": "8bit", "rounding": "stochastic", "release_grads": True, "check_finite": False},
}


MEMORY_METHOD = "built in the training dtype on the device; peak counter reset after the build"


def build(shape: str, seq: int, device, dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], max_position_embeddings=max(seq, 128))
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # never an fp32 copy of the weights, even for a moment
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(previous)
    return model


def make_optimizer(method: str, model, delta: float, interval: int):
    if method in ("misa_kernels", "misa_torch"):
        return model, misa.MISA(
            model, lr=1e-5, delta=delta, interval=interval, backend="auto" if method == "misa_kernels" else "torch"
        )
    if method in FORMATS:
        return model, misa.MISA(model, lr=1e-5, delta=delta, interval=interval, **FORMATS[method])
    if method == "adamw_fused":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-5, fused=next(model.parameters()).is_cuda)
    if method == "lora_r16":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(
            model,
            LoraConfig(
                r=16,
                lora_alpha=32,
                target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
            ),
        )
        return model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    order = "ascending" if method == "badam" else "uniform"
    layer = max(sum(p.numel() for p in m.parameters()) for m in model.model.layers)
    total = sum(p.numel() for p in model.parameters())
    # one block at a time (BAdam), or two blocks (LISA's usual gamma=2)
    blocks = 1 if method == "badam" else 2
    return model, misa.MISA(
        model,
        lr=1e-5,
        delta=min(1.0, blocks * layer / total * 1.001),
        interval=interval,
        granularity="layer",
        order=order,
    )


def bench_name(args) -> str:
    # Capped runs are their own rows in the day's results file (write_rows replaces rows per bench).
    return "train_step" if args.memory_cap_gb is None else f"train_step_cap{args.memory_cap_gb:g}gb"


def measure(shape, seq, method, ckpt, args, device) -> Dict:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cuda":
        torch.cuda.empty_cache()
    model = build(shape, seq, device, dtype)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    if ckpt:
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x renamed it
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model, opt = make_optimizer(method, model, args.delta, args.interval)
    ids = torch.randint(0, SHAPES[shape]["vocab_size"], (args.batch, seq), device=device)
    switches = getattr(opt, "switch_log", None)
    switch_steps = []

    def step(i):
        before = len(switches) if switches is not None else 0
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if switches is not None and len(switches) != before and i >= args.warmup:
            switch_steps.append(i - args.warmup)

    times = common.time_each_ms(step, device, reps=args.steps, warmup=args.warmup)
    steady = [t for i, t in enumerate(times) if i not in switch_steps]
    switched = [times[i] for i in switch_steps]
    t = {
        **common.quantiles(steady),
        "steady_steps": len(steady),
        "switch_steps": len(switched),
        "switch_ms_p50": common.quantiles(switched)["ms_p50"] if switched else None,
    }
    mem = {}
    if device.type == "cuda":
        mem = {
            "peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 2**30,
            "peak_reserved_gb": torch.cuda.max_memory_reserved(device) / 2**30,
        }
    trainable = getattr(opt, "trainable_fraction", None)
    if trainable is None:
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) / sum(
            p.numel() for p in model.parameters()
        )
    masters = any("master" in st for st in getattr(opt, "state", {}).values())
    extra = {}
    if isinstance(opt, misa.MISA):
        extra = {
            "formats": opt.formats,
            "release_grads": opt.release_grads,
            "arena_bytes": sum(opt.memory_bytes().values()),
        }
    return {
        "bench": bench_name(args),
        "impl": method,
        "model": shape,
        "seq_len": seq,
        "batch": args.batch,
        "grad_checkpointing": ckpt,
        "param_dtype": "bf16" if dtype == torch.bfloat16 else "fp32",
        "trainable_fraction": trainable,
        "delta": args.delta if method.startswith("misa") else None,
        "interval": args.interval,
        "fp32_masters": masters,
        "memory_method": MEMORY_METHOD,
        "memory_cap_gb": args.memory_cap_gb,
        "oom": False,
        "tokens_per_s": args.batch * seq / (t["ms_p50"] * 1e-3),
        **t,
        **mem,
        **extra,
    }


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--shapes", default=None, help="comma list from 1b,8b,tiny")
    p.add_argument("--seqs", default=None, help="comma list of sequence lengths")
    p.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma list from {', '.join(METHODS + tuple(FORMATS))}"
    )
    p.add_argument("--delta", type=float, default=0.03)
    p.add_argument("--interval", type=int, default=10, help="steps per outer loop: the timed steps include switches")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--steps", type=int, default=None, help="timed steps (default 40: 36 steady, 4 switches)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--budget-s", type=float, default=240.0)
    p.add_argument(
        "--memory-cap-gb",
        type=float,
        default=None,
        help="cap this process's GPU memory (e.g. 24 for an RTX 4090) and record which runs fit",
    )
    p.add_argument("--no-checkpointing-runs", action="store_true", help="only runs with gradient checkpointing")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    if args.memory_cap_gb is not None:
        if device.type != "cuda":
            p.error("--memory-cap-gb needs a CUDA device")
        total = torch.cuda.get_device_properties(device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_cap_gb * 2**30 / total), device)
    shapes = (args.shapes or ("tiny" if args.quick else "1b,8b")).split(",")
    seqs = [int(s) for s in (args.seqs or ("32" if args.quick else "512,2048")).split(",")]
    args.steps = args.steps or (4 if args.quick else 40)
    if args.quick:
        args.interval = 2
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
            for ckpt in (True,) if args.no_checkpointing_runs else (False, True):
                for method in methods:
                    if time.monotonic() > deadline:
                        break
                    try:
                        r = measure(shape, seq, method, ckpt, args, device)
                    except torch.cuda.OutOfMemoryError:
                        r = {
                            "bench": bench_name(args),
                            "impl": method,
                            "model": shape,
                            "seq_len": seq,
                            "grad_checkpointing": ckpt,
                            "oom": True,
                            "memory_cap_gb": args.memory_cap_gb,
                            "memory_method": MEMORY_METHOD,
                        }
                    rows.append(r)
                    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
                    gc.collect()
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
    return common.save(device, args.out, rows)


if __name__ == "__main__":
    main()
