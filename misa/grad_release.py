"""Gradient release (MISA(release_grads=True)): each active tensor is updated in a post-accumulate-grad hook
as soon as backward has its gradient, and the gradient freed there; `step()` then keeps the books.

A part of MISA (misa/optimizer.py composes the parts).
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

from .active_set import _local


class GradRelease:
    """Updates during backward (a part of MISA)."""

    def _init_release(self, params) -> None:
        self._released: set = set()  # tensors updated by their hook since the last step()
        self._release_sq = torch.zeros(1, dtype=torch.float32, device=self.device)
        if self.release_grads:
            self._install_release_hooks(params)

    def _reset_release(self) -> None:
        """A new active set: one squared-norm accumulator per slot (and one for the rest)."""
        self._release_sq = torch.zeros(len(self.active_set.slots) + 1, dtype=torch.float32, device=self.device)

    def _install_release_hooks(self, params) -> None:
        # The hook holds the optimizer weakly: a model must not keep a dropped optimizer alive.
        me = weakref.ref(self)

        def hook(p: Tensor) -> None:
            opt = me()
            if opt is not None:
                opt._update_released(p)

        self._release_handles = []
        for p in params:  # a hook can only be registered while the tensor requires grad; it stays after that
            frozen = not p.requires_grad
            p.requires_grad_(True)
            self._release_handles.append(p.register_post_accumulate_grad_hook(hook))
            p.requires_grad_(not frozen)

    def _update_released(self, p: Tensor) -> None:
        """Update `p` from its just-accumulated gradient and free the gradient (release_grads=True)."""
        if p.grad is None or p not in self.state:
            return
        if p in self._released:
            name = self._param_names.get(p, "a tensor")
            raise RuntimeError(
                f"MISA(release_grads=True): a second backward reached {name} before step(): each "
                "gradient updates its tensor as soon as it exists, so gradients cannot be accumulated "
                "over several backward passes; call step() after each backward, or construct MISA "
                "without release_grads"
            )
        g = _local(p.grad)
        if g.is_sparse:
            raise RuntimeError(f"MISA does not support sparse gradients ({self._param_names.get(p, 'a param')})")
        self._released.add(p)
        gi = 0 if p in self.active_set.slots else self._group_of(p)
        with torch.no_grad():
            self._fused_steps([(gi, p, g, self.active_set.slots.get(p))], self._release_sq, call_base=self._index[p])
        p.grad = None

    def _group_of(self, p: Tensor) -> int:
        return next(gi for gi, q in self._always if q is p)

    def _release_step(self, loss):
        """step() under release_grads: the updates ran in the hooks; keep the books."""
        if not self._released:
            self._warn_no_gradient()
            return loss
        step_sq, self._release_sq = self._release_sq, torch.zeros_like(self._release_sq)
        self._released.clear()
        if self._reduce_sq_norms is not None:
            self._reduce_sq_norms(step_sq)
        per_module = self.active_set.per_module(step_sq)
        self.period.S.add_(per_module.sqrt() if self.v.norm_power == 1 else per_module)
        self._advance()
        return loss
