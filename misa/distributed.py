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
import io
import time
import weakref
from typing import List, Optional

import torch
import torch.distributed as dist
from torch import nn

from misa_kernels import quant

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
    if opt.release_grads:
        raise ValueError(
            "misa.distributed.prepare: MISA(release_grads=True) updates a tensor in a hook as soon as "
            "its local gradient exists, before DDP or FSDP2 reduce it over ranks: construct it without "
            "release_grads"
        )
    if opt.cuda_graph:
        raise ValueError(
            "misa.distributed.prepare: MISA(cuda_graph=True) records single-process steps; construct it "
            "without cuda_graph under torch.distributed"
        )
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
                    f"ranks disagree on the active modules at step {opt.period.step_count}: "
                    f"rank 0 has {names(gathered[0])}, "
                    f"rank {rank} has {names(other)}; give every rank the same MISA seed"
                )

    # torch's fake process group (the memory planner's, misa/jobs/plan.py) moves no data: nothing to agree on
    if dist.get_backend(group) != "fake":
        opt._check_active_set = check
        check(opt.active_set.indices)
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
# torch.distributed.checkpoint (DCP) writes the model and the Adam states of the active modules as
# sharded tensors (DTensors under FSDP2, replicated tensors under DDP), so a checkpoint can be read back
# with another sharding; the rest of MISA's state (sampler, RNG, active set, counters), identical on
# every rank, travels as one torch.save blob. Loading is two-phase: the blob first, which selects the
# saved active set and acquires its state buffers; then DCP reads the states straight into them.

_META = "misa_schedule"


def _as_saved(tensor: torch.Tensor, param) -> torch.Tensor:
    if hasattr(param, "device_mesh"):  # FSDP2: this rank's shard of a global tensor shaped like param
        from torch.distributed.tensor import DTensor

        return DTensor.from_local(
            tensor.view(param.to_local().shape),
            param.device_mesh,
            param.placements,
            run_check=False,
            shape=param.shape,
            stride=param.stride(),
        )
    return tensor.view(param.shape)


_SCALES = {"exp_avg": ("exp_avg_absmax", 0), "exp_avg_sq": ("exp_avg_sq_absmax", 1)}
_VALUES = ("master", "compensation")


def _state_tensors(optimizer: MISA, indices, saved=None):
    """The DCP entries of the active states and a function that finishes a load (`saved`: the names the
    checkpoint holds; None when saving).

    Every state is saved shaped like its parameter (a DTensor of this rank's shard under FSDP2), so any
    sharding reads it back: m and v as fp32 whatever their format, 8-bit ones dequantized; the fp32 master
    or the Kahan compensation as they are. Unsharded (DDP, one process) 8-bit states are saved exactly as
    well (codes and scales), and a run in the same format resumes from them bit for bit; otherwise the fp32
    values are requantized (exact up to one requantization), and a master and a compensation convert into
    each other (master = weight + compensation)."""
    out, after = {}, []
    maps = quant.maps(optimizer.device)
    for i in indices:
        p = optimizer.param_by_index(i)
        st, entry, name = optimizer.state[p], {}, f"optimizer.{i}."
        exact = not hasattr(p, "device_mesh")
        for key, (scale_key, which) in _SCALES.items():
            if scale_key not in st:
                entry[key] = _as_saved(st[key], p)  # fp32 states
                continue
            if saved is None:
                entry[key] = _as_saved(quant.dequantize(st[key], st[scale_key], maps[which]), p)
                if exact:
                    entry[key + "_codes"], entry[scale_key] = _as_saved(st[key], p), st[scale_key]
            elif exact and name + key + "_codes" in saved:
                entry[key + "_codes"], entry[scale_key] = _as_saved(st[key], p), st[scale_key]
            else:
                values = torch.empty(st[key].shape, dtype=torch.float32, device=st[key].device)
                entry[key] = _as_saved(values, p)
                after.append(
                    lambda st=st, key=key, scale_key=scale_key, q=maps[which], v=values: _requantize(
                        st, key, scale_key, q, v
                    )
                )
        for key in _VALUES:
            if key not in st:
                continue
            other = _VALUES[1 - _VALUES.index(key)]
            if saved is None or name + key in saved:
                entry[key] = _as_saved(st[key], p)
            elif name + other in saved:
                value = torch.empty(
                    st[key].shape, dtype=torch.float32 if other == "master" else torch.bfloat16, device=st[key].device
                )
                entry[other] = _as_saved(value, p)
                after.append(lambda st=st, key=key, p=p, v=value: _convert_value(st, key, _local_of(p), v))
            else:  # saved without either: start from the weight, as an activation does
                after.append(lambda st=st, key=key, p=p: _convert_value(st, key, _local_of(p), None))
        out[str(i)] = entry

    def finish() -> None:
        for step in after:
            step()

    return out, finish


def _local_of(p):
    return p.to_local() if hasattr(p, "to_local") else p


def _requantize(st, key, scale_key, qmap, values) -> None:
    codes, scales = quant.quantize(values, qmap)
    st[key].copy_(codes.view(st[key].shape))
    st[scale_key].copy_(scales)


def _convert_value(st, key, weight, saved) -> None:
    w = weight.detach().float().reshape(-1)
    if key == "master":
        value = w if saved is None else w + saved.float().reshape(-1)
    else:
        value = torch.zeros_like(w) if saved is None else saved.float().reshape(-1) - w
    st[key].copy_(value.view(st[key].shape))


def save_checkpoint(path, model: nn.Module, optimizer: MISA) -> None:
    """Save model and optimizer with torch.distributed.checkpoint (call on every rank)."""
    import torch.distributed.checkpoint as dcp

    sd = optimizer.state_dict()
    states = sd.pop("state")
    sd["steps"] = {int(i): int(st["step"]) for i, st in states.items()}
    blob = io.BytesIO()
    torch.save(sd, blob)
    blob.seek(0)
    dcp.save(
        {"model": model.state_dict(), "optimizer": _state_tensors(optimizer, sd["steps"])[0], _META: blob},
        checkpoint_id=str(path),
    )


def load_checkpoint(path, model: nn.Module, optimizer: MISA) -> None:
    """Resume model and optimizer from `save_checkpoint` (call on every rank; the sharding may differ)."""
    import torch.distributed.checkpoint as dcp

    holder = {_META: io.BytesIO()}
    dcp.load(holder, checkpoint_id=str(path))
    sd = holder[_META]
    if isinstance(sd, io.BytesIO):  # older DCP versions hand back the raw bytes
        sd.seek(0)
        sd = torch.load(sd, map_location="cpu", weights_only=False)
    model_sd = model.state_dict()
    dcp.load({"model": model_sd}, checkpoint_id=str(path))
    model.load_state_dict(model_sd)
    optimizer.load_schedule(sd)
    steps = sd["steps"]
    saved = set(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    targets, finish = _state_tensors(optimizer, steps, saved)
    dcp.load({"optimizer": targets}, checkpoint_id=str(path))  # into the arena views, or fp32 to requantize
    finish()
    for i, step in steps.items():
        optimizer.state[optimizer.param_by_index(int(i))]["step"] = int(step)
