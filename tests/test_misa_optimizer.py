"""misa.MISA against a float64 reference of MISA.md, plus its invariants."""

import math

import pytest
import torch

import misa

from models import tiny_lm

LR, WD, BETAS, EPS, BETA = 1e-2, 0.01, (0.9, 0.999), 1e-8, 0.8


def synthetic_grads(model, gen):
    """Give every trainable parameter a fresh random gradient (the same draw for any twin model)."""
    grads = {}
    for name, p in model.named_parameters():
        g = torch.randn(p.shape, generator=gen) * (1 + len(name) % 3)
        if p.requires_grad:
            p.grad = g.to(p.dtype)
            grads[name] = g.to(p.dtype)
    return grads


class Float64Reference:
    """MISA.md's 'paper' algorithm in float64, following the active sets the optimizer reports."""

    def __init__(self, model, eta, min_flush_steps=5):
        self.params = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        self.eta, self.min_flush_steps = eta, min_flush_steps
        self.G, self.k = {}, {}
        self.m, self.v, self.steps, self.S = {}, {}, 0, {}

    def start(self, modules, names):
        self.modules = modules  # module -> [param names]
        self.m = {n: torch.zeros_like(self.params[n]) for mod in modules for n in names[mod]}
        self.v = {n: torch.zeros_like(self.params[n]) for n in self.m}
        self.S = {mod: 0.0 for mod in modules}
        self.names = names
        self.steps = 0

    def step(self, grads):
        self.steps += 1
        t = self.steps
        for mod in self.modules:
            for n in self.names[mod]:
                g = grads[n].double()
                self.S[mod] += float((g * g).sum())
                self.m[n] = BETAS[0] * self.m[n] + (1 - BETAS[0]) * g
                self.v[n] = BETAS[1] * self.v[n] + (1 - BETAS[1]) * g * g
                m_hat = self.m[n] / (1 - BETAS[0] ** t)
                v_hat = self.v[n] / (1 - BETAS[1] ** t)
                self.params[n] = self.params[n] * (1 - LR * WD) - LR * m_hat / (v_hat.sqrt() + EPS)

    def end(self):
        T = self.steps
        if T >= self.min_flush_steps:
            for n in self.m:
                m_hat = self.m[n] / (1 - BETAS[0] ** T)
                v_hat = self.v[n] / (1 - BETAS[1] ** T)
                self.params[n] = self.params[n] - LR * BETAS[0] / (1 - BETAS[0]) * m_hat / (v_hat.sqrt() + EPS)
        for mod in self.modules:
            self.k[mod] = self.k.get(mod, 0) + 1
            self.G[mod] = BETA * self.G.get(mod, 0.0) + (1 - BETA) * self.S[mod] / T

    def importance(self, all_modules):
        return torch.tensor(
            [self.G[m] / (1 - BETA ** self.k[m]) if self.k.get(m, 0) else 0.0 for m in all_modules], dtype=torch.float64
        )


def module_param_names(opt):
    return {m.name: [n for n, _ in m.params] for m in opt.partition.modules}


