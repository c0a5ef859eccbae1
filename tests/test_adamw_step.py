"""adamw_step_ against the float64 oracle and torch.optim.AdamW, on every backend that runs here."""

import math
from pathlib import Path

import pytest
import torch

import misa_kernels as mk
from misa_kernels import tables
from misa_kernels.checks import canonical_device
from misa_kernels.scalars import fp32, kernel_scalars

from conftest import test_device
from oracle import adamw_step as oracle_adamw
from oracle import rel_err

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# "many": 150 tensors, more than a parameter-space table could hold (the CUDA backend once split such lists
# over launches; now one launch reads a device-side table of any length).
SHAPES = {
    "1": [(1,)],
    "127": [(127,)],
    "4097": [(4097,)],
    "mixed": [(3, 5), (1,), (127,), (64, 65), (2049,)],
    "many": [(7 * i % 61 + 1,) for i in range(150)],
}
HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)


def backend_params():
    return [
        pytest.param("torch", id="torch"),
        pytest.param("triton", id="triton", marks=pytest.mark.interpreter),
        pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
    ]


def require(backend, device):
    if backend not in mk.available_backends(device):
        pytest.skip(f"backend {backend} cannot run on {device.type} here")


def make_inputs(shapes, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=g).to(dtype).to(device) for s in shapes]
    grads = [(torch.randn(s, generator=g) * 0.5).to(dtype).to(device) for s in shapes]
    exp_avgs = [(torch.randn(s, generator=g) * 0.1).to(device) for s in shapes]
    exp_avg_sqs = [(torch.rand(s, generator=g) * 0.01).to(device) for s in shapes]
    return params, grads, exp_avgs, exp_avg_sqs


def clone(ts):
    return [t.clone() for t in ts]


def make_masters(params, seed):
    """fp32 masters that differ from their rounded weights (as after a few steps), so that a kernel
    reading the weight instead of the master is caught."""
    g = torch.Generator().manual_seed(seed + 2)
    return [
        (p.float() + torch.randn(p.shape, generator=g).to(p.device) * 1e-3 * p.float().abs()).reshape(-1)
        for p in params
    ]


def run_case(backend, device, shapes, dtype, *, fresh, step, with_norms, seed=0, lr=None, master=False, hyper=None):
    params, grads, exp_avgs, exp_avg_sqs = make_inputs(shapes, dtype, device, seed)
    hyper = dict(hyper or HYPER)
    if lr is not None:
        hyper["lr"] = lr
    lr_value = float(hyper["lr"])
    masters = make_masters(params, seed) if master else None
    norms0 = torch.rand(len(shapes), generator=torch.Generator().manual_seed(seed + 1)).to(device) + 1.0
    want_p, want_m, want_v, want_n = oracle_adamw(
        params,
        grads,
        exp_avgs,
        exp_avg_sqs,
        **{**hyper, "lr": lr_value},
        step=float(step),
        fresh=fresh,
        grad_sq_norms=norms0 if with_norms else None,
        master_params=masters,
    )
    p, m, v = clone(params), clone(exp_avgs), clone(exp_avg_sqs)
    w = clone(masters) if master else None
    if fresh:  # fresh states (and masters) must never be read: poison them
        for t in m + v + (w or []):
            t.fill_(float("nan"))
    norms = norms0.clone() if with_norms else None
    mk.adamw_step_(
        p, grads, m, v, **hyper, step=step, fresh=fresh, grad_sq_norms=norms, master_params=w, backend=backend
    )
    assert mk.last_backend() == backend
    return dict(
        p=p,
        m=m,
        v=v,
        w=w,
        norms=norms,
        want_p=want_p,
        want_m=want_m,
        want_v=want_v,
        want_n=want_n,
        inputs=(params, grads, exp_avgs, exp_avg_sqs),
        hyper=hyper,
    )


