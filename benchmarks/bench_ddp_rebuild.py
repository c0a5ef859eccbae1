"""What MISA under DDP costs: step time with the reducer rebuilt at each switch (ours) against torch's
DDP built once over the whole model with find_unused_parameters=True, and the time of one rebuild.
Real process groups: 2 processes, gloo on loopback on a CPU machine (nccl on a GPU machine).

    python benchmarks/bench_ddp_rebuild.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import common  # noqa: E402


def worker(rank, world, init_file, out_file, size, steps, interval, delta, strategy):
    import misa
    from misa import distributed as mdist
    from misa.jobs.model import SIZES, LlamaForCausalLM

    use_cuda = torch.cuda.is_available() and torch.cuda.device_count() >= world
    device = torch.device("cuda", rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if use_cuda else "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(SIZES[size]).to(device)
    kwargs = dict(lr=1e-3, delta=delta, interval=interval, seed=0, include_embedding=True, include_lm_head=True)
    error = None
    if strategy == "misa_rebuild":
        opt = misa.MISA(model, **kwargs)
        wrapped = mdist.DistributedDataParallel(model, opt, device_ids=[rank] if use_cuda else None)
    else:  # torch's DDP over every parameter, built before MISA freezes most of them
        wrapped = torch.nn.parallel.DistributedDataParallel(
            model, find_unused_parameters=True, device_ids=[rank] if use_cuda else None
        )
        opt = misa.MISA(model, **kwargs)
    times = []
    g = torch.Generator().manual_seed(rank)
    try:
        for _ in range(steps):
            ids = torch.randint(0, 256, (4, 129), generator=g).to(device)
            common.synchronize(device)
            t0 = time.perf_counter()
            logits = wrapped(ids[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).backward()
            opt.step()
            opt.zero_grad()
            common.synchronize(device)
            times.append(time.perf_counter() - t0)
    except Exception as exc:  # record what happens rather than hide it
        error = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
    reduced = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if rank == 0:
        torch.save(
            {
                "times": times,
                "error": error,
                "rebuild_seconds": getattr(wrapped, "rebuild_seconds", []),
                "params": sum(p.numel() for p in model.parameters()),
                "active_params": reduced,
                "device": str(device),
            },
            out_file,
        )
    dist.destroy_process_group()


def main(argv=None) -> Path:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--size", default=None)
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--interval", type=int, default=5)
    p.add_argument("--delta", type=float, default=0.25)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    size = args.size or ("tiny" if args.quick else "small")
    steps = args.steps or (6 if args.quick else 40)
    rows = []
    for strategy in ("misa_rebuild", "ddp_find_unused_full_model"):
        with tempfile.TemporaryDirectory() as tmp:
            out_file = os.path.join(tmp, "result.pt")
            mp.start_processes(
                worker,
                args=(2, os.path.join(tmp, "init"), out_file, size, steps, args.interval, args.delta, strategy),
                nprocs=2,
                start_method="spawn",
            )
            r = torch.load(out_file, weights_only=False)
        t = torch.tensor(r["times"][2:] or [float("nan")], dtype=torch.float64)
        rows.append(
            {
                "bench": "ddp_step",
                "impl": strategy,
                "model": size,
                "world_size": 2,
                "steps": len(r["times"]),
                "interval": args.interval,
                "delta": args.delta,
                "step_ms_p50": float(t.median() * 1e3),
                "step_ms_mean": float(t.mean() * 1e3),
                "active_params_last": r["active_params"],
                "rebuild_ms_p50": float(torch.tensor(r["rebuild_seconds"][1:] or [float("nan")]).median() * 1e3),
                "rebuilds": len(r["rebuild_seconds"]),
                "params": r["params"],
                "error": r["error"],
                "process_device": r["device"],
            }
        )
        print(rows[-1], flush=True)
    device = torch.device(rows[0]["process_device"].split(":")[0])
    return common.save(device, args.out, rows)


if __name__ == "__main__":
    main()
