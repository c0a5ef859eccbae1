"""The compact state formats of the fused ops: 8-bit blockwise states (quant.py) and the Kahan bf16
compensation, against a float64 oracle, on every backend that runs here.

The oracle runs the fp32 contract in float64 from the states the op *sees* (the dequantized codes),
so a kernel is held to fp32 tolerances on the parameter and to the quantization bound on the states."""

import re
from pathlib import Path

import pytest
import torch

import misa_kernels as mk
from misa_kernels import quant

from conftest import test_device
from oracle import adamw_step as oracle_adamw
from oracle import momentum_flush as oracle_flush
from oracle import rel_err
from test_adamw_step import DTYPES, backend_params, require

HYPER = dict(lr=3e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1)
# 1, one block less one, one block, one more, the 8-bit minimum less one, past it and over several chunks
# (MISA_CHUNK is 1024 in the tests), and a view that starts mid-buffer (misaligned).
SIZES = [1, 255, 256, 257, 4095, 4097]
ROOT = Path(__file__).resolve().parents[1]


def _block_bound(codes, absmax, qmap):
    """Per element: half the larger gap around its code, times its block's absmax (the rounding bound of
    a nearest-code quantizer), plus fp32 slack."""
    c = codes.reshape(-1).long()
    gaps = torch.cat([qmap[1:] - qmap[:-1], qmap[-1:] - qmap[-2:-1]])
    below = torch.cat([gaps[:1], gaps[:-1]])
    half = 0.5 * torch.maximum(gaps[c], below[c])
    scale = absmax.repeat_interleave(quant.BLOCK)[: c.numel()]
    return (half * scale + 1e-6 * scale).double()


def _states8(sizes, device, seed, steady_scale=(0.1, 0.01)):
    g = torch.Generator().manual_seed(seed)
    qs, qu = quant.maps(device)
    m = [(torch.randn(n, generator=g) * steady_scale[0]).to(device) for n in sizes]
    v = [(torch.rand(n, generator=g) * steady_scale[1]).to(device) for n in sizes]
    mc, ma = map(list, zip(*(quant.quantize(x, qs) for x in m)))
    vc, va = map(list, zip(*(quant.quantize(x, qu) for x in v)))
    return mc, vc, ma, va


def _inputs(sizes, dtype, device, seed, misaligned=False):
    g = torch.Generator().manual_seed(seed)
    if misaligned:  # views one element into a buffer: no 16-byte alignment
        params = [torch.randn(n + 1, generator=g).to(dtype).to(device)[1:] for n in sizes]
    else:
        params = [torch.randn(n, generator=g).to(dtype).to(device) for n in sizes]
    grads = [(torch.randn(n, generator=g) * 0.5).to(dtype).to(device) for n in sizes]
    return params, grads


def _compensation(params, seed):
    # A compensation as after a few steps: a fraction of the parameter's last bf16 bit.
    g = torch.Generator().manual_seed(seed + 7)
    return [(p.float() * 2.0**-10 * torch.randn(p.shape, generator=g).to(p.device)).bfloat16() for p in params]


def _run(backend, device, sizes, dtype, *, fresh, value, seed=0, skip=None, misaligned=False):
    """One 8-bit step; returns (inputs as seen, outputs). value: None | "master" | "kahan"."""
    params, grads = _inputs(sizes, dtype, device, seed, misaligned)
    mc, vc, ma, va = _states8(sizes, device, seed)
    masters = [p.float() + 1e-3 * p.float().abs() for p in params] if value == "master" else None
    comp = _compensation(params, seed) if value == "kahan" else None
    seen = dict(
        params=[p.clone() for p in params],
        mc=[c.clone() for c in mc],
        vc=[c.clone() for c in vc],
        ma=[a.clone() for a in ma],
        va=[a.clone() for a in va],
        masters=None if masters is None else [w.clone() for w in masters],
        comp=None if comp is None else [c.clone() for c in comp],
    )
    if fresh:  # never read: poison codes, scales (and masters, compensation)
        for c in mc + vc:
            c.fill_(201)
        for a in ma + va + (masters or []):
            a.fill_(float("nan"))
        for c in comp or []:
            c.fill_(float("nan"))
    norms = torch.ones(len(sizes), device=device)
    mk.adamw_step_(
        params,
        grads,
        mc,
        vc,
        **HYPER,
        step=3,
        fresh=fresh,
        grad_sq_norms=norms,
        master_params=masters,
        compensation=comp,
        exp_avg_absmax=ma,
        exp_avg_sq_absmax=va,
        skip=skip,
        backend=backend,
        rounding="stochastic" if value == "stochastic" else "nearest",
        seed=3,
    )
    assert mk.last_backend() == backend
    return seen, grads, dict(params=params, mc=mc, vc=vc, ma=ma, va=va, masters=masters, comp=comp, norms=norms)


