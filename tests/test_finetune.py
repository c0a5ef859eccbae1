"""The fine-tuning comparison (`python -m misa.finetune`): the cached base, LoRA and DoRA, the memory
ledger (exact bytes), the learning rate chosen on validation (never on test), and bad input (exit 2,
nothing written)."""

import json
import math
import platform
from pathlib import Path

import pytest
import torch

from misa.integrations.lora import attach_lora, peft_available
from misa.jobs import finetune, pretrained, train
from misa.jobs.method import Method
from misa.jobs.model import SIZES, LlamaForCausalLM
from misa.memory import MemoryMeter
from misa.optimizer import MISA

from cli_checks import assert_refused

FAST = [
    "--model-size",
    "tiny",
    "--seq-len",
    "32",
    "--batch-size",
    "2",
    "--eval-batches",
    "2",
    "--max-steps",
    "3",
    "--eval-every",
    "3",
    "--base-steps",
    "3",
    "--no-progress",
]
needs_peft = pytest.mark.skipif(not peft_available(), reason="needs peft (pip install misa-kernels[hf])")


def parsed(argv):
    args = finetune.build_parser().parse_args(argv)
    finetune.validate(args)
    return args


# ----------------------------------------------------------------------------------------- the base
def test_base_is_made_once_reused_and_keyed_by_its_settings(tmp_path):
    args = parsed(FAST + ["--cache-dir", str(tmp_path / "cache")])
    corpus = finetune.load_corpus(None)
    old = finetune.TokenDataset(finetune.tokenize(corpus), args.seq_len)
    first, cached = pretrained.pretrained_base(args, old, corpus, torch.device("cpu"))
    assert not cached and (first / pretrained.BASE_FILE).is_file()
    made = (first / pretrained.BASE_FILE).stat().st_mtime_ns
    again, cached = pretrained.pretrained_base(args, old, corpus, torch.device("cpu"))
    assert cached and again == first and (first / pretrained.BASE_FILE).stat().st_mtime_ns == made
    weights = pretrained.base_weights(first)
    fresh = LlamaForCausalLM(SIZES["tiny"]).state_dict()
    assert weights.keys() == fresh.keys()
    assert any(not torch.equal(weights[k], fresh[k]) for k in fresh)  # it was trained (seeded init is the same)

    for change in (["--base-steps", "4"], ["--base-lr", "1e-3"], ["--model-size", "small"], ["--seq-len", "48"]):
        other = parsed(FAST + ["--cache-dir", str(tmp_path / "cache")] + change)
        assert pretrained.key_digest(pretrained.base_key(other, corpus, torch.device("cpu"))) != first.name, change
    other_data = pretrained.base_key(args, corpus + b"x", torch.device("cpu"))
    assert pretrained.key_digest(other_data) != first.name
    threads = torch.get_num_threads()
    try:  # the CPU's sums split by thread count: another count makes other weights, so another key
        torch.set_num_threads(threads + 1)
        assert pretrained.key_digest(pretrained.base_key(args, corpus, torch.device("cpu"))) != first.name
    finally:
        torch.set_num_threads(threads)
    bases = [p for p in (tmp_path / "cache" / "bases").iterdir()]
    assert bases == [first]  # one folder, no leftovers of the atomic write


