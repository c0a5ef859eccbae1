"""Launchers: build (or reuse) the chunk table, fold the hyperparameters, launch."""

from __future__ import annotations

import os
from typing import List, Optional

import torch
import triton.language as tl
from torch import Tensor

from ..scalars import kernel_scalars
from . import tables
from .kernels import adamw_kernel, flush_kernel, reduce_partials_kernel, sq_norm_partials_kernel

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
BLOCK = 1024
REDUCE_BLOCK = 256
_SOFT_BF16 = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _chunk() -> int:
    # Tests shrink the chunk so that "larger than one chunk" stays cheap under the interpreter. The
    # kernels tell the compiler that a chunk's start is a multiple of the block: keep it a power of two.
    chunk = int(os.environ.get("MISA_TRITON_CHUNK", tables.DEFAULT_CHUNK))
    if chunk < 16 or chunk & (chunk - 1):
        raise ValueError(f"MISA_TRITON_CHUNK: expected a power of two >= 16, got {chunk}")
    return chunk


def _block(chunk: int) -> int:
    return min(BLOCK, chunk)


def _reduce(partials: Tensor, table: tables.ChunkTable, out: Tensor) -> None:
    reduce_partials_kernel[(table.n_tensors,)](partials, table.chunk_begin, out, BLOCK=REDUCE_BLOCK)


def _nonempty(*lists: List[Tensor]):
    # Empty tensors take no chunk. Every backend numbers the remaining tensors the same way (their
    # index among the non-empty ones keys stochastic rounding).
    keep = [i for i, t in enumerate(lists[0]) if t.numel() > 0]
    return keep, [[ts[i] for i in keep] for ts in lists]


def adamw_step_(params, grads, exp_avgs, exp_avg_sqs, grad_sq_norms: Optional[Tensor], master_params, *, lr,
                beta1, beta2, eps, weight_decay, step, fresh, stochastic, seed, skip=None) -> None:
    master = bool(master_params)
    lists = [params, grads, exp_avgs, exp_avg_sqs] + ([master_params] if master else [])
    keep, lists = _nonempty(*lists)
    if not keep:
        return
    params = lists[0]
    chunk = _chunk()
    table = tables.build(lists, chunk)
    sc = kernel_scalars(lr, step, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    norms = grad_sq_norms is not None
    partials = torch.empty(table.n_chunks if norms else 1, dtype=torch.float32, device=params[0].device)
    scalars_dev = sc.device if sc.device is not None else partials
    adamw_kernel[(table.n_chunks,)](
        table.chunk_tensor, table.chunk_start, table.numels, table.addresses, table.n_tensors,
        partials, scalars_dev, skip if skip is not None else partials,
        sc.one_minus_beta1, sc.beta2, sc.one_minus_beta2, sc.eps, sc.step_size, sc.bias_correction2_sqrt, sc.decay,
        int(seed),
        PARAM_DTYPE=_TL_DTYPES[params[0].dtype], CHUNK=chunk, BLOCK=_block(chunk),
        FRESH=bool(fresh), NORMS=norms, SCALARS_ON_DEVICE=sc.device is not None,
        ALIGNED=table.aligned16, MASTER=master, STOCHASTIC=bool(stochastic), SOFT_BF16=_SOFT_BF16,
        SKIP=skip is not None,
    )
    if norms:
        if len(keep) == len(grad_sq_norms):
            _reduce(partials, table, grad_sq_norms)
        else:
            sub = grad_sq_norms[keep]
            _reduce(partials, table, sub)
            grad_sq_norms[keep] = sub


def grad_sq_norms(tensors) -> Tensor:
    out = torch.zeros(len(tensors), dtype=torch.float32, device=tensors[0].device)
    keep, (kept,) = _nonempty(tensors)
    if not keep:
        return out
    chunk = _chunk()
    table = tables.build([kept], chunk)
    partials = torch.empty(table.n_chunks, dtype=torch.float32, device=out.device)
    sq_norm_partials_kernel[(table.n_chunks,)](
        table.chunk_tensor, table.chunk_start, table.numels, table.addresses, partials,
        DTYPE=_TL_DTYPES[kept[0].dtype], CHUNK=chunk, BLOCK=_block(chunk), ALIGNED=table.aligned16,
    )
    if len(keep) == len(tensors):
        _reduce(partials, table, out)
    else:
        sub = out[keep]
        _reduce(partials, table, sub)
        out[keep] = sub
    return out


def momentum_flush_(params, exp_avgs, exp_avg_sqs, master_params, *, lr, beta1, beta2, eps, step, stochastic,
                    seed) -> None:
    master = bool(master_params)
    keep, lists = _nonempty(*([params, exp_avgs, exp_avg_sqs] + ([master_params] if master else [])))
    if not keep:
        return
    params = lists[0]
    chunk = _chunk()
    table = tables.build(lists, chunk)
    sc = kernel_scalars(lr, step, beta1=beta1, beta2=beta2, eps=eps, flush=True)
    scalars_dev = sc.device if sc.device is not None else table.numels
    flush_kernel[(table.n_chunks,)](
        table.chunk_tensor, table.chunk_start, table.numels, table.addresses, table.n_tensors,
        scalars_dev, sc.eps, sc.step_size, sc.bias_correction2_sqrt, int(seed),
        PARAM_DTYPE=_TL_DTYPES[params[0].dtype], CHUNK=chunk, BLOCK=_block(chunk),
        SCALARS_ON_DEVICE=sc.device is not None, ALIGNED=table.aligned16, MASTER=master,
        STOCHASTIC=bool(stochastic), SOFT_BF16=_SOFT_BF16,
    )