def _oracle(seen, grads, device, *, fresh, value):
    qs, qu = quant.maps(device)
    m = [quant.dequantize(c, a, qs) for c, a in zip(seen["mc"], seen["ma"])]
    v = [quant.dequantize(c, a, qu) for c, a in zip(seen["vc"], seen["va"])]
    start = seen["params"]
    if value == "kahan" and not fresh:
        start = [p.double() + c.double() for p, c in zip(seen["params"], seen["comp"])]
    masters = seen["masters"] if value == "master" else None
    if value == "kahan":  # the oracle's start value is param + compensation, as an fp32 master would be
        masters = [s.float() for s in start] if not fresh else None
    return oracle_adamw(
        seen["params"],
        grads,
        m,
        v,
        **HYPER,
        step=3.0,
        fresh=fresh,
        grad_sq_norms=torch.ones(len(grads), device=device),
        master_params=masters,
    )


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "steady"])
@pytest.mark.parametrize("value", [None, "master", "kahan", "stochastic"], ids=["plain", "master", "kahan", "sr"])
def test_8bit_step_against_float64(backend, dtype, fresh, value):
    device = test_device()
    require(backend, device)
    dtype = DTYPES[dtype]
    if dtype == torch.float32 and value is not None:
        pytest.skip("float32 parameters take no master, compensation or stochastic rounding")
    if dtype == torch.float16 and value == "stochastic":
        pytest.skip("stochastic rounding is for bfloat16")
    seen, grads, out = _run(backend, device, SIZES, dtype, fresh=fresh, value=value)
    want_p, want_m, want_v, want_n = _oracle(seen, grads, device, fresh=fresh, value=value)
    qs, qu = quant.maps(device)
    for got_c, got_a, want, qmap in [(c, a, w, qs) for c, a, w in zip(out["mc"], out["ma"], want_m)] + [
        (c, a, w, qu) for c, a, w in zip(out["vc"], out["va"], want_v)
    ]:
        got = quant.dequantize(got_c, got_a, qmap).double()
        assert torch.all((got - want.reshape(-1)).abs() <= _block_bound(got_c, got_a, qmap)), "states off the bound"
        # the block scale is the block's largest new magnitude
        blocks = torch.nn.functional.pad(want.reshape(-1).abs(), (0, got_a.numel() * quant.BLOCK - want.numel()))
        assert torch.allclose(got_a.double(), blocks.view(-1, quant.BLOCK).amax(1), rtol=1e-6, atol=0)
    assert rel_err(out["norms"], want_n) < 1e-5
    if value == "master":
        assert rel_err(out["masters"], want_p) < 1e-6
    if value == "kahan":  # param + compensation carries the value to about 16 bits
        assert rel_err([p.double() + c.double() for p, c in zip(out["params"], out["comp"])], want_p) < 2e-5
    if dtype == torch.float32:
        assert rel_err(out["params"], want_p) < 1e-6
    else:  # the parameter is a rounding of the fp32 value: the nearest (one ulp apart where the fp32 value sits
        # on a tie), or with stochastic rounding one of its two neighbours
        mantissa = 7 if dtype == torch.bfloat16 else 10
        for p, w in zip(out["params"], want_p):
            ulp = torch.exp2(torch.floor(torch.log2(w.abs().clamp_min(1e-30))) - mantissa)
            assert torch.all((p.double() - w).abs() <= ulp * 1.001)


