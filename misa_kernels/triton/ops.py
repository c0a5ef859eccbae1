"""Launchers: build (or reuse) the chunk table, fold the hyperparameters, pick the launch config, launch."""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton.language as tl
from torch import Tensor

from .. import quant, tables
from ..scalars import kernel_scalars
from . import tune
from .kernels import (
    adamw8_kernel,
    adamw_kernel,
    flush8_kernel,
    flush_kernel,
    reduce_partials_kernel,
    sq_norm_partials_kernel,
)

_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
REDUCE_BLOCK = 256
_SOFT_BF16 = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _reduce(partials: Tensor, table: tables.ChunkTable, out: Tensor) -> None:
    reduce_partials_kernel[(table.n_tensors,)](partials, table.chunk_begin, out, BLOCK=REDUCE_BLOCK)


_PLACEHOLDERS = {}


def _placeholder(device) -> Tensor:
    """A one-element tensor for the pointer arguments a launch does not read (no norms, scalars as numbers,
    no skip flag), made once per device rather than at every call."""
    found = _PLACEHOLDERS.get(device)
    if found is None:
        found = _PLACEHOLDERS[device] = torch.empty(1, dtype=torch.float32, device=device)  # never read
    return found


def _block(config, eight: bool):
    # An 8-bit tile is whole quantization blocks; the chunk (>= quant.BLOCK, a power of two) stays a multiple.
    block, warps = config
    return (max(block, quant.BLOCK) if eight else block), warps


