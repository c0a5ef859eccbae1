"""The pure-torch path: runs on any device, is the CPU backend, the test oracle's twin and the
benchmark baseline. It follows `torch.optim.AdamW`'s arithmetic (fp32 math, decoupled weight decay,
bias correction, lerp for the first moment), so that `torch.optim.AdamW` is a second oracle, and uses
torch's `_foreach` ops, as torch's own multi-tensor AdamW does, so that it is a fair baseline.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import torch
from torch import Tensor

from . import quant
from .scalars import GOLDEN, HASH_M1, HASH_M2

_MASK32 = 0xFFFFFFFF


def _bias_corrections(beta1, beta2, step):
    # `step` may be a Python number or a 0-d tensor; both follow the same formulas, in float64 as the
    # kernels' host-side folding does (scalars.py).
    if isinstance(step, Tensor):
        step = step.double()
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    bc2_sqrt = bias_correction2.sqrt() if isinstance(bias_correction2, Tensor) else bias_correction2**0.5
    return bias_correction1, bc2_sqrt


def _as_fp32(tensors: List[Tensor]) -> List[Tensor]:
    return [t if t.dtype == torch.float32 else t.float() for t in tensors]


def _shaped_like(states: List[Tensor], params: List[Tensor]) -> List[Tensor]:
    # States need only the parameter's element count (e.g. flat arena views); foreach ops want shapes.
    return [s if s.shape == p.shape else s.view(p.shape) for s, p in zip(states, params)]


def _mul32(x: Tensor, c: int) -> Tensor:
    # (x * c) mod 2**32 for int64 tensors holding uint32 values, without int64 overflow.
    lo, hi = c & 0xFFFF, c >> 16
    return (x * lo + (((x * hi) & 0xFFFF) << 16)) & _MASK32


def _hash32(x: Tensor) -> Tensor:
    # lowbias32, as scalars.hash32 and the Triton and CUDA kernels compute it.
    x = x ^ (x >> 16)
    x = _mul32(x, HASH_M1)
    x = x ^ (x >> 15)
    x = _mul32(x, HASH_M2)
    return x ^ (x >> 16)


def stochastic_round_bf16(x: Tensor, seed: int, tensor_index: int) -> Tensor:
    """fp32 -> bf16, rounding up with probability equal to the distance from the lower neighbour."""
    key = int(_hash32(torch.tensor((seed + tensor_index * GOLDEN) & _MASK32, dtype=torch.int64)))
    idx = torch.arange(x.numel(), dtype=torch.int64, device=x.device)
    noise = _hash32(idx ^ key) & 0xFFFF
    bits = x.reshape(-1).view(torch.int32).to(torch.int64) & _MASK32
    bits = (bits + noise) & 0xFFFF0000
    bits = torch.where(bits >= 2**31, bits - 2**32, bits).to(torch.int32)
    rounded = bits.view(torch.float32).to(torch.bfloat16).view(x.shape)  # exact: the low bits are zero
    return torch.where(torch.isnan(x), x.to(torch.bfloat16), rounded)


def _write_back(params: List[Tensor], params_fp32: List[Tensor], stochastic: bool = False, seed: int = 0) -> None:
    if stochastic and params and params[0].dtype == torch.bfloat16:
        for i, (p, q) in enumerate(zip(params, params_fp32)):
            p.copy_(stochastic_round_bf16(q, seed, i))
        return
    low = [(p, q) for p, q in zip(params, params_fp32) if q is not p]
    if low:
        torch._foreach_copy_([p for p, _ in low], [q for _, q in low])


def _nonempty(*lists: List[Tensor]):
    # Every backend numbers the non-empty tensors alone (their index keys stochastic rounding).
    keep = [i for i, t in enumerate(lists[0]) if t.numel() > 0]
    return [[ts[i] for i in keep] for ts in lists]


def _working_copy(params: List[Tensor], master_params: List[Tensor], fresh: bool) -> List[Tensor]:
    """The fp32 tensors the update runs on: the masters (set from the weights on a fresh step), or
    fp32 copies of low-precision weights, or fp32 weights themselves."""
    if not master_params:
        return _as_fp32(params)
    masters = _shaped_like(master_params, params)
    if fresh:
        torch._foreach_copy_(masters, params)
    return masters


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
    master_params: List[Tensor],
    *,
    lr,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    step,
    fresh: bool,
    stochastic: bool = False,
    seed: int = 0,
    skip: Optional[Tensor] = None,
    compensation: Sequence[Tensor] = (),
    exp_avg_absmax: Sequence[Tensor] = (),
    exp_avg_sq_absmax: Sequence[Tensor] = (),
) -> None:
    if isinstance(step, Tensor) and step.dim() == 1:
        # A step per tensor: tensor by tensor, each keyed for stochastic rounding by its index among the call's
        # non-empty tensors, as the fused kernels number them.
        index = 0
        for i in range(len(params)):
            if params[i].numel() == 0:  # nothing to update, nothing added to its norm
                continue
            one = lambda xs, i=i: list(xs[i : i + 1]) if xs else []  # noqa: E731
            adamw_step_(
                one(params),
                one(grads),
                one(exp_avgs),
                one(exp_avg_sqs),
                None if grad_sq_norms is None else grad_sq_norms[i : i + 1],
                one(master_params),
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                weight_decay=weight_decay,
                step=step[i],
                fresh=fresh,
                stochastic=stochastic,
                seed=(seed + index * GOLDEN) & _MASK32,
                skip=skip,
                compensation=one(compensation),
                exp_avg_absmax=one(exp_avg_absmax),
                exp_avg_sq_absmax=one(exp_avg_sq_absmax),
            )
            index += 1
        return
    if compensation or exp_avg_absmax:
        _compact(
            params,
            exp_avgs,
            exp_avg_sqs,
            master_params,
            compensation,
            exp_avg_absmax,
            exp_avg_sq_absmax,
            fresh=fresh,
            skip=skip,
            step=lambda m, v, w: adamw_step_(
                params,
                grads,
                m,
                v,
                grad_sq_norms,
                w,
                lr=lr,
                beta1=beta1,
                beta2=beta2,
                eps=eps,
                weight_decay=weight_decay,
                step=step,
                fresh=fresh,
                stochastic=stochastic,
                seed=seed,
                skip=skip,
            ),
        )
        return
    if skip is not None:
        _skippable_step(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            grad_sq_norms,
            master_params,
            skip,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            step=step,
            fresh=fresh,
            stochastic=stochastic,
            seed=seed,
        )
        return
    bias_correction1, bc2_sqrt = _bias_corrections(beta1, beta2, step)
    step_size = lr / bias_correction1
    exp_avgs, exp_avg_sqs = _shaped_like(exp_avgs, params), _shaped_like(exp_avg_sqs, params)
    g = _as_fp32(grads)
    if grad_sq_norms is not None:
        grad_sq_norms.add_(torch.stack([t.square().sum() for t in g]))
    if master_params or stochastic:
        lists = _nonempty(params, g, exp_avgs, exp_avg_sqs, *([master_params] if master_params else []))
        params, g, exp_avgs, exp_avg_sqs = lists[:4]
        master_params = lists[4] if master_params else []
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
    p = _working_copy(params, master_params, fresh)
    torch._foreach_mul_(p, 1 - lr * weight_decay)
    _apply_update(p, exp_avgs, _denominator(exp_avg_sqs, bc2_sqrt, eps), step_size)
    _write_back(params, p, stochastic, seed)


def _skippable_step(
    params, grads, exp_avgs, exp_avg_sqs, grad_sq_norms, master_params, skip: Tensor, *, fresh, **hyper
) -> None:
    """The step, then every written tensor selected back on the device where `skip` is set (no host
    sync): a skipped step leaves everything as it was, except that a fresh one leaves zero states and
    masters equal to the weights."""
    keep = skip == 0
    before = {
        "params": [p.clone() for p in params],
        "exp_avgs": [torch.zeros_like(m) if fresh else m.clone() for m in exp_avgs],
        "exp_avg_sqs": [torch.zeros_like(v) if fresh else v.clone() for v in exp_avg_sqs],
        "master_params": [p.float().reshape(w.shape) if fresh else w.clone() for p, w in zip(params, master_params)],
    }
    norms_before = grad_sq_norms.clone() if grad_sq_norms is not None else None
    adamw_step_(params, grads, exp_avgs, exp_avg_sqs, grad_sq_norms, master_params, fresh=fresh, **hyper)
    for name, tensors in (
        ("params", params),
        ("exp_avgs", exp_avgs),
        ("exp_avg_sqs", exp_avg_sqs),
        ("master_params", master_params),
    ):
        for t, old in zip(tensors, before[name]):
            t.copy_(torch.where(keep, t, old))
    if grad_sq_norms is not None:
        grad_sq_norms.copy_(torch.where(keep, grad_sq_norms, norms_before))


def grad_sq_norms(tensors: List[Tensor], out: Optional[Tensor] = None) -> Tensor:
    """The squared norms, added to `out` when given; returns the tensor written."""
    if not tensors:
        return torch.zeros(0, dtype=torch.float32) if out is None else out
    norms = torch.stack([t.float().square().sum() for t in tensors])
    return norms if out is None else out.add_(norms)


def momentum_flush_(
    params: List[Tensor],
    exp_avgs: List[Tensor],
    exp_avg_sqs: List[Tensor],
    master_params: List[Tensor],
    *,
    lr,
    beta1: float,
    beta2: float,
    eps: float,
    step,
    stochastic: bool = False,
    seed: int = 0,
    compensation: Sequence[Tensor] = (),
    exp_avg_absmax: Sequence[Tensor] = (),
    exp_avg_sq_absmax: Sequence[Tensor] = (),
) -> None:
    if compensation or exp_avg_absmax:
        _compact(
            params,
            exp_avgs,
            exp_avg_sqs,
            master_params,
            compensation,
            exp_avg_absmax,
            exp_avg_sq_absmax,
            fresh=False,
            skip=None,
            writes_states=False,
            step=lambda m, v, w: momentum_flush_(
                params, m, v, w, lr=lr, beta1=beta1, beta2=beta2, eps=eps, step=step, stochastic=stochastic, seed=seed
            ),
        )
        return
    bias_correction1, bc2_sqrt = _bias_corrections(beta1, beta2, step)
    step_size = lr * (beta1 / (1 - beta1)) / bias_correction1
    exp_avgs, exp_avg_sqs = _shaped_like(exp_avgs, params), _shaped_like(exp_avg_sqs, params)
    if master_params or stochastic:
        lists = _nonempty(params, exp_avgs, exp_avg_sqs, *([master_params] if master_params else []))
        params, exp_avgs, exp_avg_sqs = lists[:3]
        master_params = lists[3] if master_params else []
    p = _working_copy(params, master_params, fresh=False)
    _apply_update(p, exp_avgs, _denominator(exp_avg_sqs, bc2_sqrt, eps), step_size)
    _write_back(params, p, stochastic, seed)


def _compact(
    params,
    exp_avgs,
    exp_avg_sqs,
    master_params,
    compensation,
    m_absmax,
    v_absmax,
    *,
    fresh: bool,
    skip: Optional[Tensor],
    step: Callable,
    writes_states: bool = True,
) -> None:
    """The compact formats, defined by the fp32 step they stand for: 8-bit states (codes + absmax,
    quant.py) are dequantized into fp32, a Kahan compensation `c` (bf16) makes the fp32 value `p + c`
    the master; `step(m, v, masters)` runs the fp32 update on them; then the new fp32 states are
    requantized and the new compensation is the rounding error `value - p`. A skipped step (skip != 0)
    keeps the old codes, absmax and compensation (requantizing unchanged states could move them),
    except that a fresh one leaves zero states and zero compensation, as the fp32 formats do."""
    eight = bool(m_absmax)
    if eight:
        qs, qu = quant.maps(params[0].device) if params else (None, None)
        if fresh:  # never read: any values do
            m32 = [torch.empty(p.shape, dtype=torch.float32, device=p.device) for p in params]
            v32 = [torch.empty(p.shape, dtype=torch.float32, device=p.device) for p in params]
        else:
            m32 = [quant.dequantize(c, a, qs).view(p.shape) for c, a, p in zip(exp_avgs, m_absmax, params)]
            v32 = [quant.dequantize(c, a, qu).view(p.shape) for c, a, p in zip(exp_avg_sqs, v_absmax, params)]
    else:
        m32, v32 = list(exp_avgs), list(exp_avg_sqs)
    if compensation:
        working = [
            p.float().reshape(-1) if fresh else p.float().reshape(-1) + c.float().reshape(-1)
            for p, c in zip(params, compensation)
        ]
    else:
        working = master_params
    step(m32, v32, working)
    keep = None if skip is None or fresh else skip == 0

    def write(out: Tensor, new: Tensor) -> None:
        new = new.reshape(out.shape)
        out.copy_(new if keep is None else torch.where(keep, new, out))

    if eight and writes_states:
        for i in range(len(params)):
            for codes, absmax, value, qmap in (
                (exp_avgs[i], m_absmax[i], m32[i], qs),
                (exp_avg_sqs[i], v_absmax[i], v32[i], qu),
            ):
                new_codes, new_absmax = quant.quantize(value, qmap)
                write(codes, new_codes)
                write(absmax, new_absmax)
    for p, c, w in zip(params, compensation, working):
        write(c, (w - p.float().reshape(-1)).to(c.dtype))
