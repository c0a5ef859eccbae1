"""`python -m misa.plan --fsdp N`: the planner's per-rank peak under FSDP2 (fake process group, fake tensors,
one process) against a real 2-rank gloo run of the same step on the CPU, the same meter on each rank."""

import os
from dataclasses import asdict

import pytest
import torch
import torch.multiprocessing as mp

from misa.jobs import plan as P

import plan_workers

pytestmark = pytest.mark.distributed
WORLD = 2


def measured(tmp_path, model, entry, setting):
    if not torch.distributed.is_available():
        pytest.skip("torch.distributed is not available")
    ctx = mp.start_processes(
        plan_workers.worker,
        args=(WORLD, str(tmp_path / "init"), str(tmp_path), model, entry, asdict(setting)),
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
        pytest.fail("the FSDP2 workers did not finish in time")
    return [torch.load(os.path.join(tmp_path, f"peak{r}.pt")) for r in range(WORLD)]


@pytest.mark.parametrize(
    "entry, checkpointing", [("misa+delta=0.25", False), ("misa+delta=0.25", True), ("lora", False), ("adamw", True)]
)
def test_the_planned_rank_peak_is_within_1_percent_of_a_real_2_rank_run(entry, checkpointing, tmp_path):
    setting = P.Setting(
        seq=64,
        batch=4,
        dtype="fp32",
        checkpointing=checkpointing,
        lora_r=8,
        gpu="none",
        worst_set="largest",
        fsdp=WORLD,
    )
    planned = P.plan_step(P.load_model("small"), P.parse_methods(entry)[0], setting)
    ranks = measured(tmp_path, "small", entry, setting)
    rank0 = ranks[0]["peak_bytes"]
    assert abs(planned.peak_bytes - rank0) <= 0.01 * rank0, (planned.peak_bytes, planned.parts, ranks[0])
    assert planned.fsdp == WORLD
    # rank 0 holds the largest shards: no rank peaks above it by more than the meter's 1%
    assert all(r["peak_bytes"] <= 1.01 * rank0 for r in ranks)


def test_sharding_lowers_the_rank_peak_by_the_sharded_states():
    setting = P.Setting(seq=32, batch=2, dtype="fp32", checkpointing=False, gpu="none", worst_set="largest")
    model, method = P.load_model("small"), P.parse_methods("adamw")[0]
    alone = P.plan_step(model, method, setting)
    sharded = P.plan_step(model, method, P.Setting(**{**asdict(setting), "fsdp": 4}))
    # AdamW's two states of every parameter are each rank's shard: a quarter of them
    assert sharded.parts["optimizer"] == pytest.approx(alone.parts["optimizer"] / 4, rel=0.02)
    assert sharded.peak_bytes < alone.peak_bytes
