"""Worker processes for tests/test_plan_fsdp.py: one rank of a real FSDP2 training step on the CPU (gloo), built
and sharded as the planner builds it, with real tensors, its peak taken by the same meter."""

import os

import torch
import torch.distributed as dist

from misa.jobs import plan as P
from misa.jobs import worst_set
from misa.memory import StepPeakMeter

WARM_STEPS = 2


def worker(rank, world, init_file, out_dir, model_name, entry, setting_fields):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from torch.distributed.device_mesh import init_device_mesh

    torch.manual_seed(rank)
    model_spec, method = P.load_model(model_name), P.parse_methods(entry)[0]
    setting = P.Setting(**setting_fields)
    model, loss_fn = P._build(model_spec, method, setting)
    P.shard(model, model_spec.n_layers, init_device_mesh("cpu", (world,)))
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)  # values do not change what a step holds; fresh memory must not be NaN
        for b in model.buffers():
            if b.is_floating_point():
                b.normal_(0, 0.02)
    model.train()
    opt = P._optimizer(model, method, setting, None)
    held = None
    if method.name == "misa":
        from misa import distributed

        distributed.prepare(opt)
        held = opt.hold()
        held.__enter__()
        opt.set_active(worst_set.largest_set(opt))  # the planner's set, held: no period ends
    gen = torch.Generator().manual_seed(100)
    vocab = model_spec.vocab_size

    def train_step():
        batch = torch.randint(0, vocab, (setting.batch, setting.seq + 1), generator=gen)
        loss_fn(batch).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(WARM_STEPS):
        train_step()
    meter = StepPeakMeter(model, opt, mode="track")
    worst_set.measure_steps(meter, train_step, 1)
    if held is not None:
        held.__exit__(None, None, None)
    torch.save({"peak_bytes": meter.peak_bytes, "parts": meter.peak_parts}, os.path.join(out_dir, f"peak{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
