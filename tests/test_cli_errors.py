"""The main job keeps its promise: bad input prints one message naming the argument and exits with code 2,
with no folder or file created or changed; resume refuses what it cannot honour; help shows defaults."""

import json
import os
import sys

import pytest
import torch

from misa.jobs import train

from cli_checks import assert_refused

FAST = ["--model-size", "tiny", "--seq-len", "32", "--batch-size", "2", "--eval-batches", "2", "--no-progress"]


@pytest.fixture
def small_text(tmp_path):
    path = tmp_path / "small.txt"
    path.write_text("def f(x):\n    return x + 1\n" * 200)
    return path


def refused(capsys, argv, text, workdir):
    """Runs main(argv) and checks: exit 2, `text` in the one-line message, no traceback, nothing written."""
    assert_refused(train.main, capsys, argv, text, workdir)


def model_folder(tmp_path):
    folder = tmp_path / "hf-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    return folder


@pytest.mark.parametrize(
    "extra,text",
    [
        (["--delta", "0.001"], "delta"),
        (["--lr", "nan"], "--lr"),
        (["--lr", "inf"], "--lr"),
        (["--eta", "nan"], "--eta"),
        (["--weight-decay", "-1"], "--weight-decay"),
        (["--compare", ""], "--compare"),
        (["--compare", "misa,misa"], "--compare"),
        (["--compare", "misa-v2"], "--compare"),
        (["--compare", "misa+flush=maybe"], "flush"),
        (["--seeds", "3"], "--seeds"),
        (["--backend", "cuda"], "cuda"),
    ],
    ids=[
        "delta-too-small",
        "lr-nan",
        "lr-inf",
        "eta-nan",
        "weight-decay",
        "compare-empty",
        "compare-twice",
        "compare-unknown-preset",
        "compare-bad-switch",
        "seeds-without-compare",
        "backend-cuda-on-cpu",
    ],
)
def test_bad_options(tmp_path, capsys, small_text, extra, text):
    refused(capsys, FAST + ["--data", str(small_text), "--out", str(tmp_path / "never")] + extra, text, tmp_path)
    assert not (tmp_path / "never").exists()


