"""The active set that makes a training step hold the most, among those a MISA budget allows.

A MISA step's memory depends on which modules are active: a trainable linear layer saves its input for
its weight's gradient (modules that read one tensor, such as q/k/v or gate/up, share it; o_proj's input,
the attention kernel's output, is saved by the kernel anyway), a frozen one saves nothing, every active
module holds its gradient, and backward runs down to the lowest active module, so every layer above it
saves what its nonlinearities need. Sizing MISA to a memory limit (the equal-peak
comparison, the planner) must therefore plan for the worst set its budget allows, not one lucky draw.

`candidate_sets` builds the sets that hold the most by construction: the lowest module that fits (the
longest backward), then modules added greedily by the bytes they bring per parameter of budget (gradient
plus an input not yet saved), by size (the most gradient bytes), in forward order (whole blocks from the
bottom: what a checkpointed block recomputes), from the top (the top block is recomputed first, while the
gradient of the logits is still alive), led by each module of the top block in turn (with checkpointing on the
small model the worst set has the top block's gate_proj, which no fixed order found), each module of the top
block with the rest of the budget below the top block (without checkpointing the peak can fall inside the top
block's attention backward), and a few random fills. `worst_case_peak` measures each with
the step-peak meter and keeps the largest: the measurement, not the heuristic, is the answer.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from ..memory import StepPeakMeter
from ..sampler import host

RANDOM_FILLS = 3  # budget-filling random sets beside the constructed ones: what a draw may hold that they miss


@dataclass
class ModuleInput:
    order: int  # position in the forward pass (0: the first module to run)
    storage: int  # identity of its input's storage: modules that read one tensor share it
    nbytes: int
    saved_anyway: bool = False  # another op saves this input for backward whatever the module's state


def module_inputs(model: nn.Module, opt, forward: Callable[[], object]) -> Dict[int, ModuleInput]:
    """{module index: its input} for every MISA module of `opt`, seen in one forward pass (`forward()`
    returns the loss): where it runs, which tensor it reads, and whether training it adds that tensor to
    what backward keeps. It adds nothing when another op saves the same storage anyway: o_proj reads the
    attention kernel's output as a view, and the kernel saves its output for its own backward. Which ops
    save what is read off the autograd graph of that pass, run with every module trainable: above the
    lowest active module every op sees inputs that need a gradient, as in any step that trains one."""
    owners = {}
    for b, m in enumerate(opt.partition.modules):
        name = m.params[0][0].rsplit(".", 1)[0]
        owners[b] = model.get_submodule(name) if name else model
    params = [p for m in opt.partition.modules for _, p in m.params]
    weights = {p.untyped_storage()._cdata for p in params}
    seen: Dict[int, ModuleInput] = {}
    held = []  # keeps each input alive through the pass, so no storage identity is reused

    def hook(b):
        def pre(_module, args, kwargs=None):
            x = next((a for a in list(args) + list((kwargs or {}).values()) if isinstance(a, torch.Tensor)), None)
            if x is not None and b not in seen:
                held.append(x)
                seen[b] = ModuleInput(
                    order=len(seen), storage=x.untyped_storage()._cdata, nbytes=x.numel() * x.element_size()
                )

        return pre

    flags = [p.requires_grad for p in params]
    handles = [owners[b].register_forward_pre_hook(hook(b), with_kwargs=True) for b in owners]
    try:
        for p in params:
            p.requires_grad_(True)
        with torch.enable_grad():
            out = forward()
        anyway = _saved_by_other_ops(out, weights)
        for b in seen:
            seen[b].saved_anyway = seen[b].storage in anyway
    finally:
        for h in handles:
            h.remove()
        for p, f in zip(params, flags):
            p.requires_grad_(f)
        held.clear()
    return seen


def _saved_by_other_ops(out, weights: set) -> set:
    """Storages that the autograd graph under `out` saves for an op that is not a module's product with its
    weight (that product saves its input only for the weight's gradient)."""
    roots = [
        t.grad_fn
        for t in (out if isinstance(out, (tuple, list)) else [out])
        if isinstance(t, torch.Tensor) and t.grad_fn is not None
    ]
    anyway, visited, stack = set(), set(), roots
    while stack:
        fn = stack.pop()
        if fn is None or fn in visited:
            continue
        visited.add(fn)
        stack.extend(f for f, _ in fn.next_functions)
        if _is_weight_product(fn, weights):
            continue
        for name in dir(fn):
            if name.startswith("_saved_"):
                try:
                    value = getattr(fn, name)
                except RuntimeError:  # released, or not a tensor a Python object can hold
                    continue
                anyway |= {
                    t.untyped_storage()._cdata
                    for t in (value if isinstance(value, (tuple, list)) else [value])
                    if isinstance(t, torch.Tensor)
                }
    return anyway


def _is_weight_product(fn, weights: set) -> bool:
    """Whether `fn` takes a module's weight as an operand, directly or through one view (the transpose that
    a linear layer multiplies by)."""
    for f, _ in fn.next_functions:
        for g in [f] + ([h for h, _ in f.next_functions] if f is not None and len(f.next_functions) == 1 else []):
            variable = getattr(g, "variable", None)
            if variable is not None and variable.untyped_storage()._cdata in weights:
                return True
    return False


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
        new_input = (
            inputs[b].nbytes if b in inputs and inputs[b].storage not in saved and not inputs[b].saved_anyway else 0
        )
        return (sizes[b] * grad_bytes_per_element + new_input) / sizes[b]

    def by_size(b, saved):
        return sizes[b]

    def in_forward_order(b, saved):  # whole blocks from the bottom: the most a checkpointed block recomputes
        return -order.index(b)

    def from_the_top(b, saved):  # whole blocks from the top: recomputed first, while the loss's gradients live
        return order.index(b)

    def top_block_first(b, saved):
        # the same blocks, each from its last module (backward's first gradient, alive through the block's whole
        # backward), then from its first: trainable attention inputs (q, k) make the recomputed block's backward
        # hold the most
        return (layer_of(b), b == last_of_layer.get(layer_of(b)), -order.index(b))

    layers = [re.search(r"(?:^|\.)(?:layers|h|blocks)\.(\d+)\.", n) for n in opt.module_names]

    def layer_of(b):
        return int(layers[b].group(1)) if layers[b] else -1

    last_of_layer = {}
    for b in order:
        last_of_layer[layer_of(b)] = b

    with host():  # real draws under the planner's fake tensors too
        rng = torch.Generator().manual_seed(0)
        draws = [torch.randperm(len(sizes), generator=rng).tolist() for _ in range(RANDOM_FILLS)]
    # each module of the top block first (its input saved, its gradient the first of backward), then the rest of
    # the top blocks as top_block_first or per_param orders them: which top module makes the recomputed block's
    # backward hold the most is measured, not guessed (the top block's gate_proj, on the small model)
    top = max((layer_of(b) for b in range(len(sizes))), default=-1)
    firsts = [b for b in order if layer_of(b) == top and top >= 0 and sizes[b] + sizes[anchor] <= budget]
    led = [fill(lambda b, saved, m=m: (b == m,) + top_block_first(b, saved)) for m in firsts] + [
        fill(lambda b, saved, m=m: (b == m, per_param(b, saved))) for m in firsts
    ]
    # one module of the top block and the rest of the budget below it (the inputs it saves, or the largest
    # modules): without checkpointing the step's peak can fall inside the top block's attention backward, its
    # temporaries on top of everything the lower blocks saved, and the top block's MLP already done (on the
    # small model such a set held 0.4% more than every set above, and a drawn one went past LoRA's peak)
    led += [fill(lambda b, saved, m=m: (b == m, layer_of(b) != top, per_param(b, saved))) for m in firsts] + [
        fill(lambda b, saved, m=m: (b == m, layer_of(b) != top, sizes[b])) for m in firsts
    ]
    constructed = [fill(per_param), fill(by_size), fill(in_forward_order), fill(from_the_top), fill(top_block_first)]
    out = []
    for s in constructed + led + [fill(lambda b, saved, rank=d: -rank.index(b)) for d in draws]:
        if s not in out:
            out.append(s)
    return out


def largest_set(opt) -> Optional[List[int]]:
    """The largest set the budget allows with the lowest module that fits in it (backward runs down to it),
    filled with the largest modules that fit (the most gradient bytes): the planner's worst set where the
    search (`candidate_sets`, measured one by one) costs too much, an 8B model's. None if no module fits."""
    sizes, budget = opt.sampler.sizes, opt.budget
    anchor = next((b for b in range(len(sizes)) if sizes[b] <= budget), None)  # modules are in forward order
    if anchor is None:
        return None
    chosen, used = [anchor], sizes[anchor]
    for b in sorted(range(len(sizes)), key=lambda b: (-sizes[b], b)):
        if b != anchor and used + sizes[b] <= budget:
            chosen.append(b)
            used += sizes[b]
    return sorted(chosen)


def measure_steps(
    meter: StepPeakMeter, train_step: Callable[[], None], steps: int, before_step: Optional[Callable[[], None]] = None
) -> int:
    """The largest peak of `steps` metered training steps (`before_step()` runs before each, unmetered)."""
    start = len(meter.steps)
    for _ in range(steps):
        if before_step is not None:
            before_step()
        with meter.step():
            train_step()
    return max(s.peak_bytes for s in meter.steps[start:])


def worst_case_peak(
    model: nn.Module,
    opt,
    train_step: Callable[[], None],
    forward: Callable[[], object],
    *,
    steps: int = 2,
    sets: Optional[Sequence[Sequence[int]]] = None,
    grad_bytes_per_element: Optional[int] = None,
    block_bytes: int = 1,
) -> Tuple[int, Dict[str, int], List[int]]:
    """(peak bytes, its parts by kind, the set) of the worst of the candidate sets (or of `sets`), each
    measured over `steps` steps with the set forced before every step (a switch at a period's end is part
    of a step; the next step starts from the chosen set again). Trains `model` and `opt`: pass throwaway
    copies. `block_bytes`: the meter's (StepPeakMeter). (-1, {}, []) when no module fits the budget."""
    if sets is None:
        if grad_bytes_per_element is None:
            grad_bytes_per_element = next(iter(model.parameters())).element_size()
        sets = candidate_sets(opt, module_inputs(model, opt, forward), grad_bytes_per_element)
    worst = (-1, {}, [])
    for chosen in sets:
        meter = StepPeakMeter(model, opt, block_bytes=block_bytes)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # short planned periods warn about what a real run would not do
            peak = measure_steps(meter, train_step, steps, before_step=lambda c=chosen: opt.set_active(c))
        if peak > worst[0]:
            worst = (peak, meter.peak_parts, list(chosen))
    return worst
