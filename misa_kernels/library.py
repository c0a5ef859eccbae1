"""The ops, declared once as `torch.library` custom ops (schema with mutation annotations, plus a fake
for tracing). Each op's body hands the call to the backend that `backends.resolve` already chose, so
torch.compile, opcheck and FakeTensor see one op whatever runs underneath."""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from . import backends


def compact_kwargs(compensation, exp_avg_absmax, exp_avg_sq_absmax) -> dict:
    """The backends' keyword arguments for the compact formats; none for the fp32 formats."""
    if not compensation and not exp_avg_absmax:
        return {}
    return dict(compensation=compensation, exp_avg_absmax=exp_avg_absmax, exp_avg_sq_absmax=exp_avg_sq_absmax)


def _number_or_tensor(value: float, tensor: Optional[Tensor]):
    return tensor if tensor is not None else value


@torch.library.custom_op(
    "misa::adamw_step_",
    mutates_args=(
        "params",
        "exp_avgs",
        "exp_avg_sqs",
        "grad_sq_norms",
        "master_params",
        "compensation",
        "exp_avg_absmax",
        "exp_avg_sq_absmax",
    ),
)
def adamw_step_op(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    grad_sq_norms: Optional[Tensor],
    master_params: List[Tensor],
    compensation: List[Tensor],
    exp_avg_absmax: List[Tensor],
    exp_avg_sq_absmax: List[Tensor],
    lr: float,
    lr_tensor: Optional[Tensor],
    step: float,
    step_tensor: Optional[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    fresh: bool,
    stochastic: bool,
    seed: int,
    skip: Optional[Tensor],
    backend: str,
) -> None:
    backends.implementation(backend).adamw_step_(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        grad_sq_norms,
        master_params,
        lr=_number_or_tensor(lr, lr_tensor),
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        weight_decay=weight_decay,
        step=_number_or_tensor(step, step_tensor),
        fresh=fresh,
        stochastic=stochastic,
        seed=seed,
        skip=skip,
        **compact_kwargs(compensation, exp_avg_absmax, exp_avg_sq_absmax),
    )


@adamw_step_op.register_fake
def _(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    grad_sq_norms,
    master_params,
    compensation,
    exp_avg_absmax,
    exp_avg_sq_absmax,
    lr,
    lr_tensor,
    step,
    step_tensor,
    beta1,
    beta2,
    eps,
    weight_decay,
    fresh,
    stochastic,
    seed,
    skip,
    backend,
) -> None:
    return None


@torch.library.custom_op("misa::grad_sq_norms", mutates_args=())
def grad_sq_norms_op(tensors: List[Tensor], backend: str) -> Tensor:
    return backends.implementation(backend).grad_sq_norms(tensors)


@grad_sq_norms_op.register_fake
def _(tensors, backend):
    return tensors[0].new_empty(len(tensors), dtype=torch.float32)


@torch.library.custom_op("misa::momentum_flush_", mutates_args=("params", "master_params", "compensation"))
def momentum_flush_op(
    params: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    master_params: List[Tensor],
    compensation: List[Tensor],
    exp_avg_absmax: List[Tensor],
    exp_avg_sq_absmax: List[Tensor],
    lr: float,
    lr_tensor: Optional[Tensor],
    step: float,
    step_tensor: Optional[Tensor],
    beta1: float,
    beta2: float,
    eps: float,
    stochastic: bool,
    seed: int,
    backend: str,
) -> None:
    backends.implementation(backend).momentum_flush_(
        params,
        exp_avgs,
        exp_avg_sqs,
        master_params,
        lr=_number_or_tensor(lr, lr_tensor),
        beta1=beta1,
        beta2=beta2,
        eps=eps,
        step=_number_or_tensor(step, step_tensor),
        stochastic=stochastic,
        seed=seed,
        **compact_kwargs(compensation, exp_avg_absmax, exp_avg_sq_absmax),
    )


@momentum_flush_op.register_fake
def _(
    params,
    exp_avgs,
    exp_avg_sqs,
    master_params,
    compensation,
    exp_avg_absmax,
    exp_avg_sq_absmax,
    lr,
    lr_tensor,
    step,
    step_tensor,
    beta1,
    beta2,
    eps,
    stochastic,
    seed,
    backend,
) -> None:
    return None
