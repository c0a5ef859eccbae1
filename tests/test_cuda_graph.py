"""MISA(cuda_graph=True): the steady step recorded once and replayed. No GPU here: the tests run the
recording logic under Triton's interpreter with a stand-in for the capture (it returns the body as the
replay), which checks when a graph is recorded, what invalidates it, what stays on the host, and that the
replayed steps compute what the eager ones do. test_misa_optimizer's capturability test checks the
recorded body itself (no host sync, no tensor built from host data, stable operands)."""

import pytest
import torch
from test_misa_optimizer import synthetic_grads

import misa
import misa_kernels
from misa import cuda_graph

from models import tiny_lm

pytestmark = pytest.mark.interpreter


def _needs_triton():
    if "triton" not in misa_kernels.available_backends("cpu"):
        pytest.skip("triton cannot run on the CPU here")


def _graphed(opt, record=True):
    """Turns the recording on for an optimizer on the CPU (cuda_graph=True refuses CPU tensors) and counts
    the replays."""
    replays = []

    def stand_in(body):
        def replay():
            replays.append(1)
            body()

        return replay

    opt.cuda_graph, opt._device_steps = True, True
    opt.graph.capture = stand_in if record else (lambda body: pytest.fail("recorded"))
    return replays


def _long_period():
    """A graphed optimizer whose period outlasts the test: (model, optimizer, replays, gradient generator)."""
    _needs_triton()
    model = tiny_lm(seed=4, d=8, ff=8, layers=2)
    opt = misa.MISA(model, lr=1e-2, delta=0.4, interval=50, backend="triton", seed=2)
    return model, opt, _graphed(opt), torch.Generator().manual_seed(0)


def _run(record: bool, steps=16, lr_schedule=False, monkeypatch=None):
    model = tiny_lm(seed=4, d=8, ff=8, layers=2)
    opt = misa.MISA(model, lr=1e-2, delta=0.4, interval=5, backend="triton", seed=2)
    replays = _graphed(opt, record)
    if not record:
        monkeypatch.setattr(cuda_graph, "WARM_STEPS", 10**9)  # eager steps only, with the same device lr
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        synthetic_grads(model, gen)
        if step == 9:
            next(p for p in model.parameters() if p.grad is not None).grad[0] = float("nan")
        if lr_schedule:
            opt.param_groups[0]["lr"] = 1e-2 * (1 - step / steps)
        opt.step()
        opt.zero_grad()
    return model, opt, replays


