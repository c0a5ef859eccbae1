"""Importance estimates, sampling probabilities and budgeted sampling (Algorithm 2 of the paper).

Pure bookkeeping on the host: a few hundred numbers per model, updated once per outer loop. All
randomness comes from the sampler's own seeded generator, saved in `state_dict`. The numbers stay real CPU
tensors whatever the caller runs under: the memory planner runs MISA's training step on fake tensors
(FakeTensorMode), and a `torch.device("meta")` context must not make the bookkeeping meta either.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Dict, List, Optional, Sequence

import torch
from torch.utils._python_dispatch import _disable_current_modes

from .variants import Variant, resolve

ORDERS = ("misa", "uniform", "ascending", "descending", "random")


@contextlib.contextmanager
def host():
    """Real CPU tensors inside, whatever dispatch mode (a fake or tracking one) or default device is active."""
    with _disable_current_modes(), torch.device("cpu"):
        yield


def _on_host(method):
    @functools.wraps(method)
    def wrapped(*args, **kwargs):
        with host():
            return method(*args, **kwargs)

    return wrapped


class ImportanceSampler:
    """`variant` supplies the switches that shape the estimate and the draw (norm_power, logit_cap,
    compounding_correction, skip_zero_statistic, sample_last); `sample_last` overrides the variant's."""

    @_on_host
    def __init__(
        self,
        sizes: Sequence[int],
        budget: float,
        *,
        eta: float = 1.0,
        beta: float = 0.8,
        order: str = "misa",
        variant="paper",
        sample_last: Optional[int] = None,
        seed: int = 0,
    ):
        if order not in ORDERS:
            raise ValueError(f"order: expected one of {', '.join(map(repr, ORDERS))}, got {order!r}")
        self.v: Variant = resolve(variant)
        if sample_last is None:
            sample_last = self.v.sample_last
        if eta != "auto" and not eta >= 0:
            raise ValueError(f"eta: expected eta >= 0 or 'auto', got {eta}")
        if not 0 <= beta < 1:
            raise ValueError(f"beta: expected 0 <= beta < 1, got {beta}")
        if not (isinstance(sample_last, int) and sample_last >= 0):
            raise ValueError(f"sample_last: expected a non-negative int, got {sample_last!r}")
        self.sizes = [int(s) for s in sizes]
        self.budget = float(budget)
        self.eta, self.beta, self.order, self.sample_last = eta, beta, order, sample_last
        self.variant = self.v.name
        n = len(self.sizes)
        self.G = torch.zeros(n, dtype=torch.float64)  # importance estimate per module
        self.k = torch.zeros(n, dtype=torch.int64)  # times the estimate was updated
        self.last = torch.full((n,), -1, dtype=torch.int64)  # outer loop last selected in (-1: never)
        self._unselected = n
        self.loops = 0  # outer loops completed
        self.generator = torch.Generator().manual_seed(int(seed))
        self._cycle: List[int] = []  # remaining modules of the current pass (cyclic orders)
        self.in_warmup = False  # whether the latest sample forced never-sampled modules in

    # ---- the estimate and the distribution ----
    @_on_host
    def importance(self) -> torch.Tensor:
        """Ĝ: the bias-corrected estimate, or G itself when the correction compounds in place."""
        if self.v.compounding_correction:
            return self.G.clone()
        corrected = self.G / (1 - self.beta ** self.k.double())
        return torch.where(self.k > 0, corrected, torch.zeros_like(self.G))

    @_on_host
    def probabilities(self) -> torch.Tensor:
        n = len(self.sizes)
        if self.order != "misa":
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        energy = self.importance() if self.v.norm_power == 2 else self.importance().square()
        logits = self.effective_eta(energy) * energy
        if self.v.logit_cap is not None:
            logits = torch.clamp(logits, max=self.v.logit_cap)
        return torch.softmax(logits, dim=0)

    @_on_host
    def effective_eta(self, energy: torch.Tensor) -> float:
        """eta, or for eta="auto" 1 / (mean energy of the modules with an estimate): scale-free logits."""
        if self.eta != "auto":
            return self.eta
        known = energy[self.k > 0]
        mean = float(known.mean()) if known.numel() else 0.0
        return 1.0 / mean if mean > 0 and math.isfinite(mean) else 0.0

    def never_selected(self) -> bool:
        # A Python count, not a tensor reduction: the optimizer asks at every step and must not sync.
        return self._unselected > 0

    # ---- sampling ----
    @_on_host
    def sample(self) -> List[int]:
        if self.order in ("ascending", "descending", "random"):
            return self._sample_cyclic()
        chosen: List[int] = []
        used = 0.0
        taken = set()
        pool = sorted(range(len(self.sizes)), key=lambda b: (int(self.last[b]), b))  # oldest first
        forced: List[int] = []
        if self.order == "misa":
            forced = [b for b in pool if self.last[b] < 0]
        forced += [b for b in pool[: self.sample_last] if b not in forced]
        self.in_warmup = False
        for b in forced:
            if used + self.sizes[b] <= self.budget:
                chosen.append(b)
                taken.add(b)
                used += self.sizes[b]
                self.in_warmup = self.in_warmup or bool(self.last[b] < 0 and self.order == "misa")
        rest = [b for b in pool if b not in taken]
        # Drawing one by one without replacement with probability ∝ P is the same distribution as
        # sorting by log P + Gumbel noise (the Gumbel-top-k trick): one draw of noise per switch.
        p = self.probabilities()[rest]
        u = torch.rand(len(rest), generator=self.generator, dtype=torch.float64).clamp_(1e-300, 1.0)
        keys = torch.log(p) - torch.log(-torch.log(u))
        for i in torch.argsort(keys, descending=True, stable=True).tolist():
            b = rest[i]
            if used + self.sizes[b] <= self.budget:
                chosen.append(b)
                used += self.sizes[b]
        return self._selected(chosen)

    def _selected(self, chosen: List[int]) -> List[int]:
        for b in chosen:
            if self.last[b] < 0:
                self._unselected -= 1
            self.last[b] = self.loops
        return sorted(chosen)

    @_on_host
    def _sample_cyclic(self) -> List[int]:
        # BAdam's switch modes: walk the modules in a fixed (or per-pass shuffled) order, taking the
        # next modules that fit in the budget; a new pass starts when the order is used up.
        chosen: List[int] = []
        used = 0.0
        self.in_warmup = False
        while True:
            if not self._cycle:
                if chosen:
                    break
                self._cycle = self._new_pass()
            b = self._cycle[0]
            if used + self.sizes[b] > self.budget:
                break
            chosen.append(self._cycle.pop(0))
            used += self.sizes[b]
        return self._selected(chosen)

    def _new_pass(self) -> List[int]:
        n = len(self.sizes)
        if self.order == "ascending":
            return list(range(n))
        if self.order == "descending":
            return list(range(n - 1, -1, -1))
        return torch.randperm(n, generator=self.generator).tolist()

    # ---- the estimate's update, once per outer loop ----
    @_on_host
    def update(self, active: Sequence[int], s: Sequence[float]) -> None:
        """`s[i]` is module active[i]'s gradient statistic over the loop, already divided by the loop's
        length (or by T): its mean squared norm (norm_power 2) or mean norm (norm_power 1)."""
        for b, value in zip(active, s):
            value = float(value)
            if not math.isfinite(value):
                continue  # a non-finite statistic never enters the estimate
            if value == 0.0 and self.v.skip_zero_statistic:
                continue
            self.k[b] += 1
            if self.v.compounding_correction:
                # The authors' code writes the bias correction back into G, so it compounds.
                self.G[b] = ((1 - self.beta) * value + self.beta * self.G[b]) / (1 - self.beta ** int(self.k[b]))
            else:
                self.G[b] = self.beta * self.G[b] + (1 - self.beta) * value
        self.loops += 1

    def smallest_module(self) -> int:
        return min(range(len(self.sizes)), key=lambda b: self.sizes[b])

    # ---- checkpoints ----
    @_on_host
    def state_dict(self) -> Dict:
        return {
            "G": self.G.clone(),
            "k": self.k.clone(),
            "last": self.last.clone(),
            "loops": self.loops,
            "rng": self.generator.get_state(),
            "cycle": list(self._cycle),
            "in_warmup": self.in_warmup,
        }

    @_on_host
    def load_state_dict(self, state: Dict) -> None:
        if state["G"].numel() != len(self.sizes):
            raise ValueError(f"sampler state: expected {len(self.sizes)} modules, got {state['G'].numel()}")
        self.G = state["G"].to(torch.float64).cpu().clone()
        self.k = state["k"].to(torch.int64).cpu().clone()
        self.last = state["last"].to(torch.int64).cpu().clone()
        self._unselected = int((self.last < 0).sum())
        self.loops = int(state["loops"])
        self.generator.set_state(state["rng"].cpu())
        self._cycle = list(state["cycle"])
        self.in_warmup = bool(state["in_warmup"])


@_on_host
def entropy(p: torch.Tensor) -> float:
    p = p[p > 0]
    return float(-(p * p.log()).sum())


__all__ = ["ImportanceSampler", "ORDERS", "entropy"]