def adamw_step_(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    grad_sq_norms: Optional[Tensor],
    master_params,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step,
    fresh,
    stochastic,
    seed,
    skip=None,
    compensation=(),
    exp_avg_absmax=(),
    exp_avg_sq_absmax=(),
    prepared=None,
) -> None:
    if prepared is None:  # a PreparedAdamW hands its own, made once for these operands
        prepared = tables.prepare_formats(
            [params, grads, exp_avgs, exp_avg_sqs], master_params, compensation, (exp_avg_absmax, exp_avg_sq_absmax)
        )
    if prepared is None:
        return
    keep, (params, *_), table, eight = prepared
    master = bool(master_params)
    sc = kernel_scalars(lr, step, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    out = tables.norms_of_kept(grad_sq_norms, keep)
    partials = (
        torch.empty(table.n_chunks, dtype=torch.float32, device=params[0].device)
        if out is not None
        else _placeholder(params[0].device)
    )
    scalars_dev = tables.rows_of_kept(sc.device, keep, sc.per_tensor) if sc.device is not None else partials
    mode = dict(
        PARAM_DTYPE=_TL_DTYPES[params[0].dtype],
        FRESH=bool(fresh),
        NORMS=out is not None,
        SCALARS_ON_DEVICE=sc.device is not None,
        ALIGNED=table.aligned16,
        MASTER=master,
        KAHAN=bool(compensation),
        STOCHASTIC=bool(stochastic),
        SOFT_BF16=_SOFT_BF16,
        SKIP=skip is not None,
        PER_TENSOR=sc.per_tensor,
    )
    if eight:
        maps = quant.maps(params[0].device)
        mode.update(ZERO_M=quant.zero_code(True), ZERO_V=quant.zero_code(False))

    def launch(tbl, block, num_warps):
        parts = (
            partials if tbl is table else torch.empty(max(tbl.n_chunks, 1), dtype=torch.float32, device=partials.device)
        )
        common = (parts, scalars_dev, skip if skip is not None else parts)
        kernel = adamw8_kernel if eight else adamw_kernel
        kernel[(tbl.n_chunks,)](
            tbl.chunk_tensor,
            tbl.chunk_start,
            tbl.numels,
            tbl.addresses,
            tbl.n_tensors,
            *(common + maps if eight else common),
            sc.one_minus_beta1,
            sc.beta2,
            sc.one_minus_beta2,
            sc.eps,
            sc.step_size,
            sc.bias_correction2_sqrt,
            sc.decay,
            int(seed),
            CHUNK=tbl.chunk,
            BLOCK=block,
            num_warps=num_warps,
            **mode,
        )

    dtype = params[0].dtype

    def scratch():  # the operands' dtypes, for tuning on scratch tensors (its first call only)
        states = [torch.uint8, torch.uint8, torch.float32, torch.float32] if eight else [torch.float32] * 2
        low = ([torch.float32] if master else []) + ([torch.bfloat16] if compensation else [])
        return [dtype, dtype] + states + low

    config = tune.config("adamw8" if eight else "adamw", params[0].device, dtype, table.chunk, mode, scratch, launch)
    launch(table, *_block(config, eight))
    if out is not None:
        _reduce(partials, table, out)
        tables.scatter_norms(grad_sq_norms, out, keep)


def grad_sq_norms(tensors, out: Optional[Tensor] = None, prepared=None) -> Tensor:
    """The squared norms, added to `out` when given (else to zeros); returns the tensor written."""
    result = torch.zeros(len(tensors), dtype=torch.float32, device=tensors[0].device) if out is None else out
    if prepared is None:
        prepared = tables.prepare([tensors])
    if prepared is None:
        return result
    keep, (kept,), table, *scratch = prepared  # a PreparedAdamW's tuple brings its partials buffer
    partials = scratch[0] if scratch else torch.empty(table.n_chunks, dtype=torch.float32, device=result.device)
    mode = dict(DTYPE=_TL_DTYPES[kept[0].dtype], ALIGNED=table.aligned16)

    def launch(tbl, block, num_warps):
        parts = partials if tbl is table else torch.empty(tbl.n_chunks, dtype=torch.float32, device=result.device)
        sq_norm_partials_kernel[(tbl.n_chunks,)](
            tbl.chunk_tensor,
            tbl.chunk_start,
            tbl.numels,
            tbl.addresses,
            parts,
            CHUNK=tbl.chunk,
            BLOCK=block,
            num_warps=num_warps,
            **mode,
        )

    dtype = kept[0].dtype
    launch(table, *tune.config("norms", result.device, dtype, table.chunk, mode, [dtype], launch))
    out = tables.norms_of_kept(result, keep)
    _reduce(partials, table, out)
    tables.scatter_norms(result, out, keep)
    return result


def momentum_flush_(
    params,
    exp_avgs,
    exp_avg_sqs,
    master_params,
    *,
    lr,
    beta1,
    beta2,
    eps,
    step,
    stochastic,
    seed,
    compensation=(),
    exp_avg_absmax=(),
    exp_avg_sq_absmax=(),
) -> None:
    prepared = tables.prepare_formats(
        [params, exp_avgs, exp_avg_sqs], master_params, compensation, (exp_avg_absmax, exp_avg_sq_absmax)
    )
    if prepared is None:
        return
    _, (params, *_), table, eight = prepared
    master = bool(master_params)
    sc = kernel_scalars(lr, step, beta1=beta1, beta2=beta2, eps=eps, flush=True)
    scalars_dev = sc.device if sc.device is not None else table.numels
    mode = dict(
        PARAM_DTYPE=_TL_DTYPES[params[0].dtype],
        SCALARS_ON_DEVICE=sc.device is not None,
        ALIGNED=table.aligned16,
        MASTER=master,
        KAHAN=bool(compensation),
        STOCHASTIC=bool(stochastic),
        SOFT_BF16=_SOFT_BF16,
    )
    maps = quant.maps(params[0].device) if eight else ()

    def launch(tbl, block, num_warps):
        kernel = flush8_kernel if eight else flush_kernel
        kernel[(tbl.n_chunks,)](
            tbl.chunk_tensor,
            tbl.chunk_start,
            tbl.numels,
            tbl.addresses,
            tbl.n_tensors,
            scalars_dev,
            *maps,
            sc.eps,
            sc.step_size,
            sc.bias_correction2_sqrt,
            int(seed),
            CHUNK=tbl.chunk,
            BLOCK=block,
            num_warps=num_warps,
            **mode,
        )

    dtype = params[0].dtype
    states = [torch.uint8, torch.uint8, torch.float32, torch.float32] if eight else [torch.float32] * 2
    scratch = [dtype] + states + ([torch.float32] if master else []) + ([torch.bfloat16] if compensation else [])
    config = tune.config("flush8" if eight else "flush", params[0].device, dtype, table.chunk, mode, scratch, launch)
    launch(table, *_block(config, eight))