@pytest.mark.parametrize("interval,warmup", [(6, None), (4, 2)], ids=["T6", "T4-warmup2"])
def test_matches_float64_reference(interval, warmup):
    model = tiny_lm(seed=1)
    opt = misa.MISA(
        model,
        lr=LR,
        weight_decay=WD,
        delta=0.12,
        eta=2.0,
        interval=interval,
        warmup_interval=warmup,
        seed=3,
        backend="torch",
        variant="paper",
    )
    ref = Float64Reference(model, eta=2.0)
    names = module_param_names(opt)
    gen = torch.Generator().manual_seed(0)
    ref.start(opt.active_modules, names)
    switches = 0
    for _ in range(40):
        before = len(opt.switch_log)
        grads = synthetic_grads(model, gen)
        opt.step()
        ref.step(grads)
        opt.zero_grad()
        if len(opt.switch_log) > before:  # an outer loop ended at this step
            switches += 1
            ref.end()
            want = ref.importance(opt.module_names)
            torch.testing.assert_close(opt.importance, want, rtol=1e-5, atol=0)
            torch.testing.assert_close(opt.probabilities, torch.softmax(2.0 * opt.importance, 0))
            ref.start(opt.active_modules, names)
        got = {n: p.detach().double() for n, p in model.named_parameters()}
        num = sum(float(((got[n] - ref.params[n]) ** 2).sum()) for n in got)
        den = sum(float((ref.params[n] ** 2).sum()) for n in got)
        assert math.sqrt(num / den) <= 1e-6
        for n in ref.m:  # states of the active modules (a new module's state is undefined until its first step)
            p = dict(model.named_parameters())[n]
            if opt.state[p]["step"] == 0:
                continue
            torch.testing.assert_close(opt.state[p]["exp_avg"].double(), ref.m[n], rtol=1e-5, atol=1e-7)
            torch.testing.assert_close(opt.state[p]["exp_avg_sq"].double(), ref.v[n], rtol=1e-5, atol=1e-9)
    assert switches >= 5


def test_budget_frozen_modules_and_states():
    model = tiny_lm(seed=2)
    opt = misa.MISA(model, lr=1e-3, delta=0.08, interval=3, backend="torch")
    total = sum(p.numel() for p in model.parameters())
    gen = torch.Generator().manual_seed(1)
    seen = set()
    for _ in range(60):
        active = set(opt.active_modules)
        seen |= active
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        assert trainable <= 0.08 * total
        for m in opt.partition.modules:
            for _, p in m.params:
                assert p.requires_grad == (m.name in active)
                assert (p in opt.state) == (m.name in active)
        synthetic_grads(model, gen)
        for p in model.parameters():
            assert (p.grad is not None) == p.requires_grad
        opt.step()
        opt.zero_grad(set_to_none=True)
        for m in opt.partition.modules:
            if m.name not in opt.active_modules:
                assert all(p.grad is None and not p.requires_grad for _, p in m.params)
    assert seen == set(opt.module_names)  # warm-up visits every module
    assert opt.arena.stats()["generation"] == 0  # never compacted: switches reuse the same buffer


def test_norms_and_embedding_are_frozen_by_default_and_optional():
    model = tiny_lm()
    opt = misa.MISA(model, delta=0.2, backend="torch")
    assert "embed_tokens" not in opt.module_names and "lm_head" not in opt.module_names
    assert not model.norm.weight.requires_grad and not model.embed_tokens.weight.requires_grad
    opt2 = misa.MISA(
        tiny_lm(), delta=0.5, include_embedding=True, include_lm_head=True, backend="torch", variant="paper"
    )
    assert "embed_tokens" in opt2.module_names and "lm_head" in opt2.module_names
    model3 = tiny_lm()
    opt3 = misa.MISA(model3, delta=0.2, train_1d=True, backend="torch", variant="paper")
    assert model3.norm.weight.requires_grad and model3.layers[0].input_layernorm.bias.requires_grad
    assert model3.norm.weight in opt3.state
    # the bias of down_proj travels with its module
    assert any(n.endswith("mlp.down_proj.bias") for m in opt3.partition.modules for n, _ in m.params)


def test_layer_granularity_makes_blocks_modules():
    opt = misa.MISA(tiny_lm(layers=4), delta=0.3, granularity="layer", backend="torch")
    assert opt.module_names == [f"layers.{i}" for i in range(4)]


def test_unrecognised_model_still_works_and_empty_model_errors():
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    opt = misa.MISA(model, delta=0.8, backend="torch")
    assert opt.module_names == ["0", "2"]
    with pytest.raises(ValueError, match="nothing to partition"):
        misa.MISA(torch.nn.LayerNorm(4), delta=0.5)
    with pytest.raises(ValueError, match="no parameters"):
        misa.MISA(torch.nn.ReLU(), delta=0.5)