@pytest.mark.parametrize("backend", backend_params())
def test_8bit_misaligned_views_and_many_tensors(backend):
    device = test_device()
    require(backend, device)
    sizes = [7 * i % 600 + 1 for i in range(40)]  # 40 tensors, most of them blocks with a tail
    seen, grads, out = _run(backend, device, sizes, torch.bfloat16, fresh=False, value="kahan", misaligned=True)
    want_p = _oracle(seen, grads, device, fresh=False, value="kahan")[0]
    assert rel_err([p.double() + c.double() for p, c in zip(out["params"], out["comp"])], want_p) < 2e-5


@pytest.mark.interpreter
@pytest.mark.parametrize("value", [None, "kahan"], ids=["plain", "kahan"])
def test_triton_and_torch_quantize_alike(value):
    """Codes and scales are not bit-identical across backends: their fp32 updates may differ in the last
    bit (operation order), and a value that lands that close to the midpoint of two codes takes either.
    The bound: codes at most one apart, on at most 1% of the elements; scales within 1e-6."""
    device = torch.device("cpu")
    require("triton", device)
    runs = [_run(b, device, SIZES, torch.bfloat16, fresh=False, value=value, seed=4)[2] for b in ("torch", "triton")]
    codes = [torch.cat([c.reshape(-1) for c in r["mc"] + r["vc"]]).int() for r in runs]
    diff = (codes[0] - codes[1]).abs()
    assert diff.max() <= 1 and (diff > 0).float().mean() <= 0.01
    for a, b in zip(runs[0]["ma"] + runs[0]["va"], runs[1]["ma"] + runs[1]["va"]):
        assert torch.allclose(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "steady"])
def test_8bit_skipped_step(backend, fresh):
    """A skipped steady step keeps codes, scales, compensation bit for bit (requantizing unchanged states
    could move them); a skipped fresh one leaves zero states and zero compensation, as fp32 states do."""
    device = test_device()
    require(backend, device)
    skip = torch.ones((), device=device)
    seen, _, out = _run(backend, device, SIZES, torch.bfloat16, fresh=fresh, value="kahan", skip=skip)
    for p, q in zip(out["params"], seen["params"]):
        assert torch.equal(p, q)
    assert torch.equal(out["norms"], torch.ones(len(SIZES), device=device))
    if fresh:
        for c in out["mc"]:
            assert torch.all(c == quant.zero_code(True))
        for c in out["vc"]:
            assert torch.all(c == quant.zero_code(False))
        for t in out["ma"] + out["va"] + out["comp"]:
            assert torch.all(t == 0)
    else:
        for key in ("mc", "vc", "ma", "va", "comp"):
            for got, before in zip(out[key], seen[key]):
                assert torch.equal(got, before)


@pytest.mark.parametrize("backend", backend_params())
@pytest.mark.parametrize("value", [None, "master", "kahan"], ids=["plain", "master", "kahan"])
def test_8bit_flush_reads_states_and_moves_the_value(backend, value):
    device = test_device()
    require(backend, device)
    dtype = torch.bfloat16 if value else torch.float32
    params, _ = _inputs(SIZES, dtype, device, 5)
    mc, vc, ma, va = _states8(SIZES, device, 5)
    masters = [p.float() + 1e-3 * p.float().abs() for p in params] if value == "master" else None
    comp = _compensation(params, 5) if value == "kahan" else None
    before = [t.clone() for t in mc + vc + ma + va]
    qs, qu = quant.maps(device)
    start = (
        masters
        if masters is not None
        else ([p.double() + c.double() for p, c in zip(params, comp)] if comp is not None else params)
    )
    want = oracle_flush(
        start,
        [quant.dequantize(c, a, qs) for c, a in zip(mc, ma)],
        [quant.dequantize(c, a, qu) for c, a in zip(vc, va)],
        lr=1e-3,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        step=7.0,
    )
    mk.momentum_flush_(
        params,
        mc,
        vc,
        lr=1e-3,
        step=7,
        master_params=masters,
        compensation=comp,
        exp_avg_absmax=ma,
        exp_avg_sq_absmax=va,
        backend=backend,
    )
    for t, b in zip(mc + vc + ma + va, before):
        assert torch.equal(t, b)  # states are read, never written
    if value == "master":
        assert rel_err(masters, want) < 1e-6
    elif value == "kahan":
        assert rel_err([p.double() + c.double() for p, c in zip(params, comp)], want) < 2e-5
    else:
        assert rel_err(params, want) < 1e-6


