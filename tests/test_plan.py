"""The memory planner (`python -m misa.plan`): its 8B plans against every peak measured on a GPU (committed under
benchmarks/results/), its fake step against a real one, its GPU terms, its budget answers and its errors."""

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

import misa
from misa.jobs import plan as P
from misa.memory import StepPeakMeter

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import plan_vs_measured  # noqa: E402


@pytest.mark.hf
def test_the_8b_plans_are_within_1_percent_of_every_measured_peak():
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    peaks = plan_vs_measured.committed_peaks()
    assert len(peaks) >= 10  # 8 H200 train_step rows, the mem8b row, the H100 row
    assert {p[0] for p in peaks} == set(plan_vs_measured.METHODS.values())
    off = [
        f"{r['method']} seq {r['seq']} ckpt {r['checkpointing']}: planned {r['planned_bytes'] / 2**30:.3f} GiB, "
        f"measured {r['measured_bytes'] / 2**30:.3f} ({r['source']}), {r['error']:+.2%}"
        for r in plan_vs_measured.compare(peaks)
        if abs(r["error"]) > 0.01
    ]
    assert not off, "\n".join(off)


def _real_peak(method: str, seq: int, batch: int, checkpointing: bool):
    """The same step as the planner's, on real CPU tensors, metered exactly (no GPU terms)."""
    from misa.integrations.lora import attach_lora
    from misa.jobs.model import SIZES, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**SIZES["tiny"].to_dict()))
    model.gradient_checkpointing = checkpointing
    if method == "lora":
        attach_lora(model, 16, 32.0)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    else:
        opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    batch_ids = torch.randint(0, 256, (batch, seq + 1))
    meter = StepPeakMeter(model, opt, mode="track")
    for _ in range(2):
        with meter.step():
            model.loss(batch_ids).backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
    return meter.peak_bytes


@pytest.mark.parametrize("method", ["adamw", "lora"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_a_planned_step_holds_what_the_same_real_step_holds(method, checkpointing):
    if method == "lora":
        pytest.importorskip("peft")
    row = P.plan_step(
        P.load_model("tiny"),
        P.parse_methods(method)[0],
        P.Setting(seq=33, batch=3, dtype="fp32", checkpointing=checkpointing, gpu="none"),
    )
    assert row.gpu_terms == {}
    assert row.peak_bytes == _real_peak(method, 33, 3, checkpointing)
    assert sum(row.parts.values()) == row.peak_bytes


def test_misa_is_planned_at_its_worst_set_and_held_there():
    row = P.plan_step(
        P.load_model("tiny"),
        P.parse_methods("misa+delta=0.25")[0],
        P.Setting(seq=16, batch=2, dtype="fp32", checkpointing=False, gpu="none", worst_set="largest"),
    )
    assert row.active_set and row.active_set[0].startswith("model.layers.0.")  # the lowest layer: the longest backward
    assert 0 < row.trainable
    searched = P.plan_step(
        P.load_model("tiny"),
        P.parse_methods("misa+delta=0.25")[0],
        P.Setting(seq=16, batch=2, dtype="fp32", checkpointing=False, gpu="none", worst_set="search"),
    )
    assert searched.peak_bytes >= row.peak_bytes * 0.999 or searched.active_set != row.active_set


def test_a_held_misa_ends_no_period():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 8))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = misa.MISA(model, lr=1e-3, delta=0.5, interval=1, backend="torch")
        with opt.hold():
            opt.set_active([1])
            switches = len(opt.switch_log)
            for _ in range(3):
                model(torch.randn(4, 8)).sum().backward()
                opt.step()
                opt.zero_grad()
            assert len(opt.switch_log) == switches and opt.active_modules == [opt.module_names[1]]
        model(torch.randn(4, 8)).sum().backward()
        opt.step()  # interval 1: outside hold() the period ends, and a new set is drawn
    assert len(opt.switch_log) == switches + 1


