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
    ctx = mp.start_processes(dist_workers.worker, args=(WORLD, str(init_file), str(tmp_path), kind), nprocs=WORLD,
                             join=False, start_method="spawn")
    for _ in range(1200):  # bounded: 120 s
        if ctx.join(timeout=0.1):
            break
    else:
        for p in ctx.processes:
            p.kill()
        pytest.fail(f"{kind} workers did not finish in time")
    return [torch.load(os.path.join(tmp_path, f"report{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.fixture(scope="module")
def reference():
    return dist_workers.single_process_run()


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled")  # the single-process reload, on purpose
@pytest.mark.parametrize("kind", ["ddp", "fsdp2"])
def test_distributed_matches_single_process(kind, tmp_path, reference):
    reports = launch(kind, tmp_path)
    ref_params, ref_active = reference
    r0, r1 = reports
    # every rank: the same active set at every step, identical parameters
    assert r0["active_per_step"] == r1["active_per_step"]
    assert r0["switches"] >= 3
    for n in ref_params:
        assert torch.equal(r0["params"][n], r1["params"][n]), n
    # equal to one process on the concatenated batch, within float tolerance
    assert r0["active"] == ref_active
    for n, want in ref_params.items():
        torch.testing.assert_close(r0["params"][n], want, rtol=1e-5, atol=1e-6, msg=n)
    # frozen modules never held a gradient, on any rank
    assert r0["frozen_with_grad"] == [] and r1["frozen_with_grad"] == []
    # a checkpoint saved mid-period resumes exactly
    for r in reports:
        assert r["resumed_active"] == r["active"]
        for n in ref_params:
            assert torch.equal(r["resumed_params"][n], r["params"][n]), n
    # ranks that sample differently are caught
    assert any(r["mismatch_error"] and "disagree" in r["mismatch_error"] for r in reports)
    if kind == "ddp":
        assert r0["rebuilds"] == r0["switches"]  # one reducer per active set
    # the checkpoint is a torch.distributed.checkpoint: one process reads it back, resharded, and finishes
    params, active = dist_workers.single_process_run(checkpoint=str(tmp_path / "ckpt"), start=dist_workers.SAVE_AT)
    assert active == ref_active
    for n, want in ref_params.items():
        torch.testing.assert_close(params[n], want, rtol=1e-5, atol=1e-6, msg=n)
