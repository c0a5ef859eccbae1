"""The pure-torch path: runs on any device, is the CPU backend, the test oracle's twin and the
benchmark baseline. It follows `torch.optim.AdamW`'s arithmetic (fp32 math, decoupled weight decay,
bias correction, lerp for the first moment), so that `torch.optim.AdamW` is a second oracle, and uses
torch's `_foreach` ops, as torch's own multi-tensor AdamW does, so that it is a fair baseline.
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


def _as_fp32(tensors: List[Tensor]) -> List[Tensor]:
    return [t if t.dtype == torch.float32 else t.float() for t in tensors]


def _shaped_like(states: List[Tensor], params: List[Tensor]) -> List[Tensor]:
    # States need only the parameter's element count (e.g. flat arena views); foreach ops want shapes.
    return [s if s.shape == p.shape else s.view(p.shape) for s, p in zip(states, params)]


def _write_back(params: List[Tensor], params_fp32: List[Tensor]) -> None:
    low = [(p, q) for p, q in zip(params, params_fp32) if q is not p]
    if low:
        torch._foreach_copy_([p for p, _ in low], [q for _, q in low])


def _apply_update(params_fp32, exp_avgs, denom, step_size) -> None:
    if isinstance(step_size, Tensor):
        update = torch._foreach_div(exp_avgs, denom)
        torch._foreach_mul_(update, step_size)
        torch._foreach_sub_(params_fp32, update)
    else:
        torch._foreach_addcdiv_(params_fp32, exp_avgs, denom, value=-step_size)


def _denominator(exp_avg_sqs, bc2_sqrt, eps):
    denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    return denom


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
    exp_avgs, exp_avg_sqs = _shaped_like(exp_avgs, params), _shaped_like(exp_avg_sqs, params)
    g = _as_fp32(grads)
    if grad_sq_norms is not None:
        grad_sq_norms.add_(torch.stack([t.square().sum() for t in g]))
    if fresh:
        # States are treated as zero and never read: they may hold anything (even NaN).
        torch._foreach_copy_(exp_avgs, g)
        torch._foreach_mul_(exp_avgs, 1 - beta1)
        torch._foreach_copy_(exp_avg_sqs, g)
        torch._foreach_mul_(exp_avg_sqs, g)
        torch._foreach_mul_(exp_avg_sqs, 1 - beta2)
    else:
        torch._foreach_lerp_(exp_avgs, g, 1 - beta1)
        torch._foreach_mul_(exp_avg_sqs, beta2)
        torch._foreach_addcmul_(exp_avg_sqs, g, g, value=1 - beta2)
    p = _as_fp32(params)
    torch._foreach_mul_(p, 1 - lr * weight_decay)
    _apply_update(p, exp_avgs, _denominator(exp_avg_sqs, bc2_sqrt, eps), step_size)
    _write_back(params, p)


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
    exp_avgs, exp_avg_sqs = _shaped_like(exp_avgs, params), _shaped_like(exp_avg_sqs, params)
    p = _as_fp32(params)
    _apply_update(p, exp_avgs, _denominator(exp_avg_sqs, bc2_sqrt, eps), step_size)
    _write_back(params, p)
