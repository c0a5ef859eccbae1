"""The step: gradients of the active tensors, their squared norms (the importance statistic and the
non-finite check), one fused misa_kernels call per kind of tensor, the end-of-period flush, and clipping
that reuses the norms.

A part of MISA (misa/optimizer.py composes the parts): public function -> this file -> misa_kernels.
"""

from __future__ import annotations

import functools
import warnings
from collections import defaultdict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

import misa_kernels
from misa_kernels.scalars import tensor_key

from .active_set import _local


def _lean_step_hooks(step):
    """torch.optim.Optimizer wraps every step() in a profiler range and its pre/post-hook loops, which cost
    about 20 us of host time per call on the CPU we measure on: more than a third of what is left of a steady
    MISA step. This wrapper does the same work only when there is some: torch's own wrapper runs when a
    profiler is on or any step hook (the optimizer's or a global one) is registered, else the step runs bare.
    Marked `hooked`, so that Optimizer does not wrap it again."""
    from torch.optim import optimizer as torch_optimizer

    wrapped = torch.optim.Optimizer.profile_hook_step(step)
    global_hooks = [
        getattr(torch_optimizer, name, None) for name in ("_global_optimizer_pre_hooks", "_global_optimizer_post_hooks")
    ]

    @functools.wraps(step)
    def lean(self, *args, **kwargs):
        if (
            torch._C._autograd._profiler_enabled()
            or self._optimizer_step_pre_hooks
            or self._optimizer_step_post_hooks
            or any(h is None or h for h in global_hooks)
        ):
            return wrapped(self, *args, **kwargs)
        out = step(self, *args, **kwargs)
        self._optimizer_step_code()  # the profiler's Python tracer looks for this call
        return out

    lean.hooked = True
    return lean