@pytest.mark.parametrize(
    "kwargs,text",
    [
        (dict(delta=0.0), "delta"),
        (dict(delta=1.5), "delta"),
        (dict(delta=1e-6), "smallest module"),
        (dict(eta=-1.0), "eta"),
        (dict(interval=0), "interval"),
        (dict(order="sorted"), "order"),
        (dict(granularity="neuron"), "granularity"),
        (dict(variant="v2"), "variant"),
        (dict(lr=-1.0), "lr"),
        (dict(betas=(0.9, 1.0)), "betas"),
        (dict(backend="opencl"), "backend"),
        (dict(order="ascending", delta=0.04), "visits every module"),
    ],
    ids=lambda v: str(v) if isinstance(v, str) else None,
)
def test_bad_configuration(kwargs, text):
    model = tiny_lm()
    with pytest.raises(ValueError, match=text):
        misa.MISA(model, **kwargs)


def test_mixed_devices_are_refused():
    model = tiny_lm()
    model.lm_head.to("meta")
    with pytest.raises(ValueError, match="mixed devices"):
        misa.MISA(model, delta=0.2, include_lm_head=True)


def _grads_from(model, seed, nan=False):
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=gen)
    if nan:
        next(p for p in model.parameters() if p.requires_grad).grad.view(-1)[0] = float("nan")


@pytest.mark.parametrize("bad_step", [0, 2], ids=["fresh-step", "steady-step"])
@pytest.mark.parametrize(
    "backend", [pytest.param("torch", id="torch"), pytest.param("triton", id="triton", marks=pytest.mark.interpreter)]
)
def test_nonfinite_gradient_skips_step_and_leaves_state(bad_step, backend):
    """A step with NaN gradients is skipped on the device: parameters and every state stay as they were,
    and the run continues exactly as if that step had not happened (also when it was a module's fresh
    first step); the period counts it and says so when it ends."""
    import misa_kernels

    if backend not in misa_kernels.available_backends("cpu"):
        pytest.skip(f"{backend} cannot run on the CPU here")
    runs = {}
    for with_bad in (True, False):
        model = tiny_lm(d=8, ff=8, layers=2)
        opt = misa.MISA(model, lr=1e-2, delta=0.2, interval=7, backend=backend, variant="paper", flush=False)
        for k in range(5):
            if with_bad and k == bad_step:
                before = {n: p.detach().clone() for n, p in model.named_parameters()}
                states = {
                    p: {key: v.clone() for key, v in st.items() if key in ("exp_avg", "exp_avg_sq")}
                    for p, st in opt.state.items()
                    if st["step"] > 0
                }
                _grads_from(model, 100, nan=True)
                opt.step()
                opt.zero_grad()
                assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
                for p, st in states.items():
                    assert torch.equal(opt.state[p]["exp_avg"], st["exp_avg"])
                    assert torch.equal(opt.state[p]["exp_avg_sq"], st["exp_avg_sq"])
                assert opt.skipped_steps == 1
            _grads_from(model, k)
            opt.step()
            opt.zero_grad()
        runs[with_bad] = (model, opt)
    (bad_model, bad_opt), (good_model, good_opt) = runs[True], runs[False]
    for a, b in zip(bad_model.parameters(), good_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert [st["step"] for st in bad_opt.state_dict()["state"].values()] == [
        st["step"] for st in good_opt.state_dict()["state"].values()
    ]
    with pytest.warns(RuntimeWarning, match="non-finite gradients and were skipped"):
        _grads_from(bad_model, 9)
        bad_opt.step()  # the seventh step of the period (one of them skipped) ends it


def test_step_never_waits_for_the_device(monkeypatch):
    """In its default configuration, a step that does not end an outer loop converts no tensor to a host
    value (the CPU stand-in for a device synchronisation: .item(), bool(), float(), .tolist(), ...)."""
    model = tiny_lm()
    opt = misa.MISA(model, lr=1e-3, delta=0.2, interval=50, backend="torch")
    ids = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(30):  # past the warm-up, whose every step ends a loop
        model.loss(ids).backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
    assert not opt.sampler.never_selected() and opt.period.step_count % 50 != 0
    syncs = []
    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "__index__", "new_tensor"):
        real = getattr(torch.Tensor, name)
        monkeypatch.setattr(
            torch.Tensor,
            name,
            lambda self, *a, _real=real, _name=name, **k: (syncs.append(_name), _real(self, *a, **k))[1],
        )
    for name in ("tensor", "as_tensor"):  # from host data: on a GPU, a blocking copy that waits for the stream
        real = getattr(torch, name)
        monkeypatch.setattr(
            torch, name, lambda *a, _real=real, _name=name, **k: (syncs.append(f"torch.{_name}"), _real(*a, **k))[1]
        )
    for _ in range(5):
        model.loss(ids).backward()
        opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
    monkeypatch.undo()
    assert syncs == []
    assert opt.switch_log[-1]["step"] < opt.period.step_count - 5  # no switch happened in the counted steps


