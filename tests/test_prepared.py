"""prepare_adamw_step: `adamw_step_` with the lists a caller keeps checked once. A prepared call computes
what `adamw_step_` computes, to the bit, in every state format and backend; a steady call checks only the
gradients (once for a norms call and the step after it); storage that moved is checked again; a bad
gradient is named and nothing is written; autograd sees the writes."""

import pytest
import torch
from test_state_formats import _compensation, _states8

import misa_kernels as mk
from misa_kernels import checks

from conftest import test_device
from test_adamw_step import backend_params, make_masters, require

SIZES = [1, 127, 4097, 300]  # 4097 is larger than one chunk under the interpreter
FORMATS = ["fp32", "bf16+master", "bf16+8bit+kahan"]


def _case(fmt, device, seed):
    """(params, exp_avgs, exp_avg_sqs, kept keyword lists) in one format, steady (states already written)."""
    g = torch.Generator().manual_seed(seed)
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    params = [torch.randn(n, generator=g).to(dtype).to(device) for n in SIZES]
    if "8bit" in fmt:
        m, v, ma, va = _states8(SIZES, device, seed)
        return params, m, v, dict(exp_avg_absmax=ma, exp_avg_sq_absmax=va, compensation=_compensation(params, seed))
    m = [(torch.randn(n, generator=g) * 0.1).to(device) for n in SIZES]
    v = [(torch.rand(n, generator=g) * 0.01).to(device) for n in SIZES]
    return params, m, v, (dict(master_params=make_masters(params, seed)) if fmt == "bf16+master" else {})


def _grads(params, seed):
    g = torch.Generator().manual_seed(seed + 100)
    return [(torch.randn(p.shape, generator=g) * 0.5).to(p.dtype).to(p.device) for p in params]


def _copy(case):
    params, m, v, kept = case
    return (
        [t.clone() for t in params],
        [t.clone() for t in m],
        [t.clone() for t in v],
        {k: [t.clone() for t in ts] for k, ts in kept.items()},
    )


def _every(case):
    params, m, v, kept = case
    return params + m + v + [t for ts in kept.values() for t in ts]


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("fmt", FORMATS)
def test_a_prepared_call_is_adamw_step_to_the_bit(backend, fmt):
    """Three steps (norms measured first, a device step per tensor, then the skip flag set; new gradient
    tensors each time) against the same calls of the public ops on a copy."""
    device = test_device()
    require(backend, device)
    ours = _case(fmt, device, seed=1)
    theirs = _copy(ours)
    step = mk.prepare_adamw_step(*ours[:3], backend=backend, **ours[3])
    for k, (step_count, skip) in enumerate([(3, 0.0), (torch.full((len(SIZES),), 4.0, device=device), 0.0), (5, 1.0)]):
        grads = _grads(ours[0], seed=k)
        flag = torch.tensor(skip, device=device)
        norms_a = torch.full((len(SIZES),), 0.5, device=device)  # accumulated into, not overwritten
        norms_b = norms_a.clone()
        step.grad_sq_norms_(grads, norms_a)
        norms_b += mk.grad_sq_norms([g.clone() for g in grads], backend=backend)
        step(grads, lr=1e-3, weight_decay=0.1, step=step_count, skip=flag)
        mk.adamw_step_(
            theirs[0],
            [g.clone() for g in grads],
            theirs[1],
            theirs[2],
            lr=1e-3,
            weight_decay=0.1,
            step=step_count,
            skip=flag,
            backend=backend,
            **theirs[3],
        )
        assert torch.equal(norms_a, norms_b)
        for a, b in zip(_every(ours), _every(theirs)):
            assert torch.equal(a, b)
    assert mk.last_backend() == backend


@pytest.mark.parametrize("backend", backend_params())
def test_norms_accumulated_in_the_update_pass_match_the_public_op(backend):
    device = test_device()
    require(backend, device)
    ours = _case("bf16+master", device, seed=2)
    theirs = _copy(ours)
    grads = _grads(ours[0], seed=7)
    norms_a, norms_b = torch.zeros(len(SIZES), device=device), torch.zeros(len(SIZES), device=device)
    mk.prepare_adamw_step(*ours[:3], backend=backend, **ours[3])(grads, lr=1e-3, step=2, grad_sq_norms=norms_a)
    mk.adamw_step_(
        theirs[0], grads, theirs[1], theirs[2], lr=1e-3, step=2, grad_sq_norms=norms_b, backend=backend, **theirs[3]
    )
    assert torch.equal(norms_a, norms_b)
    assert all(torch.equal(a, b) for a, b in zip(_every(ours), _every(theirs)))


def test_a_steady_call_checks_the_gradients_once_and_the_kept_lists_never(monkeypatch):
    device = test_device()
    params, m, v, kept = _case("bf16+master", device, seed=3)
    step = mk.prepare_adamw_step(params, m, v, backend="torch", **kept)
    fits, full = [], []
    real_fit = checks._grads_fit
    monkeypatch.setattr(checks, "_grads_fit", lambda *a: fits.append(1) or real_fit(*a))
    monkeypatch.setattr(checks, "check_states", lambda *a, **k: full.append(a))
    for k in range(3):
        grads = _grads(params, seed=k)  # new tensors at every step, as after each backward
        step.grad_sq_norms_(grads, torch.zeros(len(SIZES), device=device))
        step(grads, lr=1e-3, step=k + 1)
    assert len(fits) == 3 and full == []


