"""MISA's parts (misa/optimizer.py composes them): each owns the state it writes, and the period's record is
built and tested on its own."""

import ast
from pathlib import Path

import torch

from misa.period import Period

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("optimizer", "active_set", "schedule", "fused_step", "cuda_graph", "grad_release", "checkpoint")


def _written(path: Path):
    """Attributes of `self` that a file assigns (`self.x = ...`, `self.x += ...`, tuple targets included)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
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
    writers = {}
    for part in PARTS:
        for attr in _written(ROOT / "misa" / f"{part}.py"):
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
