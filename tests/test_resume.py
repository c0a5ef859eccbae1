"""A run resumed from a state_dict saved at any step (mid-period included) equals the uninterrupted run."""

import io

import pytest
import torch

import misa

from models import tiny_lm


def train(model, opt, steps, data_seed=0, start=0):
    device = next(model.parameters()).device  # the batch goes where the model is
    for step in range(start, start + steps):
        ids = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(data_seed * 1000 + step))
        ids = ids.to(device)
        loss = model.loss(ids)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def make(variant="paper", dtype=torch.float32, model_kw=None, **kw):
    model = tiny_lm(seed=7, dtype=dtype, **(model_kw or {}))
    opt = misa.MISA(
        model, lr=5e-3, weight_decay=0.01, delta=0.15, interval=4, variant=variant, seed=11, backend="torch", **kw
    )
    return model, opt


def roundtrip(obj):
    buf = io.BytesIO()
    torch.save(obj, buf)
    buf.seek(0)
    return torch.load(buf, map_location="cpu", weights_only=False)


# The 8-bit formats need tensors of at least 4096 elements: a wider model (d=64).
WIDE = {"model_kw": {"d": 64, "ff": 64}}
LOW_PRECISION = {
    "fp32": (torch.float32, {}),
    "bf16-master": (torch.bfloat16, {}),
    "bf16-stochastic": (torch.bfloat16, {"rounding": "stochastic"}),
    "fp32-8bit": (torch.float32, {"states": "8bit", **WIDE}),
    "bf16-8bit-kahan": (torch.bfloat16, {"states": "8bit", "master_weights": "kahan", **WIDE}),
    "bf16-8bit-stochastic": (torch.bfloat16, {"states": "8bit", "rounding": "stochastic", **WIDE}),
}


@pytest.mark.parametrize("precision", list(LOW_PRECISION), ids=list(LOW_PRECISION))
@pytest.mark.parametrize("variant", ["paper", "official"])
@pytest.mark.parametrize("save_at", [1, 6, 8, 13], ids=lambda s: f"save@{s}")
def test_resume_is_exact(variant, save_at, precision):
    dtype, kw = LOW_PRECISION[precision]
    total = 22
    model_a, opt_a = make(variant, dtype, **kw)
    train(model_a, opt_a, total)

    model_b, opt_b = make(variant, dtype, **kw)
    train(model_b, opt_b, save_at)
    ckpt = roundtrip({"model": model_b.state_dict(), "opt": opt_b.state_dict()})
    del model_b, opt_b

    model_c, opt_c = make(variant, dtype, **kw)
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    train(model_c, opt_c, total - save_at, start=save_at)

    for (n, a), (_, c) in zip(model_a.named_parameters(), model_c.named_parameters()):
        assert torch.equal(a, c), n
        assert a.requires_grad == c.requires_grad, n
    assert opt_a.active_modules == opt_c.active_modules
    assert torch.equal(opt_a.importance, opt_c.importance)
    assert opt_a.switch_log == opt_c.switch_log
    for pa, pc in zip(model_a.parameters(), model_c.parameters()):
        assert (pa in opt_a.state) == (pc in opt_c.state)
        if pa in opt_a.state:
            sa, sc = opt_a.state[pa], opt_c.state[pc]
            assert sa["step"] == sc["step"]
            assert ("master" in sa) == (precision == "bf16-master")
            assert ("compensation" in sa) == (precision == "bf16-8bit-kahan")
            assert ("exp_avg_absmax" in sa) == ("8bit" in precision and pa.numel() >= 4096)
            for key in ("exp_avg", "exp_avg_sq", "master", "compensation", "exp_avg_absmax", "exp_avg_sq_absmax"):
                if key in sa:
                    assert torch.equal(sa[key], sc[key]), key


def test_state_dict_holds_copies_not_the_arena():
    model, opt = make()
    train(model, opt, 3)
    sd = opt.state_dict()
    arena_ptr = opt.arena.buffer.untyped_storage().data_ptr()
    for st in sd["state"].values():
        assert st["exp_avg"].untyped_storage().data_ptr() != arena_ptr
        assert st["exp_avg"].untyped_storage().nbytes() == st["exp_avg"].numel() * 4


def test_load_rejects_another_model():
    _, opt = make()
    other = misa.MISA(tiny_lm(layers=2), delta=0.2, backend="torch")
    with pytest.raises(ValueError, match="different modules"):
        other.load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="not a MISA"):
        opt.load_state_dict(torch.optim.AdamW(tiny_lm().parameters()).state_dict())


def test_load_into_another_variant_names_the_variants():
    """The default variant and "paper" partition the model differently (module biases): loading one into the
    other must say so rather than only count parameters (the GPU run of 2026-12-04 met this)."""
    model = tiny_lm(seed=7)
    saved = misa.MISA(model, lr=5e-3, delta=0.15, interval=4, seed=11, backend="torch")
    _, paper = make("paper")
    if len(saved.param_groups[0]["params"]) == len(paper.param_groups[0]["params"]):
        pytest.skip("the default variant partitions this model as 'paper' does")
    with pytest.raises(ValueError, match=r"saved with variant=.*this optimizer has variant='paper'"):
        paper.load_state_dict(saved.state_dict())


@pytest.mark.gpu
def test_saved_on_gpu_loads_on_cpu():
    model = tiny_lm(seed=7).cuda()
    # make()'s settings but the device's default backend (the variant decides the partition, so it must match)
    opt = misa.MISA(model, lr=5e-3, weight_decay=0.01, delta=0.15, interval=4, variant="paper", seed=11)
    train(model, opt, 6)
    ckpt = roundtrip({"model": model.state_dict(), "opt": opt.state_dict()})
    model_cpu, opt_cpu = make()
    model_cpu.load_state_dict(ckpt["model"])
    opt_cpu.load_state_dict(ckpt["opt"])
    assert opt_cpu.active_modules == opt.active_modules
    for p_gpu, p_cpu in zip(model.parameters(), model_cpu.parameters()):
        if p_gpu in opt.state:
            torch.testing.assert_close(opt.state[p_gpu]["exp_avg"].cpu(), opt_cpu.state[p_cpu]["exp_avg"])


@pytest.mark.parametrize("variant", ["default", "paper", "official"])
def test_state_dict_leaves_the_run_undisturbed(variant):
    """Saving mid-run must not change the run: the optimizer's states stay views of its arena."""
    model_a, opt_a = make(variant)
    model_b, opt_b = make(variant)
    for start in range(0, 24, 3):
        train(model_a, opt_a, 3, start=start)
        train(model_b, opt_b, 3, start=start)
        opt_b.state_dict()
    arena = opt_b.arena.buffer.untyped_storage().data_ptr()
    for st in opt_b.state.values():
        assert st["exp_avg"].untyped_storage().data_ptr() == arena
    for a, b in zip(model_a.parameters(), model_b.parameters()):
        assert torch.equal(a, b)
