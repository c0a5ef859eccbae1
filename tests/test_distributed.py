"""MISA under DDP and FSDP2 with real process groups: 2 processes, gloo on loopback (a shared file)."""

import os

import pytest
import torch
import torch.multiprocessing as mp

import dist_workers

pytestmark = pytest.mark.distributed
WORLD = 2


def launch(kind, tmp_path):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    init_file = tmp_path / "init"
    ctx = mp.start_processes(
        dist_workers.worker,
        args=(WORLD, str(init_file), str(tmp_path), kind),
        nprocs=WORLD,
        join=False,
        start_method="spawn",
    )
    for _ in range(1200):  # bounded: 120 s
        if ctx.join(timeout=0.1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail(f"{kind} workers did not finish in time")
    return [torch.load(os.path.join(tmp_path, f"report{r}.pt"), weights_only=False) for r in range(WORLD)]


def close_to(got, want, dtype):
    if dtype == torch.float32:
        for n, w in want.items():
            torch.testing.assert_close(got[n], w, rtol=1e-5, atol=1e-6, msg=n)
        return
    # bf16: each rank's forward and backward run in bf16 on half the batch, so per-element agreement with
    # one process is not expected; the model as a whole must agree closely (exactness is checked by resume).
    diff = sum(float((got[n].double() - w.double()).square().sum()) for n, w in want.items()) ** 0.5
    norm = sum(float(w.double().square().sum()) for w in want.values()) ** 0.5
    assert diff / norm < 2e-2


@pytest.fixture(scope="module")
def references():
    return {}


def _reference(references, kind):
    key = kind.split("-", 1)[1] if "-" in kind else "fp32"  # the same for ddp-... and fsdp2-...
    if key not in references:
        references[key] = dist_workers.single_process_run(kind=kind)
    return references[key]


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the single-process reload, on purpose
@pytest.mark.parametrize("kind", ["ddp", "fsdp2", "ddp-bf16", "fsdp2-bf16", "ddp-bf16-8bit", "fsdp2-bf16-8bit"])
def test_distributed_matches_single_process(kind, tmp_path, references):
    dtype = dist_workers._dtype(kind)
    reports = launch(kind, tmp_path)
    ref_params, ref_active = _reference(references, kind)
    r0, r1 = reports
    # every rank: the same active set at every step, identical parameters
    assert r0["active_per_step"] == r1["active_per_step"]
    assert r0["switches"] >= 3
    for n in ref_params:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    # equal to one process on the concatenated batch, within float tolerance
    assert r0["active"] == ref_active
    close_to(r0["params"], ref_params, dtype)
    compact = dist_workers._compact(kind)
    assert r0["has_masters"] == (dtype == torch.bfloat16 and not compact)
    assert r0["has_8bit"] == r0["has_compensation"] == compact
    # frozen modules never held a gradient, on any rank
    assert r0["frozen_with_grad"] == [] and r1["frozen_with_grad"] == []
    # a checkpoint saved mid-period resumes exactly (8-bit states of FSDP2 shards: up to one requantization)
    for r in reports:
        assert r["resumed_active"] == r["active"]
        if compact and kind.startswith("fsdp2"):
            close_to(r["resumed_params"], r["params"], dtype)
            continue
        for n in ref_params:
            assert torch.equal(r["resumed_params"][n], r["params"][n]), n
    # ranks that sample differently are caught
    assert any(r["mismatch_error"] and "disagree" in r["mismatch_error"] for r in reports)
    if kind.startswith("ddp"):
        assert r0["rebuilds"] == r0["switches"]  # one reducer per active set
    # the checkpoint is a torch.distributed.checkpoint: one process reads it back, resharded, and finishes
    params, active = dist_workers.single_process_run(
        checkpoint=str(tmp_path / "ckpt"), start=dist_workers.SAVE_AT, kind=kind
    )
    assert active == ref_active
    close_to(params, ref_params, dtype)
