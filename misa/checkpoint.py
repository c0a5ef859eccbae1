"""Checkpoint state: MISA's state_dict (states as copies, true step counts, the schedule and the sampler)
and its loading, with conversion between state formats.

A part of MISA (misa/optimizer.py composes the parts); misa/distributed.py saves the same through
torch.distributed.checkpoint.
"""

from __future__ import annotations

from typing import Dict

import torch
from torch import Tensor

from misa_kernels import quant

from .active_set import _local


class Checkpoint:
    """state_dict and its loading (a part of MISA)."""

    def state_dict(self) -> Dict:
        sd = super().state_dict()
        # torch's state_dict hands out the live per-parameter dicts: copy them before replacing their
        # tensors, or this optimizer's states would stop being views of the arena.
        live = {i: self.param_by_index(int(i)) for i in sd["state"]}
        sd["state"] = {
            i: {
                **{
                    key: value.detach().clone()
                    for key, value in st.items()
                    if torch.is_tensor(value) and key != "skips0"
                },
                "step": self._steps_taken(self.state[live[i]]),
            }
            for i, st in sd["state"].items()
        }
        sd["misa"] = {
            "module_names": list(self.module_names),
            "variant": self.variant,
            "sampler": self.sampler.state_dict(),
            "active": list(self.active_set.indices),
            **self.period.as_dict(),
            "switch_log": list(self.switch_log),
        }
        return sd

    def load_state_dict(self, state_dict: Dict) -> None:
        self.load_schedule(state_dict)
        for i, st in state_dict["state"].items():
            p = self.param_by_index(int(i))
            if p not in self.state:
                raise ValueError(f"state_dict: state for {self._param_names.get(p, i)}, which is not active")
            self._load_states(p, self.state[p], st)
            self.state[p]["step"] = int(st["step"])
        self._invalidate_plan()

    def _load_states(self, p: Tensor, here: Dict, saved: Dict) -> None:
        """Copy a saved parameter's states into its arena views, converting between formats: fp32 states
        are quantized into 8-bit ones and 8-bit ones dequantized (quant.py), an fp32 master becomes a
        compensation (master - weight) and the reverse (weight + compensation); a checkpoint without
        either starts them from the weight, as an activation does."""
        maps = quant.maps(self.device)
        for key, scale_key, qmap in (
            ("exp_avg", "exp_avg_absmax", maps[0]),
            ("exp_avg_sq", "exp_avg_sq_absmax", maps[1]),
        ):
            if key not in saved:
                continue
            value = saved[key].to(self.device)
            if (scale_key in here) == (scale_key in saved):  # same format: the exact bytes
                here[key].copy_(value.reshape(here[key].shape))
                if scale_key in here:
                    here[scale_key].copy_(saved[scale_key].reshape(-1))
            elif scale_key in here:
                codes, scales = quant.quantize(value.float(), qmap)
                here[key].copy_(codes.reshape(here[key].shape))
                here[scale_key].copy_(scales)
            else:
                here[key].copy_(
                    quant.dequantize(value, saved[scale_key].to(self.device), qmap).reshape(here[key].shape)
                )
        weight = _local(p).detach().float().reshape(-1)
        if "master" in here:
            if "master" in saved:
                value = saved["master"]
            elif "compensation" in saved:
                value = weight + saved["compensation"].to(self.device).float().reshape(-1)
            else:
                value = weight
            here["master"].copy_(value.reshape(here["master"].shape))
        if "compensation" in here:
            if "compensation" in saved:
                value = saved["compensation"]
            elif "master" in saved:
                value = saved["master"].to(self.device).float().reshape(-1) - weight
            else:
                value = torch.zeros_like(weight)
            here["compensation"].copy_(value.reshape(here["compensation"].shape))

    def param_by_index(self, i: int) -> Tensor:
        """The parameter behind index `i` of state_dict()["state"] (param-group order)."""
        return [p for g in self.param_groups for p in g["params"]][i]

    def load_schedule(self, state_dict: Dict) -> None:
        """Everything of a state_dict except the Adam states: hyperparameters, the sampler and its RNG, the
        active set (whose states are then acquired, undefined until filled in) and the step counters."""
        misa = state_dict.get("misa")
        if misa is None:
            raise ValueError("state_dict: not a MISA state_dict (no 'misa' entry)")
        if misa["module_names"] != self.module_names:
            raise ValueError(
                "state_dict: saved for a model with different modules "
                f"({len(misa['module_names'])} saved, {len(self.module_names)} here)"
            )
        # The variant decides which parameters a module holds (its biases, say): name it when it is the cause.
        saved_variant = misa.get("variant", self.variant)
        hint = (
            f" (saved with variant={saved_variant!r}, this optimizer has variant={self.variant!r})"
            if saved_variant != self.variant
            else ""
        )
        if len(state_dict["param_groups"]) != len(self.param_groups):
            raise ValueError(f"state_dict: the number of param groups differs{hint}")
        for group, saved in zip(self.param_groups, state_dict["param_groups"]):
            if len(saved["params"]) != len(group["params"]):
                raise ValueError(
                    f"state_dict: a param group has a different number of parameters "
                    f"({len(saved['params'])} saved, {len(group['params'])} here){hint}"
                )
            for key, value in saved.items():
                if key != "params":
                    group[key] = value
        # Switch to the saved active set, dropping every current module state.
        self.sampler.load_state_dict(misa["sampler"])
        self._switch(misa["active"], log=False, keep_states=set())
        self.period.load(misa)
        for st in self.state.values():  # saved steps are true steps: no skips since "activation"
            st["skips0"] = self.period.skips_at_switch
        self._states_loaded()  # the step counts a plan holds are made again from these
        self._load_switch_log(misa["switch_log"])
