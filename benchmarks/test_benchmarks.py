"""The benchmark suite in quick mode, so the scripts never rot (CPU numbers here are not claims), and a
pytest-benchmark run of the kernel ops on small CPU tensors (`pytest benchmarks/`)."""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import misa_kernels as mk  # noqa: E402


def test_bench_kernels_quick(tmp_path):
    import bench_kernels
    import render_readme

    path = bench_kernels.main(["--quick", "--out", str(tmp_path)])
    data = json.loads(path.read_text())
    assert render_readme.check(path) == []
    impls = {(r["bench"], r["impl"]) for r in data["rows"]}
    assert ("adamw_step", "torch_reference") in impls and ("adamw_step", "torch_fused_adamw") in impls
    eight = [r for r in data["rows"] if r.get("states") == "8bit"]
    assert eight and all(r["state_dtype"] == "8bit" for r in eight)
    # the torch path's steady step: codes r/w 4 B, scales 16/256 B, p r/w 8, g 4, and its separate norm pass 4
    steady = next(r for r in eight if not r["fresh"] and r["impl"] == "torch_reference")
    assert steady["bytes"] == pytest.approx(steady["numel"] * (8 + 4 + 4 + 16 / 256 + 4))
    assert all(r["ms_p50"] > 0 and r["bytes"] > 0 for r in data["rows"])
    assert data["copy_bandwidth_gbps"] > 0 and data["commit"]


def test_bench_host_quick(tmp_path, monkeypatch):
    import bench_host
    import render_readme

    data = json.loads(bench_host.main(["--cases", "8", "--calls", "64", "--out", str(tmp_path)]).read_text())
    impls = {r["impl"]: r for r in data["rows"]}
    assert {"cuda", "triton", "torch_fused_adamw"} <= set(impls)
    assert all(r["us_per_call"] > 0 for r in data["rows"])
    assert impls["cuda"]["launch"] == ("real" if torch.cuda.is_available() else "stubbed")
    monkeypatch.setattr(render_readme, "RESULTS", tmp_path)
    assert "| cuda" in render_readme.host_section()


def test_bench_arena_quick(tmp_path):
    import bench_arena

    data = json.loads(bench_arena.main(["--quick", "--out", str(tmp_path)]).read_text())
    assert {r["impl"] for r in data["rows"]} == {"arena", "allocate_per_switch"}


def test_bench_train_step_quick(tmp_path):
    pytest.importorskip("transformers")
    import bench_train_step

    path = bench_train_step.main(
        [
            "--quick",
            "--methods",
            "misa_kernels,adamw_fused,badam,misa_8bit_kahan_release",
            "--no-checkpointing-runs",
            "--out",
            str(tmp_path),
        ]
    )
    rows = json.loads(path.read_text())["rows"]
    assert {r["impl"] for r in rows} == {"misa_kernels", "adamw_fused", "badam", "misa_8bit_kahan_release"}
    assert all(r["ms_p50"] > 0 for r in rows)
    compact = next(r for r in rows if r["impl"] == "misa_8bit_kahan_release")
    assert compact["release_grads"] and compact["formats"]["states"] == "8bit"
    assert compact["arena_bytes"] < next(r for r in rows if r["impl"] == "misa_kernels")["arena_bytes"]


def test_plan_vs_measured_reads_every_8b_row_of_a_train_step_file(tmp_path):
    import plan_vs_measured
    import render_readme

    rows = [
        {
            "bench": "train_step",
            "impl": impl,
            "model": "8b",
            "seq_len": seq,
            "batch": 1,
            "grad_checkpointing": True,
            "oom": False,
            "peak_allocated_gb": 20.0,
        }
        for impl in plan_vs_measured.METHODS
        for seq in (512, 2048)
    ]
    rows += [
        {
            "bench": "train_step",
            "impl": "misa_kernels",
            "model": "1b",
            "seq_len": 512,
            "batch": 1,
            "grad_checkpointing": True,
            "oom": False,
            "peak_allocated_gb": 5.0,
        },
        {
            "bench": "train_step",
            "impl": "lora_r16",
            "model": "8b",
            "seq_len": 4096,
            "grad_checkpointing": True,
            "oom": True,
        },
    ]
    path = tmp_path / "gpu.json"
    path.write_text(json.dumps({"device": "NVIDIA H200", "rows": rows}))
    peaks = plan_vs_measured.train_step_peaks(path)
    assert len(peaks) == 2 * len(plan_vs_measured.METHODS)  # not the 1B row, not the OOM
    assert {p[0] for p in peaks} == set(plan_vs_measured.METHODS.values())
    assert all(p[3] == 20.0 * 2**30 and "H200" in p[4] for p in peaks)
    empty = tmp_path / "none.json"
    empty.write_text(json.dumps({"device": "cpu", "rows": []}))
    assert plan_vs_measured.main(["--measured", str(empty)]) == 2
    assert "stochastic" in render_readme.FORMAT_NAMES[("8bit", "none")]


