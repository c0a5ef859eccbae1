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


class GraphRecorder:
    """One recorded step at a time: warmed up for WARM_STEPS eager steps under a key, recorded on the next,
    replayed after that while the key holds. `invalidate()` drops the recording (its memory goes back now).
    `capture`: how a step is recorded (tests on the CPU put a stand-in here)."""

    def __init__(self, capture: Callable[[Callable[[], None]], Callable[[], None]] = capture):
        self.capture = capture
        self.recordings = 0  # how many steps were recorded: each is a graph made again
        self._current: Optional[Dict] = None  # the recording under its key, and its warm-up count
        self._lrs: Optional[List[torch.Tensor]] = None

    def invalidate(self) -> None:
        self._current = None

    def lrs(self, param_groups, device) -> List[torch.Tensor]:
        """The groups' learning rates as device scalars (float64, exactly the groups' numbers), written before
        each step, so that a scheduler changes no recorded work, and the eager steps fold them alike."""
        if self._lrs is None:
            self._lrs = [torch.zeros((), dtype=torch.float64, device=device) for _ in param_groups]
        for t, group in zip(self._lrs, param_groups):
            t.fill_(float(group["lr"]))  # a launch with the number as its argument: no copy, no wait
        return self._lrs

    def run(self, key, grads: List[torch.Tensor], work: Callable[[List[torch.Tensor]], None]) -> bool:
        """Runs `work(recorded gradients)` from the recording under `key` (recording it first when due) and
        returns True, or returns False while warming up (the caller runs the step eagerly). The gradients of a
        replay are copied into the recorded ones when autograd gave new tensors."""
        rec = self._current
        if rec is None or rec["key"] != key:
            rec = self._current = {"key": key, "warm": 0, "replay": None, "grads": None}
        if rec["replay"] is None and rec["warm"] < WARM_STEPS:
            rec["warm"] += 1
            rec["grads"] = grads  # the last warm step's gradients become the recorded ones
            return False
        recorded = rec["grads"]
        stale = [(g, r) for g, r in zip(grads, recorded) if g is not r]
        if stale:
            torch._foreach_copy_([r for _, r in stale], [g for g, _ in stale])
        if rec["replay"] is None:
            rec["replay"] = self.capture(lambda: work(recorded))
            self.recordings += 1
        rec["replay"]()
        return True


class CudaGraphStep:
    """When a step may run from the recording (a part of MISA; the recording is MISA.graph, a GraphRecorder)."""

    def _graph_lrs(self) -> Optional[List[torch.Tensor]]:
        """With cuda_graph=True the learning rates are device scalars, in the eager steps as in the replays;
        None otherwise."""
        return self.graph.lrs(self.param_groups, self.device) if self.cuda_graph else None

    def _graph_step(self, plan, grads) -> bool:
        """Runs this step from the recorded graph (recording it first when due) and returns True, or returns
        False for an eager step (warm-up, a fresh step, clipped gradients)."""
        cached = self._cached_norms
        clipped = cached is not None and cached[0] == self.period.step_count
        if clipped or self._reduce_sq_norms is not None or plan.fresh:
            return False
        key = (id(plan), tuple((g["betas"], g["eps"], g["weight_decay"]) for g in self.param_groups))
        lrs = self._graph_lrs()
        if not self.graph.run(key, grads, lambda recorded: self._planned_device_work(plan, recorded, lrs)):
            return False
        self._planned_books(plan)
        return True
