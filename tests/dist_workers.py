"""Worker processes for tests/test_distributed.py (importable by torch.multiprocessing's spawn)."""

import gc
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F

import misa
from misa import distributed as mdist

from models import tiny_lm

HYPER = dict(lr=5e-3, weight_decay=0.01, delta=0.15, interval=3, seed=5, backend="torch", variant="paper")
STEPS, SAVE_AT, GLOBAL_BATCH = 10, 4, 4


def global_batch(step):
    return torch.randint(0, 32, (GLOBAL_BATCH, 9), generator=torch.Generator().manual_seed(100 + step))


def lm_loss(forward, ids):
    logits = forward(ids[:, :-1])
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def _dtype(kind):
    # "ddp-bf16" / "fsdp2-bf16": a bf16 model, so MISA keeps fp32 masters (of local shards under FSDP2)
    return torch.bfloat16 if "-bf16" in kind else torch.float32


def _compact(kind) -> bool:
    # "...-8bit": 8-bit states and a Kahan compensation, on a model wide enough that every shard of a module
    # holds at least 4096 elements (smaller tensors keep fp32 states)
    return kind.endswith("-8bit")


def _model(kind):
    return tiny_lm(seed=0, dtype=_dtype(kind), **({"d": 128, "ff": 128} if _compact(kind) else {}))


def _hyper(kind):
    return {**HYPER, **({"states": "8bit", "master_weights": "kahan"} if _compact(kind) else {})}


def single_process_run(steps=STEPS, checkpoint=None, start=0, kind="ddp"):
    """The reference: one process, the concatenated batch (optionally resumed from a DCP checkpoint)."""
    model = _model(kind)
    opt = misa.MISA(model, **_hyper(kind))
    if checkpoint is not None:
        mdist.load_checkpoint(checkpoint, model, opt)
    for step in range(start, steps):
        lm_loss(model, global_batch(step)).backward()
        opt.step()
        opt.zero_grad()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, opt.active_modules


def _setup(kind, rank, world):
    model = _model(kind)
    if kind.startswith("fsdp2"):
        from torch.distributed.fsdp import fully_shard

        for layer in model.layers:
            fully_shard(layer)
        fully_shard(model)
    opt = misa.MISA(model, **_hyper(kind))
    if kind.startswith("ddp"):
        wrapped = mdist.DistributedDataParallel(model, opt)
    else:
        mdist.prepare(opt)
        wrapped = model
    return model, opt, wrapped


def _train(kind, rank, world, model, opt, wrapped, start, stop, report):
    for step in range(start, stop):
        local = global_batch(step)[rank::world]
        lm_loss(wrapped, local).backward()
        active = set(opt.active_modules)
        for m in opt.partition.modules:
            if m.name not in active:
                for name, p in m.params:
                    if p.grad is not None:
                        report["frozen_with_grad"].append(name)
        opt.step()
        opt.zero_grad()
        report["active_per_step"].append(list(opt.active_modules))


def _full(model):
    out = {}
    for n, p in model.named_parameters():
        t = p.full_tensor() if hasattr(p, "full_tensor") else p
        out[n] = t.detach().clone()
    return out


def worker(rank, world, init_file, out_dir, kind):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    report = {"frozen_with_grad": [], "active_per_step": []}
    # A: uninterrupted
    model, opt, wrapped = _setup(kind, rank, world)
    _train(kind, rank, world, model, opt, wrapped, 0, STEPS, report)
    report["params"] = _full(model)
    report["active"] = opt.active_modules
    report["switches"] = len(opt.switch_log)
    report["rebuilds"] = getattr(wrapped, "rebuilds", None)
    report["has_masters"] = any("master" in st for st in opt.state.values())
    report["has_8bit"] = any("exp_avg_absmax" in st for st in opt.state.values())
    report["has_compensation"] = any("compensation" in st for st in opt.state.values())
    # B: stop mid-period at SAVE_AT, checkpoint, resume into fresh objects, finish
    resumed = {"frozen_with_grad": [], "active_per_step": []}
    model, opt, wrapped = _setup(kind, rank, world)
    _train(kind, rank, world, model, opt, wrapped, 0, SAVE_AT, resumed)
    assert opt.steps_in_period != 0, "the checkpoint is meant to be mid-period"
    mdist.save_checkpoint(os.path.join(out_dir, "ckpt"), model, opt)
    del model, opt, wrapped
    model, opt, wrapped = _setup(kind, rank, world)
    mdist.load_checkpoint(os.path.join(out_dir, "ckpt"), model, opt)
    _train(kind, rank, world, model, opt, wrapped, SAVE_AT, STEPS, resumed)
    report["resumed_params"] = _full(model)
    report["resumed_active"] = opt.active_modules
    # DDP's reducer must go before the process group does (gloo aborts the process otherwise)
    del model, opt, wrapped
    gc.collect()
    # C: a rank with another seed must be caught at the first switch
    model = tiny_lm(seed=0)
    opt = misa.MISA(model, **{**HYPER, "seed": HYPER["seed"] + rank, "order": "uniform"})
    try:
        mdist.prepare(opt)
        report["mismatch_error"] = None
    except mdist.ActiveSetMismatch as exc:
        report["mismatch_error"] = str(exc)
    torch.save(report, os.path.join(out_dir, f"report{rank}.pt"))
    del model, opt
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()
