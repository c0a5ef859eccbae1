"""The chunk table that lets one launch cover a whole list of tensors, for the Triton and CUDA kernels.

Each program (Triton) or block (CUDA) handles one chunk of one tensor. The table, one int64 device
buffer, holds for every chunk its tensor index and start offset, for every tensor its element count
and first chunk, and the raw address of each operand of each tensor (a kernel casts an address back
to a typed pointer). The chunks of a tensor are consecutive, so a tensor's partial norms sit side by
side and reduce in a fixed order (deterministic, no float atomics). A launch needs no parameter-space
table, so one launch covers any number of tensors and its grid is every chunk at once.

Tables are cached by (addresses, sizes): in a training loop the same tensors come back every step, so
the table is built and copied to the device once (asynchronously, from pinned memory) and every
later call only looks it up.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch
from torch import Tensor

DEFAULT_CHUNK = 65536
CHUNK_ENV = "MISA_CHUNK"
_CACHE_SIZE = 16
_cache: "OrderedDict[int, Tuple[tuple, ChunkTable]]" = OrderedDict()


@dataclass(frozen=True)
class ChunkTable:
    n_chunks: int
    n_tensors: int
    n_operands: int
    chunk: int
    flat: Tensor  # the whole table, laid out as the fields below (the CUDA kernels take this)
    chunk_tensor: Tensor  # [n_chunks] int64
    chunk_start: Tensor  # [n_chunks] int64
    numels: Tensor  # [n_tensors] int64
    chunk_begin: Tensor  # [n_tensors + 1] int64: first chunk of each tensor
    addresses: Tensor  # [n_operands, n_tensors] int64
    aligned16: bool  # every operand's address is a multiple of 16 bytes


def chunk_size() -> int:
    """Elements per chunk. Tests shrink it (MISA_CHUNK) so that "larger than one chunk" stays cheap under
    the interpreter. Kernels tell the compiler that a chunk's start is a multiple of their block: keep it
    a power of two."""
    chunk = int(os.environ.get(CHUNK_ENV, DEFAULT_CHUNK))
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"{CHUNK_ENV}: expected a power of two >= 16, got {chunk}")
    return chunk


def nonempty(*lists: Sequence[Tensor]) -> Tuple[List[int], List[List[Tensor]]]:
    """Empty tensors take no chunk. Every backend numbers the remaining tensors the same way (their index
    among the non-empty ones keys stochastic rounding)."""
    first = lists[0]
    if all(map(Tensor.numel, first)):
        return list(range(len(first))), [list(ts) for ts in lists]
    keep = [i for i, t in enumerate(first) if t.numel() > 0]
    return keep, [[ts[i] for i in keep] for ts in lists]


def prepare(lists: Sequence[Sequence[Tensor]], masters: Sequence[Tensor] = (), chunk: Optional[int] = None):
    """What a fused launcher needs: (keep, operand lists of the non-empty tensors with the masters last,
    their chunk table), or None when every tensor is empty."""
    keep, kept = nonempty(*(list(lists) + ([masters] if masters else [])))
    if not keep:
        return None
    return keep, kept, build(kept, chunk)


def prepare_formats(
    lists: Sequence[Sequence[Tensor]],
    master_params: Sequence[Tensor],
    compensation: Sequence[Tensor],
    absmaxes: Tuple[Sequence[Tensor], Sequence[Tensor]],
):
    """`prepare` for the state formats: the operands in the fused kernels' order (the lists, the block scales
    of 8-bit states, then the master or the compensation) and a chunk that holds whole quantization blocks
    when the states are 8-bit. Returns prepare's tuple plus whether the states are 8-bit, or None."""
    from . import quant

    eight = bool(absmaxes[0])
    chunk = max(chunk_size(), quant.BLOCK) if eight else None
    prepared = prepare(list(lists) + (list(absmaxes) if eight else []), master_params or compensation, chunk=chunk)
    return None if prepared is None else prepared + (eight,)


def norms_of_kept(grad_sq_norms: Optional[Tensor], keep: List[int]) -> Optional[Tensor]:
    """The entries of `grad_sq_norms` that belong to the non-empty tensors: the tensor itself when no
    tensor was dropped, else a gathered copy that `scatter_norms` writes back."""
    if grad_sq_norms is None or len(keep) == len(grad_sq_norms):
        return grad_sq_norms
    return grad_sq_norms[keep]


def rows_of_kept(scalars: Tensor, keep: List[int], per_tensor: bool) -> Tensor:
    """Per-tensor scalar rows (3 per tensor, flattened) of the non-empty tensors only, as the table numbers
    them; call-wide scalars as they are."""
    if not per_tensor or len(keep) * 3 == scalars.numel():
        return scalars
    return scalars.view(-1, 3)[keep].reshape(-1)


def scatter_norms(grad_sq_norms: Optional[Tensor], kept: Optional[Tensor], keep: List[int]) -> None:
    if kept is not None and kept is not grad_sq_norms:
        grad_sq_norms[keep] = kept


def build(operands: Sequence[Sequence[Tensor]], chunk: Optional[int] = None) -> ChunkTable:
    chunk = chunk_size() if chunk is None else chunk
    first = operands[0]
    addresses = [a for ts in operands for a in map(Tensor.data_ptr, ts)]
    numels = list(map(Tensor.numel, first))
    key = (first[0].device, chunk, tuple(numels), tuple(addresses))
    h = hash(key)  # once: hashing thousands of addresses is not free
    found = _cache.get(h)
    if found is not None and found[0] == key:
        _cache.move_to_end(h)
        return found[1]
    counts = [(n + chunk - 1) // chunk for n in numels]
    chunk_tensor, chunk_start, chunk_begin = [], [], [0]
    for i, c in enumerate(counts):
        chunk_tensor.extend([i] * c)
        chunk_start.extend(range(0, c * chunk, chunk))
        chunk_begin.append(chunk_begin[-1] + c)
    host = torch.tensor(chunk_tensor + chunk_start + numels + chunk_begin + addresses, dtype=torch.int64)
    device = first[0].device
    # Pinned + non_blocking: the copy is queued on the stream and the host never waits for the device.
    flat = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    n_chunks, n_tensors = len(chunk_tensor), len(numels)
    offsets = split_points(n_chunks, n_tensors)
    table = ChunkTable(
        n_chunks=n_chunks,
        n_tensors=n_tensors,
        n_operands=len(operands),
        chunk=chunk,
        flat=flat,
        chunk_tensor=flat[offsets[0] : offsets[1]],
        chunk_start=flat[offsets[1] : offsets[2]],
        numels=flat[offsets[2] : offsets[3]],
        chunk_begin=flat[offsets[3] : offsets[4]],
        addresses=flat[offsets[4] :].view(len(operands), n_tensors),
        aligned16=all(a % 16 == 0 for a in addresses),
    )
    _cache[h] = (key, table)
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return table


def split_points(n_chunks: int, n_tensors: int) -> Tuple[int, ...]:
    """Where each field starts in `flat`: chunk_tensor, chunk_start, numels, chunk_begin, addresses."""
    return (0, n_chunks, 2 * n_chunks, 2 * n_chunks + n_tensors, 2 * n_chunks + 2 * n_tensors + 1)
