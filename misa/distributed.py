"""MISA with PyTorch's own distributed engines: DDP and FSDP2 (`fully_shard`).

DDP's reducer registers hooks for the parameters that need a gradient when it is built, and
allocates bucket buffers for all of them: a DDP built over the whole model would allreduce (and
hold) gradients for every frozen module too. `DistributedDataParallel` here is torch's DDP over the
active modules only, rebuilt after every switch (no re-broadcast: `init_sync=False`, the ranks already
agree). Frozen modules therefore never take part in the reduction and hold no gradient anywhere.

With FSDP2 each rank's fused kernel runs on its local shards; `prepare(opt)` makes the optimizer sum
the per-tensor squared norms across ranks (one small all-reduce per step) before they enter the
importance estimate, so every rank holds the same G and samples the same modules.

On both, `prepare` checks at every switch that all ranks chose the same active set, and raises on a
mismatch instead of letting ranks silently train different modules.
"""

from __future__ import annotations

import gc
import os
import time
import weakref
from pathlib import Path
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from .optimizer import MISA


class ActiveSetMismatch(RuntimeError):
    """Ranks sampled different active modules (different seeds or diverged statistics)."""


def _is_sharded(opt: MISA) -> bool:
    return any(hasattr(p, "device_mesh") for g in opt.param_groups for p in g["params"])


def _comm_device(group) -> torch.device:
    backend = dist.get_backend(group)
    return torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")


def prepare(opt: MISA, group: Optional[dist.ProcessGroup] = None) -> MISA:
    """Make `opt` safe under a process group: agreement check at every switch, and (FSDP2) norms summed
    over shards. Call it once, right after building the optimizer, on every rank."""
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("misa.distributed.prepare: torch.distributed is not initialised")
    device = _comm_device(group)

    def check(active: List[int]) -> None:
        mask = torch.zeros(len(opt.module_names), dtype=torch.int32, device=device)
        mask[active] = 1
        gathered = [torch.empty_like(mask) for _ in range(dist.get_world_size(group))]
        dist.all_gather(gathered, mask, group=group)
        for rank, other in enumerate(gathered):
            if not torch.equal(other, gathered[0]):
                names = lambda m: [opt.module_names[i] for i in torch.nonzero(m).flatten().tolist()]  # noqa: E731
                raise ActiveSetMismatch(
                    f"ranks disagree on the active modules at step {opt._step_count}: rank 0 has {names(gathered[0])}, "
                    f"rank {rank} has {names(other)}; give every rank the same MISA seed")

    opt._check_active_set = check
    check(opt._active)
    if _is_sharded(opt):
        def reduce(sq: torch.Tensor) -> None:
            if sq.device == device:
                dist.all_reduce(sq, op=dist.ReduceOp.SUM, group=group)
            else:
                buf = sq.to(device)
                dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=group)
                sq.copy_(buf)

        opt._reduce_sq_norms = reduce
    return opt


class DistributedDataParallel(nn.Module):
    """torch.nn.parallel.DistributedDataParallel over MISA's active modules, rebuilt at each switch.

        opt = misa.MISA(model, ...)                      # same seed on every rank
        ddp = misa.distributed.DistributedDataParallel(model, opt, device_ids=[local_rank])
        loss = loss_fn(ddp(batch)); loss.backward(); opt.step(); opt.zero_grad()

    Keyword arguments go to torch's DDP. `rebuilds` counts the reducers built so far and
    `rebuild_seconds` holds how long each build took.
    """

    def __init__(self, module: nn.Module, optimizer: MISA, **ddp_kwargs):
        super().__init__()
        self.module = module
        self._ddp_kwargs = dict(ddp_kwargs)
        self._ddp_kwargs.setdefault("init_sync", False)
        self.ddp: Optional[nn.parallel.DistributedDataParallel] = None
        self.rebuilds = 0
        self.rebuild_seconds: List[float] = []
        if optimizer._check_active_set is None:
            prepare(optimizer, self._ddp_kwargs.get("process_group"))
        self._rebuild(optimizer)
        optimizer.register_switch_hook(self._rebuild)

    def _rebuild(self, optimizer: MISA) -> None:
        start = time.perf_counter()
        if self.ddp is not None:
            # The old reducer's autograd hooks go away with it. Reference counting frees it at once; a
            # full collection (~100 ms) runs only if something still holds it in a cycle.
            old = weakref.ref(self.ddp)
            self.ddp = None
            if old() is not None:
                gc.collect()
        self.ddp = nn.parallel.DistributedDataParallel(self.module, **self._ddp_kwargs)
        self.rebuilds += 1
        self.rebuild_seconds.append(time.perf_counter() - start)

    def forward(self, *args, **kwargs):
        return self.ddp(*args, **kwargs)

    def no_sync(self):
        return self.ddp.no_sync()


# ---------------------------------------------------------------------------------------- checkpoints
def _local_state(tensors: dict) -> dict:
    return {k: (v.to_local().clone() if hasattr(v, "to_local") else v) for k, v in tensors.items()}


def save_checkpoint(path, model: nn.Module, optimizer: MISA) -> None:
    """Every rank writes its own file (rank<r>.pt): its shard of the model (FSDP2) or the replicated
    model (DDP), and the optimizer's state for its local shards. Resume with the same world size."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    blob = {"model": _local_state(model.state_dict()), "optimizer": optimizer.state_dict(),
            "world_size": dist.get_world_size() if dist.is_initialized() else 1}
    tmp = path / f"rank{rank}.pt.tmp"
    torch.save(blob, tmp)
    os.replace(tmp, path / f"rank{rank}.pt")
    if dist.is_initialized():
        dist.barrier()


def load_checkpoint(path, model: nn.Module, optimizer: MISA) -> None:
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    blob = torch.load(Path(path) / f"rank{rank}.pt", map_location="cpu", weights_only=False)
    if blob["world_size"] != world:
        raise ValueError(f"checkpoint {path}: saved with world size {blob['world_size']}, loading with {world}")
    with torch.no_grad():
        for name, value in model.state_dict().items():
            target = value.to_local() if hasattr(value, "to_local") else value
            target.copy_(blob["model"][name])
    optimizer.load_state_dict(blob["optimizer"])