class FusedStep:
    """MISA's step over the active set (a part of MISA)."""

    def _init_step(self, check_finite: bool) -> None:
        # step counts live on the device once steps may be skipped there, and for a recorded graph
        self._device_steps = check_finite or self.cuda_graph
        self._backend_resolved = None  # (fused backend or "",), resolved on the first step
        self._plan, self._plan_version = None, 0  # the planned path's calls
        self._no_gradient_warned = -1  # the plan version of the last step warned of having no gradient
        self._cached_norms: Optional[Tuple[int, Tensor, Tensor]] = None  # clip_grad_norm_'s, for the next step

    def _invalidate_plan(self) -> None:
        """The next step makes its plan again (new states, views, slots or step counts)."""
        self._plan_version += 1

    def _states_loaded(self) -> None:
        """Step counts a checkpoint wrote are true steps: kept on the device when steps may be skipped."""
        self._device_steps = self._device_steps or self.check_finite
        self._invalidate_plan()

    def _grads(self) -> List[Tuple[int, Tensor, Tensor, Optional[int]]]:
        """(group index, local param, local grad, slot or None) for every active param with a grad."""
        out = []
        for gi, p, slot in self.active_set.items:  # made at each switch (active_set.py)
            grad = p.grad
            if grad is None:
                continue
            g = _local(grad)
            if g.is_sparse:
                raise RuntimeError(f"MISA does not support sparse gradients ({self._param_names.get(p, 'a param')})")
            out.append((gi, p, g, slot))
        return out

    def _norms_by_slot(self, entries) -> Tuple[Tensor, Tensor]:
        """Squared norms of every grad: per module slot (plus a zero pad slot), and per entry."""
        by_dtype = defaultdict(list)
        for k, (_, _, g, _) in enumerate(entries):
            by_dtype[g.dtype].append(k)
        if len(by_dtype) == 1:  # one dtype (the usual case): the norms are already in entry order
            per_entry = misa_kernels.grad_sq_norms([e[2] for e in entries], backend=self.backend)
            return self._to_slots(entries, per_entry), per_entry
        per_entry = torch.zeros(len(entries), dtype=torch.float32, device=self.device)
        for ks in by_dtype.values():
            norms = misa_kernels.grad_sq_norms([entries[k][2] for k in ks], backend=self.backend)
            per_entry[self.active_set.index_tensor(ks)] = norms
        return self._to_slots(entries, per_entry), per_entry

    def _to_slots(self, entries, per_entry: Tensor) -> Tensor:
        step_sq = torch.zeros(len(self.active_set.slots) + 1, dtype=torch.float32, device=self.device)
        ks = [k for k, e in enumerate(entries) if e[3] is not None]
        if ks:
            idx = self.active_set.index_tensor([entries[k][3] for k in ks])
            step_sq.index_copy_(0, idx, per_entry[self.active_set.index_tensor(ks)])
        return step_sq

    # Excluded from torch.compile: the step's schedule (sampling from the sampler's own generator, period
    # ends, host counters, the plan) is Python state that tracing got wrong (a compiled training step drew
    # other modules than the eager one); a compiled training step calls it eagerly, graph-breaking around it,
    # and the kernels stay declared torch.library ops for code that traces misa_kernels itself.
    @_lean_step_hooks
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.release_grads:
            return self._release_step(loss)
        planned = self._current_plan()  # the steady step: the last step's plan, no entry list made
        if planned is None:
            entries = self._grads()
            if not entries:
                self._warn_no_gradient()
                return loss
            if not (self._device_steps and self._fused_backend() is not None):
                self._grouped_step(entries)
                self._advance()
                return loss
            planned = self._plan_for(entries)
        plan, grads = planned
        if not (self.cuda_graph and self._graph_step(plan, grads)):  # cuda_graph.py: replayed, or recorded
            self._planned_step(plan, grads)
        self._advance()
        return loss

    def _warn_no_gradient(self) -> None:
        """A step that finds no gradient on any active tensor trains nothing: say so, once per active set. The
        causes seen or possible: a model compiled before a switch on a torch whose graph missed it
        (compiled_switch.py), a backward that never reached the active modules, step() before any backward."""
        if self._no_gradient_warned == self._plan_version:
            return
        self._no_gradient_warned = self._plan_version
        names = [self.module_names[b] for b in self.active_set.indices]
        warnings.warn(
            f"MISA.step: none of the {len(names)} active modules ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}) has a gradient, so this step trains nothing; call "
            "backward() on a loss that depends on them first (a compiled model must retrace after a "
            "switch: see misa/compiled_switch.py)",
            RuntimeWarning,
            stacklevel=3,
        )

    def _grouped_step(self, entries) -> None:
        """The step on the torch backend (or with host step counts): one call per step count."""
        found = None  # 0-d device flag: 1.0 when this step's gradients hold NaN/inf
        cached = self._take_cached_norms()
        if cached is not None:
            step_sq, total = cached  # from clip_grad_norm_, already summed over shards
        elif self.check_finite:
            step_sq, per_entry = self._norms_by_slot(entries)
            step_sq, total = self._reduced(step_sq, per_entry)
        else:
            step_sq, total = None, None
        if self.check_finite:
            self._device_steps = True
            found = _nonfinite(total)
        if step_sq is None:
            step_sq = torch.zeros(len(self.active_set.slots) + 1, dtype=torch.float32, device=self.device)
            self._fused_steps(entries, step_sq, found)
            if self._reduce_sq_norms is not None:
                self._reduce_sq_norms(step_sq)
        else:
            self._fused_steps(entries, None, found)
        self._account(step_sq, found)

    def _take_cached_norms(self) -> Optional[Tuple[Tensor, Tensor]]:
        """(per-slot squared norms, total) that clip_grad_norm_ left for this step, or None."""
        cached, self._cached_norms = self._cached_norms, None
        return cached[1:] if cached is not None and cached[0] == self.period.step_count else None

    def _account(self, step_sq: Tensor, found: Optional[Tensor], steps: Sequence[Tensor] = ()) -> None:
        """The step's share of the importance statistic and the skip counters, on the device; `steps`: the
        planned calls' device step counts, advanced for the next step (by 1, or 0 on a skipped step)."""
        if found is not None and self.v.count_nonfinite_steps:
            # The authors' code: a non-finite tensor's norm counts as 1.0 and the step counts.
            step_sq = torch.nan_to_num(step_sq, 1.0, 1.0, 1.0)  # one launch, not three
        per_module = self.active_set.per_module(step_sq)
        stat = per_module.sqrt() if self.v.norm_power == 1 else per_module
        if found is None:
            self.period.S.add_(stat)
            if steps:
                torch._foreach_add_(list(steps), 1.0)
            return
        if not self.v.count_nonfinite_steps:
            stat = stat * (1.0 - found)  # a skipped step adds nothing to the statistic
        # one call for every counter (the host time of a launch each is what a step is made of)
        kept = [torch.rsub(found, 1.0)] * len(steps) if steps else []
        period = self.period
        torch._foreach_add_([period.S, period.skips, period.period_skips, *steps], [stat, found, found, *kept])

    def _reduced(self, step_sq: Tensor, per_entry: Tensor) -> Tuple[Tensor, Tensor]:
        """Per-slot squared norms and the total over every gradient, summed over shards (FSDP2) so that
        every rank takes the same skip decision."""
        total = per_entry.sum()
        if self._reduce_sq_norms is None:
            return step_sq, total
        sq = torch.cat([step_sq, (total - step_sq.sum()).reshape(1)])
        self._reduce_sq_norms(sq)
        return sq[:-1], sq.sum()

    def _true_step(self, st: Dict, ahead: int = 0):
        """A state's step count (plus `ahead`) for the bias corrections: a number, or (once steps may be
        skipped on the device) a 0-d device tensor, the attempted steps minus the skips since activation."""
        if not self._device_steps:
            return st["step"] + ahead
        # number - tensor launches one kernel; a tensor built from host data would copy and wait on a GPU
        return float(st["step"] + ahead) - (self.period.skips - st["skips0"])

    def _fused_steps(
        self, entries, step_sq: Optional[Tensor], found: Optional[Tensor] = None, call_base: int = 0
    ) -> None:
        """One fused kernel call per (group, dtype, step count, activation, module-or-not, state format).
        `call_base` numbers the calls for the stochastic-rounding seeds (a released tensor's own index).
        On the fused backends, with step counts on the device, step() takes the planned path below instead:
        one call per (group, dtype, fresh or not, module-or-not, state format), whatever the step counts."""
        calls = defaultdict(list)
        for gi, p, g, slot in entries:
            st = self.state[p]
            calls[(gi, _local(p).dtype, st["step"], id(st["skips0"]), slot is not None, "exp_avg_absmax" in st)].append(
                (p, g, slot)
            )
        for call, ((gi, _, step, _, is_module, _), items) in enumerate(calls.items()):
            group = self.param_groups[gi]
            beta1, beta2 = group["betas"]
            params = [_local(p) for p, _, _ in items]
            states = [self.state[p] for p, _, _ in items]
            norms, scatter = None, None
            if step_sq is not None and is_module:
                slots = [s for _, _, s in items]
                if slots == list(range(slots[0], slots[0] + len(slots))):
                    norms = step_sq[slots[0] : slots[0] + len(slots)]  # a contiguous view: accumulate in place
                else:
                    norms = torch.zeros(len(slots), dtype=torch.float32, device=self.device)
                    scatter = self.active_set.index_tensor(slots)
            misa_kernels.adamw_step_(
                params,
                [g for _, g, _ in items],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                step=self._true_step(states[0], ahead=1),
                fresh=step == 0,
                grad_sq_norms=norms,
                skip=found,
                backend=self.backend,
                **self._rounding_args(states, call_base + call),
            )
            if scatter is not None:
                step_sq.index_copy_(0, scatter, norms)
            for s in states:
                s["step"] = step + 1

    # ---------------------------------------------------------------- the planned path (fused backends)
    def _fused_backend(self) -> Optional[str]:
        """The fused backend the kernels run on ("cuda" or "triton"), or None (the torch path, which keeps
        one call per step count: its results stay those of every earlier run)."""
        if self._backend_resolved is None:
            chosen = misa_kernels.backends.resolve(self.backend, self.device)
            self._backend_resolved = (chosen if chosen in ("cuda", "triton") else "",)
        return self._backend_resolved[0] or None

    def _current_plan(self) -> Optional[Tuple["_Plan", List[Tensor]]]:
        """(plan, gradients in the plan's order) when the plan made at an earlier step still fits: same
        version (no switch, load or fresh step since), every planned tensor has a gradient and no other active
        tensor has one. This is the whole per-step cost of finding the work: no entry list, no grouping."""
        plan = self._plan
        if plan is None or plan.version != self._plan_version:
            return None
        grads = [p.grad for p in plan.params]
        if any(g is None for g in grads) or any(p.grad is not None for p in plan.others):
            return None
        return plan, [_local(g) for g in grads] if plan.sharded else grads

    def _plan_for(self, entries) -> Tuple["_Plan", List[Tensor]]:
        """A new plan for these entries, and their gradients in its order."""
        self._plan = plan = _Plan(self, entries)
        by_param = {id(p): g for _, p, g, _ in entries}
        return plan, [by_param[id(p)] for p in plan.params]

    def _planned_step(self, plan: "_Plan", grads: List[Tensor]) -> None:
        """The step's device work from the plan, then the host's books."""
        cached = self._take_cached_norms()
        if cached is not None:  # clip_grad_norm_ measured (and scaled) the norms already
            step_sq, total = cached
            found = _nonfinite(total) if self.check_finite else None
            self._planned_calls(plan, grads, None, found, self._graph_lrs())
            self._account(step_sq, found, plan.steady_steps)
        else:
            self._planned_device_work(plan, grads, self._graph_lrs())
        self._planned_books(plan)

    def _planned_device_work(self, plan: "_Plan", grads: List[Tensor], lrs) -> None:
        """Norms, the non-finite flag, the plan's kernel calls, the next step counts and the importance
        statistic: device work only, no host sync (what a CUDA graph records, cuda_graph.py)."""
        if self.check_finite:
            step_sq, found = self._planned_norms(plan, grads)
            self._planned_calls(plan, grads, None, found, lrs)
        else:  # the norms come out of the update's own pass
            found = None
            step_sq = torch.zeros(len(self.active_set.slots) + 1, dtype=torch.float32, device=self.device)
            self._planned_calls(plan, grads, step_sq, None, lrs)
            if self._reduce_sq_norms is not None:
                self._reduce_sq_norms(step_sq)
        self._account(step_sq, found, plan.steady_steps)

    def _planned_norms(self, plan: "_Plan", grads: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """(per-slot squared norms with the zero pad slot, non-finite flag) of this step's gradients."""
        step_sq, total = self._planned_sq_norms(plan, grads)
        return step_sq, _nonfinite(total)

    def _planned_sq_norms(self, plan: "_Plan", grads: List[Tensor]) -> Tuple[Tensor, Tensor]:
        """(per-slot squared norms with the zero pad slot, their total over every gradient) in one norm launch
        per call, summed over shards (FSDP2) so that every rank decides alike. The buffer holds the slots, the
        pad, then the norms of tensors outside any module (they count for the total). The total sums the
        entries in the grouped path's order (modules by slot, then the rest), so that a clipped step's factor
        is the grouped path's to the bit."""
        norms = plan.norms.zero_()  # the plan's own buffer and views: no allocation, no slicing per step
        for c in plan.calls:
            if c["norms"] is not None:
                c["prepared"].grad_sq_norms_(grads[c["begin"] : c["end"]], c["norms"])
            else:  # slots out of order: gathered, then put in place
                part = torch.zeros(c["end"] - c["begin"], dtype=torch.float32, device=self.device)
                c["prepared"].grad_sq_norms_(grads[c["begin"] : c["end"]], part)
                norms.index_copy_(0, c["out"], part)
        if self._reduce_sq_norms is not None:
            self._reduce_sq_norms(norms)
        n = len(self.active_set.slots)
        every = plan.module_norms if plan.n_norms == n + 1 else torch.cat([norms[:n], norms[n + 1 :]])
        return plan.step_sq, every.sum()

    def _planned_calls(
        self, plan: "_Plan", grads: List[Tensor], step_sq: Optional[Tensor], found: Optional[Tensor], lrs
    ) -> None:
        """The plan's kernel calls. `step_sq`: per-slot norms to accumulate in the update's pass (None when
        measured before it); `lrs`: a device lr per param group (cuda_graph=True), or None for the groups'
        numbers. The calls' step counts advance in `_account`, with the other counters."""
        stochastic = self.rounding == "stochastic"
        for call, c in enumerate(plan.calls):
            group = self.param_groups[c["gi"]]
            beta1, beta2 = group["betas"]
            norms = None
            if step_sq is not None and c["slots"] is not None:
                norms = (
                    step_sq[c["slots"]]
                    if isinstance(c["slots"], slice)
                    else torch.zeros(c["end"] - c["begin"], dtype=torch.float32, device=self.device)
                )
            # the seed only matters to stochastic rounding; a constant keeps Triton from specializing on it
            step_key = self.period.step_count * 1024 + call
            seed = tensor_key(self.seed & 0x7FFFFFFF, step_key) & 0x7FFFFFFF if stochastic else 0
            c["prepared"](
                grads[c["begin"] : c["end"]],
                lr=group["lr"] if lrs is None else lrs[c["gi"]],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                weight_decay=group["weight_decay"],
                step=c["steps"],
                fresh=c["fresh"],
                grad_sq_norms=norms,
                skip=found,
                rounding=self.rounding,
                seed=seed,
            )
            if norms is not None and not isinstance(c["slots"], slice):
                step_sq.index_copy_(0, c["slots"], norms)

    def _planned_books(self, plan: "_Plan") -> None:
        """The host's side of a planned step: step counts, and a new plan after a fresh step (its tensors are
        steady from now on: another grouping)."""
        for c in plan.calls:
            for st in c["states"]:
                st["step"] += 1
        if plan.fresh:
            self._invalidate_plan()

    def _rounding_args(self, states, call: int) -> Dict:
        """master_params or compensation, block scales of 8-bit states, rounding and seed for one kernel
        call (every state of a call has one format). The stochastic seed is a function of (seed, step,
        call), so a resumed run rounds exactly as the uninterrupted one."""
        first = states[0] if states else {}
        seed = tensor_key(self.seed & 0x7FFFFFFF, self.period.step_count * 1024 + call) & 0x7FFFFFFF
        args = dict(rounding=self.rounding, seed=seed)
        for key, arg in (
            ("master", "master_params"),
            ("compensation", "compensation"),
            ("exp_avg_absmax", "exp_avg_absmax"),
            ("exp_avg_sq_absmax", "exp_avg_sq_absmax"),
        ):
            if key in first:
                args[arg] = [s[key] for s in states]
        return args

    def _flush(self) -> None:
        calls = defaultdict(list)
        for b in self.active_set.indices:
            for p in self._module_params(b):
                st = self.state.get(p)
                if st is not None and self._steps_taken(st) > 0:
                    calls[(_local(p).dtype, st["step"], id(st["skips0"]), "exp_avg_absmax" in st)].append(p)
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        for call, params in enumerate(calls.values()):
            states = [self.state[p] for p in params]
            misa_kernels.momentum_flush_(
                [_local(p) for p in params],
                [s["exp_avg"] for s in states],
                [s["exp_avg_sq"] for s in states],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                eps=group["eps"],
                step=self._true_step(states[0]),
                backend=self.backend,
                **self._rounding_args(states, 512 + call),
            )

    def _steps_taken(self, st: Dict) -> int:
        """A state's true step count as a number (reads the device: for period ends and checkpoints)."""
        return st["step"] - int(self.period.skips - st["skips0"]) if self._device_steps else st["step"]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients so far (reads the device)."""
        return int(self.period.skips)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip the active gradients by their global L2 norm, using one fused norm pass; the next
        `step()` reuses these norms (scaled by the clip factor) instead of computing them again.
        Returns the norm before clipping, like torch.nn.utils.clip_grad_norm_."""
        if norm_type != 2.0:
            raise ValueError(f"norm_type: MISA clips by the L2 norm only, got {norm_type}")
        if self.release_grads:
            raise RuntimeError(
                "MISA(release_grads=True) cannot clip by the global norm: each tensor was updated and "
                "its gradient freed during backward, before the norm of all of them existed"
            )
        planned = self._current_plan()
        if planned is None:
            entries = self._grads()
            if not entries:
                return torch.zeros((), device=self.device)
            if self._device_steps and self._fused_backend() is not None:
                planned = self._plan_for(entries)
        if planned is not None:  # the plan's prepared norm calls: step() then checks no gradient again
            plan, grads = planned
            step_sq, total_sq = self._planned_sq_norms(plan, grads)
        else:
            step_sq, per_entry = self._norms_by_slot(entries)
            step_sq, total_sq = self._reduced(step_sq, per_entry)  # sharded (FSDP2): over every rank's shards
            grads = [g for _, _, g, _ in entries]
        total = total_sq.sqrt()
        # No host check of the norm: a non-finite norm makes coef non-finite, and step() skips on the device.
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_(grads, coef)
        self._cached_norms = (self.period.step_count, step_sq * coef * coef, total_sq * coef * coef)
        return total


def _nonfinite(total: Tensor) -> Tensor:
    """1.0 when `total` is NaN or inf, else 0.0, on the device: total - total is 0 for a finite total and NaN
    otherwise, and ne_ writes the comparison into the float tensor (two launches; isfinite alone is four)."""
    return torch.sub(total, total).ne_(0)


class _Plan:
    """The kernel calls of a step over one active set, made once per set (and once more after its fresh
    step, whose tensors are steady from then on): the tensors whose gradients a step reads (in call order),
    and per call its prepared misa_kernels call (the kept lists checked once), its states, where its norms
    go, and a device vector of its tensors' step counts (a step count per tensor: `adamw_step_` takes it),
    so that a step only gathers the new gradients."""

    def __init__(self, opt, entries):
        self.version = opt._plan_version
        groups = defaultdict(list)
        for gi, p, _, slot in entries:
            st = opt.state[p]
            groups[(gi, _local(p).dtype, st["step"] == 0, slot is not None, "exp_avg_absmax" in st)].append((p, slot))
        planned = {id(p) for _, p, _, _ in entries}
        self.others = [p for _, p, _ in opt.active_set.items if id(p) not in planned]  # active, no gradient now
        self.sharded = any(_local(p) is not p for _, p, _, _ in entries)  # DTensors (FSDP2): kernels see shards
        self.params, self.calls = [], []
        self.n_norms = len(opt.active_set.slots) + 1  # the slots and the pad; then the tensors outside any module
        for (gi, _, fresh, is_module, _), items in groups.items():
            states = [opt.state[p] for p, _ in items]
            slots, out = None, slice(self.n_norms, self.n_norms + len(items))
            if is_module:
                numbers = [slot for _, slot in items]
                if numbers == list(range(numbers[0], numbers[0] + len(numbers))):
                    slots = out = slice(numbers[0], numbers[0] + len(numbers))
                else:
                    slots = out = opt.active_set.index_tensor(numbers)
            else:
                self.n_norms += len(items)
            formats = {
                arg: [st[key] for st in states]
                for key, arg in (
                    ("master", "master_params"),
                    ("compensation", "compensation"),
                    ("exp_avg_absmax", "exp_avg_absmax"),
                    ("exp_avg_sq_absmax", "exp_avg_sq_absmax"),
                )
                if key in states[0]
            }
            params = [_local(p) for p, _ in items]
            exp_avgs, exp_avg_sqs = [st["exp_avg"] for st in states], [st["exp_avg_sq"] for st in states]
            self.calls.append(
                dict(
                    gi=gi,
                    fresh=fresh,
                    states=states,
                    slots=slots,
                    out=out,
                    params=params,
                    exp_avgs=exp_avgs,
                    exp_avg_sqs=exp_avg_sqs,
                    begin=len(self.params),
                    end=len(self.params) + len(items),
                    prepared=misa_kernels.prepare_adamw_step(
                        params, exp_avgs, exp_avg_sqs, backend=opt._fused_backend(), **formats
                    ),
                    steps=self._steps(opt, states),
                )
            )
            self.params += [p for p, _ in items]
        self.fresh = any(c["fresh"] for c in self.calls)
        self.steady_steps = [c["steps"] for c in self.calls if not c["fresh"]]  # advanced after each step
        # The step's squared norms (zeroed at each step; a CUDA graph records these addresses) and its views.
        self.norms = torch.zeros(self.n_norms, dtype=torch.float32, device=opt.device)
        self.step_sq, self.module_norms = (
            self.norms[: len(opt.active_set.slots) + 1],
            self.norms[: len(opt.active_set.slots)],
        )
        for c in self.calls:
            c["norms"] = self.norms[c["out"]] if isinstance(c["out"], slice) else None

    @staticmethod
    def _steps(opt, states) -> Tensor:
        """This step's count of each tensor, as the grouped path computes it (true_step), on the device: one
        0-d count when the call's tensors share it (they then share it for as long as the plan lives: a step
        is skipped for all of them or none), else one per tensor."""
        if len({st["step"] for st in states}) == 1 and len({id(st["skips0"]) for st in states}) == 1:
            # float64, the dtype the kernels' scalar folding computes in (scalars.py): one conversion less a step
            return opt._true_step(states[0], ahead=1).double()
        return torch.stack([opt._true_step(st, ahead=1) for st in states]).float()