def param_tolerance(case, dtype, shapes, device, fresh, step, with_norms):
    """fp32: 1e-6 relative. bf16/fp16: within 2x the error of the pure-torch path in that dtype."""
    if dtype == torch.float32:
        return 1e-6
    torch_case = run_case("torch", device, shapes, dtype, fresh=fresh, step=step, with_norms=with_norms)
    torch_err = rel_err(torch_case["p"], torch_case["want_p"])
    return 2 * torch_err + 1e-7


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("shapes", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("fresh", [False, True], ids=["steady", "fresh"])
def test_matches_float64_oracle(backend, dtype, shapes, fresh):
    device = test_device()
    require(backend, device)
    step = 1 if fresh else 7
    case = run_case(backend, device, shapes, dtype, fresh=fresh, step=step, with_norms=True)
    tol = param_tolerance(case, dtype, shapes, device, fresh, step, True)
    assert rel_err(case["p"], case["want_p"]) <= tol
    assert rel_err(case["m"], case["want_m"]) <= 1e-6
    assert rel_err(case["v"], case["want_v"]) <= 1e-6
    assert rel_err([case["norms"]], [case["want_n"]]) <= 1e-5
    for t, want in zip(case["p"], case["want_p"]):
        assert t.dtype == dtype and t.shape == want.shape


@pytest.mark.parametrize("backend", backend_params())
def test_without_norms_leaves_nothing_else_touched(backend):
    device = test_device()
    require(backend, device)
    case = run_case(backend, device, SHAPES["mixed"], torch.float32, fresh=False, step=3, with_norms=False)
    assert rel_err(case["p"], case["want_p"]) <= 1e-6
    params, grads, _, _ = case["inputs"]
    assert all(not torch.equal(a, b) for a, b in zip(case["p"], params))  # it did update


@pytest.mark.parametrize("backend", backend_params())
def test_lr_and_step_as_device_tensors(backend):
    device = test_device()
    require(backend, device)
    shapes = SHAPES["mixed"]
    want = run_case("torch", device, shapes, torch.float32, fresh=False, step=5, with_norms=True)
    params, grads, exp_avgs, exp_avg_sqs = want["inputs"]
    p, m, v = clone(params), clone(exp_avgs), clone(exp_avg_sqs)
    norms = torch.rand(len(shapes), generator=torch.Generator().manual_seed(1)).to(device) + 1.0
    mk.adamw_step_(
        p,
        grads,
        m,
        v,
        **{**HYPER, "lr": torch.tensor(HYPER["lr"], device=device)},
        step=torch.tensor(5, device=device),
        grad_sq_norms=norms,
        backend=backend,
    )
    assert rel_err(p, want["want_p"]) <= 1e-6
    assert rel_err(m, want["want_m"]) <= 1e-6
    assert rel_err([norms], [want["want_n"]]) <= 1e-5


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_matches_torch_optim_adamw_over_steps(backend, weight_decay):
    device = test_device()
    require(backend, device)
    shapes = SHAPES["mixed"]
    params, _, _, _ = make_inputs(shapes, torch.float32, device, seed=3)
    ours = clone(params)
    theirs = [torch.nn.Parameter(t.clone()) for t in params]
    opt = torch.optim.AdamW(theirs, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=weight_decay, foreach=False)
    m = [torch.empty(s, device=device) for s in shapes]
    v = [torch.empty(s, device=device) for s in shapes]
    gen = torch.Generator().manual_seed(4)
    for step in range(1, 6):
        grads = [torch.randn(s, generator=gen).to(device) for s in shapes]
        for t, g in zip(theirs, grads):
            t.grad = g.clone()
        opt.step()
        mk.adamw_step_(
            ours, grads, m, v, lr=1e-2, weight_decay=weight_decay, step=step, fresh=step == 1, backend=backend
        )
    assert rel_err(ours, [t.detach() for t in theirs]) <= 1e-6
    assert rel_err(m, [opt.state[t]["exp_avg"] for t in theirs]) <= 1e-6
    assert rel_err(v, [opt.state[t]["exp_avg_sq"] for t in theirs]) <= 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", list(DTYPES.values()), ids=list(DTYPES))
@pytest.mark.parametrize("fresh", [False, True], ids=["steady", "fresh"])
def test_gpu_large_against_torch_backend(backend, dtype, fresh):
    """Large sizes on the GPU: several chunks, more blocks than one CUDA launch holds (320), an odd tail,
    and misaligned views (forcing the scalar path)."""
    device = canonical_device("cuda")
    require(backend, device)
    big = [(5000, 4099), (65536 * 2 + 3,), (1,), (4096, 1024)]
    case = run_case(backend, device, big, dtype, fresh=fresh, step=1 if fresh else 11, with_norms=True)
    tol = param_tolerance(case, dtype, big, device, fresh, 1 if fresh else 11, True)
    assert rel_err(case["p"], case["want_p"]) <= tol
    assert rel_err(case["m"], case["want_m"]) <= 1e-6
    assert rel_err(case["v"], case["want_v"]) <= 1e-6
    assert rel_err([case["norms"]], [case["want_n"]]) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_misaligned_views(backend):
    device = canonical_device("cuda")
    require(backend, device)
    n = 10_001
    base = [torch.randn(n + 1, device=device) for _ in range(4)]
    p, g, m, v = (t[1:] for t in base)  # offset by one element: not 16-byte aligned
    v = v.abs()
    want_p, want_m, want_v, _ = oracle_adamw([p], [g], [m], [v], **HYPER, step=2.0, fresh=False)
    mk.adamw_step_([p], [g], [m], [v], **HYPER, step=2, backend=backend)
    assert rel_err([p], want_p) <= 1e-6 and rel_err([m], want_m) <= 1e-6 and rel_err([v], want_v) <= 1e-6


@pytest.mark.gpu
def test_gpu_cuda_and_triton_norms_are_deterministic():
    device = canonical_device("cuda")
    grads = [torch.randn(3_000_000, device=device), torch.randn(70_000, device=device)]
    for backend in mk.available_backends(device):
        first = mk.grad_sq_norms(grads, backend=backend)
        for _ in range(3):
            assert torch.equal(mk.grad_sq_norms(grads, backend=backend), first)


def test_bias_correction_uses_exact_step():
    # At step 1 AdamW moves every coordinate by ~lr (sign of the grad): a cheap sanity check that the
    # bias corrections are applied, on the default backend for CPU tensors.
    p = [torch.zeros(8)]
    g = [torch.linspace(-1, 1, 8)]
    m, v = [torch.empty(8)], [torch.empty(8)]
    mk.adamw_step_(p, g, m, v, lr=0.5, step=1, fresh=True, eps=1e-12)
    assert torch.allclose(p[0].abs(), torch.full((8,), 0.5), rtol=1e-5)
    assert math.isclose(float(p[0][0]), 0.5, rel_tol=1e-5) and math.isclose(float(p[0][-1]), -0.5, rel_tol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cuda_graph_capture_with_tensor_lr_and_step(backend):
    """lr and step as device tensors: one captured step replays with new values, no recompilation."""
    device = canonical_device("cuda")
    require(backend, device)
    shapes = [(1000, 33), (4097,)]
    params, grads, exp_avgs, exp_avg_sqs = make_inputs(shapes, torch.bfloat16, device, seed=9)
    lr = torch.tensor(1e-3, device=device)
    step = torch.tensor(1.0, device=device)
    norms = torch.zeros(len(shapes), device=device)
    p, m, v = clone(params), clone(exp_avgs), clone(exp_avg_sqs)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up outside the graph: tables, compilation
        mk.adamw_step_(
            clone(p), grads, clone(m), clone(v), lr=lr, step=step, grad_sq_norms=norms.clone(), backend=backend
        )
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mk.adamw_step_(p, grads, m, v, lr=lr, step=step, grad_sq_norms=norms, backend=backend)
    want_p, want_m, want_v = clone(params), clone(exp_avgs), clone(exp_avg_sqs)
    p_copy = clone(params)
    for t, src in zip(p, p_copy):
        t.copy_(src)
    for t, src in zip(m, exp_avgs):
        t.copy_(src)
    for t, src in zip(v, exp_avg_sqs):
        t.copy_(src)
    norms.zero_()
    for lr_k, step_k in [(1e-3, 1), (5e-4, 2), (2e-4, 3)]:
        lr.fill_(lr_k)
        step.fill_(step_k)
        graph.replay()
        mk.adamw_step_(want_p, grads, want_m, want_v, lr=lr_k, step=step_k, backend="torch")
    torch.cuda.synchronize()
    assert rel_err(p, want_p) <= 1e-2 and rel_err(m, want_m) <= 1e-6 and rel_err(v, want_v) <= 1e-6
    want_norms = torch.stack([g.float().square().sum() for g in grads]) * 3
    torch.testing.assert_close(norms, want_norms, rtol=1e-5, atol=0)


# ---------------------------------------------------------------- host-folded scalars (the H100 bug)
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("betas", [(0.9, 0.999), (0.95, 0.9999), (0.5, 0.99999)], ids=str)
def test_one_minus_beta_is_folded_on_the_host(backend, betas):
    """A kernel that forms 1 - beta2 from an fp32 beta2 is off by 1.3e-5 (0.999) to 1e-2 (0.99999) in
    exp_avg_sq. Scalars reach an interpreted Triton kernel as fp32, as on a GPU, so this fails on the CPU
    for such a kernel too."""
    device = test_device()
    require(backend, device)
    hyper = dict(HYPER, beta1=betas[0], beta2=betas[1])
    for fresh in (True, False):
        case = run_case(
            backend,
            device,
            SHAPES["mixed"],
            torch.float32,
            fresh=fresh,
            step=1 if fresh else 4,
            with_norms=False,
            hyper=hyper,
        )
        assert rel_err(case["m"], case["want_m"]) <= 1e-6
        assert rel_err(case["v"], case["want_v"]) <= 1e-6
        assert rel_err(case["p"], case["want_p"]) <= 1e-6


def test_kernel_scalars_are_fp32_values_folded_in_float64():
    sc = kernel_scalars(1e-3, 3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    assert sc.one_minus_beta2 == fp32(1 - 0.999) and sc.one_minus_beta2 != fp32(1 - fp32(0.999))
    assert sc.one_minus_beta1 == fp32(1 - 0.9)
    for value in (
        sc.one_minus_beta1,
        sc.beta2,
        sc.one_minus_beta2,
        sc.eps,
        sc.step_size,
        sc.bias_correction2_sqrt,
        sc.decay,
    ):
        assert value == fp32(value)  # what a GPU launch would receive
    assert sc.step_size == fp32(1e-3 / (1 - 0.9**3)) and sc.decay == fp32(1 - 1e-4)


@pytest.mark.parametrize(
    "lr,step,beta1,beta2,wd,flush",
    [
        (1e-3, 3, 0.9, 0.999, 0.1, False),
        (3e-5, 1000, 0.9, 0.9999, 0.0, False),
        (1e-3, 7, 0.9, 0.999, 0.0, True),
        (1e-4, 1, 0.0, 0.99, 0.01, False),
        (2e-4, 123456, 0.95, 0.99999, 0.05, False),
        (5e-6, 2, 0.8, 0.95, 0.3, True),
    ],
)
def test_device_step_folds_to_the_host_values_in_few_launches(lr, step, beta1, beta2, wd, flush):
    """MISA hands a device step (skips are counted on the device): the folded scalars must be the host
    path's, to the bit, and cost a handful of small launches per call, not one per operation."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.ops += func.overloadpacket.__name__ not in ("unbind", "select")  # views launch nothing
            return func(*args, **(kwargs or {}))

    host = kernel_scalars(lr, step, beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=wd, flush=flush)
    step_t = torch.full((), float(step), device=test_device())
    kernel_scalars(lr, step_t, beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=wd, flush=flush)  # constants made
    with Count():
        dev = kernel_scalars(lr, step_t, beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=wd, flush=flush)
    assert dev.device.tolist() == [host.step_size, host.bias_correction2_sqrt, host.decay]
    assert Count.ops <= 7


def test_cuda_binding_receives_the_host_folded_scalars(monkeypatch):
    """The CUDA backend cannot run here; check what its Python side hands the extension."""
    from misa_kernels import cuda

    calls = []

    class Recorder:
        def adamw_step_(self, *args):
            calls.append(("adamw", args))

        def momentum_flush_(self, *args):
            calls.append(("flush", args))

    monkeypatch.setattr(cuda, "extension", lambda: Recorder())
    p, g, m, v = make_inputs([(4,)], torch.bfloat16, torch.device("cpu"), seed=0)
    w = [t.float() for t in p]
    cuda.adamw_step_(
        p,
        g,
        m,
        v,
        None,
        w,
        lr=1e-3,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.1,
        step=3,
        fresh=False,
        stochastic=True,
        seed=7,
    )
    cuda.momentum_flush_(p, m, v, w, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=3, stochastic=False, seed=0)
    (_, a), (_, f) = calls
    want = kernel_scalars(1e-3, 3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
    table = a[0]  # the chunk table the kernels read on the device: p, g, m, v, master addresses
    assert a[1:5] == (1, 1, tables.chunk_size(), 1)  # one chunk, one tensor, bf16 = dtype code 1
    assert table[-5:].tolist() == [t.data_ptr() for t in (p[0], g[0], m[0], v[0], w[0])]
    assert a[5] is None and a[6] is None  # no norms asked, so no partials
    assert a[7] is None  # no device scalars for a number lr
    assert a[8:15] == (
        want.one_minus_beta1,
        want.beta2,
        want.one_minus_beta2,
        want.eps,
        want.step_size,
        want.bias_correction2_sqrt,
        want.decay,
    )
    # fresh, master, stochastic, seed, skip, kahan, maps, per-tensor steps
    assert a[15:] == (False, True, True, 7, None, False, None, False)
    flush = kernel_scalars(1e-3, 3, beta1=0.9, beta2=0.999, eps=1e-8, flush=True)
    assert f[6:13] == (
        flush.one_minus_beta1,
        flush.beta2,
        flush.one_minus_beta2,
        flush.eps,
        flush.step_size,
        flush.bias_correction2_sqrt,
        flush.decay,
    )
    assert f[13:] == (True, False, 0, False, None)
    cuda_dir = Path(__file__).resolve().parents[1] / "csrc" / "cuda"
    source = "".join((cuda_dir / name).read_text() for name in ("adamw.cu", "adamw8bit.cu", "adam_element.cuh"))
    assert "1.f - sc." not in source and "sc.one_minus_beta2" in source


# ---------------------------------------------------------------- fp32 master weights
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", list(LOW.values()), ids=list(LOW))
@pytest.mark.parametrize("shapes", list(SHAPES.values()), ids=list(SHAPES))
@pytest.mark.parametrize("fresh", [False, True], ids=["steady", "fresh"])
def test_master_weights_match_float64_oracle(backend, dtype, shapes, fresh):
    device = test_device()
    require(backend, device)
    step = 1 if fresh else 7
    case = run_case(backend, device, shapes, dtype, fresh=fresh, step=step, with_norms=True, master=True)
    masters = [w.reshape(p.shape) for w, p in zip(case["w"], case["p"])]
    assert rel_err(masters, case["want_p"]) <= 1e-6  # the master is updated in fp32
    for p, w in zip(case["p"], masters):  # the weight is the master rounded to nearest
        assert p.dtype == dtype and torch.equal(p, w.to(dtype))
    assert rel_err(case["m"], case["want_m"]) <= 1e-6 and rel_err(case["v"], case["want_v"]) <= 1e-6
    assert rel_err([case["norms"]], [case["want_n"]]) <= 1e-5


@pytest.mark.parametrize("backend", backend_params())
def test_master_params_are_refused_for_fp32_and_checked(backend):
    device = test_device()
    require(backend, device)
    p, g, m, v = make_inputs([(5,)], torch.float32, device, seed=0)
    with pytest.raises(TypeError, match="master_params"):
        mk.adamw_step_(p, g, m, v, lr=1e-3, step=1, master_params=[t.clone() for t in p], backend=backend)
    p, g, m, v = make_inputs([(5,)], torch.bfloat16, device, seed=0)
    with pytest.raises(TypeError, match=r"master_params\[0\]"):
        mk.adamw_step_(p, g, m, v, lr=1e-3, step=1, master_params=[t.clone() for t in p], backend=backend)
    with pytest.raises(ValueError, match="master_params"):
        mk.adamw_step_(p, g, m, v, lr=1e-3, step=1, master_params=[], backend=backend)


# ---------------------------------------------------------------- stochastic rounding
def bf16_neighbours(x):
    """The bf16 values just below and above each fp32 value (equal when x is a bf16 value)."""
    bits = x.view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    low = bits & 0xFFFF0000
    high = torch.where(bits == low, low, low + 0x10000)
    to_f = lambda b: torch.where(b >= 2**31, b - 2**32, b).to(torch.int32).view(torch.float32)  # noqa: E731
    return to_f(low), to_f(high)


@pytest.mark.parametrize("backend", backend_params())
def test_stochastic_rounding_is_reproducible_and_between_neighbours(backend):
    device = test_device()
    require(backend, device)
    shapes = SHAPES["mixed"]
    results = {}
    for b in ("torch", backend):
        params, grads, m, v = make_inputs(shapes, torch.bfloat16, device, seed=3)
        masters = make_masters(params, 3)
        w = clone(masters)
        mk.adamw_step_(
            params, grads, m, v, **HYPER, step=4, master_params=w, rounding="stochastic", seed=1234, backend=b
        )
        results[b] = (params, w)
    for got, want in zip(results[backend][0], results["torch"][0]):
        assert torch.equal(got, want)  # the same hash on every backend: the same decisions
    params, masters = results[backend]
    low, high = bf16_neighbours(torch.cat([w.cpu() for w in masters]))
    value = torch.cat([p.float().cpu().reshape(-1) for p in params])
    assert torch.all((value == low) | (value == high))
    rounded_up = float(((value == high) & (low != high)).float().mean())
    assert 0.2 < rounded_up < 0.8  # both directions occur


def test_stochastic_rounding_is_unbiased():
    from misa_kernels.reference import stochastic_round_bf16

    one_ulp = 2.0**-7  # bf16 spacing in [1, 2)
    for frac in (0.1, 0.3, 0.5, 0.9):
        x = torch.full((20000,), 1.0 + frac * one_ulp)
        r = stochastic_round_bf16(x, seed=5, tensor_index=0).float()
        assert set(r.unique().tolist()) <= {1.0, 1.0 + one_ulp}
        up = float((r > 1.0).float().mean())
        assert abs(up - frac) < 0.015, (frac, up)
        assert abs(float(r.double().mean()) - float(x.double().mean())) < 0.015 * one_ulp
    other = stochastic_round_bf16(x, seed=6, tensor_index=0)
    assert not torch.equal(other, stochastic_round_bf16(x, seed=5, tensor_index=0))  # the seed matters


@pytest.mark.parametrize("backend", backend_params())
def test_stochastic_rounding_refuses_fp16_and_bad_seeds(backend):
    device = test_device()
    require(backend, device)
    p, g, m, v = make_inputs([(5,)], torch.float16, device, seed=0)
    with pytest.raises(TypeError, match="stochastic"):
        mk.adamw_step_(p, g, m, v, lr=1e-3, step=1, rounding="stochastic", backend=backend)
    p, g, m, v = make_inputs([(5,)], torch.bfloat16, device, seed=0)
    with pytest.raises(ValueError, match="seed"):
        mk.adamw_step_(p, g, m, v, lr=1e-3, step=1, rounding="stochastic", seed=-1, backend=backend)
    with pytest.raises(ValueError, match="rounding"):
        mk.adamw_step_(p, g, m, v, lr=1e-3, step=1, rounding="down", backend=backend)


# ---------------------------------------------------------------- a skip decided on the device
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16-master"])
@pytest.mark.parametrize("fresh", [False, True], ids=["steady", "fresh"])
@pytest.mark.parametrize("flag", [0.0, 1.0], ids=["run", "skip"])
def test_skip_flag_read_by_the_kernel(backend, dtype, fresh, flag):
    """skip=1: nothing changes (norms included), except that a fresh step leaves zero states and masters
    equal to the weights; skip=0: exactly the step without a flag."""
    device = test_device()
    require(backend, device)
    master = dtype != torch.float32
    shapes = SHAPES["mixed"]
    want = run_case("torch", device, shapes, dtype, fresh=fresh, step=1 if fresh else 4, with_norms=True, master=master)
    params, grads, exp_avgs, exp_avg_sqs = want["inputs"]
    p, m, v = clone(params), clone(exp_avgs), clone(exp_avg_sqs)
    w = make_masters(params, 0) if master else None
    w0 = clone(w) if master else None
    norms = torch.ones(len(shapes), device=device)
    mk.adamw_step_(
        p,
        grads,
        m,
        v,
        **HYPER,
        step=1 if fresh else 4,
        fresh=fresh,
        grad_sq_norms=norms,
        master_params=w,
        skip=torch.tensor(flag, device=device),
        backend=backend,
    )
    if flag == 0.0:
        assert rel_err(p, want["p"]) <= 1e-6 and rel_err(m, want["m"]) <= 1e-6 and rel_err(v, want["v"]) <= 1e-6
        from oracle import grad_sq_norms as oracle_norms

        assert rel_err([norms.double().cpu() - 1], [oracle_norms(grads)]) <= 1e-5
        return
    assert all(torch.equal(a, b) for a, b in zip(p, params))
    assert torch.equal(norms, torch.ones_like(norms))
    if fresh:
        assert all(not t.any() for t in m + v)
        if master:
            assert all(torch.equal(t.reshape(q.shape), q.float()) for t, q in zip(w, params))
    else:
        assert all(torch.equal(a, b) for a, b in zip(m, exp_avgs))
        assert all(torch.equal(a, b) for a, b in zip(v, exp_avg_sqs))
        if master:
            assert all(torch.equal(a, b) for a, b in zip(w, w0))


def test_cuda_python_side_matches_the_compiled_binding(monkeypatch):
    """What misa_kernels/cuda.py passes reaches the real extension's argument checks (pybind accepts the
    arity and types of every call); with CPU tensors the extension refuses the table by name. Without
    this, a signature drift between cuda.py and misa_ops.cpp would only show on a GPU."""
    from misa_kernels import cuda

    if cuda._load() is None:
        pytest.skip(f"extension not built here: {cuda.load_error()}")
    p, g, m, v = make_inputs([(4,), (130,)], torch.bfloat16, torch.device("cpu"), seed=0)
    w = [t.float() for t in p]
    calls = [
        lambda: cuda.adamw_step_(
            p,
            g,
            m,
            v,
            torch.zeros(2),
            w,
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.1,
            step=3,
            fresh=False,
            stochastic=True,
            seed=7,
            skip=torch.zeros(()),
        ),
        lambda: cuda.adamw_step_(
            p,
            g,
            m,
            v,
            None,
            [],
            lr=torch.tensor(1e-3),
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.0,
            step=torch.tensor(3.0),
            fresh=True,
            stochastic=False,
            seed=0,
        ),
        lambda: cuda.grad_sq_norms(g),
        lambda: cuda.momentum_flush_(
            p, m, v, w, lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, step=3, stochastic=False, seed=0
        ),
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="table must be a CUDA tensor"):
            call()


# ---------------------------------------------------------------- a step count per tensor
@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_a_step_per_tensor_equals_one_call_per_step(backend, dtype):
    """Tensors activated at different steps in one call (a 1-D device step): exactly what separate calls,
    one per step count, compute; an empty tensor in the list keeps the numbering (stochastic rounding)."""
    device = test_device()
    require(backend, device)
    shapes = [(300,), (0,), (17,), (1000,)]
    steps = [1.0, 4.0, 2.0, 9.0]
    kind = DTYPES[dtype]
    extra = dict(rounding="stochastic", seed=11) if kind == torch.bfloat16 else {}
    one = make_inputs(shapes, kind, device, seed=3)
    many = [clone(t) for t in one]
    norms = [torch.ones(len(shapes), device=device) for _ in range(2)]
    mk.adamw_step_(
        *one,
        lr=1e-3,
        weight_decay=0.1,
        step=torch.tensor(steps, device=device),
        grad_sq_norms=norms[0],
        backend=backend,
        **extra,
    )
    from misa_kernels import reference

    for i, step in enumerate(steps):  # the same tensors, one call each, keyed as the i-th non-empty tensor
        pick = [ts[i : i + 1] for ts in many]
        if not pick[0][0].numel():
            continue
        index = sum(1 for t in many[0][:i] if t.numel())
        reference.adamw_step_(
            *pick,
            norms[1][i : i + 1],
            [],
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.1,
            step=torch.tensor(step, device=device),
            fresh=False,
            stochastic=kind == torch.bfloat16,
            seed=(11 + index * 0x9E3779B9) % 2**32,
        )
    for a, b in zip(one[0] + one[2] + one[3], many[0] + many[2] + many[3]):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(norms[0], norms[1])


def test_a_step_per_tensor_is_checked():
    p, g, m, v = make_inputs([(4,), (5,)], torch.float32, torch.device("cpu"), seed=0)
    for bad, message in ((torch.ones(3), "one per parameter"), (torch.ones(2, dtype=torch.float64), "float32")):
        with pytest.raises(ValueError, match=message):
            mk.adamw_step_(p, g, m, v, lr=1e-3, step=bad)
