"""The main job's CLI: options, outputs, exact resume, and bad input (exit code 2, nothing written)."""

import json
import subprocess
import sys

import pytest
import torch

from misa.jobs import train

FAST = ["--model-size", "tiny", "--seq-len", "32", "--batch-size", "2", "--eval-batches", "2", "--no-progress"]


def run(argv):
    return train.main(argv)


@pytest.mark.parametrize("optimizer", ["misa", "lisa", "badam", "adamw"])
def test_each_optimizer_trains_and_writes_outputs(tmp_path, optimizer, capsys):
    out = tmp_path / "run"
    assert (
        run(
            FAST
            + [
                "--optimizer",
                optimizer,
                "--max-steps",
                "4",
                "--eval-every",
                "2",
                "--out",
                str(out),
                "--delta",
                "0.3",
                "--interval",
                "2",
            ]
        )
        == 0
    )
    summary = json.loads((out / "summary.json").read_text())
    assert summary["optimizer"] == optimizer and summary["steps"] == 4
    assert summary["final_val_perplexity"] > 1 and summary["tokens_per_s"] > 0
    assert (out / "loss.png").stat().st_size > 1000 and (out / "checkpoint.pt").exists()
    assert "final train loss" in capsys.readouterr().out


def test_resume_reproduces_the_uninterrupted_run(tmp_path):
    common = FAST + ["--max-steps", "8", "--save-every", "3", "--interval", "2", "--eval-every", "4"]
    assert run(common + ["--out", str(tmp_path / "a")]) == 0
    assert (
        run(
            FAST
            + [
                "--max-steps",
                "5",
                "--save-every",
                "3",
                "--interval",
                "2",
                "--eval-every",
                "4",
                "--out",
                str(tmp_path / "b"),
            ]
        )
        == 0
    )  # stops mid-period (5 = 2 + 2 + 1)
    assert run(["--resume", str(tmp_path / "b"), "--max-steps", "8", "--no-progress"]) == 0
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)
    assert a["history"]["train_loss"] == b["history"]["train_loss"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["optimizer"]["misa"]["active"] == b["optimizer"]["misa"]["active"]


def _run_files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def test_a_run_killed_after_its_last_checkpoint_is_finished_by_resume(tmp_path, capsys):
    out = tmp_path / "r"
    argv = FAST + ["--max-steps", "6", "--save-every", "2", "--interval", "2", "--eval-every", "3", "--out", str(out)]
    assert run(argv) == 0
    summary, history = (json.loads((out / n).read_text()) for n in ("summary.json", "history.json"))
    for name in train.OUTPUTS:  # killed after the step-6 checkpoint, before its outputs
        (out / name).unlink()
    assert run(argv + ["--resume", str(out)]) == 0  # the same command plus --resume, as a requeue loop runs it
    again = json.loads((out / "summary.json").read_text())
    assert json.loads((out / "history.json").read_text()) == history and (out / "loss.png").is_file()
    # every number the run measured is the one it had measured (the process's own RSS aside)
    assert {k: v for k, v in again.items() if k != "peak_rss_mb"} == {
        k: v for k, v in summary.items() if k != "peak_rss_mb"
    }
    capsys.readouterr()
    # resumed again, the run is done: one line, exit 0, nothing changed
    before = _run_files(out)
    assert run(argv + ["--resume", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "nothing to do" in printed and len(printed.strip().splitlines()) == 1
    assert _run_files(out) == before


def test_a_run_killed_midway_resumes_with_the_numbers_it_had_measured(tmp_path):
    out = tmp_path / "r"
    common = FAST + ["--save-every", "2", "--interval", "2", "--eval-every", "3"]
    assert run(common + ["--max-steps", "4", "--out", str(out)]) == 0
    steps_then = torch.load(out / "checkpoint.pt", weights_only=False)["measured"]
    assert steps_then["trained_steps"] == 4 and len(steps_then["step_peaks"]) >= 2
    assert run(["--resume", str(out), "--max-steps", "8", "--no-progress"]) == 0
    now = torch.load(out / "checkpoint.pt", weights_only=False)["measured"]
    assert now["trained_steps"] == 8 and now["step_peaks"][: len(steps_then["step_peaks"])] == steps_then["step_peaks"]
    assert now["step_seconds"][: len(steps_then["step_seconds"])] == steps_then["step_seconds"]


def test_compare_writes_table_and_plot(tmp_path):
    out = tmp_path / "cmp"
    assert (
        run(
            FAST
            + [
                "--compare",
                "misa,lisa",
                "--seeds",
                "2",
                "--max-steps",
                "3",
                "--eval-every",
                "3",
                "--delta",
                "0.3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    data = json.loads((out / "compare.json").read_text())
    assert [r["optimizer"] for r in data["rows"]] == ["misa", "lisa"] and data["rows"][0]["seeds"] == 2
    assert "| misa |" in (out / "compare.md").read_text()
    assert (out / "compare.png").stat().st_size > 1000


def test_custom_data_folder_and_config(tmp_path):
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("hello world " * 300)
    (folder / "b.txt").write_text("misa samples modules " * 300)
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"hidden_size": 32, "intermediate_size": 64, "num_layers": 1, "num_heads": 2}))
    out = tmp_path / "run"
    assert (
        run(
            FAST
            + ["--data", str(folder), "--config", str(cfg), "--max-steps", "2", "--out", str(out), "--delta", "0.5"]
        )
        == 0
    )
    assert json.loads((out / "summary.json").read_text())["params"] < 30_000


@pytest.mark.parametrize(
    "argv,text",
    [
        (["--data", "/does/not/exist"], "does not exist"),
        (["--optimizer", "sgd"], "invalid choice"),
        (["--compare", "misa,sgd"], "unknown optimizer"),
        (["--delta", "1.5"], "--delta"),
        (["--resume", "/does/not/exist"], "--resume"),
        (["--seq-len", "4096"], "longer than"),
    ],
    ids=["missing-data", "unknown-optimizer", "unknown-in-compare", "bad-delta", "missing-resume", "seq-too-long"],
)
def test_bad_input_exits_2_and_writes_nothing(tmp_path, capsys, argv, text):
    small = tmp_path / "small.txt"
    small.write_text("x" * 3000)
    out = tmp_path / "never"
    extra = ["--data", str(small)] if "--data" not in argv else []
    try:
        code = run(FAST + extra + argv + ["--out", str(out)])
    except SystemExit as exc:  # argparse's own errors
        code = exc.code
    assert code == 2
    assert text in capsys.readouterr().err
    assert not out.exists()


def test_module_entry_point_runs(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "misa.train"] + FAST + ["--max-steps", "2", "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "val perplexity" in result.stdout
    # The job chose to freeze the norms: its header says so in words, and no library warning opens the run.
    assert "frozen for the whole run: norms (5 tensors)" in result.stdout.splitlines()[0]
    assert "Warning" not in result.stderr, result.stderr
