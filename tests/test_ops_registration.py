"""The ops are declared once with torch.library; opcheck validates schema, fakes and mutation."""

import pytest
import torch

import misa_kernels as mk

from conftest import test_device
from test_adamw_step import backend_params, make_inputs, require


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck_adamw_step(backend):
    device = test_device()
    require(backend, device)
    p, g, m, v = make_inputs([(5, 3), (17,)], torch.float32, device, seed=0)
    norms = torch.zeros(2, device=device)
    args = (
        p,
        g,
        m,
        v,
        norms,
        [],
        [],
        [],
        [],
        1e-3,
        None,
        3.0,
        None,
        0.9,
        0.999,
        1e-8,
        0.01,
        False,
        False,
        0,
        None,
        backend,
    )
    torch.library.opcheck(torch.ops.misa.adamw_step_.default, args)


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck_master_weights_and_stochastic_rounding(backend):
    device = test_device()
    require(backend, device)
    p, g, m, v = make_inputs([(5, 3), (17,)], torch.bfloat16, device, seed=2)
    w = [t.float() for t in p]
    args = (
        p,
        g,
        m,
        v,
        None,
        w,
        [],
        [],
        [],
        1e-3,
        None,
        3.0,
        None,
        0.9,
        0.999,
        1e-8,
        0.01,
        False,
        True,
        5,
        torch.ones((), device=device),
        backend,
    )
    torch.library.opcheck(torch.ops.misa.adamw_step_.default, args)
    torch.library.opcheck(
        torch.ops.misa.momentum_flush_.default,
        (p, m, [t.abs() for t in v], w, [], [], [], 1e-3, None, 4.0, None, 0.9, 0.999, 1e-8, True, 5, backend),
    )


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck_compact_formats(backend):
    # 8-bit states (codes + block scales) and a Kahan compensation: the schema's extra mutated lists.
    from misa_kernels import quant

    device = test_device()
    require(backend, device)
    p, g, m, v = make_inputs([(5, 3), (300,)], torch.bfloat16, device, seed=3)
    qs, qu = quant.maps(device)
    codes_m, scale_m = zip(*(quant.quantize(t.float(), qs) for t in m))
    codes_v, scale_v = zip(*(quant.quantize(t.float().abs(), qu) for t in v))
    comp = [(0.01 * torch.randn(t.shape, device=device)).bfloat16() for t in p]
    lists = (list(codes_m), list(codes_v), None, [], comp, list(scale_m), list(scale_v))
    args = (
        (p, g) + lists[:3] + lists[3:] + (1e-3, None, 3.0, None, 0.9, 0.999, 1e-8, 0.01, False, False, 0, None, backend)
    )
    torch.library.opcheck(torch.ops.misa.adamw_step_.default, args)
    torch.library.opcheck(
        torch.ops.misa.momentum_flush_.default,
        (p,) + lists[:2] + lists[3:] + (1e-3, None, 4.0, None, 0.9, 0.999, 1e-8, False, 0, backend),
    )


@pytest.mark.parametrize("backend", backend_params())
def test_opcheck_norms_and_flush(backend):
    device = test_device()
    require(backend, device)
    p, g, m, v = make_inputs([(5, 3), (17,)], torch.bfloat16, device, seed=1)
    torch.library.opcheck(torch.ops.misa.grad_sq_norms.default, (g, backend))
    m = [t.float() for t in m]
    torch.library.opcheck(
        torch.ops.misa.momentum_flush_.default,
        (p, m, [t.abs() for t in v], [], [], [], [], 1e-3, None, 4.0, None, 0.9, 0.999, 1e-8, False, 0, backend),
    )


def test_auto_picks_torch_on_cpu_and_reports_it():
    x = [torch.randn(4)]
    mk.grad_sq_norms(x)
    assert mk.last_backend() == "torch"
    assert mk.available_backends("cpu")[-1] == "torch"


def test_env_variable_overrides_auto(monkeypatch):
    monkeypatch.setenv("MISA_KERNELS_BACKEND", "torch")
    mk.grad_sq_norms([torch.randn(4)])
    assert mk.last_backend() == "torch"


@pytest.mark.interpreter
def test_env_variable_can_force_triton_on_cpu_under_interpreter(monkeypatch):
    if "triton" not in mk.available_backends("cpu"):
        pytest.skip("triton cannot run on the CPU here (needs TRITON_INTERPRET=1)")
    monkeypatch.setenv("MISA_KERNELS_BACKEND", "triton")
    mk.grad_sq_norms([torch.randn(4)])
    assert mk.last_backend() == "triton"


@pytest.mark.gpu
def test_auto_prefers_cuda_then_triton_on_gpu():
    mk.grad_sq_norms([torch.randn(4, device="cuda")])
    assert mk.last_backend() == mk.available_backends("cuda")[0]


def test_ops_trace_under_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        xs = [torch.empty(3), torch.empty(4)]
        out = torch.ops.misa.grad_sq_norms(xs, "torch")
        assert out.shape == (2,) and out.dtype == torch.float32


@pytest.mark.parametrize("spelling", ["cpu", "cpu:0"])
def test_test_device_is_spelled_as_its_tensors_report_it(monkeypatch, spelling):
    """torch.device("cuda") != torch.device("cuda:0") (and "cpu:0" != "cpu"): the device the tests compare
    against must be the one tensors report, or every device assertion fails on a GPU."""
    monkeypatch.setenv("MISA_TEST_DEVICE", spelling)
    device = test_device()
    assert torch.empty(0, device=device).device == device
    assert mk.grad_sq_norms([torch.randn(3, device=device)]).device == device
