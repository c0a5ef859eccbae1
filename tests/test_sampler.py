"""The sampler's statistics match Algorithm 2 of MISA.md."""

import math

import pytest
import torch

import misa
from misa.sampler import ImportanceSampler

from models import tiny_lm


def test_single_slot_budget_samples_with_probability_p():
    # With room for exactly one module, the first module drawn is the sample: P(b) = p_b.
    sizes = [10] * 5
    s = ImportanceSampler(sizes, budget=10, eta=1.0, seed=0)
    s.k[:] = 1
    s.G = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0], dtype=torch.float64) * (1 - 0.8)  # Ĝ = [0, .5, 1, 1.5, 2]
    p = s.probabilities()
    torch.testing.assert_close(p, torch.softmax(torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0], dtype=torch.float64), 0))
    n = 20000
    counts = torch.zeros(5)
    for _ in range(n):
        (b,) = s.sample()
        counts[b] += 1
    expected = p.float() * n
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 20.5  # chi-square, 4 degrees of freedom, p = 0.0004


def test_two_slot_inclusion_matches_sequential_draws():
    # Inclusion probability of b with room for two equal modules: p_b + sum_{a != b} p_a p_b / (1 - p_a).
    s = ImportanceSampler([1] * 4, budget=2, eta=1.0, seed=1)
    s.k[:] = 1
    s.G = torch.tensor([0.2, 0.4, 0.6, 1.6], dtype=torch.float64)
    p = s.probabilities()
    want = torch.tensor([float(p[b] + sum(p[a] * p[b] / (1 - p[a]) for a in range(4) if a != b)) for b in range(4)])
    n = 15000
    counts = torch.zeros(4)
    for _ in range(n):
        for b in s.sample():
            counts[b] += 1
    torch.testing.assert_close(counts / n, want, atol=0.015, rtol=0)


def test_warmup_forces_never_sampled_modules_first():
    s = ImportanceSampler([3, 3, 3, 3, 3, 3], budget=6, eta=5.0, seed=2)
    seen = []
    for _ in range(3):
        a = s.sample()
        assert s.in_warmup
        seen += a
        s.update(a, [1.0] * len(a))
    assert sorted(seen) == list(range(6))
    s.sample()
    assert not s.in_warmup


def test_budget_is_never_exceeded():
    sizes = [5, 7, 11, 13, 17, 19, 23]
    s = ImportanceSampler(sizes, budget=40, eta=1.0, seed=3)
    for _ in range(200):
        a = s.sample()
        assert sum(sizes[b] for b in a) <= 40
        s.update(a, torch.rand(len(a)).tolist())


def test_sample_last_forces_the_oldest():
    s = ImportanceSampler([1] * 6, budget=2, eta=0.0, sample_last=1, seed=4, order="uniform")
    last_seen = {}
    for loop in range(30):
        a = s.sample()
        s.update(a, [1.0] * len(a))
        for b in a:
            last_seen[b] = loop
    # anti-starvation: no module waits more than a few loops
    assert loop - min(last_seen.values()) <= 6


def test_higher_gradient_modules_are_sampled_more_in_training():
    """End to end: scale the gradients of two modules up; MISA should pick them far more often."""
    torch.manual_seed(0)
    model = tiny_lm(seed=0)
    with pytest.warns(UserWarning, match="never be trained"):  # the MLP matrices exceed this budget
        opt = misa.MISA(
            model,
            lr=1e-3,
            delta=0.05,
            eta=50.0,
            interval=2,
            warmup_interval=1,
            seed=0,
            backend="torch",
            variant="paper",
        )
    hot = {"layers.1.mlp.up_proj", "layers.2.self_attn.v_proj"}
    gen = torch.Generator().manual_seed(0)
    counts = {n: 0 for n in opt.module_names}
    for _ in range(400):
        if opt.steps_in_period == 0:
            for n in opt.active_modules:
                counts[n] += 1
        for m in opt.partition.modules:
            for _, p in m.params:
                if p.requires_grad:
                    scale = 3.0 if m.name in hot else 1.0
                    p.grad = torch.randn(p.shape, generator=gen) * scale / math.sqrt(p.numel())
        opt.step()
        opt.zero_grad()
    hot_rate = sum(counts[n] for n in hot) / len(hot)
    cold_rate = sum(c for n, c in counts.items() if n not in hot) / (len(counts) - len(hot))
    assert hot_rate > 3 * cold_rate
    order = torch.argsort(opt.importance, descending=True)[:2].tolist()
    assert {opt.module_names[i] for i in order} == hot


def test_rng_state_round_trips():
    s = ImportanceSampler([1] * 8, budget=3, seed=9)
    s.sample()
    state = s.state_dict()
    a = [s.sample() for _ in range(5)]
    s2 = ImportanceSampler([1] * 8, budget=3, seed=123)
    s2.load_state_dict(state)
    assert [s2.sample() for _ in range(5)] == a


@pytest.mark.parametrize("order", ["misa", "uniform", "ascending", "descending", "random"])
def test_every_order_respects_budget(order):
    s = ImportanceSampler([2, 3, 4, 5], budget=7, order=order, seed=0)
    for _ in range(20):
        a = s.sample()
        assert a and sum([2, 3, 4, 5][b] for b in a) <= 7
        s.update(a, [1.0] * len(a))


@pytest.mark.parametrize("context", ["fake", "meta"])
def test_the_bookkeeping_stays_real_under_fake_tensors_and_a_meta_default_device(context):
    # The memory planner runs MISA's step on fake tensors; a meta device context builds models without
    # memory. Neither may turn the sampler's host numbers into tensors that cannot be read.
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    def draws():
        s = ImportanceSampler([3, 1, 2, 4, 2], budget=5, eta=1.0, seed=3)
        out = []
        for _ in range(6):
            chosen = s.sample()
            s.update(chosen, [float(b + 1) for b in chosen])
            out.append(chosen)
        return s, out

    real, expected = draws()
    with FakeTensorMode(allow_non_fake_inputs=True) if context == "fake" else torch.device("meta"):
        s, got = draws()
        probs = s.probabilities()
        state = s.state_dict()
    assert got == expected
    for t in (s.G, s.k, s.last, probs, state["G"]):
        assert not isinstance(t, FakeTensor) and t.device.type == "cpu"
    torch.testing.assert_close(s.G, real.G)
