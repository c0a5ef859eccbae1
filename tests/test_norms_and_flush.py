"""grad_sq_norms and momentum_flush_ against the float64 oracle."""

import pytest
import torch

import misa_kernels as mk

from conftest import test_device
from oracle import grad_sq_norms as oracle_norms
from oracle import momentum_flush as oracle_flush
from oracle import rel_err
from test_adamw_step import DTYPES, SHAPES, backend_params, make_inputs, make_masters, require


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shapes", list(SHAPES.values()), ids=list(SHAPES))
def test_grad_sq_norms(backend, dtype, shapes):
    device = test_device()
    require(backend, device)
    _, grads, _, _ = make_inputs(shapes, dtype, device, seed=5)
    got = mk.grad_sq_norms(grads, backend=backend)
    assert mk.last_backend() == backend
    assert got.dtype == torch.float32 and got.shape == (len(shapes),) and got.device == device
    assert rel_err([got], [oracle_norms(grads)]) <= 1e-5
    # per entry too: a small tensor's norm must not hide behind a large one's
    torch.testing.assert_close(got.double().cpu(), oracle_norms(grads), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", backend_params())
def test_grad_sq_norms_with_empty_tensor(backend):
    device = test_device()
    require(backend, device)
    xs = [torch.randn(5, device=device), torch.empty(0, device=device), torch.randn(3, device=device)]
    got = mk.grad_sq_norms(xs, backend=backend)
    torch.testing.assert_close(got.double().cpu(), oracle_norms(xs), rtol=1e-5, atol=0)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shapes", list(SHAPES.values()), ids=list(SHAPES))
def test_momentum_flush(backend, dtype, shapes):
    device = test_device()
    require(backend, device)
    params, _, m, v = make_inputs(shapes, dtype, device, seed=6)
    hyper = dict(lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=12)
    want = oracle_flush(params, m, v, **hyper)
    m0, v0 = [t.clone() for t in m], [t.clone() for t in v]
    got = [t.clone() for t in params]
    mk.momentum_flush_(got, m, v, **hyper, backend=backend)
    if dtype == torch.float32:
        tol = 1e-6
    else:
        ref = [t.clone() for t in params]
        mk.momentum_flush_(ref, m, v, **hyper, backend="torch")
        tol = 2 * rel_err(ref, want) + 1e-7
    assert rel_err(got, want) <= tol
    assert all(torch.equal(a, b) for a, b in zip(m, m0)) and all(torch.equal(a, b) for a, b in zip(v, v0))


@pytest.mark.parametrize("backend", backend_params())
def test_momentum_flush_with_device_tensors(backend):
    device = test_device()
    require(backend, device)
    params, _, m, v = make_inputs(SHAPES["mixed"], torch.float32, device, seed=7)
    want = oracle_flush(params, m, v, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=4)
    got = [t.clone() for t in params]
    mk.momentum_flush_(
        got, m, v, lr=torch.tensor(1e-3, device=device), step=torch.tensor(4.0, device=device), backend=backend
    )
    assert rel_err(got, want) <= 1e-6


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("shapes", [SHAPES["1"], SHAPES["4097"], SHAPES["many"]], ids=["1", "4097", "many"])
def test_momentum_flush_with_master_weights(backend, dtype, shapes):
    """The flush updates the fp32 masters and writes the weights as the rounded masters."""
    device = test_device()
    require(backend, device)
    params, _, m, v = make_inputs(shapes, dtype, device, seed=8)
    masters = make_masters(params, 8)
    hyper = dict(lr=2e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=12)
    want = oracle_flush(params, m, v, **hyper, master_params=masters)
    got, w = [t.clone() for t in params], [t.clone() for t in masters]
    mk.momentum_flush_(got, m, v, **hyper, master_params=w, backend=backend)
    assert rel_err([t.reshape(p.shape) for t, p in zip(w, got)], want) <= 1e-6
    for p, t in zip(got, w):
        assert torch.equal(p, t.reshape(p.shape).to(dtype))
