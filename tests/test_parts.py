"""MISA's parts (misa/optimizer.py composes them): each owns the state it writes, and the period's record is
built and tested on its own."""

import ast
from pathlib import Path

import torch

from misa.period import Period

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("optimizer", "active_set", "schedule", "fused_step", "cuda_graph", "grad_release", "checkpoint")


def _written(path: Path, classes):
    """Attributes of `self` that the file's classes named in `classes` assign (`self.x = ...`, `self.x += ...`,
    tuple targets included): MISA's own, not those of the objects a part defines (an ActiveSet's `self`)."""
    out = set()
    bodies = [n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef) and n.name in classes]
    for node in (n for body in bodies for n in ast.walk(body)):
        targets = (
            node.targets
            if isinstance(node, ast.Assign)
            else [node.target]
            if isinstance(node, (ast.AugAssign, ast.AnnAssign))
            else []
        )
        todo = list(targets)
        while todo:  # `self.x = ...` and tuples of them; not `self.x[k] = ...`, which changes x's contents
            t = todo.pop()
            if isinstance(t, (ast.Tuple, ast.List)):
                todo.extend(t.elts)
            elif isinstance(t, ast.Attribute) and isinstance(t.value, ast.Name) and t.value.id == "self":
                out.add(t.attr)
    return out


def test_no_attribute_of_misa_is_written_by_two_parts():
    import misa

    mixins = {c.__name__ for c in misa.MISA.__mro__}
    writers = {}
    for part in PARTS:
        for attr in _written(ROOT / "misa" / f"{part}.py", mixins):
            writers.setdefault(attr, []).append(part)
    shared = {a: w for a, w in writers.items() if len(w) > 1}
    assert not shared, f"written by more than one part: {shared}"


def test_the_period_counts_starts_and_round_trips_on_its_own():
    period = Period(torch.device("cpu"), length=3)
    assert (period.t, period.length, period.step_count) == (0, 3, 0) and period.S.numel() == 0
    period.start(4, length=5)
    for _ in range(2):
        period.advance()
    period.S.add_(torch.arange(4.0))
    period.skips.add_(1.0)
    period.period_skips.add_(1.0)
    saved = period.as_dict()
    assert saved == {**saved, "t": 2, "period_len": 5, "step_count": 2, "skipped_steps": 1, "period_skips": 1}
    again = Period(torch.device("cpu"), length=1)
    again.load(saved)
    assert again.as_dict().keys() == saved.keys()
    assert all(torch.equal(v, saved[k]) if torch.is_tensor(v) else v == saved[k] for k, v in again.as_dict().items())
    # a switch after the load starts the next period from the loaded skip count
    again.start(2, length=5)
    assert float(again.skips_at_switch) == 1.0 and again.t == 0 and again.S.tolist() == [0.0, 0.0]
    assert float(again.period_skips) == 0.0 and again.step_count == 2


def test_the_bound_at_a_delta_is_computed_as_an_optimizer_built_there_holds():
    import pytest

    import misa

    from models import tiny_lm

    for dtype, formats in [
        (torch.float32, {}),
        (torch.bfloat16, {}),
        (torch.bfloat16, {"master_weights": "kahan"}),
        (torch.bfloat16, {"states": "8bit", "master_weights": "kahan"}),
        (torch.bfloat16, {"rounding": "stochastic", "master_weights": False}),
    ]:
        kwargs = dict(backend="torch", train_1d=True, **formats)
        with pytest.warns(UserWarning):  # the embedding and head stay frozen
            once = misa.MISA(tiny_lm(seed=0, dtype=dtype, d=128, ff=128), delta=0.5, **kwargs)
        for delta in (0.05, 0.2, 0.5, 1.0):
            with pytest.warns(UserWarning):
                built = misa.MISA(tiny_lm(seed=0, dtype=dtype, d=128, ff=128), delta=delta, **kwargs)
            held = once.bytes_at(delta)
            assert {k: held[k] for k in ("states", "masters")} == built.memory_bytes(), (dtype, formats, delta)
            grads = int(built.budget + sum(p.numel() for g in built.param_groups[1:] for p in g["params"]))
            assert held["gradients"] == grads * torch.empty((), dtype=dtype).element_size()
    with pytest.raises(ValueError, match="delta"):
        once.bytes_at(0)


def test_lisa_layers_and_delta_are_each_others_inverse():
    from misa.baselines import _layer_fraction, layers_within
    from misa.jobs.model import SIZES, LlamaForCausalLM

    with torch.device("meta"):
        model = LlamaForCausalLM(SIZES["small"])
    n = len(model.model.layers)
    for k in range(1, n + 1):
        assert layers_within(model, _layer_fraction(model, k)) == k
    assert layers_within(model, 1e-6) == 1 and layers_within(model, 1.0) == n


