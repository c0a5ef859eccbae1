"""The pure-torch path: runs on any device, is the CPU backend, the test oracle's twin and the
benchmark baseline. It follows `torch.optim.AdamW`'s single-tensor code line by line (fp32 math,
decoupled weight decay, bias correction), so that `torch.optim.AdamW` is a second oracle.
"""

from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor


def _bias_corrections(beta1, beta2, step):
    # `step` may be a Python number or a 0-d tensor; both follow the same formulas.
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    bc2_sqrt = bias_correction2.sqrt() if isinstance(bias_correction2, Tensor) else bias_correction2**0.5
    return bias_correction1, bc2_sqrt


def _write_back(param: Tensor, param_fp32: Tensor) -> None:
    if param_fp32 is not param:
        param.copy_(param_fp32)


def adamw_step_(
    params: List[Tensor],
    grads: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    grad_sq_norms: Optional[Tensor],
    *,
    lr,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step,
    fresh: bool,
) -> None:
    bias_correction1, bc2_sqrt = _bias_corrections(beta1, beta2, step)
    step_size = lr / bias_correction1
    for i, (param, grad, exp_avg, exp_avg_sq) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        g = grad.float()
        if grad_sq_norms is not None:
            grad_sq_norms[i] += g.square().sum()
        if fresh:
            # States are treated as zero and never read: they may hold anything (even NaN).
            exp_avg.copy_(g).mul_(1 - beta1)
            exp_avg_sq.copy_(g).mul_(g).mul_(1 - beta2)
        else:
            exp_avg.lerp_(g, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p = param.float()
        p.mul_(1 - lr * weight_decay)
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
        if isinstance(step_size, Tensor):
            p.sub_(exp_avg / denom * step_size)
        else:
            p.addcdiv_(exp_avg, denom, value=-step_size)
        _write_back(param, p)


def grad_sq_norms(tensors: List[Tensor]) -> Tensor:
    if not tensors:
        return torch.zeros(0, dtype=torch.float32)
    return torch.stack([t.float().square().sum() for t in tensors])


def momentum_flush_(
    params: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    *,
    lr,
    beta1: float,
    beta2: float,
    eps: float,
    step,
) -> None:
    bias_correction1, bc2_sqrt = _bias_corrections(beta1, beta2, step)
    step_size = lr * (beta1 / (1 - beta1)) / bias_correction1
    for param, exp_avg, exp_avg_sq in zip(params, exp_avgs, exp_avg_sqs):
        p = param.float()
        denom = (exp_avg_sq.sqrt() / bc2_sqrt).add_(eps)
        if isinstance(step_size, Tensor):
            p.sub_(exp_avg / denom * step_size)
        else:
            p.addcdiv_(exp_avg, denom, value=-step_size)
        _write_back(param, p)
