"""The active set's memory, as three objects that MISA holds and that can be built without it:

    StateFormats  what an active tensor keeps beside its weight (fp32 or 8-bit Adam states, an fp32 master or
                  a bf16 compensation) and what that costs per element
    Capacity      the arena's size for any budget: a pure function of the modules, the tensors trained at every
                  step and the formats, so that the meter, the planner and --equal-memory compute a bound
                  without building an optimizer (misa.bytes_at)
    ActiveSet     the StateArena with every active tensor's states as typed views, the active modules and the
                  slots that number their tensors for the fused step

Everything a CUDA graph would capture lives in the ActiveSet: the views keep their addresses for as long as
the set is active.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from misa_kernels import StateArena, quant
from misa_kernels.arena import ALIGN_ELEMENTS

STATE_FORMATS = ("fp32", "8bit")


def _local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (FSDP2), or the tensor itself: kernels run on local data."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class StateFormats:
    """states: "fp32" or "8bit" (blockwise codes for tensors of at least quant.MIN_NUMEL elements);
    masters: None, "fp32" or "kahan", kept for low-precision tensors only; low_precision: whether the
    optimizer has any bf16/fp16 tensor (what the per-element cost reports)."""

    states: str = "fp32"
    masters: Optional[str] = None
    low_precision: bool = False

    def is_8bit(self, p: Tensor) -> bool:
        return self.states == "8bit" and _local(p).numel() >= quant.MIN_NUMEL

    def has_master(self, p: Tensor) -> bool:
        return self.masters is not None and _local(p).dtype != torch.float32

    @property
    def master_bytes(self) -> int:
        return {"fp32": 4, "kahan": 2}.get(self.masters, 0) if self.low_precision else 0

    def bytes_per_element(self, large: bool = True) -> float:
        """Bytes an active element costs: states plus master (a tensor below quant.MIN_NUMEL: fp32 states)."""
        states = quant.BYTES_PER_ELEMENT if (large and self.states == "8bit") else 8.0
        return states + self.master_bytes

    def layout(self, p: Tensor, numel: Optional[int] = None) -> Dict[str, Tuple[object, torch.dtype]]:
        """{state key: (shape or element count, dtype)} of an active parameter in these formats."""
        shape = _local(p).shape if numel is None else numel
        n = _local(p).numel() if numel is None else numel
        if self.is_8bit(p):
            layout = {
                "exp_avg": (shape, quant.CODE_DTYPE),
                "exp_avg_sq": (shape, quant.CODE_DTYPE),
                "exp_avg_absmax": (quant.n_blocks(n), torch.float32),
                "exp_avg_sq_absmax": (quant.n_blocks(n), torch.float32),
            }
        else:
            layout = {"exp_avg": (shape, torch.float32), "exp_avg_sq": (shape, torch.float32)}
        if self.has_master(p):
            if self.masters == "kahan":
                layout["compensation"] = (shape, torch.bfloat16)
            else:
                layout["master"] = (shape, torch.float32)
        return layout

    def arena_bytes(self, p: Tensor) -> int:
        """Bytes the arena gives parameter `p` when it is active (alignment included)."""
        layout = self.layout(p, _local(p).numel()).values()
        return 4 * StateArena.required_numel([(n * _itemsize(dtype) + 3) // 4 for n, dtype in layout])


@dataclass(frozen=True)
class Capacity:
    """The arena an active set of at most `budget` global elements needs, for any budget: every active set
    holds at most `budget` global elements (a shard at most the largest local/global ratio of them); each
    large tensor costs its formats' bytes per element, and every block may waste up to one alignment unit.
    Tensors below quant.MIN_NUMEL keep fp32 states: all of them are counted in full (few and small), so the
    bound holds whichever are active. `fixed` is what does not depend on the budget."""

    ratio: float
    large: float
    fixed: float
    masters_share: float  # of the arena's bytes: the masters' (or compensations')
    total_params: int
    itemsize: int  # of the widest trained tensor: its gradient's bytes per element
    always_numel: int
    smallest_module: int  # elements: below its fraction of total_params no module fits a budget

    @classmethod
    def of(
        cls, formats: StateFormats, modules: Sequence[Sequence[Tensor]], always: Sequence[Tensor], total_params: int
    ):
        """`modules`: each module's tensors; `always`: the tensors trained at every step."""
        numels = [sum(p.numel() for p in m) for m in modules]
        ratio = max(sum(_local(p).numel() for p in m) / max(n, 1) for m, n in zip(modules, numels))
        module_tensors = [p for m in modules for p in m]
        large = formats.bytes_per_element(large=True)
        small = sum(_local(p).numel() for p in module_tensors if formats.states == "8bit" and not formats.is_8bit(p))
        n_blocks = max((len(formats.layout(p, 1)) for p in module_tensors + list(always)), default=0)
        fixed = (
            small * (formats.bytes_per_element(large=False) - large)
            + ALIGN_ELEMENTS * 4 * n_blocks * len(module_tensors)
            + sum(formats.arena_bytes(p) for p in always)
        )
        itemsize = max((_itemsize(_local(p).dtype) for p in module_tensors + list(always)), default=4)
        return cls(
            ratio=ratio,
            large=large,
            fixed=fixed,
            masters_share=formats.master_bytes / large if large else 0.0,
            total_params=total_params,
            itemsize=itemsize,
            always_numel=sum(_local(p).numel() for p in always),
            smallest_module=min(numels, default=0),
        )

    def arena_numel(self, budget: float) -> int:
        """fp32 elements of the arena for an active set of at most `budget` global elements."""
        return int(math.ceil((math.ceil(budget * self.ratio) * self.large + self.fixed) / 4))

    def split(self, arena_bytes: int) -> Dict[str, int]:
        """An arena's bytes as {"states", "masters"}, by the formats' bytes per element."""
        masters = int(arena_bytes * self.masters_share)
        return {"states": arena_bytes - masters, "masters": masters}

    def bytes_at(self, delta: float) -> Dict[str, int]:
        """What an optimizer at `delta` holds: {"states", "masters"} (its arena, rounded as the arena rounds)
        and "gradients", the most its active set and the tensors trained at every step hold at once."""
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not 0 < delta <= 1:
            raise ValueError(f"delta: expected a fraction in (0, 1], got {delta!r}")
        total = 4 * StateArena.required_numel([self.arena_numel(delta * self.total_params)])
        gradients = int(delta * self.total_params + self.always_numel) * self.itemsize
        return {**self.split(total), "gradients": gradients}