@pytest.mark.parametrize("lr_schedule", [False, True], ids=["constant-lr", "scheduled-lr"])
def test_replayed_steps_equal_the_eager_ones(lr_schedule, monkeypatch):
    _needs_triton()
    graphed, opt_g, replays = _run(True, lr_schedule=lr_schedule)
    eager, opt_e, _ = _run(False, lr_schedule=lr_schedule, monkeypatch=monkeypatch)
    assert replays and opt_g.graph.recordings >= 1
    # a learning-rate schedule is written into the device scalar before each replay: no new recording
    for a, b in zip(graphed.parameters(), eager.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(opt_g.period.S, opt_e.period.S) and opt_g.switch_log == opt_e.switch_log
    assert opt_g.skipped_steps == opt_e.skipped_steps == 1
    assert [opt_g.state[p]["step"] for p in opt_g.state] == [opt_e.state[p]["step"] for p in opt_e.state]


def test_a_graph_is_recorded_after_warm_steps_and_again_after_a_switch():
    model, opt, replays, gen = _long_period()
    while opt.sampler.never_selected():
        synthetic_grads(model, gen)
        opt.step()
    counts = []
    for _ in range(7):
        synthetic_grads(model, gen)
        opt.step()
        counts.append((opt.graph.recordings, len(replays)))
    # the fresh step of the last set and the warm steps run eagerly; then one recording, replayed every step
    assert counts[-1][0] == 1 and counts[-1][1] == counts[-2][1] + 1
    recordings = opt.graph.recordings
    opt.param_groups[0]["weight_decay"] = 0.1  # a captured constant: the graph is made again
    for _ in range(4):
        synthetic_grads(model, gen)
        opt.step()
    assert opt.graph.recordings == recordings + 1
    opt._end_period()  # a switch: a fresh step, warm steps, then a new recording
    replayed = len(replays)
    synthetic_grads(model, gen)
    opt.step()
    assert len(replays) == replayed  # the fresh step ran eagerly, not the old graph
    for _ in range(4):
        synthetic_grads(model, gen)
        opt.step()
    assert opt.graph.recordings == recordings + 2


def test_clipped_steps_run_eagerly():
    model, opt, replays, gen = _long_period()
    for _ in range(10):
        synthetic_grads(model, gen)
        opt.clip_grad_norm_(1.0)
        opt.step()
    assert replays == [] and opt.graph.recordings == 0


def test_cuda_graph_refuses_what_it_cannot_record():
    model = tiny_lm(seed=0)
    with pytest.raises(ValueError, match="cuda_graph=True: CUDA graphs record CUDA kernels"):
        misa.MISA(model, delta=0.3, cuda_graph=True)
    with pytest.raises(ValueError, match="rounding='stochastic' changes its seed"):
        misa.MISA(model, delta=0.3, cuda_graph=True, rounding="stochastic")
    with pytest.raises(ValueError, match="release_grads=True updates during backward"):
        misa.MISA(model, delta=0.3, cuda_graph=True, release_grads=True, check_finite=False)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_a_real_graph_replays_the_eager_step_bit_for_bit(backend, monkeypatch):
    """On a GPU: the recorded graph against eager steps with the same device learning rates, over switches,
    a skipped step and a learning-rate schedule."""
    if not torch.cuda.is_available() or backend not in misa_kernels.available_backends("cuda"):
        pytest.skip(f"needs a CUDA GPU and the {backend} backend")
    results = []
    for warm in (cuda_graph.WARM_STEPS, 10**9):
        monkeypatch.setattr(cuda_graph, "WARM_STEPS", warm)
        model = tiny_lm(seed=4, d=64, ff=64, layers=2).cuda().to(torch.bfloat16)
        opt = misa.MISA(model, lr=1e-3, delta=0.4, interval=6, backend=backend, seed=2, cuda_graph=True)
        gen = torch.Generator().manual_seed(0)
        for step in range(20):
            for p in model.parameters():
                p.grad = (torch.randn(p.shape, generator=gen) * 1e-2).to("cuda", p.dtype) if p.requires_grad else None
            if step == 11:
                next(p for p in model.parameters() if p.grad is not None).grad[0] = float("nan")
            opt.param_groups[0]["lr"] = 1e-3 * (1 - step / 20)
            opt.step()
        results.append(([p.detach().clone() for p in model.parameters()], opt.graph.recordings))
    (graphed, recordings), (eager, none) = results
    assert recordings >= 1 and none == 0
    for a, b in zip(graphed, eager):
        assert torch.equal(a, b)


def test_a_compiled_training_step_calls_misa_step_eagerly():
    """torch.compile of a whole training step (forward, backward, MISA.step): MISA.step is excluded from
    tracing (its schedule is Python state), so the compiled step draws the same modules as the eager one
    and its weights differ only by the compiled model's own rounding."""
    from models import tiny_lm as make

    results = []
    for compiled in (False, True):
        model = make(seed=1)
        opt = misa.MISA(model, lr=1e-2, delta=0.3, interval=3, seed=0, backend="torch")

        def train_step(ids, model=model, opt=opt):
            model.loss(ids).backward()
            opt.step()
            opt.zero_grad()

        fn = torch.compile(train_step) if compiled else train_step
        for s in range(8):
            fn(torch.randint(0, 32, (4, 9), generator=torch.Generator().manual_seed(s)))
        results.append(
            ([p.detach().clone() for p in model.parameters()], [x["active_modules"] for x in opt.switch_log])
        )
    (eager, eager_log), (compiled, compiled_log) = results
    assert eager_log == compiled_log
    for a, b in zip(eager, compiled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_switch_gives_the_switched_modules_parameters_a_new_dict_tag():
    """torch 2.11's dynamo skips a parameter's guards (requires_grad among them) while its module's
    `_parameters` keeps its dict tag: a compiled model then kept the graph of the first active set and no
    parameter received a gradient after a switch (misa/compiled_switch.py). A switch must change the tag of
    every module whose parameters it switched, leave the others' alone and keep the parameters' order."""
    dict_version = pytest.importorskip("torch._C._dynamo.guards").dict_version
    model = tiny_lm(seed=1)
    opt = misa.MISA(model, lr=1e-2, delta=0.3, interval=3, seed=0, backend="torch")
    owners = {n: m for n, m in model.named_modules() if m._parameters}
    before = {n: dict_version(m._parameters) for n, m in owners.items()}
    order = [n for n, _ in model.named_parameters()]
    old = set(opt.active_modules)
    new = [n for n in opt.module_names if n not in old][:2]
    opt.set_active(new)
    switched = old ^ set(new)
    assert switched
    for name, module in owners.items():
        changed = dict_version(module._parameters) != before[name]
        assert changed == (name in switched), name
    assert [n for n, _ in model.named_parameters()] == order
    assert all("_misa" not in k for m in owners.values() for k in m._parameters)
