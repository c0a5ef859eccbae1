"""The period schedule: which modules are active, when a period ends (flush, importance update, a new
sample from the sampler) and what a switch does to the active set.

A part of MISA (misa/optimizer.py composes the parts); the sampling itself is misa/sampler.py.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Sequence

from torch import Tensor

from .sampler import entropy


class Schedule:
    """Periods and switches of the active set (a part of MISA)."""

    def _init_schedule(self) -> None:
        self._held = False  # hold(): periods do not end, the active set changes only by set_active
        self.switch_log: List[Dict] = []
        self._switch_hooks: List[Callable[["Schedule"], None]] = []

    def _load_switch_log(self, log: Sequence[Dict]) -> None:
        self.switch_log = list(log)

    @property
    def active_modules(self) -> List[str]:
        return [self.module_names[b] for b in self.active_set.indices]

    @property
    def importance(self) -> Tensor:
        return self.sampler.importance()

    @property
    def probabilities(self) -> Tensor:
        return self.sampler.probabilities()

    @property
    def trainable_fraction(self) -> float:
        return sum(self.sampler.sizes[b] for b in self.active_set.indices) / self.partition.total_params

    @property
    def steps_in_period(self) -> int:
        return self.period.t

    def register_switch_hook(self, hook: Callable[["Schedule"], None]) -> None:  # the MISA optimizer, a Schedule
        """`hook(optimizer)` runs after every switch of the active set (used to rebuild DDP)."""
        self._switch_hooks.append(hook)

    def set_active(self, modules: Sequence) -> None:
        """Activate exactly `modules` (indices or names) now, as a switch would, instead of a drawn set: the
        memory planner and the equal-peak search use it to measure the worst set a budget allows. The
        period starts again from here; the sampler's estimates are kept."""
        index = {name: b for b, name in enumerate(self.module_names)}
        chosen = []
        for m in modules:
            b = index.get(m) if isinstance(m, str) else m
            if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b < len(self.module_names):
                raise ValueError(
                    f"modules: {m!r} is not one of this optimizer's {len(self.module_names)} modules "
                    f"(an index, or a name such as {self.module_names[0]!r})"
                )
            chosen.append(b)
        if len(set(chosen)) != len(chosen):
            raise ValueError("modules: a module is named twice")
        size = sum(self.sampler.sizes[b] for b in chosen)
        if size > self.budget:
            raise ValueError(
                f"modules: {size:,} parameters, more than the budget of {int(self.budget):,} (delta={self.delta:g})"
            )
        self._switch(chosen)

    @contextlib.contextmanager
    def hold(self) -> Iterator[None]:
        """Inside, no period ends: the active set changes only by `set_active`, and no step reads the
        gradient statistics back (a period's end does, to sample). The memory planner steps on fake tensors,
        whose values cannot be read, and plans its switches instead of drawing them."""
        held, self._held = self._held, True
        try:
            yield
        finally:
            self._held = held

    def _module_params(self, b: int) -> List[Tensor]:
        return [p for _, p in self.partition.modules[b].params]

    def _switch(self, new: Sequence[int], *, log: bool = True, keep_states: Optional[set] = None) -> None:
        new = sorted(new)
        if self._check_active_set is not None:
            self._check_active_set(new)
        old, new_set = set(self.active_set.indices), set(new)
        if keep_states is None:
            keep_states = old & new_set if self.v.keep_states else set()
        for b in old - new_set:
            for p in self._module_params(b):
                p.requires_grad_(False)
                p.grad = None
        # the new period starts before the new states exist: they count their skips from here
        self.period.start(len(new), self.warmup_interval if self.sampler.in_warmup else self.interval)
        self.active_set.change(new, keep_states, self.period.skips_at_switch)  # active_set.py: states, slots
        for b in new:
            for p in self._module_params(b):
                p.requires_grad_(True)
        self._switch_tags.touch(p for b in old ^ new_set for p in self._module_params(b))
        self._switched()  # each part resets its own state (optimizer.py)
        if log:
            probs = self.probabilities
            self.switch_log.append(
                {
                    "step": self.period.step_count,
                    "active_modules": self.active_modules,
                    "trainable_fraction": self.trainable_fraction,
                    "entropy": entropy(probs),
                    "period_len": self.period.length,
                    "warmup": self.sampler.in_warmup,
                }
            )
        for hook in self._switch_hooks:
            hook(self)

    def _advance(self) -> None:
        period = self.period
        period.advance()
        if self.v.schedule == "global_step":
            # The authors' schedule: after every step while a module was never selected, then at multiples of T.
            done = period.step_count % self.interval == 0 or self.sampler.never_selected()
        else:
            done = period.t >= period.length
        if done and not self._held:
            self._end_period()

    def _end_period(self) -> None:
        length = self.period.t
        skipped = int(self.period.period_skips)  # the period's end reads the statistics anyway
        if skipped:
            warnings.warn(
                f"MISA: {skipped} of the last {length} steps had non-finite gradients and were skipped "
                "(parameters and optimizer state untouched)",
                RuntimeWarning,
                stacklevel=3,
            )
        if self.flush and length - skipped >= self.min_flush_steps:
            self._flush()
        counted = length if self.v.count_nonfinite_steps else max(length - skipped, 1)
        stats = (self.period.S / (self.interval if self.v.divide_by_interval else counted)).tolist()
        self.sampler.update(self.active_set.indices, stats)
        self._switch(self.sampler.sample())
