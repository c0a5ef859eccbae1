"""The Triton launch config: a forced config is honoured and checked, the CPU and the interpreter keep
the default, tuning picks the fastest candidate that runs and remembers it on disk, and every candidate
block size computes the same update (under the interpreter)."""

import pytest
import torch

from conftest import interpreting, test_device, triton_importable

pytestmark = pytest.mark.skipif(not triton_importable(), reason="triton is not installed")


def test_forced_config_is_used_and_fitted_to_the_chunk(monkeypatch):
    from misa_kernels.triton import tune

    monkeypatch.setenv(tune.CONFIG_ENV, "512,4")
    assert tune.config("adamw", torch.device("cpu"), torch.bfloat16, 65536, {}) == (512, 4)
    assert tune.config("adamw", torch.device("cpu"), torch.bfloat16, 256, {}) == (256, 4)
    for bad in ("512", "500,4", "512,3", "a,b"):
        monkeypatch.setenv(tune.CONFIG_ENV, bad)
        with pytest.raises(ValueError, match=tune.CONFIG_ENV):
            tune.config("adamw", torch.device("cpu"), torch.bfloat16, 65536, {})


def test_cpu_keeps_the_default(monkeypatch):
    from misa_kernels.triton import tune

    monkeypatch.delenv(tune.CONFIG_ENV, raising=False)
    called = []
    assert (
        tune.config("adamw", torch.device("cpu"), torch.float32, 65536, {}, launch=lambda *a: called.append(a))
        == tune.DEFAULT
    )
    assert called == []


def test_measure_picks_the_fastest_candidate_that_runs():
    from misa_kernels.triton import tune

    times = {(1024, 4): 3.0, (1024, 8): 2.0, (2048, 8): 2.5, (512, 4): 9.0, (2048, 16): 1.0}
    launched = []

    def launch(table, block, warps):
        launched.append((table.n_tensors, block, warps))
        if (block, warps) == (2048, 16):
            raise RuntimeError("out of resources")  # a config this GPU cannot run: not a candidate

    def timer(fn, reps):
        fn()
        return times[launched[-1][1:]]

    best, timings = tune.measure(torch.device("cpu"), [torch.float32], 65536, launch, timer=timer)
    assert best == (1024, 8)
    assert set(timings) == {"1024,4", "1024,8", "2048,8", "512,4"}
    assert {n for n, _, _ in launched} == {tune.SCRATCH_TENSORS}  # scratch tensors, never the caller's


def test_measure_takes_the_median_of_interleaved_rounds_and_a_tie_goes_to_the_default():
    from misa_kernels.triton import tune

    calls = []

    def timings(table):  # (2048, 8) is 1% faster than the default: a tie; (512, 4) has one slow outlier round
        def timer(fn, reps):
            fn()
            c = calls[-1]
            noisy = 50.0 if c == (512, 4) and calls.count(c) == 2 else 0.0
            return {(1024, 4): 1.10, (1024, 8): 1.00, (2048, 8): 0.99, (512, 4): 1.30, (2048, 16): 1.20}[c] + noisy

        return timer

    launch = lambda table, b, w: calls.append((b, w))  # noqa: E731
    best, medians = tune.measure(torch.device("cpu"), [torch.float32], 65536, launch, timer=timings(None))
    assert best == tune.DEFAULT and medians["2048,8"] < medians["1024,8"]
    assert medians["512,4"] == 1.30  # the outlier round does not move the median
    order = [c for c in calls]
    assert len(order) == tune.ROUNDS * len(tune.CANDIDATES) and order[:5] == order[5:10]  # interleaved rounds
    how = tune.measured()
    assert how["tie_to_default"] and how["margin"] == pytest.approx(1.00 / 0.99 - 1)
    assert how["scratch_elements"] == tune.SCRATCH_TENSORS * tune.SCRATCH_NUMEL >= 64 * 2**20  # bandwidth-bound

    calls.clear()
    clear_winner = lambda fn, reps: (fn(), {(2048, 8): 0.5}.get(calls[-1], 1.0))[1]  # noqa: E731
    assert tune.measure(torch.device("cpu"), [torch.float32], 65536, launch, timer=clear_winner)[0] == (2048, 8)
    assert not tune.measured()["tie_to_default"]


def test_measure_skips_blocks_larger_than_the_chunk():
    from misa_kernels.triton import tune

    seen = []
    best, _ = tune.measure(
        torch.device("cpu"),
        [torch.float32],
        1024,
        lambda t, b, w: seen.append(b),
        timer=lambda fn, reps: (fn(), 1.0)[1],
    )
    assert seen and max(seen) <= 1024 and best[0] <= 1024