def test_cuda_binding_receives_8bit_operands_in_kernel_order(monkeypatch):
    """The CUDA backend cannot run here; check what its Python side hands the extension: the table's
    operands (param, grad, codes, codes, scales, scales, compensation), a chunk of whole blocks, the maps."""
    from misa_kernels import cuda

    calls = []

    class Recorder:
        def adamw_step_(self, *args):
            calls.append(args)

    monkeypatch.setattr(cuda, "extension", lambda: Recorder())
    monkeypatch.setenv("MISA_CHUNK", "64")  # smaller than a block: the 8-bit table rounds it up
    params, grads = _inputs([300], torch.bfloat16, torch.device("cpu"), 0)
    mc, vc, ma, va = _states8([300], torch.device("cpu"), 0)
    comp = _compensation(params, 0)
    cuda.adamw_step_(
        params,
        grads,
        mc,
        vc,
        None,
        [],
        lr=1e-3,
        beta1=0.9,
        beta2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        step=2,
        fresh=False,
        stochastic=False,
        seed=0,
        compensation=comp,
        exp_avg_absmax=ma,
        exp_avg_sq_absmax=va,
    )
    (a,) = calls
    assert a[3] == quant.BLOCK and a[1] == 2  # chunk 256: two chunks of 300 elements
    operands = [params[0], grads[0], mc[0], vc[0], ma[0], va[0], comp[0]]
    assert a[0][-7:].tolist() == [t.data_ptr() for t in operands]
    assert a[-3] is True and torch.equal(a[-2], torch.cat(quant.maps("cpu")))  # kahan, the maps


def test_dynamic_maps_have_the_bitsandbytes_shape():
    for signed in (True, False):
        q = quant.dynamic_map(signed)
        assert q.numel() == 256 and torch.all(q[1:] > q[:-1])  # sorted, distinct: a code is one value
        assert q[-1] == 1.0 and q[quant.zero_code(signed)] == 0.0
        assert (q[0] < 0) == signed and q[0] > -1.0
    # the smallest non-zero magnitude is 1e-6-ish (the decimal exponent runs to 10**-6): small states keep
    # their relative precision
    assert 1e-7 < quant.dynamic_map(False)[1] < 1e-6


def test_dynamic_maps_equal_bitsandbytes_where_installed():
    bnb_functional = pytest.importorskip("bitsandbytes.functional")
    for signed in (True, False):
        assert torch.equal(quant.dynamic_map(signed), bnb_functional.create_dynamic_map(signed=signed).float())


def test_cuda_zero_codes_match_the_maps():
    text = (ROOT / "csrc" / "misa_ops.cpp").read_text()
    signed = int(re.search(r"kZeroCodeSigned = (\d+);", text).group(1))
    unsigned = int(re.search(r"kZeroCodeUnsigned = (\d+);", text).group(1))
    assert (signed, unsigned) == (quant.zero_code(True), quant.zero_code(False))


def test_quantize_round_trip_stays_in_the_bound():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(5000, generator=g) * torch.logspace(-6, 0, 5000)  # magnitudes across six decades
    for signed, values in ((True, x), (False, x.abs())):
        qmap = quant.dynamic_map(signed)
        codes, absmax = quant.quantize(values, qmap)
        back = quant.dequantize(codes, absmax, qmap)
        assert torch.all((back - values).abs().double() <= _block_bound(codes, absmax, qmap))
        again = quant.quantize(back, qmap)[0]
        # the block's largest element maps to +-1 only when positive (the signed map stops at -0.993)
        assert (again != codes).float().mean() < 0.01
    zeros = quant.quantize(torch.zeros(300), quant.dynamic_map(True))
    assert torch.all(zeros[0] == quant.zero_code(True)) and torch.all(zeros[1] == 0)


BAD = [
    ("exp_avg_absmax", "block scales go with 8-bit", dict(fp32_states=True, absmax=True)),
    ("exp_avg_absmax", "need their fp32 block scales", dict(absmax=False)),
    ("exp_avg_absmax[0]", "expected 2 block scales", dict(absmax_numel=3)),
    ("exp_avg_absmax[0]", "must be float32", dict(absmax_dtype=torch.float16)),
    ("exp_avg_sqs[0]", "share one format", dict(mixed=True)),
    ("compensation", "float32 and need no compensation", dict(param_dtype=torch.float32, comp=True)),
    ("compensation", "exclude each other", dict(comp=True, master=True)),
    ("compensation", "exclude each other", dict(comp=True, rounding="stochastic")),
    ("compensation[0]", "must be bfloat16", dict(comp=True, comp_dtype=torch.float16)),
]