class ActiveSet:
    """The active modules (`indices`), their tensors' states in one StateArena as typed views in `state`
    (the optimizer's per-parameter dicts), and the slots of the active module tensors.

    `index`: each trained tensor's number (its arena keys); `module_params(b)`: module b's tensors; `always`:
    (group index, tensor) of those trained at every step, active from the start."""

    def __init__(
        self,
        formats: StateFormats,
        capacity_numel: int,
        device: torch.device,
        index: Dict[Tensor, int],
        state: Dict,
        module_params: Callable[[int], List[Tensor]],
        always: Sequence[Tuple[int, Tensor]],
    ):
        self.formats = formats
        self.arena = StateArena(capacity_numel, device=device)
        self.device = device
        self.index, self.state, self.module_params, self.always = index, state, module_params, list(always)
        self.indices: List[int] = []
        self.build_slots()

    def acquire(self, p: Tensor, skips0: Tensor) -> None:
        """Makes `p` active: its states in the arena (contents undefined until its first, fresh, step writes
        them, the master included); "step" counts the steps attempted since, "skips0" is the skip count now."""
        i = self.index[p]
        for key, (shape, dtype) in self.formats.layout(p).items():
            self.arena.acquire((key, i), shape, dtype)
        self.state[p] = {"step": 0, "skips0": skips0}
        self.refresh_views([p])

    def refresh_views(self, params) -> None:
        for p in params:
            i = self.index[p]
            for key in self.formats.layout(p):
                self.state[p][key] = self.arena.view((key, i))

    def release(self, p: Tensor) -> None:
        i = self.index[p]
        for key in self.formats.layout(p):
            self.arena.release((key, i))
        self.state.pop(p, None)

    def change(self, new: Sequence[int], keep: set, skips0: Tensor) -> None:
        """The active modules become `new` (sorted); the states of the modules in `keep` stay as they are."""
        for b in set(self.indices):  # the order a set gives, as the arena's free list has always seen it
            if b not in keep:
                for p in self.module_params(b):
                    self.release(p)
        generation = self.arena.generation
        for b in new:
            if b not in keep:
                for p in self.module_params(b):
                    self.acquire(p, skips0)
        if self.arena.generation != generation:  # compaction moved blocks: re-point every state
            self.refresh_views(list(self.state.keys()))
        self.indices = list(new)
        self.build_slots()

    def build_slots(self) -> None:
        self._index_cache: Dict[Tuple[int, ...], Tensor] = {}
        # One slot per active module tensor, modules in order; a padded gather matrix sums them per module.
        self.slots: Dict[Tensor, int] = {}
        rows = []
        for b in self.indices:
            row = []
            for p in self.module_params(b):
                self.slots[p] = len(self.slots)
                row.append(self.slots[p])
            rows.append(row)
        width = max((len(r) for r in rows), default=1)
        pad = len(self.slots)
        self._seg_index = torch.tensor(
            [r + [pad] * (width - len(r)) for r in rows] or [[pad]], dtype=torch.int64, device=self.device
        )
        # Modules of one tensor each (a LLaMA projection without bias), numbered in order: the per-slot norms
        # are already the per-module ones, and a view replaces the gather (the same values).
        self._seg_identity = bool(rows) and width == 1 and [r[0] for r in rows] == list(range(len(rows)))
        # (group index, param, slot or None) of every tensor a step may update, in the step's order
        self.items = [(0, p, self.slots[p]) for b in self.indices for p in self.module_params(b)] + [
            (gi, p, None) for gi, p in self.always
        ]

    def per_module(self, step_sq: Tensor) -> Tensor:
        """Per-slot squared norms (with the zero pad slot last) summed per active module."""
        if self._seg_identity:
            return step_sq[: len(self.slots)]
        return step_sq[self._seg_index].sum(dim=1)

    def index_tensor(self, indices: List[int]) -> Tensor:
        """A device tensor of these indices, made once per active set: a copy from host memory at every
        step would make the step wait for the GPU."""
        key = tuple(indices)
        cached = self._index_cache.get(key)
        if cached is None:
            cached = self._index_cache[key] = torch.tensor(indices, dtype=torch.int64, device=self.device)
        return cached