def test_a_steady_step_issues_few_small_operations():
    """Each small tensor operation of MISA.step is a kernel launch on a GPU (a few microseconds of host
    and device time each). A steady default step, counted at the dispatcher (the fused ops count once),
    stays at about two dozen: norms, the skip flag, statistics, step counts and the fused calls."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket.__name__ not in ("unbind", "select", "view", "detach", "alias"):
                Count.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    model = tiny_lm()
    opt = misa.MISA(model, lr=1e-3, delta=0.2, interval=50, backend="torch")
    ids = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(30):
        model.loss(ids).backward()
        opt.step()
        opt.zero_grad()
    model.loss(ids).backward()
    with Count():
        opt.step()
    assert opt.switch_log[-1]["step"] < opt.period.step_count - 1  # a steady step, not a switch
    assert len(Count.ops) <= 24, Count.ops


def test_works_with_lr_scheduler_and_closure():
    model = tiny_lm()
    opt = misa.MISA(model, lr=1e-2, delta=0.2, interval=2, backend="torch")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1 + s))
    ids = torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(12):

        def closure():
            opt.zero_grad()
            loss = model.loss(ids)
            loss.backward()
            return loss

        losses.append(float(opt.step(closure).detach()))
        sched.step()
    assert losses[-1] < losses[0]
    assert opt.param_groups[0]["lr"] == pytest.approx(1e-2 / 13)


def test_clip_grad_norm_matches_torch_and_feeds_the_step():
    model = tiny_lm()
    opt = misa.MISA(model, lr=1e-2, delta=0.2, interval=10, backend="torch", check_finite=False, variant="paper")
    gen = torch.Generator().manual_seed(0)
    synthetic_grads(model, gen)
    grads = [p.grad.clone() for p in model.parameters() if p.grad is not None]
    want = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    got = opt.clip_grad_norm_(1.0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=0)
    clipped = torch.linalg.vector_norm(
        torch.stack([torch.linalg.vector_norm(p.grad) for p in model.parameters() if p.grad is not None])
    )
    assert float(clipped) == pytest.approx(1.0, rel=1e-4)
    opt.step()
    assert float(opt.period.S.sum()) == pytest.approx(1.0, rel=1e-4)  # S saw the clipped norms


@pytest.mark.parametrize("order", ["uniform", "ascending", "descending", "random"])
def test_baseline_orders(order):
    model = tiny_lm(layers=4)
    opt = misa.MISA(model, delta=0.3, granularity="layer", order=order, interval=1, backend="torch", seed=5)
    gen = torch.Generator().manual_seed(0)
    visits = []
    for _ in range(8):
        visits.append(tuple(opt.active_modules))
        synthetic_grads(model, gen)
        opt.step()
        opt.zero_grad()
    names = [f"layers.{i}" for i in range(4)]
    if order == "ascending":
        assert [v[0] for v in visits] == names + names
    elif order == "descending":
        assert [v[0] for v in visits] == names[::-1] + names[::-1]
    elif order == "random":
        assert sorted(v[0] for v in visits[:4]) == names and sorted(v[0] for v in visits[4:]) == names
    assert torch.allclose(opt.probabilities, torch.full((4,), 0.25, dtype=torch.float64))


def test_official_variant():
    model = tiny_lm()
    opt = misa.MISA(
        model,
        lr=1e-2,
        delta=0.3,
        interval=3,
        variant="official",
        include_embedding=True,
        eta=1.0,
        backend="torch",
        seed=1,
    )
    assert opt.sampler.sample_last == 2 and opt.warmup_interval == 1 and not opt.flush
    assert model.embed_tokens.weight.requires_grad and model.embed_tokens.weight in opt.state  # every step
    gen = torch.Generator().manual_seed(0)
    kept_state_seen = False
    for _ in range(25):
        prev = set(opt.active_modules)
        prev_steps = {p: s["step"] for p, s in opt.state.items()}
        synthetic_grads(model, gen)
        opt.step()
        opt.zero_grad()
        for name in prev & set(opt.active_modules):
            p = next(p for n, p in model.named_parameters() if n.startswith(name + "."))
            if opt.state[p]["step"] == prev_steps[p] + 1 and opt.steps_in_period == 0:
                kept_state_seen = True  # sampled again: state and step count kept
    assert kept_state_seen
    # logits are min(5, eta*G^2)
    G = opt.importance
    torch.testing.assert_close(opt.probabilities, torch.softmax(torch.clamp(G.square(), max=5.0), 0))


def test_official_importance_update_compounds():
    s = misa.ImportanceSampler([10, 10], budget=10, variant="official", beta=0.8)
    for _ in range(7):
        s.update([0], [1.0])
    s2 = misa.ImportanceSampler([10, 10], budget=10, variant="paper", beta=0.8)
    for _ in range(7):
        s2.update([0], [1.0])
    assert float(s2.importance()[0]) == pytest.approx(1.0)  # the paper's correction is unbiased
    assert float(s.importance()[0]) > 5.0  # the authors' in-place correction inflates G


def test_block_coordinate_descent_api():
    model = tiny_lm()
    base = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.8, 0.99), weight_decay=0.05)
    opt = misa.BlockCoordinateDescentOptimizer(
        base, list(model.named_parameters()), param_ratio_limit=0.1, interval=4, backend="torch"
    )
    assert opt.param_groups[0]["lr"] == 3e-3 and opt.param_groups[0]["betas"] == (0.8, 0.99)
    assert opt.trainable_fraction <= 0.1
    with pytest.raises(ValueError, match="decoupled"):
        misa.BlockCoordinateDescentOptimizer(
            torch.optim.Adam(model.parameters(), weight_decay=0.1), list(model.named_parameters())
        )
    with pytest.raises(TypeError, match="base_optimizer"):
        misa.BlockCoordinateDescentOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1), list(model.named_parameters())
        )


@pytest.mark.interpreter
def test_triton_backend_under_interpreter_matches_torch_backend():
    import misa_kernels

    if "triton" not in misa_kernels.available_backends("cpu"):
        pytest.skip("triton cannot run on the CPU here")
    results = {}
    for backend in ("torch", "triton"):
        model = tiny_lm(seed=4, d=8, ff=8, layers=2)
        opt = misa.MISA(model, lr=1e-2, delta=0.2, interval=3, backend=backend, seed=2)
        gen = torch.Generator().manual_seed(0)
        for _ in range(7):
            synthetic_grads(model, gen)
            opt.step()
            opt.zero_grad()
        results[backend] = ([p.detach().clone() for p in model.parameters()], opt.importance, opt.active_modules)
    for a, b in zip(results["torch"][0], results["triton"][0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results["torch"][1], results["triton"][1], rtol=1e-5, atol=0)
    assert results["torch"][2] == results["triton"][2]


@pytest.mark.interpreter
def test_planned_step_on_a_fused_backend_matches_the_grouped_torch_path(monkeypatch):
    """On a fused backend the step runs from a plan made once per active set, one kernel call per kind of
    tensor whatever their step counts (a step count per tensor, on the device). Modules kept across a
    switch have older counts than new ones (the default variant keeps states), and a non-finite step is
    skipped: the result equals the torch path's, which makes one call per step count."""
    import misa_kernels

    if "triton" not in misa_kernels.available_backends("cpu"):
        pytest.skip("triton cannot run on the CPU here")
    results, calls = {}, []
    real = misa_kernels.ops.run_adamw_step  # what adamw_step_ and a prepared call (the plan's) both run

    def counting(*args, **kwargs):
        calls.append(kwargs["step"])
        return real(*args, **kwargs)

    monkeypatch.setattr(misa_kernels.ops, "run_adamw_step", counting)
    for backend in ("torch", "triton"):
        calls.clear()
        model = tiny_lm(seed=4, d=8, ff=8, layers=2)
        opt = misa.MISA(model, lr=1e-2, delta=0.4, interval=3, backend=backend, seed=2)
        gen = torch.Generator().manual_seed(0)
        per_step = []
        for step in range(12):
            synthetic_grads(model, gen)
            if step == 7:
                next(p for p in model.parameters() if p.grad is not None).grad[0] = float("nan")
            before = len(calls)
            opt.step()
            per_step.append(len(calls) - before)
            opt.zero_grad()
        results[backend] = (
            [p.detach().clone() for p in model.parameters()],
            opt.importance,
            opt.switch_log,
            per_step,
            opt.skipped_steps,
        )
    torch_run, triton_run = results["torch"], results["triton"]
    for a, b in zip(torch_run[0], triton_run[0]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch_run[1], triton_run[1], rtol=1e-5, atol=0)
    assert [s["active_modules"] for s in torch_run[2]] == [s["active_modules"] for s in triton_run[2]]
    assert len(torch_run[2]) >= 4 and torch_run[4] == triton_run[4] == 1
    assert max(torch_run[3]) > 1  # the grouped path: a call per step count after a switch that kept states
    assert 1 <= min(triton_run[3]) and max(triton_run[3]) <= 2  # the plan: fresh and steady tensors at most


