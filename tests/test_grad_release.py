"""MISA(release_grads=True): each active tensor is updated in a hook during backward and its gradient
freed there. The result equals the ordinary step bit for bit; what it cannot honour is refused."""

import io

import pytest
import torch
from test_resume import train

import misa

from models import tiny_lm

SETUPS = {
    "fp32": (torch.float32, {}),
    "bf16-master": (torch.bfloat16, {}),
    "bf16-8bit-kahan": (torch.bfloat16, {"states": "8bit", "master_weights": "kahan"}),
}


def make(dtype, release, variant="paper", **kw):
    model = tiny_lm(seed=7, dtype=dtype, d=64, ff=64)
    opt = misa.MISA(
        model,
        lr=3e-3,
        weight_decay=0.01,
        delta=0.25,
        interval=4,
        variant=variant,
        seed=11,
        backend="torch",
        check_finite=False,
        release_grads=release,
        train_1d=True,
        **kw,
    )
    return model, opt


@pytest.mark.parametrize("setup", list(SETUPS))
@pytest.mark.parametrize("variant", ["paper", "default"])  # with and without the end-of-period flush
def test_release_equals_the_ordinary_step(setup, variant):
    dtype, kw = SETUPS[setup]
    runs = []
    for release in (False, True):
        model, opt = make(dtype, release, variant, **kw)
        train(model, opt, 14)
        runs.append((model, opt))
    (ma, oa), (mb, ob) = runs
    for (n, a), b in zip(ma.named_parameters(), mb.parameters()):
        assert torch.equal(a, b), n
    assert oa.switch_log == ob.switch_log
    assert torch.equal(oa.importance, ob.importance)  # the statistic, from the norms the hooks accumulated


def test_no_active_gradient_outlives_its_update():
    model, opt = make(torch.bfloat16, True)
    active = [p for p in model.parameters() if p.requires_grad]
    alive = []

    def count(_):  # runs after MISA's hook on the same tensor (hooks run in registration order)
        alive.append(sum(q.grad is not None for q in active))

    handles = [p.register_post_accumulate_grad_hook(count) for p in active]
    ids = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(0))
    model.loss(ids).backward()
    for h in handles:
        h.remove()
    assert len(alive) == len(active) and max(alive) == 0
    opt.step()


@pytest.mark.parametrize("save_at", [3, 6])
def test_release_resumes_exactly(save_at):
    model_a, opt_a = make(torch.bfloat16, True, states="8bit", master_weights="kahan")
    train(model_a, opt_a, 12)
    model_b, opt_b = make(torch.bfloat16, True, states="8bit", master_weights="kahan")
    train(model_b, opt_b, save_at)
    buf = io.BytesIO()
    torch.save({"model": model_b.state_dict(), "opt": opt_b.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=False)
    model_c, opt_c = make(torch.bfloat16, True, states="8bit", master_weights="kahan")
    model_c.load_state_dict(ckpt["model"])
    opt_c.load_state_dict(ckpt["opt"])
    train(model_c, opt_c, 12 - save_at, start=save_at)
    for (n, a), c in zip(model_a.named_parameters(), model_c.parameters()):
        assert torch.equal(a, c), n


def test_release_refuses_what_it_cannot_honour():
    model = tiny_lm(seed=0, d=64, ff=64)
    with pytest.raises(ValueError, match="release_grads=True .* pass check_finite=False"):
        misa.MISA(model, release_grads=True)
    model, opt = make(torch.float32, True)
    ids = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(0))
    model.loss(ids).backward()
    with pytest.raises(RuntimeError, match="cannot clip by the global norm"):
        opt.clip_grad_norm_(1.0)
    with pytest.raises(RuntimeError, match="gradients cannot be accumulated"):
        model.loss(ids).backward()
    from misa import distributed

    with pytest.raises(ValueError, match="before DDP or FSDP2 reduce"):
        distributed.prepare(opt)


def test_a_dropped_optimizer_is_not_kept_alive_by_its_hooks():
    import gc
    import weakref

    model, opt = make(torch.float32, True)
    ref = weakref.ref(opt)
    del opt
    gc.collect()
    assert ref() is None
    ids = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(0))
    model.loss(ids).backward()  # the hooks of a dead optimizer do nothing
