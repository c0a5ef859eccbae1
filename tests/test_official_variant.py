"""variant="official" against a transcription of the authors' optimizer (tests/authors_misa.py): the same
gradients, then the switch steps, G, probabilities, forced modules and parameters compared at every step;
the random part of the draw compared statistically."""

import math
import random

import pytest
import torch

import misa
from misa.variants import OFFICIAL

from authors_misa import AuthorsMISA
from models import tiny_lm

LR, WD, ETA = 1e-2, 0.01, 3.0


def make(interval, delta=0.1, seed=0):
    model = tiny_lm(seed=1, d=16, ff=24, layers=3)
    opt = misa.MISA(
        model,
        lr=LR,
        weight_decay=WD,
        delta=delta,
        eta=ETA,
        interval=interval,
        variant="official",
        seed=seed,
        backend="torch",
        check_finite=False,
    )
    modules = [[p for _, p in m.params] for m in opt.partition.modules]
    theirs = AuthorsMISA(
        modules, opt.partition.total_params, ratio=delta, interval=interval, eta=ETA, lr=LR, weight_decay=WD
    )
    return model, opt, theirs


@pytest.mark.parametrize("interval", [1, 4, 5, 8, 50])
def test_official_matches_the_authors_code_step_by_step(interval):
    model, opt, theirs = make(interval)
    # their code's modules: the >=2-D weights inside layers, biases frozen
    assert all(len(m.params) == 1 and m.params[0][1].dim() == 2 for m in opt.partition.modules)
    assert not model.layers[0].mlp.down_proj.bias.requires_grad
    forced, _, _ = theirs.forced()
    assert sorted(forced) == opt.active_set.indices  # the first sample is all forced (nothing sampled yet)
    theirs.switch(opt.active_set.indices)
    gen = torch.Generator().manual_seed(interval)
    steps = max(3 * interval, 30) if interval < 50 else 120
    switch_steps = {"ours": [], "theirs": []}
    for step in range(1, steps + 1):
        grads = {}
        for b in opt.active_set.indices:
            grads[b] = []
            for _, p in opt.partition.modules[b].params:
                p.grad = torch.randn(p.shape, generator=gen) * (0.5 + b % 3)
                grads[b].append(p.grad.clone())
        before = len(opt.switch_log)
        opt.step()
        opt.zero_grad()
        theirs_switch = theirs.step(grads)
        ours_switch = len(opt.switch_log) > before
        assert ours_switch == theirs_switch, f"step {step}"
        if theirs_switch:
            switch_steps["ours"].append(step)
            switch_steps["theirs"].append(step)
            theirs.update_estimate()
            torch.testing.assert_close(
                opt.importance, torch.tensor(theirs.G, dtype=torch.float64), rtol=1e-5, atol=1e-9
            )
            torch.testing.assert_close(
                opt.probabilities, torch.tensor(theirs.p, dtype=torch.float64), rtol=1e-5, atol=1e-9
            )
            forced, _, _ = theirs.forced()
            assert set(forced) <= set(opt.active_set.indices), (
                f"step {step}: forced {forced}, chosen {opt.active_set.indices}"
            )
            kept = set(opt.active_set.indices) & set(theirs.active)
            theirs.switch(opt.active_set.indices)  # their random part: take ours
            for b in kept:  # re-selected modules keep their Adam state and step count
                p = opt.partition.modules[b].params[0][1]
                assert opt.state[p]["step"] == theirs.state_steps(b)
        for b, ps in enumerate(theirs.params):
            got = opt.partition.modules[b].params[0][1].detach().double()
            torch.testing.assert_close(got, ps[0], rtol=1e-5, atol=1e-6, msg=f"step {step}, module {b}")
    if interval == 50:  # warm-up: one switch per step while a module was never selected, then at 50, 100
        warmup = [s for s in switch_steps["ours"] if s < 50]
        assert warmup == list(range(1, len(warmup) + 1)) and 50 in switch_steps["ours"]


def test_the_random_part_of_the_draw_matches_in_distribution():
    """Their sequential random.choices and our Gumbel-top-k draw give the same inclusion frequencies."""
    _, opt, theirs = make(interval=4, delta=0.2)
    sampler = opt.sampler
    g = torch.Generator().manual_seed(0)
    G = torch.rand(len(sampler.sizes), generator=g, dtype=torch.float64) * 1.5
    last = torch.randint(0, 5, (len(sampler.sizes),), generator=g)
    theirs.G, theirs.last_used = G.tolist(), last.tolist()
    theirs.p = [
        x / sum(math.exp(min(5.0, ETA * v * v)) for v in theirs.G)
        for x in [math.exp(min(5.0, ETA * v * v)) for v in theirs.G]
    ]
    sampler.G, sampler.last = G.clone(), last.clone()
    sampler.k[:] = 1
    torch.testing.assert_close(sampler.probabilities(), torch.tensor(theirs.p, dtype=torch.float64))
    n, rng = 3000, random.Random(0)
    ours = torch.zeros(len(G))
    them = torch.zeros(len(G))
    for _ in range(n):
        sampler.last = last.clone()  # sampling stamps `last`; keep the state fixed
        for b in sampler.sample():
            ours[b] += 1
        for b in theirs.draw(rng):
            them[b] += 1
    assert (ours / n - them / n).abs().max() < 0.05, (ours / n, them / n)


def test_official_counts_a_nonfinite_step_and_skips_its_update():
    model, opt, _ = make(interval=50)
    for _ in range(10):  # through the warm-up
        for b in opt.active_set.indices:
            for _, p in opt.partition.modules[b].params:
                p.grad = torch.randn(p.shape)
        opt.step()
    opt.check_finite = True
    active = opt.active_set.indices
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    S_before, steps_before = opt.period.S.clone(), opt.period.step_count
    for b in active:
        for _, p in opt.partition.modules[b].params:
            p.grad = torch.randn(p.shape)
    opt.partition.modules[active[0]].params[0][1].grad[0, 0] = float("nan")
    opt.step()  # decided on the device: no warning until the period ends
    assert opt.skipped_steps == 1
    assert opt.period.step_count == steps_before + 1  # counted, as the authors' code does
    assert float(opt.period.S[0] - S_before[0]) == pytest.approx(1.0)  # the NaN tensor's norm counts as 1.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # no update


def test_official_preset_switches():
    assert OFFICIAL.norm_power == 1 and OFFICIAL.logit_cap == 5.0 and OFFICIAL.compounding_correction
    assert not OFFICIAL.flush and OFFICIAL.keep_states and OFFICIAL.divide_by_interval
    assert OFFICIAL.schedule == "global_step" and OFFICIAL.sample_last == 2 and not OFFICIAL.module_biases