def test_the_gpu_terms():
    lora = P.parse_methods("lora")[0]
    mis = P.parse_methods("misa")[0]
    hopper = P.Setting(seq=512, batch=1, dtype="bf16", checkpointing=False)
    terms = P.gpu_terms(hopper, 32, mis)
    assert terms["cublas_workspace"] == 2 * 8 * 4 * 2**20  # forward's and backward's handle, 8 x 4 MiB each
    assert terms["attention_seed"] == 32 * 512  # every layer's backward pending, one 512-B block each
    assert terms["step_scratch"] == 5120
    ckpt = P.gpu_terms(P.Setting(seq=512, batch=1, dtype="bf16", checkpointing=True), 32, lora)
    assert ckpt["attention_seed"] == 512 and "step_scratch" not in ckpt
    assert P.gpu_terms(P.Setting(seq=512, batch=1, dtype="bf16", checkpointing=True, gpu="none"), 32, lora) == {}


def test_the_meter_counts_whole_allocator_blocks_when_asked():
    model = torch.nn.Linear(3, 1, bias=False)  # 12 bytes of weight
    for block, expected in ((1, 12), (512, 512)):
        meter = StepPeakMeter(model, None, mode="track", block_bytes=block)
        with meter.step():
            pass
        assert meter.peak_bytes == expected
    with pytest.raises(ValueError, match="block_bytes"):
        StepPeakMeter(model, None, mode="track", block_bytes=0)


def test_the_budget_answers_fit_and_plan_json(tmp_path):
    out = tmp_path / "plan"
    budget = 3 * 2**19  # 1.5 MiB: the tiny model's adamw step (2.2 MiB) does not fit, MISA's at delta 0.05 (1 MiB) does
    rc = P.main(
        [
            "--model",
            "tiny",
            "--dtype",
            "fp32",
            "--batch",
            "1",
            "--seq",
            "16,32",
            "--gpu",
            "none",
            "--methods",
            "misa+delta=0.05,adamw",
            "--worst-set",
            "largest",
            "--budget",
            "1.5MiB",
            "--out",
            str(out),
        ]
    )
    assert rc == 0
    result = json.loads((out / "plan.json").read_text())
    assert (out / "plan.png").is_file() and result["meta"]["commit"]
    assert len(result["rows"]) == 4
    for row in result["rows"]:
        assert {"method", "seq", "batch", "checkpointing", "peak_bytes", "parts", "fits"} <= set(row)
        assert row["fits"] == (row["peak_bytes"] <= budget)
    for answer in result["budget"]:
        for here in answer["at_seq"]:
            if here.get("largest_delta"):
                assert here["peak_bytes_at_largest"] <= budget
        if answer.get("longest_seq"):
            assert answer["peak_bytes_at_longest_seq"] <= budget
            assert answer["longest_seq"] % P.SEQ_MULTIPLE == 0 or answer["longest_seq"] in (16, 32)
    by = {a["method"]: a for a in result["budget"]}
    misa16, misa32 = by["misa+delta=0.05"]["at_seq"]
    assert misa32["fits"] and misa32["largest_delta"] > 0.05 and misa16["largest_delta"] >= misa32["largest_delta"]
    assert not any(h["fits"] for h in by["adamw"]["at_seq"])
    assert by["adamw"]["longest_seq"] is None  # its weights, gradients and states alone do not fit
    assert by["misa+delta=0.05"]["longest_seq"] >= 32


def test_planning_side_by_side_gives_the_same_plan():
    def plan(jobs):
        result = P.plan(
            model="tiny",
            methods="misa+delta=0.05,lora",
            seqs=(16, 32),
            dtype="fp32",
            gpu="none",
            worst_set="largest",
            budget="1.5MiB",
            jobs=jobs,
        )
        for row in result["rows"]:
            row.pop("seconds")
        return result

    alone, side_by_side = plan(1), plan(2)
    assert side_by_side == alone and len(alone["rows"]) == 4 and len(alone["budget"]) == 2


