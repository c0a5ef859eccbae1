"""The period's counters, and the run's, as one record that the schedule writes and a checkpoint reads back.

A part of MISA (misa/optimizer.py composes the parts): `MISA.period`. Everything here changes only through
its methods, so that no other part writes these counters: `start` at a switch (schedule.py), `advance`
once per step, `load` from a checkpoint (checkpoint.py). The step's device work adds into the tensors in
place (`S.add_`, one `_foreach_add_` for every counter): the tensors are the same objects a recorded CUDA
graph holds until the next switch.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor


class Period:
    """t: steps into the current period, of `length`; step_count: steps so far; S: the period's importance
    statistic per active module; skips: steps skipped for non-finite gradients so far, skips_at_switch its
    value when the active set was drawn (a state's true step count is its attempted steps minus the skips
    since), period_skips: this period's (all three on the device, decided there without a host sync)."""

    __slots__ = ("device", "t", "length", "step_count", "S", "skips", "skips_at_switch", "period_skips")

    def __init__(self, device: torch.device, length: int):
        self.device = device
        self.t, self.length, self.step_count = 0, length, 0
        self.S = torch.zeros(0, device=device)
        self.skips = self._scalar(0.0)
        self.skips_at_switch = self.skips.clone()
        self.period_skips = self._scalar(0.0)

    def _scalar(self, value: float) -> Tensor:
        return torch.full((), value, dtype=torch.float32, device=self.device)

    def start(self, n_active: int, length: int) -> None:
        """A new period at a switch: fresh statistics for `n_active` modules, no steps or skips in it yet."""
        self.skips_at_switch = self.skips.clone()
        self.S = torch.zeros(n_active, dtype=torch.float32, device=self.device)
        self.period_skips = self._scalar(0.0)
        self.t, self.length = 0, length

    def advance(self) -> None:
        self.t += 1
        self.step_count += 1

    def as_dict(self) -> Dict:
        """The entries of MISA's state_dict()["misa"] that are this record's (reads the device)."""
        return {
            "t": self.t,
            "period_len": self.length,
            "step_count": self.step_count,
            "S": self.S.detach().cpu().clone(),
            "skipped_steps": int(self.skips),
            "period_skips": int(self.period_skips),
        }

    def load(self, saved: Dict) -> None:
        """The counters of a state_dict()["misa"] (after its switch to the saved set has started a period)."""
        self.t, self.length, self.step_count = int(saved["t"]), int(saved["period_len"]), int(saved["step_count"])
        self.S = saved["S"].to(device=self.device, dtype=torch.float32).clone()
        self.skips = self._scalar(float(saved["skipped_steps"]))
        self.period_skips = self._scalar(float(saved.get("period_skips", 0)))
        self.skips_at_switch = self.skips.clone()