def test_triton_backend_where_it_cannot_run(tmp_path, capsys, small_text, monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    refused(
        capsys,
        FAST + ["--data", str(small_text), "--backend", "triton", "--out", str(tmp_path / "never")],
        "triton",
        tmp_path,
    )


@pytest.mark.parametrize(
    "content,text",
    [
        ("{not json", "not valid JSON"),
        ('{"hidden_size": 30, "num_heads": 4}', "num_heads"),
        ('{"hidden_sise": 64}', "unknown field"),
        ("[1, 2]", "JSON object"),
    ],
    ids=["malformed", "heads-do-not-divide", "unknown-field", "not-an-object"],
)
def test_bad_config(tmp_path, capsys, small_text, content, text):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(content)
    refused(
        capsys,
        FAST + ["--data", str(small_text), "--config", str(cfg), "--out", str(tmp_path / "never")],
        "--config",
        tmp_path,
    )
    refused(
        capsys,
        FAST + ["--data", str(small_text), "--config", str(cfg), "--out", str(tmp_path / "never")],
        text,
        tmp_path,
    )


def test_out_naming_an_existing_file(tmp_path, capsys, small_text):
    target = tmp_path / "a-file"
    target.write_text("keep me")
    refused(capsys, FAST + ["--data", str(small_text), "--out", str(target)], "--out", tmp_path)
    assert target.read_text() == "keep me"


def test_model_without_transformers(tmp_path, capsys, small_text, monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    refused(
        capsys,
        FAST + ["--data", str(small_text), "--model", str(model_folder(tmp_path)), "--out", str(tmp_path / "never")],
        "pip install misa-kernels[hf]",
        tmp_path,
    )


def test_a_step_that_cannot_fit_is_refused_before_starting(tmp_path, capsys):
    refused(
        capsys,
        ["--model-size", "tiny", "--seq-len", "100000", "--no-progress", "--out", str(tmp_path / "never")],
        "--seq-len 100000",
        tmp_path,
    )


@pytest.fixture
def saved_run(tmp_path, small_text):
    out = tmp_path / "run"
    assert (
        train.main(
            FAST
            + ["--data", str(small_text), "--max-steps", "6", "--interval", "2", "--eval-every", "3", "--out", str(out)]
        )
        == 0
    )
    return out


@pytest.mark.parametrize(
    "extra,text",
    [
        (["--max-steps", "4"], "--max-steps"),
        (["--max-steps", "9", "--lr", "0.1"], "--lr"),
        (["--max-steps", "9", "--optimizer", "adamw"], "--optimizer"),
        (["--max-steps", "9", "--delta", "0.5"], "--delta"),
    ],
    ids=["shorter", "lr", "optimizer", "delta"],
)
def test_resume_refuses_what_it_cannot_honour(saved_run, tmp_path, capsys, extra, text):
    refused(capsys, ["--resume", str(saved_run), "--no-progress"] + extra, text, tmp_path)


@pytest.mark.parametrize("kind", ["empty", "truncated", "foreign"])
def test_resume_from_a_broken_checkpoint(saved_run, tmp_path, capsys, kind):
    ckpt = saved_run / "checkpoint.pt"
    if kind == "empty":
        ckpt.write_bytes(b"")
    elif kind == "truncated":
        ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    else:
        torch.save({"weights": torch.zeros(2)}, ckpt)
    refused(capsys, ["--resume", str(saved_run), "--max-steps", "9", "--no-progress"], "--resume", tmp_path)


def test_resume_continues_and_keeps_the_history(saved_run, capsys):
    assert train.main(["--resume", str(saved_run), "--max-steps", "8", "--no-progress"]) == 0
    ckpt = torch.load(saved_run / "checkpoint.pt", weights_only=False)
    assert ckpt["step"] == 8 and len(ckpt["history"]["train_loss"]) == 8
    summary = json.loads((saved_run / "summary.json").read_text())
    assert summary["tokens_per_s"] > 0


def test_header_wrote_line_and_plain_lines_without_a_terminal(tmp_path, capsys, small_text):
    out = tmp_path / "run"
    assert (
        train.main(
            [
                "--model-size",
                "tiny",
                "--seq-len",
                "32",
                "--batch-size",
                "2",
                "--eval-batches",
                "2",
                "--data",
                str(small_text),
                "--max-steps",
                "4",
                "--eval-every",
                "2",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    stdout = capsys.readouterr().out
    header = stdout.splitlines()[0]
    for part in ("model tiny", "params", str(small_text), "device cpu", "backend auto", "MISA(", "writing to"):
        assert part in header, header
    assert "\r" not in stdout  # capsys is not a terminal: no progress bar
    assert "[misa] step 2/4" in stdout
    assert "history.json" in stdout.splitlines()[-1]


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        train.main(["--help"])
    text = " ".join(capsys.readouterr().out.split()).split("options:", 1)[1]
    for option, default in (
        ("--lr", "0.003"),
        ("--max-steps", "300"),
        ("--model-size", "small"),
        ("--seq-len", "128"),
        ("--batch-size", "8"),
        ("--seed", "0"),
        ("--eval-every", "50"),
    ):
        segment = text.split(option + " ", 1)[1].split(" --", 1)[0]
        assert f"(default: {default})" in segment, (option, segment)
    assert "(default: None)" not in text


def test_compare_records_a_relative_command(tmp_path, small_text, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert (
        train.main(
            FAST
            + [
                "--data",
                str(small_text),
                "--compare",
                "misa,adamw",
                "--max-steps",
                "2",
                "--eval-every",
                "2",
                "--out",
                str(tmp_path / "cmp"),
            ]
        )
        == 0
    )
    meta = json.loads((tmp_path / "cmp" / "compare.json").read_text())["meta"]
    assert meta["command"].startswith("python -m misa.train ")
    assert str(tmp_path) not in meta["command"] and os.path.basename(str(small_text)) in meta["command"]
    assert meta["commit"] not in ("", "unknown")