@pytest.mark.interpreter
def test_a_steady_planned_step_checks_gradients_once_and_kept_lists_never(monkeypatch):
    """The host path of a steady step: the plan's prepared calls checked the parameters, states and masters
    when the plan was made; a step checks its gradients once (the norms call, reused by the update; with
    clipping, clip_grad_norm_'s norms call) and never the kept lists, whose checks cost as much as the launch
    (benchmarks/bench_host.py)."""
    import misa_kernels
    from misa_kernels import checks

    if "triton" not in misa_kernels.available_backends("cpu"):
        pytest.skip("triton cannot run on the CPU here")
    model = tiny_lm(seed=4, d=8, ff=8, layers=2)
    opt = misa.MISA(model, lr=1e-2, delta=0.4, interval=50, backend="triton", seed=2)
    gen = torch.Generator().manual_seed(0)
    while opt.sampler.never_selected():
        synthetic_grads(model, gen)
        opt.step()
    for _ in range(2):  # the fresh step of the last set, then the steady plan's first step
        synthetic_grads(model, gen)
        opt.step()
    fits, kept, calls = [], [], len(opt._plan.calls)
    real_fit = checks._grads_fit
    monkeypatch.setattr(checks, "_grads_fit", lambda *a: fits.append(1) or real_fit(*a))
    monkeypatch.setattr(checks, "kept_operands", lambda *a, **k: kept.append(1))
    monkeypatch.setattr(checks, "adamw_operands", lambda *a, **k: kept.append(1))
    for _ in range(3):
        synthetic_grads(model, gen)  # new gradient tensors, as after each backward
        opt.step()
    assert kept == [] and len(fits) == 3 * calls
    for _ in range(2):  # clipped (the Hugging Face Trainer's default): the clip's norm pass checks them, step() not
        synthetic_grads(model, gen)
        opt.clip_grad_norm_(0.5)
        opt.step()
    assert kept == [] and len(fits) == 5 * calls


