"""How far do bf16 weights get under MISA in each state format, against fp32 AdamW on the same gradients?

One bf16 weight (256 x 256, init std 0.02) trained for one MISA period of 50 steps at several learning
rates, in every format: fp32 states with the fp32 master weights (default), a Kahan compensation, or
stochastic rounding; the same three with 8-bit states; and the old in-place bf16 update
(master_weights=False). Gradients keep a direction across steps (a fixed
component plus fresh noise), as fine-tuning gradients do. Per row: the distance moved relative to
fp32 AdamW's, the error (||w - w_fp32|| over the distance fp32 AdamW moved), the fraction of entries
that never changed, that fraction for fp32 AdamW's result rounded to bf16 (the floor), and the
optimizer-state bytes per active element (m, v, master or compensation), as MISA itself reports them.

    python benchmarks/bench_master_weights.py           # seconds, any device
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import misa  # noqa: E402

import common  # noqa: E402

METHODS = {  # name -> MISA keyword arguments
    "master_fp32": dict(),
    "kahan": dict(master_weights="kahan"),
    "stochastic": dict(rounding="stochastic"),
    "8bit_master_fp32": dict(states="8bit"),
    "8bit_kahan": dict(states="8bit", master_weights="kahan"),
    "8bit_stochastic": dict(states="8bit", rounding="stochastic"),
    "bf16_in_place": dict(master_weights=False),
}


def run(method: str, lr: float, device, size: int, steps: int, seed: int) -> Dict:
    torch.manual_seed(seed)
    weight = torch.empty(size, size).normal_(std=0.02).to(device=device, dtype=torch.bfloat16)
    model = torch.nn.Sequential(torch.nn.Linear(size, size, bias=False)).to(device)
    model[0].weight = torch.nn.Parameter(weight.clone())
    w0 = weight.clone()
    reference = torch.nn.Parameter(w0.float().clone())
    adamw = torch.optim.AdamW([reference], lr=lr, weight_decay=0.0)
    opt = misa.MISA(model, lr=lr, delta=1.0, interval=steps + 1, variant="paper", check_finite=False, **METHODS[method])
    gen = torch.Generator().manual_seed(seed + 1)
    direction = torch.randn(size, size, generator=gen)
    for _ in range(steps):
        g = ((0.5 * direction + torch.randn(size, size, generator=gen)) * 1e-3).to(device, torch.bfloat16)
        model[0].weight.grad = g
        reference.grad = g.float()
        opt.step()
        adamw.step()
        opt.zero_grad()
    w, ref = model[0].weight.detach(), reference.detach()
    moved = float((ref - w0.float()).norm())
    return {
        "bench": "master_weights",
        "impl": method,
        "lr": lr,
        "steps": steps,
        "numel": size * size,
        "param_dtype": "bf16",
        "moved_vs_fp32": float((w.float() - w0.float()).norm()) / moved,
        "error_vs_fp32": float((w.float() - ref).norm()) / moved,
        "unchanged": float((w == w0).float().mean()),
        "fp32_rounded_unchanged": float((ref.to(torch.bfloat16) == w0).float().mean()),
        "fp32_rounded_error": float((ref.to(torch.bfloat16).float() - ref).norm()) / moved,
        "state_bytes_per_element": opt.formats["bytes_per_element"],
        "formats": opt.formats,
        "backend": misa_kernels_backend(),
    }


def misa_kernels_backend() -> str:
    import misa_kernels

    return misa_kernels.last_backend() or "?"


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default=None)
    p.add_argument("--lrs", default="1e-6,1e-5,5e-5,1e-4")
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    rows: List[Dict] = []
    for lr in [float(x) for x in args.lrs.split(",")]:
        for method in METHODS:
            r = run(method, lr, device, args.size, args.steps, args.seed)
            rows.append(r)
            print(
                f"lr {lr:8.1e} {method:16s} moved {r['moved_vs_fp32']:.3f}  error {r['error_vs_fp32']:.3f}  "
                f"unchanged {r['unchanged']:.3f} (fp32 rounded: {r['fp32_rounded_unchanged']:.3f})"
            )
    return common.save(
        device, args.out, rows, {"master_weights_setup": {"size": args.size, "steps": args.steps, "seed": args.seed}}
    )


if __name__ == "__main__":
    main()
