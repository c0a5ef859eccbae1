"""StateArena: one device buffer, allocated once, that holds the optimizer states of the active modules.

MISA changes its trainable set every T steps. Allocating and freeing Adam states at every switch (as
BAdam does) churns the caching allocator and fragments reserved memory; the arena instead hands out
views of a single buffer. `acquire` is first-fit over a sorted free list with coalescing on
`release`, so after construction no allocator call happens, with one exception: when enough memory is
free but no single hole is large enough, `acquire` compacts the live blocks toward the start (moving
their data) and bumps `generation`; holders of views re-fetch them with `view(key)` after a switch.
"""

from __future__ import annotations

import bisect
import math
from typing import Dict, Hashable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

# 64 fp32 elements = 256 bytes: every view starts on a boundary that allows 16-byte vector access
# and keeps consecutive views in separate cache lines.
ALIGN_ELEMENTS = 64


class ArenaFull(RuntimeError):
    """The arena has no room for a request; it never grows silently."""


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _round_up(n: int) -> int:
    return (n + ALIGN_ELEMENTS - 1) // ALIGN_ELEMENTS * ALIGN_ELEMENTS


class StateArena:
    def __init__(self, capacity_numel: int, device="cpu", dtype: torch.dtype = torch.float32):
        if not isinstance(capacity_numel, int) or capacity_numel < 0:
            raise ValueError(f"capacity_numel: expected a non-negative int, got {capacity_numel!r}")
        self.capacity = _round_up(capacity_numel)
        self.buffer = torch.empty(self.capacity, dtype=dtype, device=device)
        self._free: List[Tuple[int, int]] = [(0, self.capacity)] if self.capacity else []  # (offset, size)
        # key -> (offset, size, shape, dtype); offsets and sizes in elements of the buffer's dtype
        self._blocks: Dict[Hashable, Tuple[int, int, Tuple[int, ...], torch.dtype]] = {}
        self.used = 0
        self.peak = 0
        self.generation = 0

    @staticmethod
    def required_numel(sizes: Sequence[int]) -> int:
        """Capacity that holds blocks of these element counts, alignment included."""
        return sum(_round_up(int(n)) for n in sizes)

    def units(self, numel: int, dtype: Optional[torch.dtype] = None) -> int:
        """Buffer elements that a block of `numel` elements of `dtype` occupies (before alignment)."""
        if dtype is None or dtype == self.buffer.dtype:
            return int(numel)
        size = self.buffer.element_size()
        return (int(numel) * _itemsize(dtype) + size - 1) // size

    @property
    def device(self) -> torch.device:
        return self.buffer.device

    def __contains__(self, key: Hashable) -> bool:
        return key in self._blocks

    def __len__(self) -> int:
        return len(self._blocks)

    def keys(self):
        return self._blocks.keys()

    def acquire(
        self, key: Hashable, numel_or_shape: Union[int, Sequence[int], torch.Size], dtype: Optional[torch.dtype] = None
    ) -> Tensor:
        """A view of `numel_or_shape` elements of `dtype` (default: the buffer's) for `key`: the 8-bit
        states' codes and block scales and a bf16 compensation share one buffer with fp32 states. Its
        contents are undefined (the caller overwrites it, e.g. with a `fresh=True` step), which is why no
        zeroing pass is needed."""
        if key in self._blocks:
            raise KeyError(f"key {key!r} already holds a block; release it first")
        shape = (int(numel_or_shape),) if isinstance(numel_or_shape, int) else tuple(int(s) for s in numel_or_shape)
        numel = math.prod(shape)
        dtype = self.buffer.dtype if dtype is None else dtype
        size = _round_up(max(self.units(numel, dtype), 1))
        slot = self._first_fit(size)
        if slot is None and self.capacity - self.used >= size:
            self.compact()
            slot = self._first_fit(size)
        if slot is None:
            raise ArenaFull(
                f"StateArena: no room for {key!r} ({numel} elements, {size} aligned): capacity {self.capacity}, "
                f"used {self.used}, largest free block {self._largest_free()}"
            )
        offset, hole = self._free.pop(slot)
        if hole > size:
            self._free.insert(slot, (offset + size, hole - size))
        self._blocks[key] = (offset, size, shape, dtype)
        self.used += size
        self.peak = max(self.peak, self.used)
        return self.view(key)

    def view(self, key: Hashable) -> Tensor:
        if key not in self._blocks:
            raise KeyError(f"StateArena.view: no block is held under {key!r}")
        offset, size, shape, dtype = self._blocks[key]
        numel = math.prod(shape)
        if dtype == self.buffer.dtype:
            return self.buffer[offset : offset + numel].view(shape)
        return self.buffer[offset : offset + size].view(dtype)[:numel].view(shape)

    def release(self, key: Hashable) -> None:
        if key not in self._blocks:
            raise KeyError(f"StateArena.release: no block is held under {key!r} ({len(self._blocks)} blocks held)")
        offset, size, _, _ = self._blocks.pop(key)
        self.used -= size
        i = bisect.bisect_left(self._free, (offset, 0))
        self._free.insert(i, (offset, size))
        # Coalesce with the right, then the left neighbour.
        if i + 1 < len(self._free) and offset + size == self._free[i + 1][0]:
            self._free[i] = (offset, size + self._free.pop(i + 1)[1])
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:
            left = self._free.pop(i - 1)
            self._free[i - 1] = (left[0], left[1] + self._free[i - 1][1])

    def reset(self) -> None:
        """Release every block (the buffer itself stays allocated)."""
        self._blocks.clear()
        self._free = [(0, self.capacity)] if self.capacity else []
        self.used = 0

    def compact(self) -> None:
        """Move live blocks to the start of the buffer, keeping their contents."""
        cursor = 0
        for key, (offset, size, shape, dtype) in sorted(self._blocks.items(), key=lambda kv: kv[1][0]):
            if offset != cursor:
                src = self.buffer[offset : offset + size]
                if offset - cursor < size:  # overlapping move
                    src = src.clone()
                self.buffer[cursor : cursor + size].copy_(src)
                self._blocks[key] = (cursor, size, shape, dtype)
            cursor += size
        self._free = [(cursor, self.capacity - cursor)] if cursor < self.capacity else []
        self.generation += 1

    def _first_fit(self, size: int):
        for i, (_, hole) in enumerate(self._free):
            if hole >= size:
                return i
        return None

    def _largest_free(self) -> int:
        return max((hole for _, hole in self._free), default=0)

    def stats(self) -> Dict[str, float]:
        free = self.capacity - self.used
        largest = self._largest_free()
        return {
            "capacity": self.capacity,
            "used": self.used,
            "peak": self.peak,
            "free": free,
            "largest_free_block": largest,
            "fragmentation": 0.0 if free == 0 else 1.0 - largest / free,
            "blocks": len(self._blocks),
            "generation": self.generation,
            "bytes": self.capacity * self.buffer.element_size(),
            # what the held blocks are, by dtype: the 8-bit states' codes and scales, compensations, fp32 states
            "used_bytes_by_dtype": self._bytes_by_dtype(),
        }

    def _bytes_by_dtype(self) -> Dict[str, int]:
        out: Dict[str, int] = {}
        for _, size, _, dtype in self._blocks.values():
            name = str(dtype).replace("torch.", "")
            out[name] = out.get(name, 0) + size * self.buffer.element_size()
        return out
