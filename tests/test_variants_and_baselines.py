"""Each variant switch on its own, and the LISA and BAdam baselines as their authors run them."""

import math

import pytest
import torch

import misa
import misa_kernels
from misa.variants import DEFAULT, PAPER, PRESETS

from models import tiny_lm


def grads_for_trainable(model, gen):
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=gen)


def run(opt, model, steps, seed=0):
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        grads_for_trainable(model, gen)
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("flush", [True, False])
def test_flush_switch(monkeypatch, flush):
    calls = []
    real = misa_kernels.momentum_flush_
    monkeypatch.setattr(misa_kernels, "momentum_flush_", lambda *a, **k: (calls.append(1), real(*a, **k)))
    model = tiny_lm()
    opt = misa.MISA(model, delta=0.2, interval=5, variant="paper", flush=flush, backend="torch")
    run(opt, model, 10)
    assert bool(calls) == flush
    assert opt.v.flush == flush and ("flush" in opt.variant) == (flush != PAPER.flush)


@pytest.mark.parametrize("keep", [True, False])
def test_keep_states_switch(keep):
    # two modules' worth of budget over three modules: re-selection happens often
    model = torch.nn.Sequential(
        torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False), torch.nn.Linear(8, 8, bias=False)
    )
    opt = misa.MISA(
        model, delta=0.7, interval=2, variant="paper", keep_states=keep, flush=False, backend="torch", warmup_interval=2
    )
    gen = torch.Generator().manual_seed(0)
    seen_kept = seen_restart = False
    for _ in range(30):
        before = {b: opt.state[opt.partition.modules[b].params[0][1]]["step"] for b in opt.active_set.indices}
        grads_for_trainable(model, gen)
        opt.step()
        opt.zero_grad()
        if opt.steps_in_period == 0:  # switched
            for b in set(before) & set(opt.active_set.indices):
                step = opt.state[opt.partition.modules[b].params[0][1]]["step"]
                seen_kept |= step == before[b] + 1
                seen_restart |= step == 0
    assert seen_kept == keep and seen_restart == (not keep)


@pytest.mark.parametrize("power", [1, 2])
def test_norm_power_switch(power):
    model = tiny_lm()
    opt = misa.MISA(
        model, delta=0.2, interval=5, variant="paper", norm_power=power, backend="torch", check_finite=False
    )
    gen = torch.Generator().manual_seed(0)
    grads_for_trainable(model, gen)
    want = []
    for b in opt.active_set.indices:
        sq = sum(float(p.grad.double().square().sum()) for _, p in opt.partition.modules[b].params)
        want.append(sq if power == 2 else math.sqrt(sq))
    opt.step()
    torch.testing.assert_close(opt.period.S.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=0)


@pytest.mark.parametrize("cap", [None, 0.5, math.inf])
def test_logit_cap_switch(cap):
    opt = misa.MISA(tiny_lm(), delta=0.2, eta=4.0, variant="official", logit_cap=cap, backend="torch")
    opt.sampler.G = torch.linspace(0, 2, len(opt.module_names), dtype=torch.float64)
    energy = 4.0 * opt.sampler.G.square()
    limit = 5.0 if cap is None else cap  # None keeps the preset's cap (official: 5)
    want = torch.softmax(torch.clamp(energy, max=limit), 0)
    torch.testing.assert_close(opt.probabilities, want)


def test_presets_and_unknown_switches():
    assert set(PRESETS) == {"default", "paper", "official"}
    assert misa.MISA(tiny_lm(), delta=0.2).v == DEFAULT
    with pytest.raises(ValueError, match="variant"):
        misa.MISA(tiny_lm(), delta=0.2, variant="v2")
    with pytest.raises(ValueError, match="norm_power"):
        misa.MISA(tiny_lm(), delta=0.2, norm_power=3)


# ---------------------------------------------------------------- baselines
def test_lisa_as_lmflow_runs_it():
    model = tiny_lm(layers=4)
    opt = misa.LISA(model, lr=1e-3, n_layers=2, interval=3, seed=1, backend="torch")
    assert opt.module_names == [f"layers.{i}" for i in range(4)]
    outside = [model.embed_tokens.weight, model.lm_head.weight, model.norm.weight, model.norm.bias]
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(60):
        assert len(opt.active_modules) == 2
        assert all(p.requires_grad for p in outside)  # embedding, head, final norm: every step
        if opt.steps_in_period == 0:
            draws.append(tuple(opt.active_modules))
            assert all(
                opt.state[p]["step"] == 0 for b in opt.active_set.indices for _, p in opt.partition.modules[b].params
            )
        grads_for_trainable(model, gen)
        opt.step()
        opt.zero_grad()
    assert opt.v.flush is False and torch.allclose(opt.probabilities, torch.full((4,), 0.25, dtype=torch.float64))
    assert len(set(draws)) > 2  # independent uniform draws


@pytest.mark.parametrize("mode", ["descending", "ascending", "random"])
def test_badam_as_its_authors_run_it(mode):
    model = tiny_lm(layers=4)
    opt = misa.BAdam(model, lr=1e-3, interval=2, switch_mode=mode, backend="torch")
    assert not model.embed_tokens.weight.requires_grad and not model.lm_head.weight.requires_grad
    visits = []
    gen = torch.Generator().manual_seed(0)
    for _ in range(16):
        if opt.steps_in_period == 0:
            visits.append(opt.active_modules[0])
            assert len(opt.active_modules) == 1
            assert all(opt.state[p]["step"] == 0 for _, p in opt.partition.modules[opt.active_set.indices[0]].params)
        grads_for_trainable(model, gen)
        opt.step()
        opt.zero_grad()
    names = [f"layers.{i}" for i in range(4)]
    if mode == "descending":
        assert visits == names[::-1] * 2
    elif mode == "ascending":
        assert visits == names * 2
    else:
        assert sorted(visits[:4]) == names and sorted(visits[4:]) == names
    with pytest.raises(ValueError, match="switch_mode"):
        misa.BAdam(model, switch_mode="fixed")


def test_badam_keeps_fp32_masters_of_the_active_block():
    model = tiny_lm(layers=2, dtype=torch.bfloat16)
    opt = misa.BAdam(model, lr=1e-3, interval=2, backend="torch", train_outside_layers=True)
    assert model.embed_tokens.weight.requires_grad
    assert all(st["master"].dtype == torch.float32 for st in opt.state.values())
