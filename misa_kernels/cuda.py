"""The CUDA C++ backend (csrc/): loads the compiled extension `misa_kernels._C` on first use.

Importing misa_kernels never touches the extension; a missing or broken build is reported only when
the cuda backend is asked for (`load_error()` says why), so CPU users and Triton users are unaffected.
"""

from __future__ import annotations

import importlib
from typing import Optional

import torch
from torch import Tensor

from . import quant, tables
from .scalars import kernel_scalars

_ext = None
_error: Optional[str] = None
_tried = False


def _load():
    global _ext, _error, _tried
    if not _tried:
        _tried = True
        try:
            _ext = importlib.import_module("misa_kernels._C")
        except Exception as exc:  # ImportError, or an undefined symbol from a mismatched torch
            _error = (
                f"the compiled extension misa_kernels._C is not available ({exc}); reinstall with "
                f"nvcc and a CUDA build of torch present (MISA_FORCE_CUDA_BUILD=1 pip install .)"
            )
    return _ext


def load_error() -> Optional[str]:
    """None when the extension is built and a GPU is visible, else the reason the backend cannot run."""
    if _load() is None:
        return _error
    if not torch.cuda.is_available():
        return "the extension is built, but torch sees no CUDA device"
    return None


def extension():
    ext = _load()
    if ext is None:
        raise RuntimeError(_error)
    return ext


_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # csrc/cuda/kernels.h DType


def _scalar_args(sc, keep=None):
    # Exactly the host-folded values (scalars.py): the kernels do no arithmetic on hyperparameters.
    device = sc.device if sc.device is None or keep is None else tables.rows_of_kept(sc.device, keep, sc.per_tensor)
    return (
        device,
        sc.one_minus_beta1,
        sc.beta2,
        sc.one_minus_beta2,
        sc.eps,
        sc.step_size,
        sc.bias_correction2_sqrt,
        sc.decay,
    )


def _table_args(table: tables.ChunkTable, dtype: torch.dtype):
    return (table.flat, table.n_chunks, table.n_tensors, table.chunk, _DTYPE_CODES[dtype])


_MAPS = {}


def _maps(device) -> Tensor:
    """The 8-bit format's two maps as one device tensor [signed | unsigned], made once per device."""
    found = _MAPS.get(device)
    if found is None:
        found = _MAPS[device] = torch.cat(quant.maps(device)).contiguous()
    return found


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
    keep, lists, table, eight = prepared
    master = bool(master_params)
    sc = kernel_scalars(lr, step, beta1=beta1, beta2=beta2, eps=eps, weight_decay=weight_decay)
    out = tables.norms_of_kept(grad_sq_norms, keep)
    partials = None if out is None else torch.empty(table.n_chunks, dtype=torch.float32, device=out.device)
    extension().adamw_step_(
        *_table_args(table, lists[0][0].dtype),
        out,
        partials,
        *_scalar_args(sc, keep),
        bool(fresh),
        master,
        bool(stochastic),
        int(seed),
        skip,
        bool(compensation),
        _maps(lists[0][0].device) if eight else None,
        sc.per_tensor,
    )
    tables.scatter_norms(grad_sq_norms, out, keep)


def grad_sq_norms(tensors, out: Optional[Tensor] = None, prepared=None) -> Tensor:
    """The squared norms, added to `out` when given (else to zeros); returns the tensor written."""
    result = torch.zeros(len(tensors), dtype=torch.float32, device=tensors[0].device) if out is None else out
    if prepared is None:
        prepared = tables.prepare([tensors])
    if prepared is None:
        return result
    keep, (kept,), table, *scratch = prepared  # a PreparedAdamW's tuple brings its partials buffer
    out = tables.norms_of_kept(result, keep)
    partials = scratch[0] if scratch else torch.empty(table.n_chunks, dtype=torch.float32, device=result.device)
    extension().grad_sq_norms(*_table_args(table, kept[0].dtype), out, partials)
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
    _, lists, table, eight = prepared
    master = bool(master_params)
    sc = kernel_scalars(lr, step, beta1=beta1, beta2=beta2, eps=eps, flush=True)
    extension().momentum_flush_(
        *_table_args(table, lists[0][0].dtype),
        *_scalar_args(sc),
        master,
        bool(stochastic),
        int(seed),
        bool(compensation),
        _maps(lists[0][0].device) if eight else None,
    )
