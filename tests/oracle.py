"""A float64 implementation of the op contracts in DESIGN.md, written from the formulas, independent
of misa_kernels. Inputs are upcast exactly; results stay float64."""

import math

import torch


def adamw_step(
    params,
    grads,
    exp_avgs,
    exp_avg_sqs,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step,
    fresh,
    grad_sq_norms=None,
    master_params=None,
):
    """With master_params the update starts from the master (from the parameter when fresh); the
    returned parameters are then the updated masters, which the kernel must round into the weights."""
    out_p, out_m, out_v = [], [], []
    norms = None if grad_sq_norms is None else grad_sq_norms.double().clone()
    bc1 = 1 - beta1**step
    bc2 = 1 - beta2**step
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        if master_params is not None and not fresh:
            p = master_params[i].reshape(p.shape)
        p, g = p.double(), g.double()
        m = torch.zeros_like(p) if fresh else m.double().reshape(p.shape)
        v = torch.zeros_like(p) if fresh else v.double().reshape(p.shape)
        if norms is not None:
            norms[i] += (g * g).sum()
        m = beta1 * m + (1 - beta1) * g
        v = beta2 * v + (1 - beta2) * g * g
        p = p * (1 - lr * weight_decay) - (lr / bc1) * m / (v.sqrt() / math.sqrt(bc2) + eps)
        out_p.append(p)
        out_m.append(m)
        out_v.append(v)
    return out_p, out_m, out_v, norms


def grad_sq_norms(tensors):
    return torch.tensor([float((t.double() ** 2).sum()) for t in tensors], dtype=torch.float64)


def momentum_flush(params, exp_avgs, exp_avg_sqs, *, lr, beta1, beta2, eps, step, master_params=None):
    m_scale = 1 / (1 - beta1**step)
    v_scale = 1 / (1 - beta2**step)
    out = []
    if master_params is not None:
        params = [w.reshape(p.shape) for w, p in zip(master_params, params)]
    for p, m, v in zip(params, exp_avgs, exp_avg_sqs):
        m_hat = m.double().reshape(p.shape) * m_scale
        v_hat = v.double().reshape(p.shape) * v_scale
        out.append(p.double() - lr * beta1 / (1 - beta1) * m_hat / (v_hat.sqrt() + eps))
    return out


def rel_err(got, want) -> float:
    """||got - want|| / ||want|| over a whole list of tensors, compared on the CPU (an oracle may be computed
    there while the kernel's output stays on the GPU)."""
    num = sum(float(((g.double().cpu() - w.double().cpu()) ** 2).sum()) for g, w in zip(got, want))
    den = sum(float((w.double().cpu() ** 2).sum()) for w in want)
    return math.sqrt(num) / max(math.sqrt(den), 1e-30)