def test_a_run_starts_from_the_base_and_reports_both_domains(tmp_path, capsys):
    out = tmp_path / "ft"
    assert (
        finetune.main(
            FAST
            + [
                "--methods",
                "misa,adamw",
                "--lr-grid",
                "1e-3,3e-3",
                "--grid-extensions",
                "0",
                "--seeds",
                "2",
                "--delta",
                "0.3",
                "--interval",
                "2",
                "--cache-dir",
                str(tmp_path / "c"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "on its own domain" in printed and "on the new one" in printed
    data = json.loads((out / "finetune.json").read_text())
    meta, rows = data["meta"], {r["method"]: r for r in data["rows"]}
    assert meta["base_loss_new"] > 0 and meta["base_loss_old"] > 0
    for name in ("misa", "adamw"):
        r = rows[name]
        assert set(r["grid"]) == {"0.001", "0.003"} and r["seeds"] == 2 and len(r["runs"]) == 2
        assert [run["seed"] for run in r["runs"]] == [0, 1] and all(run["lr"] == r["lr"] for run in r["runs"])
        assert r["memory"]["total_bytes"] > 0 and r["old_loss_mean"] > 0
    assert "| misa |" in (out / "finetune.md").read_text() and (out / "finetune.png").stat().st_size > 1000


# ----------------------------------------------------------------------------------------- LoRA and DoRA
@needs_peft
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
def test_adapters_train_and_the_base_stays_frozen(dora):
    torch.manual_seed(0)
    model = LlamaForCausalLM(SIZES["tiny"])
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    adapters = attach_lora(model, r=4, alpha=8, dora=dora)
    assert adapters and all(p.requires_grad for p in adapters)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all("lora_" in n for n in trainable)
    opt = torch.optim.AdamW(adapters, lr=1e-2)
    batch = torch.randint(0, 256, (2, 17))
    for _ in range(3):
        model.loss(batch).backward()
        opt.step()
        opt.zero_grad()
    after = dict(model.named_parameters())
    for n, p in before.items():  # peft renames a wrapped weight to ...base_layer.weight
        moved = after.get(n, after.get(n.replace(".weight", ".base_layer.weight")))
        assert torch.equal(moved, p), n
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)


@needs_peft
def test_lora_and_dora_rows_in_the_comparison(tmp_path):
    out = tmp_path / "ft"
    assert (
        finetune.main(
            FAST
            + [
                "--methods",
                "lora,dora",
                "--lr-grid",
                "1e-2",
                "--seeds",
                "1",
                "--lora-r",
                "2",
                "--cache-dir",
                str(tmp_path / "c"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = {r["method"]: r for r in json.loads((out / "finetune.json").read_text())["rows"]}
    cfg = SIZES["tiny"]
    d, f, layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_layers
    lora_params = layers * 2 * (4 * 2 * d + 3 * (d + f))  # r (in + out) per projection, r = 2
    assert rows["lora"]["memory"]["trainable_params"] == lora_params
    magnitudes = layers * (4 * d + 2 * f + d)  # DoRA adds one magnitude per output feature
    assert rows["dora"]["memory"]["trainable_params"] == lora_params + magnitudes


# ----------------------------------------------------------------------------------------- memory ledger
def _step(model, opt, meter):
    model.loss(torch.randint(0, 256, (2, 17))).backward()
    meter.before_step()
    opt.step()
    meter.after_step(opt)
    opt.zero_grad(set_to_none=True)


def test_memory_of_full_adamw_is_counted_to_the_byte():
    torch.manual_seed(0)
    model = LlamaForCausalLM(SIZES["tiny"])
    params = list(model.parameters())
    n = sum(p.numel() for p in params)
    meter = MemoryMeter(model, params)
    _step(model, torch.optim.AdamW(params, lr=1e-3), meter)
    peak = meter.peak
    assert peak.trainable_params == n and peak.adapter_bytes == 0 and peak.master_bytes == 0
    assert peak.grad_bytes == 4 * n
    assert peak.state_bytes == 8 * n + 4 * len(params)  # m, v, and torch's fp32 step counter per tensor


def test_memory_of_misa_is_its_arena_and_the_active_gradients():
    torch.manual_seed(0)
    model = LlamaForCausalLM(SIZES["tiny"]).to(torch.bfloat16)
    params = list(model.parameters())
    opt = MISA(model, lr=1e-3, delta=0.3, interval=2)
    meter = MemoryMeter(model, params)
    peaks = []
    for _ in range(4):
        active = [p for p in params if p.requires_grad]
        _step(model, opt, meter)
        peaks.append(sum(p.numel() for p in active))
    arena = opt.arena.stats()["bytes"]
    assert meter.peak.state_bytes + meter.peak.master_bytes == arena
    assert meter.peak.master_bytes == arena // 3  # bf16: m, v and an fp32 master per element
    assert meter.peak.grad_bytes == 2 * max(peaks) and meter.peak.trainable_params == max(peaks)
    assert max(peaks) <= opt.budget


@needs_peft
def test_memory_of_lora_counts_adapters_their_grads_and_states():
    torch.manual_seed(0)
    model = LlamaForCausalLM(SIZES["tiny"])
    base = list(model.parameters())
    adapters = attach_lora(model, r=4, alpha=8)
    n = sum(p.numel() for p in adapters)
    meter = MemoryMeter(model, base)
    _step(model, torch.optim.AdamW(adapters, lr=1e-3), meter)
    assert meter.peak.adapter_bytes == 4 * n and meter.peak.grad_bytes == 4 * n
    assert meter.peak.state_bytes == 8 * n + 4 * len(adapters)


def test_equal_memory_delta_fits_the_budget():
    args = parsed(FAST)
    budget = finetune.misa_bound(args, 0.2, {})
    delta = finetune.delta_at(args, budget, {})
    assert delta == pytest.approx(0.2, rel=0.05)
    assert finetune.misa_bound(args, delta, {}) <= budget < finetune.misa_bound(args, delta * 1.05, {})
    assert finetune.delta_at(args, 10, {}) is None  # not even one module
    layers, one = finetune.lisa_layers_at(args, budget, {})
    assert (layers == 0) == (one > budget)


def _new_domain(args):
    return finetune.TokenDataset(
        finetune.tokenize(finetune.DOMAINS["unicode-names"]()),
        args.seq_len,
        torch.device("cpu"),
        test_fraction=finetune.TEST_FRACTION,
    )


def test_the_equal_peak_delta_fits_and_is_tight():
    args = parsed(FAST)
    data = _new_domain(args)
    target = finetune.peak_at(args, Method("misa", "misa", overrides={"delta": 0.2}), None, data, torch.device("cpu"))[
        0
    ]
    found = finetune.delta_at_peak(args, target, Method("misa", "misa"), None, data, torch.device("cpu"))
    assert found["peak_bytes"] <= target < found["next_peak_bytes"]
    assert found["next_delta"] - found["delta"] <= 2.0**-finetune.EQUAL_PEAK_ITERATIONS
    assert found["delta"] >= 0.2 - 2.0**-finetune.EQUAL_PEAK_ITERATIONS  # 0.2's own worst peak fits
    # the peak it reports is the worst set's, measured again
    again = finetune.peak_at(
        args, Method("misa", "misa", overrides={"delta": found["delta"]}), None, data, torch.device("cpu")
    )
    assert again[0] == found["peak_bytes"]
    assert finetune.delta_at_peak(args, 10, Method("misa", "misa"), None, data, torch.device("cpu")) is None


def test_lisa_layers_at_the_peak_are_counted_by_measurement():
    args = parsed(FAST)
    data = _new_domain(args)
    layers, peaks = finetune.lisa_layers_at_peak(args, 10**12, None, data, torch.device("cpu"))
    assert layers == SIZES["tiny"].num_layers and peaks == sorted(peaks)  # a layer more holds more
    layers, peaks = finetune.lisa_layers_at_peak(args, peaks[0], None, data, torch.device("cpu"))
    assert layers == 1
    assert finetune.lisa_layers_at_peak(args, 10, None, data, torch.device("cpu"))[0] == 0


@needs_peft
@pytest.mark.parametrize("checkpointing", [True], ids=["checkpointing"])
def test_equal_memory_at_the_peak_writes_peaks_times_and_the_criterion(tmp_path, checkpointing):
    out = tmp_path / "ft"
    argv = FAST + [
        "--max-steps",
        "12",
        "--methods",
        "lora,misa",
        "--lr-grid",
        "1e-3",
        "--seeds",
        "1",
        "--equal-memory",
        "--cache-dir",
        str(tmp_path / "c"),
        "--out",
        str(out),
    ]
    argv += ["--checkpointing"] if checkpointing else []
    assert finetune.main(argv) == 0
    data = json.loads((out / "finetune.json").read_text())
    meta, rows = data["meta"], {r["method"]: r for r in data["rows"]}
    assert meta["checkpointing"] is checkpointing and meta["equal_memory"] == "peak"
    assert meta["python"] == platform.python_version()  # the shipped domains are its own texts
    lora_peak = rows["lora"]["memory"]["step_peak_bytes"]
    for r in rows.values():
        m = r["memory"]
        assert m["step_peak_bytes"] > m["total_bytes"] > 0  # activations and weights beyond the ledger
        assert sum(m["step_peak_parts"].values()) == m["step_peak_bytes"]
        assert r["step_ms"] > 0 and r["tokens_per_s"] == pytest.approx(2 * 32 / r["step_ms"] * 1000)
    for entry in ("misa@lora-peak", "misa@lora-peak+states=8bit+masters=kahan"):
        planned = meta["equal_peak"][entry]
        if planned is not None:
            assert planned["peak_bytes"] <= lora_peak == planned["target_bytes"]
            assert rows[entry]["runs"][0]["lr"] == 1e-3
    text = (out / "finetune.md").read_text()
    assert "step peak MiB (x LoRA)" in text and "ms / step" in text
    assert ("with activation checkpointing" if checkpointing else "without activation checkpointing") in text.lower()


# ----------------------------------------------------------------------------------------- the learning rate
def test_the_rate_is_chosen_on_validation_and_only_then_tested(monkeypatch, tmp_path):
    val = {1e-3: 2.0, 3e-3: 1.5, 1e-2: 1.8}
    test_if_chosen_on_test = {1e-3: 0.1, 3e-3: 9.0, 1e-2: 9.0}  # test would pick 1e-3: it must not be read
    calls = []

    def fake_run(args, method, lr, seed, out, new, base, device):
        entry = method.entry
        calls.append(("train", lr, seed))
        return {
            "method": entry,
            "lr": lr,
            "seed": seed,
            "val_loss": val[lr] + seed,
            "history": {},
            "memory": {"total_bytes": 1},
        }, ("model", lr, seed)

    def fake_eval(model, data, args, batches=None, split="val"):
        calls.append((split, model))
        return test_if_chosen_on_test[model[1]], 0.0, [0.0, 0.0]

    monkeypatch.setattr(finetune, "one_run", fake_run)
    monkeypatch.setattr(train, "evaluate_with_error", fake_eval)
    monkeypatch.setattr(train, "evaluate", lambda model, data, args, batches=None: 0.5)
    args = parsed(FAST + ["--seeds", "3"])
    row = finetune.run_method(args, Method("misa", "misa"), (1e-3, 3e-3, 1e-2), None, None, None, None, tmp_path)
    assert row["lr"] == 3e-3 and not row["lr_at_grid_edge"]
    grid_calls = calls[:3]
    assert grid_calls == [("train", 1e-3, 0), ("train", 3e-3, 0), ("train", 1e-2, 0)]
    tested = [c[1] for c in calls if c[0] == "test"]
    assert tested == [("model", 3e-3, 0), ("model", 3e-3, 1), ("model", 3e-3, 2)]  # seed 0's grid run reused
    assert calls.index(("test", ("model", 3e-3, 0))) > 2  # after the whole grid
    assert [r["seed"] for r in row["runs"]] == [0, 1, 2]
    assert finetune.choose_rate([{"lr": 1e-3, "val_loss": 1.0}, {"lr": 3e-4, "val_loss": 1.0}]) == 3e-4


def test_a_rate_chosen_at_the_grid_edge_extends_the_grid(monkeypatch, tmp_path):
    tried = []

    def fake_run(args, method, lr, seed, out, new, base, device):
        entry = method.entry
        tried.append(lr)
        return {
            "method": entry,
            "lr": lr,
            "seed": seed,
            "val_loss": abs(math.log10(lr) + 4.2),
            "history": {},
            "memory": {"total_bytes": 1},
        }, ("model", lr, seed)  # best near 6e-5: below the grid

    monkeypatch.setattr(finetune, "one_run", fake_run)
    monkeypatch.setattr(
        train, "evaluate_with_error", lambda model, data, args, batches=None, split="val": (1.0, 0.0, [0.0, 0.0])
    )
    monkeypatch.setattr(train, "evaluate", lambda model, data, args, batches=None: 0.5)
    row = finetune.run_method(
        parsed(FAST + ["--seeds", "1"]), Method("lora", "lora"), (1e-3, 1e-2), None, None, None, None, tmp_path
    )
    assert tried == pytest.approx([1e-3, 1e-2, 1e-4, 1e-5])  # extended twice, by the grid's ratio
    assert row["lr"] == pytest.approx(1e-4) and not row["lr_at_grid_edge"]
    assert list(row["grid"]) == ["1e-05", "0.0001", "0.001", "0.01"]
    tried.clear()
    row = finetune.run_method(
        parsed(FAST + ["--seeds", "1", "--grid-extensions", "1"]),
        Method("lora", "lora"),
        (1e-2, 1e-1),
        None,
        None,
        None,
        None,
        tmp_path,
    )
    assert tried == pytest.approx([1e-2, 1e-1, 1e-3]) and row["lr_at_grid_edge"]  # still at the edge: flagged


def test_grids_per_method():
    grids = finetune.parse_grid("misa=1e-4,2e-4;lora=5e-3", ["misa", "lora", "adamw"])
    assert grids == {"misa": (1e-4, 2e-4), "lora": (5e-3,), "adamw": finetune.DEFAULT_GRIDS["adamw"]}
    assert finetune.parse_grid("1e-3", ["misa+delta=0.1", "lisa"]) == {"misa+delta=0.1": (1e-3,), "lisa": (1e-3,)}
    assert finetune.parse_entry("misa-official+delta=0.1+flush=true") == Method(
        "misa-official+delta=0.1+flush=true", "misa", {"variant": "official", "flush": True}, {"delta": 0.1}
    )


# ----------------------------------------------------------------------------------------- bad input
def refused(capsys, argv, text, workdir):
    assert_refused(finetune.main, capsys, argv, text, workdir)


@pytest.mark.parametrize(
    "extra,text",
    [
        (["--lr-grid", "1e-3,0"], "--lr-grid"),
        (["--lr-grid", "1e-3,-1e-4"], "--lr-grid"),
        (["--lr-grid", "misa=1e-3,abc"], "--lr-grid"),
        (["--lr-grid", "sgd=1e-3"], "--lr-grid"),
        (["--methods", "misa,sgd"], "--methods"),
        (["--methods", "misa,misa"], "--methods"),
        (["--methods", "lora+delta=0.1"], "--methods"),
        (["--methods", "misa+flush=maybe"], "flush"),
        (["--equal-memory", "--methods", "misa"], "--equal-memory"),
        (["--equal-memory", "sometimes"], "--equal-memory"),
        (["--delta", "0.0001"], "delta"),
        (["--base", "/does/not/exist"], "--base"),
        (["--data", "/does/not/exist"], "--data"),
        (["--grid-extensions", "-1"], "--grid-extensions"),
    ],
    ids=[
        "zero-rate",
        "negative-rate",
        "not-a-rate",
        "grid-for-unknown-method",
        "unknown-method",
        "twice",
        "switch-on-lora",
        "bad-switch",
        "equal-memory-without-lora",
        "unknown-equal-memory-criterion",
        "delta-below-a-module",
        "missing-base",
        "missing-data",
        "negative-extensions",
    ],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, monkeypatch, extra, text):
    monkeypatch.chdir(tmp_path)
    refused(
        capsys, FAST + ["--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")] + extra, text, tmp_path
    )


def test_a_base_that_does_not_fit_the_model_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "base"
    folder.mkdir()
    torch.save({"model": LlamaForCausalLM(SIZES["tiny"]).state_dict()}, folder / pretrained.BASE_FILE)
    refused(
        capsys,
        FAST + ["--model-size", "small", "--base", str(folder), "--out", str(tmp_path / "out")],
        "does not fit",
        tmp_path,
    )
    (folder / pretrained.BASE_FILE).write_bytes(b"not a checkpoint")
    refused(capsys, FAST + ["--base", str(folder), "--out", str(tmp_path / "out")], "--base", tmp_path)


def test_checkpointing_a_model_that_cannot_is_refused(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(LlamaForCausalLM, "supports_gradient_checkpointing", False, raising=False)
    refused(
        capsys,
        FAST
        + ["--methods", "misa", "--checkpointing", "--cache-dir", str(tmp_path / "c"), "--out", str(tmp_path / "out")],
        "--checkpointing",
        tmp_path,
    )


def test_missing_peft_is_one_clear_message(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(finetune, "peft_available", lambda: False)
    refused(
        capsys,
        FAST + ["--methods", "misa,lora", "--out", str(tmp_path / "out")],
        "pip install misa-kernels[hf]",
        tmp_path,
    )


def test_a_base_of_ours_is_taken_as_it_is(tmp_path):
    folder = tmp_path / "base"
    folder.mkdir()
    torch.manual_seed(3)
    weights = LlamaForCausalLM(SIZES["tiny"]).state_dict()
    torch.save({"model": weights, "args": {}}, folder / train.CHECKPOINT)  # misa.train's checkpoint
    out = tmp_path / "ft"
    assert (
        finetune.main(
            FAST
            + [
                "--methods",
                "adamw",
                "--lr-grid",
                "1e-3",
                "--seeds",
                "1",
                "--base",
                str(folder),
                "--cache-dir",
                str(tmp_path / "c"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert not (tmp_path / "c").exists()  # no pretraining when a base is given
    assert json.loads((out / "finetune.json").read_text())["meta"]["base"] == ".../base"  # no machine paths


# ----------------------------------------------------------------------------------------- a Hugging Face model
def tiny_hf_model(folder: Path) -> Path:
    """A 2-layer LLaMA and a byte tokenizer, saved as a Hugging Face folder (nothing downloaded)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {(chr(i) if chr(i).isprintable() else f"<{i}>"): i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab={**vocab, "<unk>": 256}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>").save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(
        LlamaConfig(
            vocab_size=257,
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    ).save_pretrained(folder)
    return folder


@pytest.mark.hf
@needs_peft
@pytest.mark.parametrize("criterion", ["accounted", "peak"])
def test_a_hugging_face_model_is_its_own_base(tmp_path, criterion):
    pytest.importorskip("transformers")
    folder = tiny_hf_model(tmp_path / "hf")
    out = tmp_path / "ft"
    assert (
        finetune.main(
            FAST[2:]
            + [
                "--model",
                str(folder),
                "--methods",
                "misa,lora",
                "--lr-grid",
                "1e-3",
                "--seeds",
                "1",
                "--delta",
                "0.3",
                "--interval",
                "2",
                "--equal-memory",
                criterion,
                "--cache-dir",
                str(tmp_path / "c"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads((out / "finetune.json").read_text())
    assert not (tmp_path / "c").exists() and data["meta"]["base"] == ".../hf"
    rows = {r["method"]: r for r in data["rows"]}
    if criterion == "accounted":
        assert set(rows) == {"misa", "lora", "misa@lora-memory"}
        assert rows["misa@lora-memory"]["memory"]["total_bytes"] <= rows["lora"]["memory"]["total_bytes"]
        return
    planned = data["meta"]["equal_peak"]
    assert set(planned) == {"misa@lora-peak", "misa@lora-peak+states=8bit+masters=kahan", "lisa@lora-peak"}
    for entry in ("misa@lora-peak", "misa@lora-peak+states=8bit+masters=kahan"):
        if planned[entry] is None:  # the note says so
            assert any(note.startswith(entry + ": not even") for note in data["meta"]["notes"])
        else:
            assert entry in rows and planned[entry]["peak_bytes"] <= rows["lora"]["memory"]["step_peak_bytes"]
