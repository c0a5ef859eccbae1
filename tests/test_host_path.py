"""The eager call's host path: lists a caller keeps are validated once and remembered, gradients are
checked every call, a bad argument is still named on a remembered set, storage that moved is noticed,
the dispatcher's Python layers are skipped but autograd still sees the writes, and torch.compile still
traces one op."""

import pytest
import torch

import misa_kernels as mk
from misa_kernels import checks, tables

from conftest import test_device
from oracle import adamw_step as oracle_adamw
from oracle import rel_err
from test_adamw_step import make_inputs

SHAPES = [(5, 3), (17,), (1,), (130,)]


def _step(p, g, m, v, **kw):
    kw.setdefault("lr", 1e-2)
    kw.setdefault("step", 3)
    mk.adamw_step_(p, g, m, v, weight_decay=0.01, backend="torch", **kw)


def test_a_remembered_set_validates_only_the_gradients(monkeypatch):
    p, g, m, v = make_inputs(SHAPES, torch.float32, test_device(), seed=0)
    _step(p, g, m, v)
    full = []
    monkeypatch.setattr(checks, "check_states", lambda *a, **k: full.append(a))
    for _ in range(3):
        _step(p, [t.clone() for t in g], m, v)  # new gradient tensors every call, as after each backward
    assert full == []


@pytest.mark.parametrize("bad", ["dtype", "shape", "device", "strided", "alias", "count"])
def test_a_bad_gradient_is_named_on_a_remembered_set(bad):
    device = test_device()
    p, g, m, v = make_inputs(SHAPES, torch.float32, device, seed=1)
    _step(p, g, m, v)
    before = [t.clone() for t in p + m + v]
    g = list(g)
    if bad == "dtype":
        g[1], match = g[1].double(), r"grads\[1\]: expected dtype torch.float32"
    elif bad == "shape":
        g[0], match = g[0].reshape(3, 5), r"grads\[0\]: expected shape \(5, 3\)"
    elif bad == "device":
        g[3], match = g[3].to("meta"), r"grads\[3\]: expected a tensor on"
    elif bad == "strided":
        g[0], match = torch.randn(3, 5, device=device).t(), r"grads\[0\]: expected a contiguous tensor"
    elif bad == "alias":
        g[2], match = p[2], r"is the same tensor as"
    else:
        g, match = g[:-1], "tensor lists must have equal lengths"
    with pytest.raises((TypeError, ValueError), match=match):
        _step(p, g, m, v)
    assert all(torch.equal(a, b) for a, b in zip(before, p + m + v))  # nothing was written


def test_storage_that_moved_is_validated_and_tabled_again():
    """`p.data = ...` keeps the tensor object but moves its storage: the remembered set and any chunk
    table hold the old address, so the call must notice (the new address is part of the key)."""
    device = test_device()
    p, g, m, v = make_inputs(SHAPES, torch.float32, device, seed=2)
    _step(p, g, m, v)
    p[0].data = torch.randn(5, 3, generator=torch.Generator().manual_seed(9)).to(device)
    want_p, want_m, _, _ = oracle_adamw(
        p, g, m, v, lr=1e-2, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.01, step=3, fresh=False
    )
    _step(p, g, m, v)
    assert rel_err(p, want_p) <= 1e-6 and rel_err(m, want_m) <= 1e-6
    p[1].data = torch.randn(18, device=device)  # a parameter that no longer matches its states
    with pytest.raises(ValueError, match=r"grads\[1\]: expected shape \(18,\)"):
        _step(p, g, m, v)
    g[1] = torch.randn(18, device=device)
    with pytest.raises(ValueError, match=r"exp_avgs\[1\]: expected 18 elements"):
        _step(p, g, m, v)


def test_the_eager_call_bumps_version_counters_for_autograd():
    device = test_device()
    p, g, m, v = make_inputs(SHAPES, torch.float32, device, seed=3)
    w = torch.nn.Parameter(p[0].clone())
    loss = (w * w).sum()  # saves w for backward
    versions = [t._version for t in [w] + m[1:] + v[1:]]
    _step([w] + p[1:], g, m, v)
    assert all(t._version > n for t, n in zip([w] + m[1:] + v[1:], versions))
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_torch_compile_traces_one_op_and_matches_eager():
    device = test_device()
    graphs = []

    def record(gm, example_inputs):
        graphs.append(str(gm.graph))
        return gm.forward

    def fn(p, g, m, v, norms):
        mk.adamw_step_(p, g, m, v, lr=1e-3, step=3, weight_decay=0.01, grad_sq_norms=norms, backend="torch")

    eager = make_inputs(SHAPES, torch.float32, device, seed=4) + (torch.zeros(len(SHAPES), device=device),)
    compiled = make_inputs(SHAPES, torch.float32, device, seed=4) + (torch.zeros(len(SHAPES), device=device),)
    fn(*eager)
    torch._dynamo.reset()
    torch.compile(fn, backend=record)(*compiled)
    assert graphs and "misa.adamw_step_" in graphs[0]
    written = lambda case: case[0] + case[2] + case[3] + [case[4]]  # noqa: E731  (params, states, norms)
    for a, b in zip(written(eager), written(compiled)):
        assert torch.equal(a, b)


def test_fake_tensors_go_through_the_declared_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        p, g, m, v = ([torch.empty(4)] for _ in range(4))
        mk.adamw_step_(p, g, m, v, lr=1e-3, step=1, backend="torch")  # the fake runs, no data is touched
        assert mk.grad_sq_norms(g, backend="torch").shape == (1,)


def test_chunk_tables_are_built_once_per_set_of_addresses():
    p, g, m, v = make_inputs([(300,), (5,), (1,)], torch.float32, torch.device("cpu"), seed=5)
    first = tables.build([p, g, m, v], 64)
    assert tables.build([p, g, m, v], 64) is first  # a later step: a lookup
    assert first.flat[: first.n_chunks].tolist() == [0] * 5 + [1, 2]
    moved = [t.clone() for t in g]
    other = tables.build([p, moved, m, v], 64)
    assert other is not first and other.addresses[1].tolist() == [t.data_ptr() for t in moved]
