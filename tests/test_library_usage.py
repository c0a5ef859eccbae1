"""What a library user runs into: frozen parameters said out loud, eta on a meaningful scale, misuse refused
with a message that says what to do."""

import pytest
import torch

import misa
from misa_kernels import StateArena

from models import tiny_lm


def test_parameters_outside_every_module_are_announced():
    model = tiny_lm()
    with pytest.warns(UserWarning, match=r"belong to no module and stay frozen.*always_train"):
        opt = misa.MISA(model, delta=0.2, backend="torch")
    assert "never trained=" in repr(opt)
    assert f"holds={opt.arena.stats()['bytes'] / 2**20:.2f} MiB" in repr(opt)  # the arena: states and masters
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to announce when everything is trained
        misa.MISA(tiny_lm(), delta=0.5, train_1d=True, include_embedding=True, include_lm_head=True, backend="torch")
        model = tiny_lm()
        misa.MISA(
            model,
            delta=0.5,
            train_1d=True,
            backend="torch",
            always_train=[model.embed_tokens.weight, model.lm_head.weight],
        )


def test_eta_auto_is_scale_free():
    """The same eta gives the same probabilities whatever the scale of the gradients."""
    probs = []
    for scale in (1e-4, 1.0, 1e3):
        opt = misa.MISA(tiny_lm(), delta=0.2, backend="torch", variant="paper")  # energy = G
        assert opt.eta == "auto"
        s = opt.sampler
        s.k[:] = 1
        s.G = torch.linspace(0.5, 2.0, len(s.sizes), dtype=torch.float64) * scale * (1 - s.beta)
        probs.append(opt.probabilities)
    torch.testing.assert_close(probs[0], probs[1])
    torch.testing.assert_close(probs[1], probs[2])
    # a module with twice the mean energy is e^1 times as likely as one at the mean
    p = probs[0]
    assert float(p.max() / p.min()) == pytest.approx(float(torch.exp(torch.tensor(1.5 / 1.25))), rel=1e-6)
    with pytest.raises(ValueError, match="eta"):
        misa.MISA(tiny_lm(), delta=0.2, eta="hot")


def test_add_param_group_is_refused():
    model = tiny_lm()
    opt = misa.MISA(model, delta=0.2, backend="torch")
    with pytest.raises(NotImplementedError, match="always_train"):
        opt.add_param_group({"params": [torch.nn.Parameter(torch.zeros(3))]})


def test_two_optimizers_on_one_model_are_detected():
    model = tiny_lm()
    first = misa.MISA(model, delta=0.2, backend="torch")
    with pytest.raises(ValueError, match="another live MISA"):
        misa.MISA(model, delta=0.2, backend="torch")
    del first
    misa.MISA(model, delta=0.2, backend="torch")  # once the first is gone, a new one may take over


def test_an_exhausted_generator_is_named():
    model = tiny_lm()
    named = model.named_parameters()
    list(named)
    with pytest.raises(ValueError, match="consumed only once"):
        misa.MISA(named, delta=0.2)


def test_conv_weights_are_modules_as_the_readme_says():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3))
    opt = misa.MISA(model, delta=0.6, backend="torch")
    assert opt.module_names == ["0", "2"]  # every >=2-D weight (a conv kernel too) with its bias


def test_arena_release_of_an_unknown_key_says_so():
    arena = StateArena(128)
    with pytest.raises(KeyError, match="no block is held under 'zzz'"):
        arena.release("zzz")


def test_a_model_under_misa_can_still_be_deep_copied():
    import copy

    model = tiny_lm()
    opt = misa.MISA(model, delta=0.2, backend="torch")
    twin = copy.deepcopy(model)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), twin.parameters()))
    misa.MISA(twin, delta=0.2, backend="torch")  # the copy is free for an optimizer of its own
    del opt
