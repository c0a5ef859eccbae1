"""The public ops. Each one checks its arguments, asks `backends.resolve` which backend runs, and
calls the op declared in `library.py`; the backend module (`reference`, `triton`, `cuda`) does the
work. Public function -> check + resolve -> torch.ops.misa.* -> backend kernel."""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import (
    backends,
    checks,
    library,  # noqa: F401  (registers torch.ops.misa.*)
)


def _split(value):
    # The schema cannot take "float or Tensor": a tensor travels in its own slot.
    return (0.0, value) if isinstance(value, Tensor) else (float(value), None)


def adamw_step_(
    params: Sequence[Tensor],
    grads: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    lr,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    step,
    fresh: bool = False,
    grad_sq_norms: Optional[Tensor] = None,
    master_params: Optional[Sequence[Tensor]] = None,
    rounding: str = "nearest",
    seed: int = 0,
    skip: Optional[Tensor] = None,
    backend: str = "auto",
) -> None:
    """One AdamW step over every tensor, in place, exactly as `torch.optim.AdamW` (fp32 math).

    With `grad_sq_norms` (fp32, one entry per tensor) each tensor's squared gradient norm is added to
    it in the same pass. `fresh=True` treats the states as zero and never reads them.

    `master_params` (fp32, one per bf16/fp16 parameter): the update reads and writes the master and
    writes the parameter as the rounded master, in the same pass; with `fresh=True` the master is first
    set from the parameter (not read). `rounding="stochastic"` (bf16 only) rounds the fp32 result into
    the parameter without bias, reproducibly from `seed` (vary it per step).

    `skip` (a 0-d fp32 device tensor, read by the kernel, never by the host): when nonzero the step
    writes nothing (grad_sq_norms included), except that a fresh step defines its states as zero (and
    the masters as the weights), so that the next step, called with fresh=False and the same `step`,
    starts from them exactly as from a fresh step. This lets a caller skip a step on a device-side
    decision (non-finite gradients) without waiting for the device.
    """
    params = checks.as_tensor_list("params", params)
    grads = checks.as_tensor_list("grads", grads)
    exp_avgs = checks.as_tensor_list("exp_avgs", exp_avgs)
    exp_avg_sqs = checks.as_tensor_list("exp_avg_sqs", exp_avg_sqs)
    n = checks.check_same_length(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    if n == 0:
        return
    device = params[0].device
    checks.check_device(device, params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    checks.check_params_and_grads(params, grads)
    checks.check_states(params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    masters = checks.check_master_params(params, master_params)
    checks.check_device(device, master_params=masters)
    checks.check_distinct(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs,
                          master_params=masters)
    stochastic = checks.check_rounding(rounding, params[0].dtype, seed)
    checks.check_grad_sq_norms(grad_sq_norms, n, device)
    checks.check_skip(skip, device)
    checks.check_scalar_or_0d("lr", lr, device, minimum=0.0)
    checks.check_scalar_or_0d("step", step, device, minimum=1, integer=True)
    checks.check_hyper(beta1, beta2, eps, weight_decay)
    chosen = backends.resolve(backend, device)
    lr_value, lr_tensor = _split(lr)
    step_value, step_tensor = _split(step)
    torch.ops.misa.adamw_step_(params, grads, exp_avgs, exp_avg_sqs, grad_sq_norms, masters, lr_value, lr_tensor,
                               step_value, step_tensor, beta1, beta2, eps, weight_decay, bool(fresh), stochastic,
                               int(seed), skip, chosen)
    backends.record(chosen)


def grad_sq_norms(tensors: Sequence[Tensor], backend: str = "auto") -> Tensor:
    """sum(x*x) of every tensor, in fp32, as one fp32 tensor (one launch on the fused backends)."""
    tensors = checks.as_tensor_list("tensors", tensors)
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    device = tensors[0].device
    checks.check_device(device, tensors=tensors)
    for i, t in enumerate(tensors):
        if t.dtype not in checks.PARAM_DTYPES:
            raise TypeError(f"tensors[{i}]: dtype {t.dtype} is not supported; expected float32, bfloat16 or float16")
        if t.dtype != tensors[0].dtype:
            raise TypeError(f"tensors[{i}]: all tensors of one call must share a dtype; got "
                            f"{tensors[0].dtype} and {t.dtype}")
    chosen = backends.resolve(backend, device)
    out = torch.ops.misa.grad_sq_norms(tensors, chosen)
    backends.record(chosen)
    return out


def momentum_flush_(
    params: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    lr,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    step,
    master_params: Optional[Sequence[Tensor]] = None,
    rounding: str = "nearest",
    seed: int = 0,
    backend: str = "auto",
) -> None:
    """The end-of-period step of MISA: p -= lr * beta1/(1-beta1) * m_hat / (sqrt(v_hat) + eps).
    States are read, never written; with `master_params` the masters are updated and the parameters
    written as the rounded masters (`rounding` as in `adamw_step_`)."""
    params = checks.as_tensor_list("params", params)
    exp_avgs = checks.as_tensor_list("exp_avgs", exp_avgs)
    exp_avg_sqs = checks.as_tensor_list("exp_avg_sqs", exp_avg_sqs)
    n = checks.check_same_length(params=params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    if n == 0:
        return
    device = params[0].device
    checks.check_device(device, params=params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    checks.check_params_and_grads(params, params)
    checks.check_states(params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    masters = checks.check_master_params(params, master_params)
    checks.check_device(device, master_params=masters)
    checks.check_distinct(params=params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs, master_params=masters)
    stochastic = checks.check_rounding(rounding, params[0].dtype, seed)
    checks.check_scalar_or_0d("lr", lr, device, minimum=0.0)
    checks.check_scalar_or_0d("step", step, device, minimum=1, integer=True)
    checks.check_hyper(beta1, beta2, eps)
    chosen = backends.resolve(backend, device)
    lr_value, lr_tensor = _split(lr)
    step_value, step_tensor = _split(step)
    torch.ops.misa.momentum_flush_(params, exp_avgs, exp_avg_sqs, masters, lr_value, lr_tensor, step_value,
                                   step_tensor, beta1, beta2, eps, stochastic, int(seed), chosen)
    backends.record(chosen)


__all__: List[str] = ["adamw_step_", "grad_sq_norms", "momentum_flush_"]
