"""A checkpoint an earlier tree wrote loads here and resumes to the same numbers: MISA's state_dict layout is kept
across the house's restructuring. tests/data/misa-state-db2c2bb.pt was written by `write()` below, run against
commit db2c2bb (the tree before MISA's parts became objects):

    git worktree add /tmp/old db2c2bb
    cd /tmp && PYTHONPATH=/tmp/old:<repo>/tests python -c "import test_checkpoint_compat as t; t.write('out.pt')"
"""

import warnings
from pathlib import Path

import torch
from test_misa_optimizer import synthetic_grads

import misa

from models import tiny_lm

FIXTURE = Path(__file__).parent / "data" / "misa-state-db2c2bb.pt"
BEFORE, AFTER = 7, 5  # steps before the save (two switches at interval 3), steps resumed after it


def _build():
    model = tiny_lm(seed=3, dtype=torch.bfloat16, d=64, ff=64, layers=2)  # 64 x 64: 8-bit states
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the embedding and head stay frozen
        opt = misa.MISA(
            model, lr=1e-2, delta=0.4, interval=3, backend="torch", seed=1, states="8bit", master_weights="kahan"
        )
    return model, opt


def _steps(model, opt, first: int, count: int) -> None:
    for step in range(first, first + count):
        synthetic_grads(model, torch.Generator().manual_seed(100 + step))
        opt.step()
        opt.zero_grad()


def write(path) -> None:
    model, opt = _build()
    _steps(model, opt, 0, BEFORE)
    saved = {"model": {k: v.clone() for k, v in model.state_dict().items()}, "optimizer": opt.state_dict()}
    _steps(model, opt, BEFORE, AFTER)
    saved["after"] = {k: v.clone() for k, v in model.state_dict().items()}
    torch.save(saved, path)


def test_a_checkpoint_of_the_earlier_tree_loads_and_resumes_to_the_same_numbers():
    saved = torch.load(FIXTURE, weights_only=False)
    # the same run here writes the same state_dict, entry by entry
    model, opt = _build()
    _steps(model, opt, 0, BEFORE)
    here, there = opt.state_dict(), saved["optimizer"]
    assert here.keys() == there.keys() and here["misa"].keys() == there["misa"].keys()
    assert here["state"].keys() == there["state"].keys()
    for i, st in there["state"].items():
        assert here["state"][i].keys() == st.keys(), i
        for key, value in st.items():
            assert torch.equal(torch.as_tensor(here["state"][i][key]), torch.as_tensor(value)), (i, key)
    assert (
        here["misa"]["active"] == there["misa"]["active"] and here["misa"]["switch_log"] == there["misa"]["switch_log"]
    )
    # and the saved one, loaded into a fresh optimizer, resumes to the earlier tree's numbers
    model, opt = _build()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["optimizer"])
    _steps(model, opt, BEFORE, AFTER)
    for name, value in model.state_dict().items():
        assert torch.equal(value, saved["after"][name]), name
