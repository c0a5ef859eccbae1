"""Allocator churn over many switches: MISA's StateArena against allocating and freeing Adam states at
every switch (what BAdam does). Records reserved memory and switch time after each of 100 switches of
random LLaMA-shaped active sets.

    python benchmarks/bench_arena.py           # GPU (reserved memory is the CUDA caching allocator's)
    python benchmarks/bench_arena.py --quick   # CPU smoke run
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Dict, List

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from misa_kernels import StateArena  # noqa: E402

import common  # noqa: E402

LAYER = [(4096, 4096), (1024, 4096), (1024, 4096), (4096, 4096), (14336, 4096), (14336, 4096), (4096, 14336)]


def sample_sets(n_switches, n_layers, budget, seed, shapes):
    g = torch.Generator().manual_seed(seed)
    modules = [s for _ in range(n_layers) for s in shapes]
    out = []
    for _ in range(n_switches):
        chosen, used = [], 0
        for b in torch.randperm(len(modules), generator=g).tolist():
            n = modules[b][0] * modules[b][1]
            if used + n <= budget:
                chosen.append(b)
                used += n
        out.append([modules[b] for b in chosen])
    return out


def reserved(device) -> int:
    return torch.cuda.memory_reserved(device) if device.type == "cuda" else 0


def run(strategy: str, sets, budget, device) -> List[Dict]:
    rows = []
    arena = StateArena(2 * (budget + 64 * 64), device=device) if strategy == "arena" else None
    held = []
    for i, active in enumerate(sets):
        common.synchronize(device)
        t0 = time.perf_counter()
        if arena is not None:
            arena.reset()
            held = [arena.acquire((k, j), s) for j, s in enumerate(active) for k in ("m", "v")]
        else:
            held = None  # free the previous states, then allocate zeroed new ones (BAdam's switch)
            held = [torch.zeros(s, device=device) for s in active for _ in range(2)]
        common.synchronize(device)
        rows.append(
            {
                "switch": i,
                "ms": (time.perf_counter() - t0) * 1e3,
                "reserved_bytes": reserved(device),
                "state_bytes": sum(t.numel() * 4 for t in held),
            }
        )
    return rows


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--device", default=None)
    p.add_argument("--switches", type=int, default=100)
    p.add_argument("--delta", type=float, default=0.03)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = common.pick_device(args.device)
    shapes = [(64, 64), (16, 64), (16, 64), (64, 64), (224, 64), (224, 64), (64, 224)] if args.quick else LAYER
    n_layers = 4 if args.quick else 32
    total = n_layers * sum(r * c for r, c in shapes)
    budget = int(args.delta * total * (8 if args.quick else 1))
    sets = sample_sets(args.switches if not args.quick else 10, n_layers, budget, 0, shapes)
    rows = []
    for strategy in ("allocate_per_switch", "arena"):
        if device.type == "cuda":
            torch.cuda.empty_cache()
        per = run(strategy, sets, budget, device)
        ms = torch.tensor([r["ms"] for r in per[1:]] or [0.0])
        rows.append(
            {
                "bench": "arena_churn",
                "impl": strategy,
                "switches": len(per),
                "budget_numel": budget,
                "switch_ms_p50": float(ms.median()),
                "switch_ms_max": float(ms.max()),
                "reserved_first_bytes": per[0]["reserved_bytes"],
                "reserved_last_bytes": per[-1]["reserved_bytes"],
                "reserved_max_bytes": max(r["reserved_bytes"] for r in per),
                "reserved_per_switch": [r["reserved_bytes"] for r in per],
            }
        )
        print({k: v for k, v in rows[-1].items() if k != "reserved_per_switch"})
    return common.save(device, args.out, rows)


if __name__ == "__main__":
    main()