@pytest.mark.distributed
def test_bench_ddp_rebuild_quick(tmp_path):
    import bench_ddp_rebuild

    rows = json.loads(bench_ddp_rebuild.main(["--quick", "--steps", "4", "--out", str(tmp_path)]).read_text())["rows"]
    assert {r["impl"] for r in rows} == {"misa_rebuild", "ddp_find_unused_full_model"}


def test_render_readme_sections(tmp_path):
    import render_readme

    readme = tmp_path / "README.md"
    readme.write_text(
        "x\n<!-- results:compare:begin -->\nSTALE-TEXT\n<!-- results:compare:end -->\ny\n"
        "<!-- results:kernels:begin -->\n<!-- results:kernels:end -->\n"
        "<!-- results:finetune:begin -->\n<!-- results:finetune:end -->\n"
    )
    render_readme.render(readme)
    text = readme.read_text()
    assert "STALE-TEXT" not in text and text.startswith("x\n") and "results:kernels:end" in text
    if list(render_readme.RESULTS.glob("*/finetune.json")):
        assert "When to choose what" in text and "| lora |" in text
    assert "results:ddp" not in text  # a section without markers is left out, not an error


@pytest.mark.parametrize("fresh", [False, True], ids=["steady", "fresh"])
def test_adamw_step_torch_cpu(benchmark, fresh):
    shapes = [(256, 256)] * 8
    p = [torch.randn(s) for s in shapes]
    g = [torch.randn(s) for s in shapes]
    m = [torch.randn(s) for s in shapes]
    v = [torch.rand(s) for s in shapes]
    norms = torch.zeros(len(shapes))
    benchmark(
        lambda: mk.adamw_step_(
            p, g, m, v, lr=1e-3, step=1 if fresh else 5, fresh=fresh, grad_sq_norms=norms, backend="torch"
        )
    )


def test_grad_sq_norms_torch_cpu(benchmark):
    g = [torch.randn(256, 256) for _ in range(8)]
    benchmark(lambda: mk.grad_sq_norms(g, backend="torch"))


def test_gpu_check_default_stages_fit_one_ten_minute_call():
    """The device tool gives a command 10 minutes: the build and the default stages' time limits add up
    to less (a command sent to the background, the CPU-only planner, runs beside them), and every test file
    the tests stage names exists."""
    import re

    script = (Path(__file__).parent / "gpu_check.sh").read_text()
    default = re.search(r'STAGES=",\$\{STAGES:-([a-z0-9,]+)\},"', script).group(1).split(",")
    limits = {"build": int(re.search(r"timeout (\d+) python -m pip install", script).group(1))}
    for stage in default:
        bodies = re.findall(r"want %s; then(.*?)\n  fi" % stage, script, re.S)
        limits[stage] = sum(
            int(t)
            for body in bodies
            for line in body.splitlines()
            if not line.rstrip().endswith("&")
            for t in re.findall(r"timeout (\d+)", line)
        )
    assert all(limits.values()) and sum(limits.values()) <= 570, limits
    named = re.findall(r"tests/(test_\w+\.py)", script)
    assert named and all((Path(__file__).parents[1] / "tests" / n).is_file() for n in named)


def test_step_digest_is_reproducible():
    """The digest that compares two trees' steps: the same tree gives the same digest, and the clipped and
    unclipped runs differ (it hashes what the steps computed)."""
    import step_digest

    if "triton" not in mk.available_backends("cpu"):
        pytest.skip("triton cannot run on the CPU here (TRITON_INTERPRET=1 before triton is imported)")
    root = str(Path(__file__).resolve().parents[1])
    first, again = step_digest.digest(root, clip=True), step_digest.digest(root, clip=True)
    assert first == again and set(first) == {"misa", "triton", "torch"}
    assert step_digest.digest(root, clip=False)["torch"] != first["torch"]
