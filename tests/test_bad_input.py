"""Bad calls raise a clear error naming the argument, and mutate nothing."""

import re

import pytest
import torch

import misa_kernels as mk


def inputs(n=3, size=8, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    params = [torch.randn(size, generator=g).to(dtype) for _ in range(n)]
    grads = [torch.randn(size, generator=g).to(dtype) for _ in range(n)]
    m = [torch.randn(size, generator=g) for _ in range(n)]
    v = [torch.rand(size, generator=g) for _ in range(n)]
    return params, grads, m, v


def snapshot(*lists):
    return [[t.clone() for t in ts] for ts in lists]


def unchanged(before, *lists):
    return all(torch.equal(a, b) for bs, ts in zip(before, lists) for a, b in zip(bs, ts))


def bad_calls():
    """(id, mutate(args) -> args, expected exception, text that must appear in the message)."""

    def mismatched_length(a):
        a["grads"] = a["grads"][:-1]

    def shape(a):
        a["grads"][1] = torch.randn(9)

    def grad_dtype(a):
        a["grads"][0] = a["grads"][0].double()

    def param_dtype_mix(a):
        a["params"][2] = a["params"][2].bfloat16()
        a["grads"][2] = a["grads"][2].bfloat16()

    def unsupported_dtype(a):
        a["params"] = [p.double() for p in a["params"]]
        a["grads"] = [g.double() for g in a["grads"]]

    def state_dtype(a):
        a["exp_avgs"][1] = a["exp_avgs"][1].bfloat16()

    def state_size(a):
        a["exp_avg_sqs"][0] = torch.rand(7)

    def non_contiguous(a):
        a["grads"][0] = torch.randn(16)[::2]

    def sparse(a):
        a["grads"][0] = torch.randn(8).to_sparse()

    def device(a):
        a["grads"][0] = torch.randn(8, device="meta")

    def step_zero(a):
        a["step"] = 0

    def step_nan(a):
        a["step"] = float("nan")

    def step_fraction(a):
        a["step"] = 1.5

    def state_is_the_param(a):
        a["exp_avgs"][0] = a["params"][0]

    def master_for_fp32(a):
        a["master_params"] = [t.clone() for t in a["params"]]

    def lr_negative(a):
        a["lr"] = -1.0

    def lr_2d(a):
        a["lr"] = torch.ones(1, 1)

    def beta(a):
        a["beta2"] = 1.0

    def norms_wrong_size(a):
        a["grad_sq_norms"] = torch.zeros(2)

    def norms_wrong_dtype(a):
        a["grad_sq_norms"] = torch.zeros(3, dtype=torch.float64)

    def not_a_list(a):
        a["params"] = a["params"][0]

    def unknown_backend(a):
        a["backend"] = "opencl"

    def cuda_on_cpu(a):
        a["backend"] = "cuda"

    return [
        ("mismatched-length", mismatched_length, ValueError, "equal lengths"),
        ("grad-shape", shape, ValueError, "grads[1]"),
        ("grad-dtype", grad_dtype, TypeError, "grads[0]"),
        ("param-dtype-mix", param_dtype_mix, TypeError, "params[2]"),
        ("unsupported-dtype", unsupported_dtype, TypeError, "params[0]"),
        ("state-dtype", state_dtype, TypeError, "exp_avgs[1]"),
        ("state-size", state_size, ValueError, "exp_avg_sqs[0]"),
        ("non-contiguous", non_contiguous, ValueError, "grads[0]"),
        ("sparse", sparse, ValueError, "grads[0]"),
        ("device", device, ValueError, "grads[0]"),
        ("step-0", step_zero, ValueError, "step"),
        ("step-nan", step_nan, ValueError, "step"),
        ("step-1.5", step_fraction, ValueError, "step"),
        ("state-is-the-param", state_is_the_param, ValueError, "exp_avgs[0]"),
        ("master-for-fp32", master_for_fp32, TypeError, "master_params"),
        ("lr-negative", lr_negative, ValueError, "lr"),
        ("lr-2d", lr_2d, ValueError, "lr"),
        ("beta2", beta, ValueError, "beta2"),
        ("norms-size", norms_wrong_size, ValueError, "grad_sq_norms"),
        ("norms-dtype", norms_wrong_dtype, ValueError, "grad_sq_norms"),
        ("not-a-list", not_a_list, TypeError, "params"),
        ("unknown-backend", unknown_backend, ValueError, "backend"),
        ("cuda-on-cpu", cuda_on_cpu, mk.BackendUnavailable, "cuda"),
    ]


@pytest.mark.parametrize("name,mutate,exc,text", bad_calls(), ids=[c[0] for c in bad_calls()])
def test_adamw_step_rejects(name, mutate, exc, text):
    params, grads, m, v = inputs()
    args = dict(
        params=list(params),
        grads=list(grads),
        exp_avgs=list(m),
        exp_avg_sqs=list(v),
        lr=1e-3,
        step=1,
        beta2=0.999,
        grad_sq_norms=torch.zeros(3),
        backend="torch",
    )
    before = snapshot(params, m, v)
    mutate(args)
    with pytest.raises(exc, match=re.escape(text)):
        mk.adamw_step_(args.pop("params"), args.pop("grads"), args.pop("exp_avgs"), args.pop("exp_avg_sqs"), **args)
    assert unchanged(before, params, m, v)


def test_env_backend_that_cannot_run_raises(monkeypatch):
    params, grads, m, v = inputs()
    monkeypatch.setenv("MISA_KERNELS_BACKEND", "cuda")
    with pytest.raises(mk.BackendUnavailable, match="MISA_KERNELS_BACKEND"):
        mk.adamw_step_(params, grads, m, v, lr=1e-3, step=1)
    monkeypatch.setenv("MISA_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="MISA_KERNELS_BACKEND"):
        mk.grad_sq_norms(grads)


def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    # Triton reads TRITON_INTERPRET when it is first imported: import it before the variable changes,
    # so that this test cannot switch the interpreter off for the tests that follow it.
    pytest.importorskip("misa_kernels.triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(mk.BackendUnavailable, match="TRITON_INTERPRET"):
        mk.grad_sq_norms([torch.randn(4)], backend="triton")


def test_flush_and_norms_reject_bad_input():
    params, grads, m, v = inputs()
    before = snapshot(params)
    with pytest.raises(ValueError, match="equal lengths"):
        mk.momentum_flush_(params, m[:2], v, lr=1e-3, step=3)
    with pytest.raises(ValueError, match="step"):
        mk.momentum_flush_(params, m, v, lr=1e-3, step=0)
    assert unchanged(before, params)
    with pytest.raises(TypeError, match="share a dtype"):
        mk.grad_sq_norms([torch.randn(3), torch.randn(3).half()])
    with pytest.raises(TypeError, match="tensors"):
        mk.grad_sq_norms(torch.randn(3))


def test_empty_lists_are_a_no_op():
    mk.adamw_step_([], [], [], [], lr=1e-3, step=1)
    assert mk.grad_sq_norms([]).numel() == 0
