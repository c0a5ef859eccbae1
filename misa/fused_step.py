"""The step: gradients of the active tensors, their squared norms (the importance statistic and the
non-finite check), one fused misa_kernels call per kind of tensor, the end-of-period flush, and clipping
that reuses the norms.

A part of MISA (misa/optimizer.py composes the parts): public function -> this file -> misa_kernels.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

import misa_kernels
from misa_kernels.scalars import tensor_key

from .active_set import _local


class FusedStep:
    """MISA's step over the active set (a part of MISA)."""

    def _grads(self) -> List[Tuple[int, Tensor, Tensor, Optional[int]]]:
        """(group index, local param, local grad, slot or None) for every active param with a grad."""
        out = []
        for gi, p, slot in self._active_items:  # made at each switch (active_set.py)
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
            per_entry[self._index_tensor(ks)] = norms
        return self._to_slots(entries, per_entry), per_entry

    def _to_slots(self, entries, per_entry: Tensor) -> Tensor:
        step_sq = torch.zeros(len(self._slots) + 1, dtype=torch.float32, device=self.device)
        ks = [k for k, e in enumerate(entries) if e[3] is not None]
        if ks:
            idx = self._index_tensor([entries[k][3] for k in ks])
            step_sq.index_copy_(0, idx, per_entry[self._index_tensor(ks)])
        return step_sq

    # Excluded from torch.compile: the step's schedule (sampling from the sampler's own generator, period
    # ends, host counters, the plan) is Python state that tracing got wrong (a compiled training step drew
    # other modules than the eager one); a compiled training step calls it eagerly, graph-breaking around it,
    # and the kernels stay declared torch.library ops for code that traces misa_kernels itself.
    @torch.compiler.disable
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if self.release_grads:
            return self._release_step(loss)
        entries = self._grads()
        if not entries:
            return loss
        if self.cuda_graph and self._graph_step(entries):  # cuda_graph.py: replayed, or recorded then replayed
            self._advance()
            return loss
        found = None  # 0-d device flag: 1.0 when this step's gradients hold NaN/inf
        cached = self._cached_norms
        self._cached_norms = None
        if cached is not None and cached[0] == self._step_count:
            step_sq, total = cached[1], cached[2]  # from clip_grad_norm_, already summed over shards
        elif self.check_finite:
            step_sq, per_entry = self._norms_by_slot(entries)
            step_sq, total = self._reduced(step_sq, per_entry)
        else:
            step_sq, total = None, None
        if self.check_finite:
            self._device_steps = True
            # total - total is 0 for a finite total and NaN otherwise: three launches (isfinite is four alone)
            found = (total - total).ne(0).to(torch.float32)
        if step_sq is None:
            step_sq = torch.zeros(len(self._slots) + 1, dtype=torch.float32, device=self.device)
            self._fused_steps(entries, step_sq, found)
            if self._reduce_sq_norms is not None:
                self._reduce_sq_norms(step_sq)
        else:
            self._fused_steps(entries, None, found)
        self._account(step_sq, found)
        self._advance()
        return loss

    def _account(self, step_sq: Tensor, found: Optional[Tensor]) -> None:
        """The step's share of the importance statistic and the skip counters, on the device."""
        if found is not None and self.v.count_nonfinite_steps:
            # The authors' code: a non-finite tensor's norm counts as 1.0 and the step counts.
            step_sq = torch.nan_to_num(step_sq, nan=1.0, posinf=1.0, neginf=1.0)  # one launch, not three
        per_module = step_sq[self._seg_index].sum(dim=1)
        stat = per_module.sqrt() if self.v.norm_power == 1 else per_module
        if found is not None and not self.v.count_nonfinite_steps:
            stat = stat * (1.0 - found)  # a skipped step adds nothing to the statistic
        self._S += stat
        if found is not None:
            self._skips += found
            self._period_skips += found

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
        return float(st["step"] + ahead) - (self._skips - st["skips0"])

    def _fused_steps(self, entries, step_sq: Optional[Tensor], found: Optional[Tensor] = None,
                     call_base: int = 0) -> None:
        """One fused kernel call per (group, dtype, step count, activation, module-or-not, state format).
        `call_base` numbers the calls for the stochastic-rounding seeds (a released tensor's own index).
        On the fused backends, with step counts on the device, the planned path below makes one call per
        (group, dtype, fresh or not, module-or-not, state format) instead, whatever the step counts."""
        if call_base == 0 and self._device_steps and self._fused_backend() is not None:
            self._planned_steps(entries, step_sq, found)
            return
        calls = defaultdict(list)
        for gi, p, g, slot in entries:
            st = self.state[p]
            calls[(gi, _local(p).dtype, st["step"], id(st["skips0"]), slot is not None, "exp_avg_absmax" in st)].append(
                (p, g, slot))
        for call, ((gi, _, step, _, is_module, _), items) in enumerate(calls.items()):
            group = self.param_groups[gi]
            beta1, beta2 = group["betas"]
            params = [_local(p) for p, _, _ in items]
            states = [self.state[p] for p, _, _ in items]
            norms, scatter = None, None
            if step_sq is not None and is_module:
                slots = [s for _, _, s in items]
                if slots == list(range(slots[0], slots[0] + len(slots))):
                    norms = step_sq[slots[0]:slots[0] + len(slots)]  # a contiguous view: accumulate in place
                else:
                    norms = torch.zeros(len(slots), dtype=torch.float32, device=self.device)
                    scatter = self._index_tensor(slots)
            misa_kernels.adamw_step_(
                params, [g for _, g, _ in items], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                step=self._true_step(states[0], ahead=1), fresh=step == 0, grad_sq_norms=norms, skip=found,
                backend=self.backend,
                **self._rounding_args(states, call_base + call))
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

    def _planned_steps(self, entries, step_sq: Optional[Tensor], found: Optional[Tensor]) -> None:
        """The step's kernel calls from a plan made once per active set (and once more after its fresh
        step): the operand lists, norm views and seeds' call numbers are kept, the tensors' step counts
        live in one device vector per call (a step count per tensor: `adamw_step_` takes it), and a step
        only gathers the new gradients. The plan's key is the entries' identities and a version that every
        switch, load and fresh step bumps."""
        plan = self._plan_for(entries)
        self._planned_calls(plan, entries, step_sq, found, self._graph_lrs())
        self._planned_books(plan)

    def _plan_for(self, entries) -> List[Dict]:
        key = (self._plan_version, tuple(map(id, [e[1] for e in entries])))
        if self._plan is None or self._plan[0] != key:
            self._plan = (key, self._make_plan(entries))
        return self._plan[1]

    def _planned_calls(self, plan, entries, step_sq: Optional[Tensor], found: Optional[Tensor], lrs) -> None:
        """The plan's kernel calls and the next step's counts: device work only (what a CUDA graph records).
        `lrs`: a device lr per param group (cuda_graph=True), or None for the groups' numbers."""
        increment = None
        for call, c in enumerate(plan):
            group = self.param_groups[c["gi"]]
            beta1, beta2 = group["betas"]
            norms = None
            if step_sq is not None and c["slots"] is not None:
                norms = step_sq[c["slots"]] if isinstance(c["slots"], slice) else torch.zeros(
                    len(c["entries"]), dtype=torch.float32, device=self.device)
            seed = tensor_key(self.seed & 0x7FFFFFFF, self._step_count * 1024 + call) & 0x7FFFFFFF
            misa_kernels.adamw_step_(
                c["params"], [entries[k][2] for k in c["entries"]], c["exp_avgs"], c["exp_avg_sqs"],
                lr=group["lr"] if lrs is None else lrs[c["gi"]], beta1=beta1, beta2=beta2, eps=group["eps"],
                weight_decay=group["weight_decay"], step=c["steps"], fresh=c["fresh"], grad_sq_norms=norms,
                skip=found, backend=self._backend_resolved[0], rounding=self.rounding, seed=seed, **c["formats"])
            if norms is not None and not isinstance(c["slots"], slice):
                step_sq.index_copy_(0, c["slots"], norms)
            if not c["fresh"]:
                if increment is None:
                    increment = 1.0 if found is None else 1.0 - found
                c["steps"].add_(increment)  # the next step's counts, on the device

    def _planned_books(self, plan) -> None:
        """The host's side of a planned step: step counts, and a new plan after a fresh step (its tensors are
        steady from now on: another grouping)."""
        for c in plan:
            for st in c["states"]:
                st["step"] += 1
        if any(c["fresh"] for c in plan):
            self._plan_version += 1

    def _make_plan(self, entries) -> List[Dict]:
        calls = defaultdict(list)
        for k, (gi, p, _, slot) in enumerate(entries):
            st = self.state[p]
            calls[(gi, _local(p).dtype, st["step"] == 0, slot is not None, "exp_avg_absmax" in st)].append(k)
        plan = []
        for (gi, _, fresh, is_module, _), ks in calls.items():
            states = [self.state[entries[k][1]] for k in ks]
            slots = None
            if is_module:
                numbers = [entries[k][3] for k in ks]
                contiguous = numbers == list(range(numbers[0], numbers[0] + len(numbers)))
                slots = slice(numbers[0], numbers[0] + len(numbers)) if contiguous else self._index_tensor(numbers)
            formats = {arg: [st[key] for st in states] for key, arg in (
                ("master", "master_params"), ("compensation", "compensation"), ("exp_avg_absmax", "exp_avg_absmax"),
                ("exp_avg_sq_absmax", "exp_avg_sq_absmax")) if key in states[0]}
            plan.append(dict(gi=gi, fresh=fresh, entries=ks, states=states, slots=slots, formats=formats,
                             params=[_local(entries[k][1]) for k in ks], exp_avgs=[st["exp_avg"] for st in states],
                             exp_avg_sqs=[st["exp_avg_sq"] for st in states],
                             # this step's count of each tensor, as the grouped path computes it (true_step)
                             steps=torch.stack([self._true_step(st, ahead=1) for st in states]).float()))
        return plan

    def _rounding_args(self, states, call: int) -> Dict:
        """master_params or compensation, block scales of 8-bit states, rounding and seed for one kernel
        call (every state of a call has one format). The stochastic seed is a function of (seed, step,
        call), so a resumed run rounds exactly as the uninterrupted one."""
        first = states[0] if states else {}
        seed = tensor_key(self.seed & 0x7FFFFFFF, self._step_count * 1024 + call) & 0x7FFFFFFF
        args = dict(rounding=self.rounding, seed=seed)
        for key, arg in (("master", "master_params"), ("compensation", "compensation"),
                         ("exp_avg_absmax", "exp_avg_absmax"), ("exp_avg_sq_absmax", "exp_avg_sq_absmax")):
            if key in first:
                args[arg] = [s[key] for s in states]
        return args

    def _flush(self) -> None:
        calls = defaultdict(list)
        for b in self._active:
            for p in self._module_params(b):
                st = self.state.get(p)
                if st is not None and self._steps_taken(st) > 0:
                    calls[(_local(p).dtype, st["step"], id(st["skips0"]), "exp_avg_absmax" in st)].append(p)
        group = self.param_groups[0]
        beta1, beta2 = group["betas"]
        for call, params in enumerate(calls.values()):
            states = [self.state[p] for p in params]
            misa_kernels.momentum_flush_(
                [_local(p) for p in params], [s["exp_avg"] for s in states], [s["exp_avg_sq"] for s in states],
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], step=self._true_step(states[0]),
                backend=self.backend, **self._rounding_args(states, 512 + call))

    def _steps_taken(self, st: Dict) -> int:
        """A state's true step count as a number (reads the device: for period ends and checkpoints)."""
        return st["step"] - int(self._skips - st["skips0"]) if self._device_steps else st["step"]

    @property
    def skipped_steps(self) -> int:
        """Steps skipped for non-finite gradients so far (reads the device)."""
        return int(self._skips)

    @torch.no_grad()
    def clip_grad_norm_(self, max_norm: float, norm_type: float = 2.0) -> Tensor:
        """Clip the active gradients by their global L2 norm, using one fused norm pass; the next
        `step()` reuses these norms (scaled by the clip factor) instead of computing them again.
        Returns the norm before clipping, like torch.nn.utils.clip_grad_norm_."""
        if norm_type != 2.0:
            raise ValueError(f"norm_type: MISA clips by the L2 norm only, got {norm_type}")
        if self.release_grads:
            raise RuntimeError("MISA(release_grads=True) cannot clip by the global norm: each tensor was updated and "
                               "its gradient freed during backward, before the norm of all of them existed")
        entries = self._grads()
        if not entries:
            return torch.zeros((), device=self.device)
        step_sq, per_entry = self._norms_by_slot(entries)
        step_sq, total_sq = self._reduced(step_sq, per_entry)  # sharded (FSDP2): over every rank's shards
        total = total_sq.sqrt()
        # No host check of the norm: a non-finite norm makes coef non-finite, and step() skips on the device.
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        torch._foreach_mul_([g for _, _, g, _ in entries], coef)
        self._cached_norms = (self._step_count, step_sq * coef * coef, total_sq * coef * coef)
        return total