@pytest.mark.interpreter
def test_a_planned_step_keeps_no_gradient_alive(monkeypatch):
    """After step() and zero_grad() no gradient of an earlier step is alive: the plan's prepared calls keep
    chunk tables by the gradients' addresses, and what they keep must not hold the gradients themselves
    (on a GPU that is a gradient set of memory per table kept), clipped steps included."""
    import gc
    import weakref

    import misa_kernels

    if "triton" not in misa_kernels.available_backends("cpu"):
        pytest.skip("triton cannot run on the CPU here")
    model = tiny_lm(seed=4, d=8, ff=8, layers=2)
    opt = misa.MISA(model, lr=1e-2, delta=0.4, interval=50, backend="triton", seed=2)
    gen = torch.Generator().manual_seed(0)
    refs = []
    for step in range(8):
        synthetic_grads(model, gen)
        refs += [weakref.ref(p.grad) for p in model.parameters() if p.grad is not None]
        if step % 2:
            opt.clip_grad_norm_(1.0)
        opt.step()
        opt.zero_grad()
    gc.collect()
    assert opt._plan is not None and not any(r() is not None for r in refs)


def test_the_lean_step_wrapper_still_runs_hooks_and_shows_in_the_profiler():
    """MISA.step does torch.optim.Optimizer's step wrapping only when it has work (a profiler on, a hook
    registered): the hooks run, the profiler sees the step, and a plain step skips both."""
    model = tiny_lm(seed=1, d=8, ff=8, layers=2)
    opt = misa.MISA(model, lr=1e-2, delta=0.4, interval=5, backend="torch", seed=0)
    gen = torch.Generator().manual_seed(0)
    seen = []
    pre = opt.register_step_pre_hook(lambda o, args, kwargs: seen.append(("pre", o is opt)))
    post = opt.register_step_post_hook(lambda o, args, kwargs: seen.append(("post", o is opt)))
    synthetic_grads(model, gen)
    opt.step()
    assert seen == [("pre", True), ("post", True)]
    pre.remove()
    post.remove()
    synthetic_grads(model, gen)
    opt.step()
    assert len(seen) == 2
    from torch.optim.optimizer import register_optimizer_step_post_hook

    glob = register_optimizer_step_post_hook(lambda o, args, kwargs: seen.append("global"))
    synthetic_grads(model, gen)
    opt.step()
    glob.remove()
    assert seen[-1] == "global"
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        synthetic_grads(model, gen)
        opt.step()
    assert any(e.name == "Optimizer.step#MISA.step" for e in prof.events())


