"""The public ops. Each one checks its arguments, asks `backends.resolve` which backend runs, and hands
the call to the backend module (`reference`, `triton`, `cuda`) that does the work:
public function -> checks + resolve -> backend launcher -> kernel.

Under torch.compile, export, fake tensors or any tensor subclass, the call goes through the op
declared in `library.py` (torch.ops.misa.*) instead, so that tracing sees one op with its schema. A
plain eager call skips the dispatcher's Python layers (they cost more host time than the launch: the
H100 profile) and bumps the version counters of what it wrote itself, as the op would.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import (
    backends,
    checks,
    library,  # registers torch.ops.misa.*
)


def _eager(plain: bool) -> bool:
    return plain and not torch.compiler.is_compiling() and torch._C._len_torch_dispatch_stack() == 0


def _wrote(tensors: List[Tensor]) -> None:
    # What the op's ADInplaceOrView layer does for a mutated argument: autograd then sees the change.
    torch.autograd.graph.increment_version(tensors)


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
    compensation: Optional[Sequence[Tensor]] = None,
    exp_avg_absmax: Optional[Sequence[Tensor]] = None,
    exp_avg_sq_absmax: Optional[Sequence[Tensor]] = None,
    backend: str = "auto",
) -> None:
    """One AdamW step over every tensor, in place, exactly as `torch.optim.AdamW` (fp32 math).

    With `grad_sq_norms` (fp32, one entry per tensor) each tensor's squared gradient norm is added to
    it in the same pass. `fresh=True` treats the states as zero and never reads them.

    `master_params` (fp32, one per bf16/fp16 parameter): the update reads and writes the master and
    writes the parameter as the rounded master, in the same pass; with `fresh=True` the master is first
    set from the parameter (not read). `rounding="stochastic"` (bf16 only) rounds the fp32 result into
    the parameter without bias, reproducibly from `seed` (vary it per step).

    `step` may also be a 1-D float32 device tensor, one step count per tensor: tensors activated at
    different steps (their bias corrections differ) then share one call.

    `skip` (a 0-d fp32 device tensor, read by the kernel, never by the host): when nonzero the step
    writes nothing (grad_sq_norms included), except that a fresh step defines its states as zero (and
    the masters as the weights), so that the next step, called with fresh=False and the same `step`,
    starts from them exactly as from a fresh step. This lets a caller skip a step on a device-side
    decision (non-finite gradients) without waiting for the device.

    Compact formats (quant.py, README "State formats"): `exp_avgs`/`exp_avg_sqs` as uint8 codes of the
    8-bit blockwise format, with their fp32 block scales in `exp_avg_absmax`/`exp_avg_sq_absmax` (one per
    256 elements): the states are dequantized, updated in fp32, the parameter written from the
    unquantized new states, then each block is requantized to its new absmax. `compensation` (bf16, one
    per bf16/fp16 parameter, instead of `master_params`): Kahan-compensated updates, the fp32 value
    being `param + compensation`; the parameter is written as its nearest rounding and the compensation
    as the rounding error. A fresh step reads neither codes, scales nor compensation.
    """
    optional = (master_params, compensation, exp_avg_absmax, exp_avg_sq_absmax)
    lists, device, plain = checks.adamw_operands(
        params, grads, exp_avgs, exp_avg_sqs, optional, remember=not torch.compiler.is_compiling()
    )
    if lists[0]:
        run_adamw_step(
            lists,
            device,
            plain,
            backend,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            step=step,
            fresh=fresh,
            grad_sq_norms=grad_sq_norms,
            rounding=rounding,
            seed=seed,
            skip=skip,
        )


def run_adamw_step(
    lists,
    device,
    plain: bool,
    backend: str,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step,
    fresh,
    grad_sq_norms,
    rounding,
    seed,
    skip,
    prepared=None,
    written=None,
) -> None:
    """`adamw_step_` after its tensor lists were checked (by it, or once by a PreparedAdamW): the scalar
    checks, the backend, the launch. `prepared`: a callable giving the fused backends' chunk table tuple
    (tables.prepare_formats), or None to make it here; `written`: the tensors the call writes (kept by a
    PreparedAdamW), or None to list them here."""
    params, grads, exp_avgs, exp_avg_sqs, masters, comp, m_absmax, v_absmax = lists
    stochastic = checks.adamw_scalars(
        len(params),
        device,
        params[0].dtype,
        lr=lr,
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        step=step,
        grad_sq_norms=grad_sq_norms,
        skip=skip,
        rounding=rounding,
        seed=seed,
        compensation=comp,
    )
    chosen = backends.resolve(backend, device)
    if _eager(plain):
        extra = library.compact_kwargs(comp, m_absmax, v_absmax)
        if prepared is not None and chosen != "torch":
            extra["prepared"] = prepared()
        with torch.no_grad():  # an update, as in torch.optim's step: the op is below autograd too
            backends.implementation(chosen).adamw_step_(
                params,
                grads,
                exp_avgs,
                exp_avg_sqs,
                grad_sq_norms,
                masters,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                weight_decay=weight_decay,
                step=step,
                fresh=bool(fresh),
                stochastic=stochastic,
                seed=int(seed),
                skip=skip,
                **extra,
            )
        if written is None:
            written = [t for ts in (params, exp_avgs, exp_avg_sqs, masters, comp, m_absmax, v_absmax) for t in ts]
        _wrote(written if grad_sq_norms is None else written + [grad_sq_norms])
    else:
        lr_value, lr_tensor = _split(lr)
        step_value, step_tensor = _split(step)
        torch.ops.misa.adamw_step_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            grad_sq_norms,
            masters,
            comp,
            m_absmax,
            v_absmax,
            lr_value,
            lr_tensor,
            step_value,
            step_tensor,
            beta1,
            beta2,
            eps,
            weight_decay,
            bool(fresh),
            stochastic,
            int(seed),
            skip,
            chosen,
        )
    backends.record(chosen)


def grad_sq_norms(tensors: Sequence[Tensor], backend: str = "auto") -> Tensor:
    """sum(x*x) of every tensor, in fp32, as one fp32 tensor (one launch on the fused backends)."""
    tensors, device, plain = checks.norm_operands(tensors)
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    return run_grad_sq_norms(tensors, device, plain, backend)


def run_grad_sq_norms(
    tensors, device, plain: bool, backend: str, out: Optional[Tensor] = None, prepared=None
) -> Tensor:
    """`grad_sq_norms` after its tensors were checked, the norms added to `out` when given (fp32, one per
    tensor); `prepared` as in `run_adamw_step` (a chunk table tuple of the tensors, tables.prepare)."""
    chosen = backends.resolve(backend, device)
    if _eager(plain):
        extra = {} if out is None else {"out": out}
        if prepared is not None and chosen != "torch":
            extra["prepared"] = prepared()
        result = backends.implementation(chosen).grad_sq_norms(tensors, **extra)
        if out is not None:
            _wrote([out])
    else:
        result = torch.ops.misa.grad_sq_norms(tensors, chosen)
        if out is not None:
            result = out.add_(result)
    backends.record(chosen)
    return result


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
    compensation: Optional[Sequence[Tensor]] = None,
    exp_avg_absmax: Optional[Sequence[Tensor]] = None,
    exp_avg_sq_absmax: Optional[Sequence[Tensor]] = None,
    backend: str = "auto",
) -> None:
    """The end-of-period step of MISA: p -= lr * beta1/(1-beta1) * m_hat / (sqrt(v_hat) + eps).
    States are read, never written; with `master_params` the masters are updated and the parameters
    written as the rounded masters (`rounding` as in `adamw_step_`); the compact formats as in
    `adamw_step_` (8-bit states are only read, the compensation is updated)."""
    optional = (master_params, compensation, exp_avg_absmax, exp_avg_sq_absmax)
    lists, device, plain = checks.flush_operands(
        params, exp_avgs, exp_avg_sqs, optional, remember=not torch.compiler.is_compiling()
    )
    params, exp_avgs, exp_avg_sqs, masters, comp, m_absmax, v_absmax = lists
    if not params:
        return
    stochastic = checks.check_rounding(rounding, params[0].dtype, seed)
    checks.check_rounding_with(comp, rounding)
    checks.check_scalar_or_0d("lr", lr, device, minimum=0.0)
    checks.check_scalar_or_0d("step", step, device, minimum=1, integer=True)
    checks.check_hyper(beta1, beta2, eps)
    chosen = backends.resolve(backend, device)
    if _eager(plain):
        with torch.no_grad():
            backends.implementation(chosen).momentum_flush_(
                params,
                exp_avgs,
                exp_avg_sqs,
                masters,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                step=step,
                stochastic=stochastic,
                seed=int(seed),
                **library.compact_kwargs(comp, m_absmax, v_absmax),
            )
        _wrote(params + masters + comp)
    else:
        lr_value, lr_tensor = _split(lr)
        step_value, step_tensor = _split(step)
        torch.ops.misa.momentum_flush_(
            params,
            exp_avgs,
            exp_avg_sqs,
            masters,
            comp,
            m_absmax,
            v_absmax,
            lr_value,
            lr_tensor,
            step_value,
            step_tensor,
            beta1,
            beta2,
            eps,
            stochastic,
            int(seed),
            chosen,
        )
    backends.record(chosen)


__all__: List[str] = ["adamw_step_", "grad_sq_norms", "momentum_flush_"]
