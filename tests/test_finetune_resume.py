"""Long jobs that always finish: a fine-tuning comparison killed during a grid run or a seed run (and by a
real SIGKILL at random moments) and resumed writes what the uninterrupted comparison writes; a resume with
other settings is refused by name; two first runs build one base."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from misa.integrations.lora import peft_available
from misa.jobs import finetune, pretrained, train

from cli_checks import assert_refused, snapshot

pytestmark = pytest.mark.skipif(not peft_available(), reason="the comparison includes LoRA: needs peft")

ARGV = [
    "--model-size",
    "tiny",
    "--seq-len",
    "32",
    "--batch-size",
    "2",
    "--eval-batches",
    "2",
    "--max-steps",
    "6",
    "--eval-every",
    "3",
    "--base-steps",
    "3",
    "--no-progress",
    "--methods",
    "lora,misa",
    "--lr-grid",
    "1e-3,3e-3",
    "--grid-extensions",
    "0",
    "--seeds",
    "2",
    "--save-every",
    "2",
    "--interval",
    "2",
]
# Wall-clock measurements differ between any two runs, interrupted or not; a resumed run also meters the
# first steps after its restart once more. Every other number must be the same.
VOLATILE = {"date", "step_ms", "tokens_per_s", "metered_steps"}


def stable(obj):
    if isinstance(obj, dict):
        # which of two runs made the cached base and which found it is no result
        return {
            k: (v.replace(" (made now)", "").replace(" (cached)", "") if k == "base" else stable(v))
            for k, v in obj.items()
            if k not in VOLATILE
        }
    if isinstance(obj, list):
        return [stable(v) for v in obj]
    return obj


def differences(a, b, path="") -> list:
    """The paths at which two JSON values differ (a readable failure)."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b)) for d in differences(a.get(k), b.get(k), f"{path}.{k}")]
    if path.endswith("step_peak_parts") and a != b:
        return [f"{path}: {a} != {b}"]
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{path}[{i}]")]
    return [] if a == b else [f"{path}: {a!r} != {b!r}"[:300]]


def outputs(out: Path):
    data = json.loads((out / "finetune.json").read_text())
    table = finetune.table(data["rows"], {"old": data["meta"]["base_loss_old"]})
    return stable(data), table.count("\n")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    root = tmp_path_factory.mktemp("uninterrupted")
    cache = root / "cache"
    assert finetune.main(ARGV + ["--cache-dir", str(cache), "--out", str(root / "out")]) == 0
    return root / "out", cache


class Killed(BaseException):
    """Stands for the process dying: not an Exception, so nothing on the way up handles it."""


@pytest.mark.parametrize("kill_at", [10, 33], ids=["during-a-grid-run", "during-a-seed-run"])
def test_a_comparison_killed_and_resumed_writes_what_the_uninterrupted_one_writes(
    tmp_path, monkeypatch, uninterrupted, kill_at
):
    # steps 1-12 are LoRA's grid (two rates, 6 steps each), 13-18 its second seed, 19-30 MISA's grid, 31-36 its
    # second seed: step 10 is the fourth step of a grid run, step 33 the third of a seed run
    reference, cache = uninterrupted
    out = tmp_path / "out"
    real, calls = train.train_step, [0]

    def dying(*args, **kwargs):
        calls[0] += 1
        if calls[0] == kill_at:
            raise Killed()
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", dying)
    monkeypatch.setattr(finetune, "peak_at", lambda *a, **k: pytest.fail("no equal-memory rows here"))
    argv = ARGV + ["--cache-dir", str(cache), "--out", str(out)]
    with pytest.raises(Killed):
        finetune.main(argv)
    assert not (out / "finetune.json").exists()
    monkeypatch.setattr(train, "train_step", real)
    resumed_steps = [0]

    def counting(*args, **kwargs):
        resumed_steps[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", counting)
    assert finetune.main(argv + ["--resume", str(out)]) == 0
    # finished runs were read back, the interrupted one went on from its step-8 (or step-2) checkpoint
    assert resumed_steps[0] == 36 - (kill_at - 1) + (kill_at - 1) % 6 % 2
    assert differences(outputs(out), outputs(reference)) == []


def test_a_resume_with_other_settings_is_refused_by_name(tmp_path, capsys, uninterrupted):
    reference, cache = uninterrupted
    for extra, name in (
        (["--max-steps", "7"], "--max-steps"),
        (["--methods", "lora"], "--methods"),
        (["--lora-r", "4"], "--lora-r"),
    ):
        assert_refused(
            finetune.main,
            capsys,
            ARGV + ["--cache-dir", str(cache), "--resume", str(reference)] + extra,
            name,
            reference,
        )
    assert_refused(finetune.main, capsys, ARGV + ["--resume", str(tmp_path)], "--resume", tmp_path)


def test_resuming_a_finished_comparison_changes_nothing(uninterrupted, capsys):
    reference, cache = uninterrupted
    capsys.readouterr()
    before = snapshot(reference)
    assert finetune.main(ARGV + ["--cache-dir", str(cache), "--resume", str(reference)]) == 0
    printed = capsys.readouterr().out
    assert "nothing to do" in printed and len(printed.strip().splitlines()) == 1
    assert snapshot(reference) == before


def _command(out: Path, cache: Path):
    return [sys.executable, "-m", "misa.finetune"] + ARGV + ["--cache-dir", str(cache), "--out", str(out)]


def test_a_real_sigkill_twice_at_random_moments_then_resume(tmp_path, uninterrupted):
    reference, cache = uninterrupted
    out = tmp_path / "out"
    rng = random.Random(int(os.environ.get("MISA_KILL_SEED", "0")))
    env = dict(os.environ, PYTHONPATH=str(Path(train.__file__).resolve().parents[1]))
    killed_at = []
    for attempt in range(2):
        argv = _command(out, cache) + (["--resume", str(out)] if attempt else [])
        proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        # after the imports (a few seconds), somewhere inside the comparison
        time.sleep(rng.uniform(4.0, 12.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            killed_at.append(time.monotonic())
        proc.wait()
    done = subprocess.run(_command(out, cache) + ["--resume", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert differences(outputs(out), outputs(reference)) == [], f"killed {len(killed_at)} time(s)"


def test_two_first_runs_build_one_base(tmp_path):
    args = finetune.build_parser().parse_args(ARGV + ["--cache-dir", str(tmp_path / "cache")])
    corpus = finetune.load_corpus(None)
    old = finetune.TokenDataset(finetune.tokenize(corpus), args.seq_len)
    built, results = [], []
    real = pretrained._pretrain

    def counted(*a, **k):
        built.append(1)
        time.sleep(0.5)  # the second caller arrives while the first one trains
        return real(*a, **k)

    pretrained._pretrain = counted
    try:
        threads = [
            threading.Thread(
                target=lambda: results.append(
                    pretrained.pretrained_base(args, old, corpus, __import__("torch").device("cpu"))
                )
            )
            for _ in range(2)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        pretrained._pretrain = real
    assert len(built) == 1 and len(results) == 2
    assert results[0][0] == results[1][0] and sorted(r[1] for r in results) == [False, True]
    assert [p.name for p in (tmp_path / "cache" / "bases").iterdir() if not p.name.startswith(".")] == [
        results[0][0].name
    ]