@pytest.mark.parametrize(
    "argv, flag",
    [
        (["--model", "llama9-70b"], "--model"),
        (["--budget", "lots"], "--budget"),
        (["--seq", "512,x"], "--seq"),
        (["--jobs", "0"], "--jobs"),
        (["--fsdp", "0"], "--fsdp"),
        (["--methods", "sgd"], "--methods"),
        (["--model", "tiny", "--methods", "misa+delta=1e-9", "--seq", "8", "--gpu", "none"], "--methods"),
    ],
)
def test_bad_input_names_the_argument_and_exits_2(argv, flag, capsys):
    assert P.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("misa-plan: error: ") and flag in err


def test_a_file_that_is_not_a_config_exits_2(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text(json.dumps({"hello": 1}))
    assert P.main(["--model", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--model" in err and "not a model config" in err
    bad.write_text("{not json")
    assert P.main(["--model", str(bad)]) == 2
    assert "not a JSON config" in capsys.readouterr().err


@pytest.mark.hf
def test_lora_on_a_model_without_its_projections_exits_2(tmp_path, capsys):
    pytest.importorskip("transformers")
    pytest.importorskip("peft")
    cfg = tmp_path / "gpt2.json"
    cfg.write_text(
        json.dumps(
            {
                "model_type": "gpt2",
                "hidden_size": 32,
                "num_hidden_layers": 1,
                "n_head": 2,
                "vocab_size": 64,
                "n_positions": 64,
            }
        )
    )
    assert P.main(["--model", str(cfg), "--methods", "lora", "--seq", "8", "--gpu", "none"]) == 2
    assert "--methods" in capsys.readouterr().err


def test_every_shipped_config_loads():
    pytest.importorskip("transformers")
    assert set(P.SHIPPED) >= {"llama3-8b", "llama3.2-1b", "qwen2.5-7b", "mistral-7b"}
    sizes = {}
    for name in P.SHIPPED:
        m = P.load_model(name)
        assert m.hf_config.num_hidden_layers == m.n_layers > 0
        with torch.device("meta"):
            import transformers

            model = transformers.AutoModelForCausalLM.from_config(m.hf_config)
        sizes[name] = sum(p.numel() for p in model.parameters())
    # their public parameter counts
    assert 8.0e9 < sizes["llama3-8b"] < 8.1e9 and 1.2e9 < sizes["llama3.2-1b"] < 1.3e9
    assert 7.6e9 < sizes["qwen2.5-7b"] < 7.7e9 and 7.2e9 < sizes["mistral-7b"] < 7.3e9


@pytest.mark.parametrize(
    "peak, quantum, expected",
    [
        (lambda x: 1000 + 10 * x, 1, 900),  # affine: the secant lands on it
        (lambda x: 1000 + 10 * x + (2000 if x > 500 else 0), 1, 700),  # a step the secant overshoots
        (lambda x: 1000 + x * x / 100, 64, 896),  # convex, in multiples of 64
    ],
)
def test_the_largest_that_fits_is_planned_and_tight(peak, quantum, expected):
    from types import SimpleNamespace

    planned = []

    def plan(x):
        planned.append(x)
        return SimpleNamespace(peak_bytes=peak(x))

    x, row = P._largest(plan, quantum, 2 * quantum, 10_000, quantum=quantum, ceiling=1 << 20, tries=8)
    assert x in planned and row.peak_bytes == peak(x) <= 10_000
    assert expected * 0.97 <= x <= expected and len(planned) <= 10


def test_nothing_fits_when_even_the_smallest_does_not():
    from types import SimpleNamespace

    assert P._largest(lambda x: SimpleNamespace(peak_bytes=100 + x), 1, 2, 50, quantum=1, ceiling=10) == (None, None)