def test_choices_are_remembered_on_disk(monkeypatch, tmp_path):
    from misa_kernels.triton import tune

    monkeypatch.setenv(tune.CACHE_ENV, str(tmp_path))
    key = ("adamw", "NVIDIA H100 80GB HBM3", "bfloat16", True)
    assert tune._load(key) is None
    tune._save(key, (2048, 8), {"2048,8": 0.5})
    assert tune._load(key) == (2048, 8)
    assert tune.saved_timings("NVIDIA H100 80GB HBM3") == {"adamw": {("bfloat16", True): {"2048,8": 0.5}}}
    assert tune.saved_timings("another GPU") == {}
    tune._save(key, (2048, 8), {"2048,8": 0.5}, {"margin": 0.1})
    assert tune.saved_timings("NVIDIA H100 80GB HBM3", part=3) == {"adamw": {("bfloat16", True): {"margin": 0.1}}}
    assert tune._load(("adamw", "NVIDIA H100 80GB HBM3", "bfloat16", False)) is None
    (tmp_path / "triton_configs.json").write_text("not json")
    assert tune._load(key) is None  # a damaged file costs a re-tune, not an error


@pytest.mark.interpreter
@pytest.mark.parametrize("config", ["256,4", "512,8", "1024,8"])
def test_every_candidate_block_computes_the_same_update(monkeypatch, config):
    from oracle import rel_err
    from test_adamw_step import SHAPES, require, run_case

    device = test_device()
    require("triton", device)
    if not interpreting():
        pytest.skip("the GPU tests cover the tuned config")
    monkeypatch.setenv("MISA_TRITON_CONFIG", config)
    case = run_case(
        "triton", device, SHAPES["mixed"], torch.bfloat16, fresh=False, step=4, with_norms=True, master=True
    )
    masters = [w.reshape(p.shape) for w, p in zip(case["w"], case["p"])]
    assert rel_err(masters, case["want_p"]) <= 1e-6
    assert rel_err([case["norms"]], [case["want_n"]]) <= 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize(
    "config", [f"{b},{w}" for b, w in __import__("misa_kernels.triton.tune", fromlist=["CANDIDATES"]).CANDIDATES]
)
def test_every_candidate_config_is_right_on_the_gpu(monkeypatch, config):
    from oracle import rel_err
    from test_adamw_step import SHAPES, require, run_case

    device = test_device()
    require("triton", device)
    monkeypatch.setenv("MISA_TRITON_CONFIG", config)
    for shapes in (SHAPES["mixed"], SHAPES["many"]):
        case = run_case("triton", device, shapes, torch.bfloat16, fresh=False, step=4, with_norms=True, master=True)
        masters = [w.reshape(p.shape) for w, p in zip(case["w"], case["p"])]
        assert rel_err(masters, case["want_p"]) <= 1e-6
        assert rel_err([case["norms"]], [case["want_n"]]) <= 1e-5


@pytest.mark.gpu
def test_tuning_runs_on_the_gpu_and_is_remembered(monkeypatch, tmp_path):
    """The real tuning: it times the candidates on scratch tensors (the caller's are untouched), picks
    one, writes the cache file, and a fresh process state reads the choice back instead of re-tuning."""
    import json

    from misa_kernels.triton import tune

    from oracle import rel_err
    from test_adamw_step import SHAPES, require, run_case

    device = test_device()
    require("triton", device)
    monkeypatch.setenv(tune.AUTOTUNE_ENV, "1")
    monkeypatch.delenv(tune.CONFIG_ENV, raising=False)
    monkeypatch.setenv(tune.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(tune, "_chosen", {})
    case = run_case(
        "triton", device, SHAPES["mixed"], torch.bfloat16, fresh=False, step=4, with_norms=True, master=True
    )
    masters = [w.reshape(p.shape) for w, p in zip(case["w"], case["p"])]
    assert rel_err(masters, case["want_p"]) <= 1e-6  # the tuned call computed the step once, right
    saved = json.loads((tmp_path / "triton_configs.json").read_text())
    adamw = [v for k, v in saved.items() if "|adamw|bfloat16|master=True" in k]
    assert len(adamw) == 1 and tuple(adamw[0][:2]) in tune.CANDIDATES and adamw[0][2]
    monkeypatch.setattr(tune, "_chosen", {})
    monkeypatch.setattr(tune, "measure", lambda *a, **k: pytest.fail("re-tuned instead of reading the file"))
    run_case("triton", device, SHAPES["mixed"], torch.bfloat16, fresh=False, step=4, with_norms=True, master=True)
