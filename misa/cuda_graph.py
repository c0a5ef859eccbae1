"""MISA(cuda_graph=True): the steady step recorded once as a CUDA graph and replayed.

Between switches everything a step does on the device is the same work on the same tensors: the norms,
the non-finite flag, the fused calls of the plan (fused_step.py), the next step counts, the importance
statistic and the skip counters. After two eager steps with a plan (tables made, launch configs tuned,
constants folded) the third is recorded and replayed, and so is every later one until the plan changes.
What stays outside the graph, on the host: gathering the gradients (copied into the recorded ones when
autograd gave new tensors: `zero_grad(set_to_none=False)` avoids the copy), the learning rates (written
into one device scalar per group before each replay, so a scheduler does not invalidate the graph), the
step counters and period ends, and every switch, fresh step and flush, which run eagerly.

A recorded graph is made again when the plan changes (a switch, a load, the step after a fresh one) or a
group's betas, eps or weight decay change. A step with clipped gradients (clip_grad_norm_) runs eagerly.

A part of MISA (misa/optimizer.py composes the parts).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional

import torch

WARM_STEPS = 2  # eager steps with a new plan before it is recorded


def capture(body: Callable[[], None]) -> Callable[[], None]:
    """Records `body` as a CUDA graph (its kernels are recorded, not run) and returns the replay."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        body()
    return graph.replay


class CudaGraphStep:
    """The recorded steady step (a part of MISA)."""

    _capture = staticmethod(capture)  # tests on the CPU put a stand-in here

    def _init_graph(self) -> None:
        self._graph: Optional[Dict] = None  # the recording of the current plan, and its warm-up count
        self._lr_devices: Optional[List[torch.Tensor]] = None
        self._graph_recordings = 0

    def _invalidate_graph(self) -> None:
        """Drops the recorded step (a switch): its memory goes back now, and the next plan records anew."""
        self._graph = None

    def _graph_lrs(self) -> Optional[List[torch.Tensor]]:
        """With cuda_graph=True the learning rates are device scalars (float64, exactly the groups' numbers),
        in the eager steps as in the replays, so that both fold them alike; None otherwise."""
        if not self.cuda_graph:
            return None
        if self._lr_devices is None:
            self._lr_devices = [torch.zeros((), dtype=torch.float64, device=self.device) for _ in self.param_groups]
        for t, group in zip(self._lr_devices, self.param_groups):
            t.fill_(float(group["lr"]))  # a launch with the number as its argument: no copy, no wait
        return self._lr_devices

    def _graph_step(self, plan, grads) -> bool:
        """Runs this step from the recorded graph (recording it first when due) and returns True, or returns
        False for an eager step (warm-up, a fresh step, clipped gradients)."""
        cached = self._cached_norms
        clipped = cached is not None and cached[0] == self.period.step_count
        if clipped or self._reduce_sq_norms is not None or plan.fresh:
            return False
        key = (id(plan), tuple((g["betas"], g["eps"], g["weight_decay"]) for g in self.param_groups))
        rec: Optional[Dict] = self._graph
        if rec is None or rec["key"] != key:
            rec = self._graph = {"key": key, "warm": 0, "replay": None, "grads": None}
        if rec["replay"] is None and rec["warm"] < WARM_STEPS:
            rec["warm"] += 1
            rec["grads"] = grads  # the last warm step's gradients become the recorded ones
            return False
        recorded = rec["grads"]
        stale = [(g, r) for g, r in zip(grads, recorded) if g is not r]
        if stale:
            torch._foreach_copy_([r for _, r in stale], [g for g, _ in stale])
        lrs = self._graph_lrs()
        if rec["replay"] is None:
            rec["replay"] = self._capture(lambda: self._planned_device_work(plan, recorded, lrs))
            self._graph_recordings += 1
        rec["replay"]()
        self._planned_books(plan)
        return True