@pytest.mark.parametrize("name,message,case", BAD, ids=[f"{b[0]}-{i}" for i, b in enumerate(BAD)])
def test_bad_state_formats_are_refused_and_nothing_changes(name, message, case):
    dtype = case.get("param_dtype", torch.bfloat16)
    p = [torch.randn(300).to(dtype)]
    g = [torch.randn(300).to(dtype)]
    qs, qu = quant.maps("cpu")
    if case.get("fp32_states"):
        m, v = [torch.randn(300)], [torch.rand(300)]
    else:
        mc, vc = quant.quantize(torch.randn(300), qs)[0], quant.quantize(torch.rand(300), qu)[0]
        m, v = [mc], [vc]
        if case.get("mixed"):
            v = [torch.rand(300)]
    absmax = (
        dict(
            exp_avg_absmax=[torch.ones(case.get("absmax_numel", 2), dtype=case.get("absmax_dtype", torch.float32))],
            exp_avg_sq_absmax=[torch.ones(2)],
        )
        if case.get("absmax", True)
        else {}
    )
    extra = {}
    if case.get("comp"):
        extra["compensation"] = [torch.zeros(300, dtype=case.get("comp_dtype", torch.bfloat16))]
    if case.get("master"):
        extra["master_params"] = [p[0].float()]
    before = [t.clone() for t in p + m + v]
    with pytest.raises((TypeError, ValueError), match=re.escape(name) + ".*" + message):
        mk.adamw_step_(p, g, m, v, lr=1e-3, step=1, rounding=case.get("rounding", "nearest"), **absmax, **extra)
    for t, b in zip(p + m + v, before):
        assert torch.equal(t, b)


@pytest.mark.gpu
def test_against_bitsandbytes_adamw8bit_where_installed():
    """Same weight, same gradients, 20 steps: our 8-bit step against bitsandbytes' blockwise AdamW8bit (its
    maps are ours; its eps enters as eps * sqrt(1 - beta2^t), a difference far below the tolerance).
    Skips cleanly where bitsandbytes or a GPU is missing."""
    bnb = pytest.importorskip("bitsandbytes")
    if not torch.cuda.is_available():
        pytest.skip("bitsandbytes' 8-bit AdamW runs on a GPU")
    device = torch.device("cuda")
    g = torch.Generator(device=device).manual_seed(0)
    p0 = torch.randn(3 * 4096 + 100, generator=g, device=device) * 0.02
    ref = torch.nn.Parameter(p0.clone())
    theirs = bnb.optim.AdamW8bit([ref], lr=1e-3, weight_decay=0.01, min_8bit_size=4096)
    p = p0.clone()
    qs, qu = quant.maps(device)
    mc, vc = torch.empty_like(p, dtype=torch.uint8), torch.empty_like(p, dtype=torch.uint8)
    ma, va = (
        torch.empty(quant.n_blocks(p.numel()), device=device),
        torch.empty(quant.n_blocks(p.numel()), device=device),
    )
    for step in range(1, 21):
        grad = torch.randn(p.shape, generator=g, device=device) * 1e-2
        ref.grad = grad.clone()
        theirs.step()
        mk.adamw_step_(
            [p],
            [grad],
            [mc],
            [vc],
            lr=1e-3,
            weight_decay=0.01,
            step=step,
            fresh=step == 1,
            exp_avg_absmax=[ma],
            exp_avg_sq_absmax=[va],
        )
    st = theirs.state[ref]
    assert torch.equal(st["qmap1"].float().cpu(), quant.dynamic_map(True))
    assert torch.equal(st["qmap2"].float().cpu(), quant.dynamic_map(False))
    moved = (ref.detach() - p0).norm()
    assert ((p - ref.detach()).norm() / moved).item() < 0.02
    m_ours, m_theirs = quant.dequantize(mc, ma, qs), quant.dequantize(st["state1"], st["absmax1"], qs)
    assert ((m_ours - m_theirs).norm() / m_theirs.norm()).item() < 0.02
