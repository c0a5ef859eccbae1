"""The chunk table that lets one Triton launch cover a whole list of tensors.

Each program handles one chunk of one tensor. The table, one int64 device buffer, holds for every
chunk its tensor index and start offset, and for every tensor its element count and the raw address
of each operand (the kernel casts an address back to a typed pointer). The chunks of a tensor are
consecutive, so a tensor's partial norms sit side by side and reduce in a fixed order
(deterministic, no float atomics). Tables are cached by (addresses, sizes): in a training loop the
same tensors come back every step and the host-to-device copy happens once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence, Tuple

import torch
from torch import Tensor

DEFAULT_CHUNK = 65536
_CACHE_SIZE = 16
_cache: "OrderedDict[tuple, ChunkTable]" = OrderedDict()


@dataclass(frozen=True)
class ChunkTable:
    n_chunks: int
    n_tensors: int
    chunk: int
    chunk_tensor: Tensor  # [n_chunks] int64
    chunk_start: Tensor  # [n_chunks] int64
    numels: Tensor  # [n_tensors] int64
    chunk_begin: Tensor  # [n_tensors + 1] int64: first chunk of each tensor
    addresses: Tensor  # [n_operands, n_tensors] int64
    aligned16: bool  # every operand's address is a multiple of 16 bytes


def build(operands: Sequence[Sequence[Tensor]], chunk: int = DEFAULT_CHUNK) -> ChunkTable:
    first = operands[0]
    key = (first[0].device, chunk, tuple(t.numel() for t in first),
           tuple(t.data_ptr() for ts in operands for t in ts))
    table = _cache.get(key)
    if table is not None:
        _cache.move_to_end(key)
        return table
    numels = [t.numel() for t in first]
    counts = [(n + chunk - 1) // chunk for n in numels]
    chunk_tensor, chunk_start, chunk_begin = [], [], [0]
    for i, c in enumerate(counts):
        chunk_tensor.extend([i] * c)
        chunk_start.extend(range(0, c * chunk, chunk))
        chunk_begin.append(chunk_begin[-1] + c)
    addresses = [t.data_ptr() for ts in operands for t in ts]
    host = torch.tensor(chunk_tensor + chunk_start + numels + chunk_begin + addresses, dtype=torch.int64)
    device = first[0].device
    flat = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    n_chunks, n_tensors = len(chunk_tensor), len(numels)
    offsets = _split_points(n_chunks, n_tensors)
    table = ChunkTable(
        n_chunks=n_chunks, n_tensors=n_tensors, chunk=chunk,
        chunk_tensor=flat[offsets[0]:offsets[1]], chunk_start=flat[offsets[1]:offsets[2]],
        numels=flat[offsets[2]:offsets[3]], chunk_begin=flat[offsets[3]:offsets[4]],
        addresses=flat[offsets[4]:].view(len(operands), n_tensors),
        aligned16=all(a % 16 == 0 for a in addresses),
    )
    _cache[key] = table
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return table


def _split_points(n_chunks: int, n_tensors: int) -> Tuple[int, ...]:
    points = [0, n_chunks, 2 * n_chunks, 2 * n_chunks + n_tensors, 2 * n_chunks + 2 * n_tensors + 1]
    return tuple(points)