def test_storage_that_moved_is_checked_again():
    """`p.data = ...` keeps the tensor and moves its storage: the next call sees the new storage (and makes
    new tables), and a parameter that no longer fits its states is named."""
    device = test_device()
    params, m, v, _ = _case("fp32", device, seed=4)
    step = mk.prepare_adamw_step(params, m, v, backend="torch")
    step(_grads(params, 0), lr=1e-3, step=1)
    params[0].data = torch.randn(1, generator=torch.Generator().manual_seed(9)).to(device)
    twin = [p.clone() for p in params], [t.clone() for t in m], [t.clone() for t in v]
    grads = _grads(params, 1)
    step(grads, lr=1e-3, step=2)
    mk.adamw_step_(*twin[:1], grads, *twin[1:], lr=1e-3, step=2, backend="torch")
    assert all(torch.equal(a, b) for a, b in zip(params + m + v, twin[0] + twin[1] + twin[2]))
    params[1].data = torch.randn(128, device=device)
    with pytest.raises(ValueError, match=r"exp_avgs\[1\]: expected 128 elements"):
        step(_grads(params, 2), lr=1e-3, step=3)


@pytest.mark.parametrize("bad", ["dtype", "shape", "alias", "count", "strided", "sparse", "device"])
def test_a_bad_gradient_is_named_and_nothing_is_written(bad):
    device = test_device()
    params, m, v, kept = _case("bf16+master", device, seed=5)
    step = mk.prepare_adamw_step(params, m, v, backend="torch", **kept)
    step(_grads(params, 0), lr=1e-3, step=1)
    before = [t.clone() for t in params + m + v + kept["master_params"]]
    grads = _grads(params, 1)
    if bad == "dtype":
        grads[1], match = grads[1].float(), r"grads\[1\]: expected dtype torch.bfloat16"
    elif bad == "shape":
        grads[2], match = grads[2][:-1], r"grads\[2\]: expected shape \(4097,\)"
    elif bad == "alias":
        grads[0], match = params[0], r"grads\[0\] is the same tensor as params\[0\]"
    elif bad == "count":
        grads, match = grads[:-1], "tensor lists must have equal lengths"
    elif bad == "strided":
        grads[3], match = torch.randn(600, device=device).bfloat16()[::2], r"grads\[3\]: expected a contiguous"
    elif bad == "sparse":
        grads[0], match = torch.randn(1).bfloat16().to_sparse(), r"grads\[0\]: sparse tensors are not supported"
    else:
        grads[2], match = grads[2].to("meta"), r"grads\[2\]: expected a tensor on"
    with pytest.raises((TypeError, ValueError), match=match):
        step.grad_sq_norms_(grads, torch.zeros(len(SIZES), device=device))
    with pytest.raises((TypeError, ValueError), match=match):
        step(grads, lr=1e-3, step=2)
    assert all(torch.equal(a, b) for a, b in zip(before, params + m + v + kept["master_params"]))


def test_autograd_sees_the_writes_through_the_states_base():
    """The prepared call bumps one version counter per storage base (the states are views of one buffer here,
    as in the arena): a graph that saved a parameter, or any state view, sees the change."""
    device = test_device()
    params = [torch.nn.Parameter(torch.randn(n, device=device)) for n in SIZES]
    arena = torch.zeros(2 * sum(SIZES), device=device)
    views = list(arena.split(SIZES + SIZES))
    m, v = views[: len(SIZES)], views[len(SIZES) :]
    step = mk.prepare_adamw_step(params, m, v, backend="torch")
    with torch.enable_grad():
        loss = (params[0] * params[0]).sum()  # saves params[0] for backward
    versions = [t._version for t in params + m + v]
    step([torch.randn(n, device=device) for n in SIZES], lr=1e-3, step=1)
    assert all(t._version > n for t, n in zip(params + m + v, versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_empty_lists_and_a_backend_that_cannot_run():
    step = mk.prepare_adamw_step([], [], [])
    step([], lr=1e-3, step=1)
    assert len(step) == 0
    with pytest.raises(ValueError, match="tensor lists must have equal lengths"):
        step([torch.zeros(1)], lr=1e-3, step=1)
    if test_device().type == "cpu":
        with pytest.raises(mk.BackendUnavailable, match="backend='cuda' cannot run"):
            mk.prepare_adamw_step([torch.zeros(1)], [torch.zeros(1)], [torch.zeros(1)], backend="cuda")


def test_bad_kept_lists_are_named_when_prepared():
    p, m, v = [torch.zeros(4)], [torch.zeros(4)], [torch.zeros(3)]
    with pytest.raises(ValueError, match=r"exp_avg_sqs\[0\]: expected 4 elements"):
        mk.prepare_adamw_step(p, m, v)
    with pytest.raises(TypeError, match="master_params: the parameters are float32"):
        mk.prepare_adamw_step(p, m, [torch.zeros(4)], master_params=[torch.zeros(4)])
