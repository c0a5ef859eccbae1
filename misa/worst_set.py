"""The active set that makes a training step hold the most, among those a MISA budget allows.

A MISA step's memory depends on which modules are active: a trainable linear layer saves its input for
its weight's gradient (modules that read one tensor, such as q/k/v or gate/up, share it), a frozen one
saves nothing, every active module holds its gradient, and backward runs down to the lowest active module,
so every layer above it saves what its nonlinearities need. Sizing MISA to a memory limit (the equal-peak
comparison, the planner) must therefore plan for the worst set its budget allows, not one lucky draw.

`candidate_sets` builds the sets that hold the most by construction: the lowest module that fits (the
longest backward), then modules added greedily by the bytes they bring per parameter of budget (gradient
plus an input not yet saved), by size (the most gradient bytes), in forward order (whole blocks from the
bottom: what a checkpointed block recomputes), from the top (the top block is recomputed first, while the
gradient of the logits is still alive: the worst with checkpointing on the small model), and a few random
fills. `worst_case_peak` measures each with
the step-peak meter and keeps the largest: the measurement, not the heuristic, is the answer.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .memory import StepPeakMeter

RANDOM_FILLS = 3  # budget-filling random sets beside the constructed ones: what a draw may hold that they miss


@dataclass
class ModuleInput:
    order: int  # position in the forward pass (0: the first module to run)
    storage: int  # identity of its input's storage: modules that read one tensor share it
    nbytes: int


def module_inputs(model: nn.Module, opt, forward: Callable[[], object]) -> Dict[int, ModuleInput]:
    """{module index: its input} for every MISA module of `opt`, seen in one forward pass (`forward()`,
    under no_grad): where it runs and which tensor it reads."""
    owners = {}
    for b, m in enumerate(opt.partition.modules):
        name = m.params[0][0].rsplit(".", 1)[0]
        owners[b] = model.get_submodule(name) if name else model
    seen: Dict[int, ModuleInput] = {}
    held = []  # keeps each input alive through the pass, so no storage identity is reused

    def hook(b):
        def pre(_module, args, kwargs=None):
            x = next((a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)), None)
            if x is not None and b not in seen:
                held.append(x)
                seen[b] = ModuleInput(order=len(seen), storage=x.untyped_storage()._cdata,
                                      nbytes=x.numel() * x.element_size())
        return pre

    handles = [owners[b].register_forward_pre_hook(hook(b), with_kwargs=True) for b in owners]
    try:
        with torch.no_grad():
            forward()
    finally:
        for h in handles:
            h.remove()
        held.clear()
    return seen


def candidate_sets(opt, inputs: Dict[int, ModuleInput], grad_bytes_per_element: int) -> List[List[int]]:
    """The sets, within `opt`'s budget, that hold the most by construction (see the module doc)."""
    sizes = opt.sampler.sizes
    budget = opt.budget
    order = sorted(range(len(sizes)), key=lambda b: inputs[b].order if b in inputs else len(sizes) + b)
    anchor = next((b for b in order if sizes[b] <= budget), None)
    if anchor is None:
        return []

    def fill(score) -> List[int]:
        chosen, used, saved = [anchor], sizes[anchor], {inputs[anchor].storage} if anchor in inputs else set()
        while True:
            room = [b for b in range(len(sizes)) if b not in chosen and used + sizes[b] <= budget]
            if not room:
                return sorted(chosen)
            best = max(room, key=lambda b: (score(b, saved), -b))
            chosen.append(best)
            used += sizes[best]
            if best in inputs:
                saved.add(inputs[best].storage)

    def per_param(b, saved):
        new_input = inputs[b].nbytes if b in inputs and inputs[b].storage not in saved else 0
        return (sizes[b] * grad_bytes_per_element + new_input) / sizes[b]

    def by_size(b, saved):
        return sizes[b]

    def in_forward_order(b, saved):  # whole blocks from the bottom: the most a checkpointed block recomputes
        return -order.index(b)

    def from_the_top(b, saved):  # whole blocks from the top: recomputed first, while the loss's gradients live
        return order.index(b)

    rng = torch.Generator().manual_seed(0)
    draws = [torch.randperm(len(sizes), generator=rng).tolist() for _ in range(RANDOM_FILLS)]
    out = []
    for s in [fill(per_param), fill(by_size), fill(in_forward_order), fill(from_the_top)] + [
            fill(lambda b, saved, rank=d: -rank.index(b)) for d in draws]:
        if s not in out:
            out.append(s)
    return out


def measure_steps(meter: StepPeakMeter, train_step: Callable[[], None], steps: int,
                  before_step: Optional[Callable[[], None]] = None) -> int:
    """The largest peak of `steps` metered training steps (`before_step()` runs before each, unmetered)."""
    start = len(meter.steps)
    for _ in range(steps):
        if before_step is not None:
            before_step()
        with meter.step():
            train_step()
    return max(s.peak_bytes for s in meter.steps[start:])


def worst_case_peak(model: nn.Module, opt, train_step: Callable[[], None], forward: Callable[[], object],
                    *, steps: int = 2, sets: Optional[Sequence[Sequence[int]]] = None,
                    grad_bytes_per_element: Optional[int] = None) -> Tuple[int, Dict[str, int], List[int]]:
    """(peak bytes, its parts by kind, the set) of the worst of the candidate sets (or of `sets`), each
    measured over `steps` steps with the set forced before every step (a switch at a period's end is part
    of a step; the next step starts from the chosen set again). Trains `model` and `opt`: pass throwaway
    copies."""
    if sets is None:
        if grad_bytes_per_element is None:
            grad_bytes_per_element = next(iter(model.parameters())).element_size()
        sets = candidate_sets(opt, module_inputs(model, opt, forward), grad_bytes_per_element)
    worst = (-1, {}, [])
    for chosen in sets:
        meter = StepPeakMeter(model, opt)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # short planned periods warn about what a real run would not do
            peak = measure_steps(meter, train_step, steps, before_step=lambda c=chosen: opt.set_active(c))
        if peak > worst[0]:
            worst = (peak, meter.peak_parts, list(chosen))
    return worst