@pytest.mark.interpreter
def test_planned_step_resumes_exactly():
    """The plan's device step counts are made again from a loaded state_dict: a resumed run on a fused
    backend equals the uninterrupted one bit for bit."""
    import io

    import misa_kernels

    if "triton" not in misa_kernels.available_backends("cpu"):
        pytest.skip("triton cannot run on the CPU here")

    def run(steps, start=0, ckpt=None):
        model = tiny_lm(seed=4, d=8, ff=8, layers=2)
        opt = misa.MISA(model, lr=1e-2, delta=0.4, interval=3, backend="triton", seed=2)
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            opt.load_state_dict(ckpt["opt"])
        for step in range(start, steps):
            synthetic_grads(model, torch.Generator().manual_seed(step))
            opt.step()
            opt.zero_grad()
        return model, opt

    full, _ = run(10)
    model, opt = run(5)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    resumed, _ = run(10, 5, torch.load(buf, weights_only=False))
    for a, b in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(a, b)


@pytest.mark.interpreter
def test_a_steady_planned_step_is_capturable_in_structure():
    """What a CUDA graph of the steady step needs, checked on the CPU under the Triton interpreter: between
    switches a step reads nothing back to the host (no .item(), no bool of a tensor), builds no tensor from
    host data, and hands the kernels the same operands at the same addresses (the plan, its step vectors,
    the chunk tables); a switch, a load or a change of the learning rate is what a recorded graph would
    have to be made again for (the plan's version moves, or the lr, read at each step, differs)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    import misa_kernels
    from misa_kernels import tables

    if "triton" not in misa_kernels.available_backends("cpu"):
        pytest.skip("triton cannot run on the CPU here")

    class Watch(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.syncs, self.from_host = [], []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name in ("_local_scalar_dense", "is_nonzero", "equal"):
                self.syncs.append(name)
            if name in ("lift_fresh", "lift_fresh_copy"):  # torch.tensor(host data)
                self.from_host.append(name)
            return func(*args, **(kwargs or {}))

    model = tiny_lm(seed=4, d=8, ff=8, layers=2)
    opt = misa.MISA(model, lr=1e-2, delta=0.4, interval=50, backend="triton", seed=2)
    gen = torch.Generator().manual_seed(0)
    while opt.sampler.never_selected():  # the default schedule switches at every step until then
        synthetic_grads(model, gen)
        opt.step()
    for _ in range(2):  # the fresh step of the last set, then a steady one that makes the steady plan
        synthetic_grads(model, gen)
        opt.step()
    switches, version, plan = len(opt.switch_log), opt._plan_version, opt._plan
    addresses = [
        [t.data_ptr() for t in c["params"] + c["exp_avgs"] + c["exp_avg_sqs"]] + [c["steps"].data_ptr()]
        for c in plan.calls
    ]
    cached_tables = len(tables._cache)
    watch = Watch()
    grads = {p: p.grad for p in model.parameters() if p.grad is not None}
    for _ in range(3):
        # gradients written in place (zero_grad(set_to_none=False) and accumulation), as a graph needs them
        fresh = {p: torch.randn(p.shape, generator=gen).to(p.dtype) * 1e-2 for p in grads}
        for p, g in grads.items():
            p.grad = g
            g.copy_(fresh[p])
        with watch:
            opt.step()
    assert len(opt.switch_log) == switches and opt._plan is plan and opt._plan_version == version
    assert watch.syncs == [] and watch.from_host == []
    assert addresses == [
        [t.data_ptr() for t in c["params"] + c["exp_avgs"] + c["exp_avg_sqs"]] + [c["steps"].data_ptr()]
        for c in opt._plan.calls
    ]
    assert len(tables._cache) == cached_tables  # no new chunk table: no operand moved, the gradients included
    # what invalidates: a switch (and the fresh step after it) makes the plan again
    opt._end_period()
    assert opt._plan_version > version


@pytest.mark.parametrize("release_grads", [False, True])
def test_a_step_without_any_active_gradient_says_it_trains_nothing(release_grads):
    """A compiled model that missed a switch gave MISA steps without gradients, silently (torch 2.11): a step
    that finds none warns, once per active set, and a step with gradients does not."""
    import warnings

    model = tiny_lm(seed=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = misa.MISA(
            model,
            lr=1e-3,
            delta=0.3,
            interval=100,
            backend="torch",
            release_grads=release_grads,
            check_finite=not release_grads,
        )
    with pytest.warns(RuntimeWarning, match="has a gradient, so this step trains nothing"):
        opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # the same active set: said once
        model.loss(torch.randint(0, 32, (2, 9))).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    opt.set_active([n for n in opt.module_names if n not in opt.active_modules][:1])
    with pytest.warns(RuntimeWarning, match="active modules"):
        opt.step()