def test_the_active_set_acquires_views_slots_and_releases_on_its_own():
    from misa.active_set import ActiveSet, StateFormats

    gen = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=gen, dtype=torch.bfloat16) for n in (5000, 127, 4097, 1)]
    modules = [[tensors[0], tensors[1]], [tensors[2]], [tensors[3]]]  # module 0: a weight and its bias
    index = {p: i for i, p in enumerate(tensors)}
    formats = StateFormats(states="8bit", masters="kahan", low_precision=True)
    state = {}
    active = ActiveSet(formats, 40_000, torch.device("cpu"), index, state, lambda b: modules[b], always=[])
    skips = torch.zeros(())
    active.change([0, 2], keep=set(), skips0=skips)
    assert active.indices == [0, 2] and set(state) == {tensors[0], tensors[1], tensors[3]}
    # 8-bit codes and a bf16 compensation for the large tensor; fp32 states for those below quant.MIN_NUMEL
    assert state[tensors[0]]["exp_avg"].dtype == torch.uint8 and "exp_avg_absmax" in state[tensors[0]]
    assert state[tensors[0]]["compensation"].dtype == torch.bfloat16
    assert state[tensors[1]]["exp_avg"].dtype == torch.float32 and state[tensors[1]]["step"] == 0
    # the views are the arena's memory
    base = active.arena.buffer.untyped_storage().data_ptr()
    size = active.arena.buffer.numel() * 4
    for st in state.values():
        for key in ("exp_avg", "exp_avg_sq"):
            assert base <= st[key].untyped_storage().data_ptr() < base + size
    # slots number the active module tensors in order; per_module sums each module's slots
    assert active.slots == {tensors[0]: 0, tensors[1]: 1, tensors[3]: 2}
    assert [p is q for (_, p, _), q in zip(active.items, [tensors[0], tensors[1], tensors[3]])] == [True] * 3
    sq = torch.tensor([1.0, 2.0, 4.0, 0.0])
    assert active.per_module(sq).tolist() == [3.0, 4.0]
    assert active.index_tensor([2, 0]) is active.index_tensor([2, 0])  # made once per set
    # a kept module keeps its state object; a dropped one gives its memory back
    kept = state[tensors[3]]
    kept["step"] = 7
    used = active.arena.stats()["used"]
    active.change([1, 2], keep={2}, skips0=skips)
    assert state[tensors[3]] is kept and kept["step"] == 7 and tensors[0] not in state and tensors[2] in state
    assert active.arena.stats()["used"] < used
    assert active.per_module(torch.tensor([5.0, 6.0, 0.0])).tolist() == [5.0, 6.0]


def test_the_bound_is_computed_without_building_an_optimizer():
    import warnings

    import pytest

    import misa
    from misa.optimizer import bytes_at, capacity

    from models import tiny_lm

    model = tiny_lm(seed=0, dtype=torch.bfloat16, d=128, ff=128)
    for kwargs in ({}, {"states": "8bit", "master_weights": "kahan"}, {"granularity": "layer", "train_1d": True}):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # what stays frozen
            built = misa.MISA(tiny_lm(seed=0, dtype=torch.bfloat16, d=128, ff=128), delta=0.5, **kwargs)
        assert (
            bytes_at(model, delta=0.5, **kwargs)
            == built.bytes_at(0.5)
            == {**built.memory_bytes(), **built.bytes_at(0.5)}
        )
        assert bytes_at(model, delta=0.8, **kwargs) == built.bytes_at(0.8) == capacity(model, **kwargs).bytes_at(0.8)
    with torch.device("meta"):
        meta = tiny_lm(seed=0, dtype=torch.bfloat16, d=128, ff=128)
    assert bytes_at(meta, delta=0.5) == bytes_at(model, delta=0.5)  # shapes only: a meta model will do
    with pytest.raises(TypeError):
        bytes_at(model, delta=0.5, stats="8bit")  # a name MISA does not take
    with pytest.raises(ValueError, match="delta"):
        bytes_at(model, delta=1.5)


def test_the_graph_recorder_warms_records_replays_and_invalidates_on_its_own():
    from misa.cuda_graph import WARM_STEPS, GraphRecorder

    calls = []

    def stand_in(body):
        calls.append("recorded")
        return lambda: (calls.append("replayed"), body())

    recorder = GraphRecorder(capture=stand_in)
    grads = [torch.ones(3)]
    ran = []
    work = lambda recorded: ran.append(recorded[0].clone())  # noqa: E731
    assert [recorder.run("plan", grads, work) for _ in range(WARM_STEPS)] == [False] * WARM_STEPS
    assert recorder.run("plan", grads, work) and recorder.recordings == 1
    fresh = [torch.full((3,), 2.0)]  # autograd gave new gradient tensors: copied into the recorded ones
    assert recorder.run("plan", fresh, work) and recorder.recordings == 1 and grads[0].tolist() == [2.0] * 3
    assert calls == ["recorded", "replayed", "replayed"] and [r.tolist() for r in ran] == [[1.0] * 3, [2.0] * 3]
    assert not recorder.run("another plan", grads, work)  # a new key warms up again
    recorder.invalidate()
    assert [recorder.run("plan", grads, work) for _ in range(WARM_STEPS + 1)] == [False] * WARM_STEPS + [True]
    assert recorder.recordings == 2
    lrs = recorder.lrs([{"lr": 0.5}, {"lr": 1e-3}], torch.device("cpu"))
    assert [t.item() for t in lrs] == [0.5, 1e-3] and lrs[0].dtype == torch.float64
    assert recorder.lrs([{"lr": 0.25}, {"lr": 1e-3}], torch.device("cpu"))[0] is lrs[0]  # the same scalars
