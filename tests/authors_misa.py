"""A small transcription, in float64, of the authors' optimizer (github.com/pkumelon/MISA,
`BlockCoordinateDesentOptimizer`, update_order="misa", granularity="module", fp32 model, no LoRA), kept
to what decides the trajectory: the per-step norm statistic, the switch schedule, the compounding G
update, the capped logits, the forced part of the sample, Adam states kept for re-selected modules.
Its random draw (Python's `random.choices`) cannot be aligned with ours, so `switch` takes the
modules chosen by the optimizer under test after checking the forced ones."""

from __future__ import annotations

import math
import random
from typing import Dict, List, Optional, Sequence

import torch


class AuthorsMISA:
    def __init__(
        self,
        modules: Sequence[List[torch.Tensor]],
        total_params: int,
        *,
        ratio: float,
        interval: int,
        eta: float,
        lr: float,
        betas=(0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        beta: float = 0.8,
        sample_last: int = 2,
        cap: float = 5.0,
    ):
        self.params = [[p.detach().double().clone() for p in ps] for ps in modules]
        self.sizes = [sum(p.numel() for p in ps) for ps in modules]
        self.total, self.ratio, self.T, self.eta, self.beta = total_params, ratio, interval, eta, beta
        self.lr, self.betas, self.eps, self.wd = lr, betas, eps, weight_decay
        self.sample_last, self.cap = sample_last, cap
        n = len(modules)
        self.last_used = [-1] * n
        self.G = [0.0] * n
        self.G_cur = [0.0] * n
        self.sampled_times = [1] * n
        self.p = [1.0 / n] * n
        self.global_step = 0
        self.active: List[int] = []
        self.adam: Dict[tuple, list] = {}  # (module, tensor) -> [m, v, step]

    # ---- update_trainable_params, split at the random draw ----
    def update_estimate(self) -> None:
        for i in range(len(self.G)):
            if self.G_cur[i] == 0:
                continue
            self.G[i] = (1.0 - self.beta) * self.G_cur[i] + self.beta * self.G[i]
            self.G[i] /= 1.0 - self.beta ** self.sampled_times[i]
            self.sampled_times[i] += 1
            self.G_cur[i] = 0
        logits = [math.exp(min(self.cap, self.eta * g * g)) for g in self.G]
        self.p = [x / sum(logits) for x in logits]

    def forced(self):
        """The deterministic part of weighted_sample_without_replacement: (chosen, removed from the pool, ratio)."""
        order = sorted((last, i) for i, last in enumerate(self.last_used))
        chosen, removed, used = [], [], 0.0
        for pos, (last, i) in enumerate(order):
            if last == -1 or pos < self.sample_last:
                if used + self.sizes[i] / self.total <= self.ratio:
                    used += self.sizes[i] / self.total
                    chosen.append(i)
                removed.append(i)
        return chosen, removed, used

    def draw(self, rng: random.Random) -> List[int]:
        """Their random completion of the sample, for the statistical comparison."""
        chosen, removed, used = self.forced()
        pool = [i for i in range(len(self.G)) if i not in removed]
        weights = [self.p[i] for i in pool]
        while pool:
            pick = rng.choices(pool, weights=weights, k=1)[0]
            if used + self.sizes[pick] / self.total <= self.ratio:
                used += self.sizes[pick] / self.total
                chosen.append(pick)
            k = pool.index(pick)
            del pool[k], weights[k]
        return chosen

    def switch(self, chosen: Sequence[int]) -> None:
        retain = {i for i in chosen if i in self.active}
        self.adam = {key: st for key, st in self.adam.items() if key[0] in retain}
        self.active = sorted(chosen)
        for i in chosen:
            self.last_used[i] = self.global_step

    # ---- step ----
    def step(self, grads: Dict[int, List[torch.Tensor]]) -> bool:
        """One optimizer step; returns True when the authors' code would call update_trainable_params."""
        for i in self.active:
            norms = [float(g.double().norm()) for g in grads[i]]
            self.G_cur[i] += float(torch.tensor(norms).norm()) / self.T
        b1, b2 = self.betas
        for i in self.active:
            for j, (p, g) in enumerate(zip(self.params[i], grads[i])):
                m, v, t = self.adam.get((i, j), [torch.zeros_like(p), torch.zeros_like(p), 0])
                g = g.double()
                t += 1
                p.mul_(1 - self.lr * self.wd)
                m = b1 * m + (1 - b1) * g
                v = b2 * v + (1 - b2) * g * g
                denom = (v / (1 - b2**t)).sqrt() + self.eps
                p.sub_(self.lr / (1 - b1**t) * m / denom)
                self.adam[(i, j)] = [m, v, t]
        self.global_step += 1
        return self.global_step % self.T == 0 or -1 in self.last_used

    def state_steps(self, i: int) -> Optional[int]:
        st = self.adam.get((i, 0))
        return None if st is None else st[2]
