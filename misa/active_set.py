"""The active set's memory: the state formats, the StateArena that holds every active tensor's states (and
masters or compensations) as typed views, its size, and the slots that number the active module tensors.

A part of MISA (misa/optimizer.py composes the parts). It reads what MISA's constructor sets: `states`,
`master_format`, `budget`, `partition`, `param_groups`, `_always`, `_index`, `state`, `arena`. Everything a
CUDA graph would capture lives here: the views keep their addresses for as long as the set is active.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

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


class ActiveSet:
    """Formats, arena and slots of the active tensors (a part of MISA)."""

    def _arena_capacity(self, modules) -> int:
        """fp32 elements of an arena that holds the largest active set the budget allows, in the chosen
        formats. Every active set holds at most `budget` global elements (a shard at most the largest
        local/global ratio of them); each large tensor costs its formats' bytes per element, and every
        block may waste up to one alignment unit. Tensors below quant.MIN_NUMEL keep fp32 states: all of
        them are counted in full (few and small), so the bound holds whichever are active."""
        ratio = max(sum(_local(p).numel() for _, p in m.params) / max(m.numel, 1) for m in modules)
        module_tensors = [p for m in modules for _, p in m.params]
        every = module_tensors + [p for _, p in self._always]
        large = self._bytes_per_element(large=True)
        # an active small tensor costs its extra bytes over the large rate; all of them may be active
        small = sum(_local(p).numel() for p in module_tensors if self.states == "8bit" and not self._is_8bit(p))
        n_blocks = max((len(self._state_layout(p, 1)) for p in every), default=0)
        # what does not depend on the budget, so that the capacity at any other delta is arithmetic (bytes_at)
        fixed = (
            small * (self._bytes_per_element(large=False) - large)
            + ALIGN_ELEMENTS * 4 * n_blocks * len(module_tensors)
            + sum(self.arena_bytes(p) for _, p in self._always)
        )
        self._capacity = (ratio, large, fixed)
        self._arena_parts = {"masters": self._master_bytes() / large if large else 0.0}
        return self._arena_numel(self.budget)

    def _arena_numel(self, budget: float) -> int:
        """fp32 elements of the arena for an active set of at most `budget` global elements (_arena_capacity)."""
        ratio, large, fixed = self._capacity
        return int(math.ceil((math.ceil(budget * ratio) * large + fixed) / 4))

    def bytes_at(self, delta: float) -> Dict[str, int]:
        """What this optimizer holds at `delta`, computed, not built: {"states", "masters"} as memory_bytes()
        reports them (the arena its budget needs, rounded as the arena rounds), and "gradients", the most its
        active set and the tensors trained at every step can hold at once. At its own delta "states" and
        "masters" equal memory_bytes()."""
        if not 0 < delta <= 1:
            raise ValueError(f"delta: expected a fraction in (0, 1], got {delta!r}")
        total = 4 * StateArena.required_numel([self._arena_numel(delta * self.partition.total_params)])
        masters = int(total * self._arena_parts["masters"])
        itemsize = max((_itemsize(_local(p).dtype) for g in self.param_groups for p in g["params"]), default=4)
        always = sum(_local(p).numel() for _, p in self._always)
        gradients = int(delta * self.partition.total_params + always) * itemsize
        return {"states": total - masters, "masters": masters, "gradients": gradients}

    def _bytes_per_element(self, large: bool) -> float:
        states = quant.BYTES_PER_ELEMENT if (large and self.states == "8bit") else 8.0
        return states + self._master_bytes()

    def _master_bytes(self) -> int:
        low = any(_local(p).dtype != torch.float32 for g in self.param_groups for p in g["params"])
        return {"fp32": 4, "kahan": 2}.get(self.master_format, 0) if low else 0

    def arena_bytes(self, p: Tensor) -> int:
        """Bytes the arena gives parameter `p` when it is active (alignment included)."""
        layout = self._state_layout(p, _local(p).numel()).values()
        return 4 * StateArena.required_numel([(n * _itemsize(dtype) + 3) // 4 for n, dtype in layout])

    def memory_bytes(self) -> Dict[str, int]:
        """Bytes this optimizer holds: {"states": Adam's m and v (codes and scales when 8-bit), "masters":
        master copies or compensations}. Both live in the arena, allocated at construction for the largest
        active set the budget allows, so this is the arena's size (split by the formats' bytes per
        element), whatever the current set uses."""
        total = self.arena.stats()["bytes"]
        masters = int(total * self._arena_parts["masters"])
        return {"states": total - masters, "masters": masters}

    @property
    def formats(self) -> Dict[str, object]:
        """The state formats and what they cost: {"states", "masters", "bytes_per_element"} (an active
        element of a tensor of at least quant.MIN_NUMEL elements; smaller ones keep fp32 states)."""
        return {
            "states": self.states,
            "masters": self.master_format if self._master_bytes() else None,
            "bytes_per_element": self._bytes_per_element(large=True),
        }

    def _has_master(self, p: Tensor) -> bool:
        return self.master_weights and _local(p).dtype != torch.float32

    def _is_8bit(self, p: Tensor) -> bool:
        return self.states == "8bit" and _local(p).numel() >= quant.MIN_NUMEL

    def _state_layout(self, p: Tensor, numel: Optional[int] = None) -> Dict[str, Tuple[object, torch.dtype]]:
        """{state key: (shape or element count, dtype)} of an active parameter in the chosen formats."""
        shape = _local(p).shape if numel is None else numel
        n = _local(p).numel() if numel is None else numel
        if self._is_8bit(p):
            layout = {
                "exp_avg": (shape, quant.CODE_DTYPE),
                "exp_avg_sq": (shape, quant.CODE_DTYPE),
                "exp_avg_absmax": (quant.n_blocks(n), torch.float32),
                "exp_avg_sq_absmax": (quant.n_blocks(n), torch.float32),
            }
        else:
            layout = {"exp_avg": (shape, torch.float32), "exp_avg_sq": (shape, torch.float32)}
        if self._has_master(p):
            if self.master_format == "kahan":
                layout["compensation"] = (shape, torch.bfloat16)
            else:
                layout["master"] = (shape, torch.float32)
        return layout

    def _state_keys(self, p: Tensor) -> Tuple[str, ...]:
        return tuple(self._state_layout(p))

    def _acquire(self, p: Tensor) -> None:
        # Contents are undefined until the module's first (fresh) step writes them, the master included.
        i = self._index[p]
        for key, (shape, dtype) in self._state_layout(p).items():
            self.arena.acquire((key, i), shape, dtype)
        # "step" counts the steps attempted since activation; "skips0" is the skip count then
        self.state[p] = {"step": 0, "skips0": self.period.skips_at_switch}
        self._refresh_views([p])

    def _refresh_views(self, params) -> None:
        for p in params:
            i = self._index[p]
            for key in self._state_keys(p):
                self.state[p][key] = self.arena.view((key, i))

    def _release(self, p: Tensor) -> None:
        i = self._index[p]
        for key in self._state_keys(p):
            self.arena.release((key, i))
        self.state.pop(p, None)

    def _build_slots(self) -> None:
        self._index_cache: Dict[Tuple[int, ...], Tensor] = {}
        # One slot per active module tensor, modules in order; a padded gather matrix sums them per module.
        self._slots: Dict[Tensor, int] = {}
        rows = []
        for b in self._active:
            row = []
            for p in self._module_params(b):
                self._slots[p] = len(self._slots)
                row.append(self._slots[p])
            rows.append(row)
        width = max((len(r) for r in rows), default=1)
        pad = len(self._slots)
        self._seg_index = torch.tensor(
            [r + [pad] * (width - len(r)) for r in rows] or [[pad]], dtype=torch.int64, device=self.device
        )
        # Modules of one tensor each (a LLaMA projection without bias), numbered in order: the per-slot norms
        # are already the per-module ones, and a view replaces the gather (the same values).
        self._seg_identity = bool(rows) and width == 1 and [r[0] for r in rows] == list(range(len(rows)))
        # (group index, param, slot or None) of every tensor a step may update, in the step's order
        self._active_items = [(0, p, self._slots[p]) for b in self._active for p in self._module_params(b)] + [
            (gi, p, None) for gi, p in self._always
        ]

    def _per_module(self, step_sq: Tensor) -> Tensor:
        """Per-slot squared norms (with the zero pad slot last) summed per active module."""
        if self._seg_identity:
            return step_sq[: len(self._slots)]
        return step_sq[self._seg_index].sum(dim=1)

    def _index_tensor(self, indices: List[int]) -> Tensor:
        """A device tensor of these indices, made once per active set: a copy from host memory at every
        step would make the step wait for the GPU."""
        key = tuple(indices)
        cached = self._index_cache.get(key)
        if cached is None:
            cached = self._index_cache[key] = torch.tensor(indices, dtype=torch.int64, device=self.device)
        return cached
