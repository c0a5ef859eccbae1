"""Each term of misa/jobs/device_model.py against what bench_gpu_terms.py measured on a GPU (the committed
results file), and the parts that need no GPU on their own."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from misa.jobs import device_model as dm

MEASURED = Path(__file__).resolve().parents[1] / "benchmarks" / "results" / "nvidia-h200-2026-12-04.json"


def _rows(term):
    rows = [r for r in json.loads(MEASURED.read_text())["rows"] if r.get("bench") == "gpu_terms" and r["term"] == term]
    assert rows, f"{MEASURED.name} holds no {term} rows"
    return rows


def test_the_allocator_rounding_is_what_the_h200_handed_out():
    for r in _rows("allocator_rounding"):
        assert dm.allocator_bytes(r["request_bytes"]) == r["allocated_bytes"], r
    assert dm.allocator_bytes(0) == 0
    with pytest.raises(ValueError, match="nbytes"):
        dm.allocator_bytes(-1)


def test_a_training_step_holds_forwards_and_backwards_workspace():
    (r,) = _rows("cublas_workspace")
    hopper = dm.cublas_workspace_bytes((9, 0), config="")
    assert r["forward_bytes"] == hopper and r["backward_bytes"] == hopper
    assert dm.training_step_workspace_bytes((9, 0), config="") == r["forward_bytes"] + r["backward_bytes"]


def test_the_workspace_follows_cublas_workspace_config_and_names_a_bad_one():
    assert dm.cublas_workspace_bytes((8, 9), config=":4096:8") == 32 * 2**20
    assert dm.cublas_workspace_bytes((9, 0), config=":4096:2:16:8") == 8 * 2**20 + 128 * 1024
    assert dm.cublas_workspace_bytes((8, 9), config="") == 8 * 2**20 + 128 * 1024  # torch's pre-Hopper default
    for bad in ("4096:8", ":4096", ":a:8"):
        with pytest.raises(ValueError, match="CUBLAS_WORKSPACE_CONFIG"):
            dm.cublas_workspace_bytes((9, 0), config=bad)


def test_attention_saves_what_the_h200_saved_and_the_cpu_kernel_saves_all_but_the_seed():
    for r in _rows("sdpa"):
        assert r["kernel"].startswith("ScaledDotProductCudnnAttention"), r
        want = dm.sdpa_saved_bytes(1, 32, r["seq_len"], 128, torch.bfloat16)
        if r["case"] == "repeated_kv":  # the repeated keys and values are new tensors the kernel saves
            want += 2 * 32 * r["seq_len"] * 128 * 2
        assert r["saved_beyond_inputs_bytes"] == want, r
    # the planner's CPU kernel, the same bench function on small shapes: everything but the GPU's 16 B
    import sys

    sys.path.insert(0, str(MEASURED.parents[1]))
    from bench_gpu_terms import _saved_bytes

    q = torch.randn(1, 4, 64, 32, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, 2, 64, 32, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, 2, 64, 32, dtype=torch.bfloat16, requires_grad=True)
    saved, _, _ = _saved_bytes(
        lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True), (q, k, v)
    )
    assert saved == dm.sdpa_saved_bytes(1, 4, 64, 32, torch.bfloat16) - dm.SDPA_CUDNN_EXTRA_BYTES


def test_our_steps_scratch_is_what_the_h200_measured():
    rows = {r["backend"]: r for r in _rows("misa_step_scratch")}
    first, *steady = rows["cuda"]["scratch_bytes_per_step"]
    assert first == dm.STEP_SCRATCH_BYTES["cuda_first"] and set(steady) == {dm.STEP_SCRATCH_BYTES["cuda"]}
    pytest.importorskip("triton")
    tuner = dm.triton_tuner_scratch_bytes([torch.float32] * 4)  # fp32 parameter, gradient and two states
    first = rows["triton"]["scratch_bytes_per_step"][0]
    assert tuner <= first < tuner + 64 * 1024  # the rest: the chunk table and the kernels' own buffers
