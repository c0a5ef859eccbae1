"""`adamw_step_` prepared once for the lists a caller keeps from step to step.

An optimizer hands the same parameters, states and masters to every call; only the gradients (and the
scalars) change. `prepare_adamw_step` checks the kept lists once and keeps what a call would otherwise
remake from them: the validated record, the tensors the call writes (for autograd's version counters)
and, for the fused backends, the chunk tables, keyed by the gradients' addresses alone. A call then
checks only what may have changed:

- the gradients, on every call (one mapped pass; any doubt sends them through the full checks, which
  name the problem);
- the kept tensors' addresses (`p.data = ...` keeps the tensor and moves its storage): a move checks the
  kept lists again and makes new tables;
- the scalars, as `adamw_step_` does.

    step = misa_kernels.prepare_adamw_step(params, exp_avgs, exp_avg_sqs, master_params=masters)
    step.grad_sq_norms_(grads, out)                     # optional: out[i] += sum(grads[i]**2)
    step(grads, lr=1e-5, step=t, grad_sq_norms=None, skip=found)

Calling it is `adamw_step_` on the kept lists, to the bit: the same checks, backend choice and launch
(ops.run_adamw_step). `misa.MISA` makes one per kernel call of its plan (misa/fused_step.py).
"""

from __future__ import annotations

import operator
from collections import OrderedDict
from typing import List, Optional, Sequence

import torch
from torch import Tensor

from . import backends, checks, ops, tables

_TABLES_KEPT = 4  # chunk tables per prepared call: one per set of gradient addresses seen lately


class PreparedAdamW:
    """`adamw_step_` over kept lists, checked once (see the module docstring). Made by `prepare_adamw_step`."""

    def __init__(self, params, exp_avgs, exp_avg_sqs, optional, backend: str):
        self._given = (params, exp_avgs, exp_avg_sqs, optional)
        self.backend = backend
        self._validate()
        # The checked copies are what a moved storage is checked again from: later changes to the caller's
        # lists are not seen (the docstring of prepare_adamw_step says so).
        params, exp_avgs, exp_avg_sqs, *rest = self.lists
        self._given = (params, exp_avgs, exp_avg_sqs, tuple(x or None for x in rest))
        if self.lists[0]:
            backends.resolve(backend, self._seen.device)  # a backend that cannot run is named now

    def _validate(self) -> None:
        params, exp_avgs, exp_avg_sqs, optional = self._given
        self.lists, self._seen = checks.kept_operands(params, exp_avgs, exp_avg_sqs, optional)
        self._flat: List[Tensor] = [t for ts in self.lists for t in ts]  # every kept tensor is written
        # Views share their base's version counter: bumping each base once tells autograd of every write (the
        # states of an optimizer are views of one arena: one bump instead of one per tensor).
        self._counters: List[Tensor] = list(
            {id(b): b for b in (t if t._base is None else t._base for t in self._flat)}.values()
        )
        self._addresses = self._addresses_now()
        self._tables: "OrderedDict[tuple, tuple]" = OrderedDict()
        # (gradients, their addresses or None) that passed a norms call just now, for the step after it
        self._checked: Optional[tuple] = None

    def _addresses_now(self) -> Optional[tuple]:
        try:
            return tuple(map(Tensor.data_ptr, self._flat))
        except Exception:  # tensors without storage (fake, meta subclasses): nothing to table
            return None

    def __len__(self) -> int:
        return len(self.lists[0])

    # ---------------------------------------------------------------- per call
    def _grads(self, grads) -> tuple:
        """(gradients as a list, plain, their addresses if a norms call took them) after the checks; raises
        naming a bad gradient, writing nothing."""
        checked, self._checked = self._checked, None
        if checked is not None and len(checked[0]) == len(grads) and all(map(operator.is_, checked[0], grads)):
            return checked[0], self._seen.plain, checked[1]  # a norms call checked them (and the addresses) just now
        if self._addresses is not None and self._addresses_now() != self._addresses:
            self._validate()  # storage moved: the kept lists are checked again, the tables remade
        if self._seen is not None and checks._grads_fit(grads, self._seen):
            return list(grads), self._seen.plain, None
        params, exp_avgs, exp_avg_sqs, masters, comp, m_absmax, v_absmax = self.lists
        lists, _, plain = checks.adamw_operands(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            (masters or None, comp or None, m_absmax or None, v_absmax or None),
            remember=False,
        )
        return lists[1], plain, None

    def _table(self, grads: List[Tensor], addresses: tuple, norms: bool):
        """The fused backends' chunk table tuple for these gradients (made once per set of their addresses).
        What is kept holds no gradient: a table of old gradients' addresses must not keep their memory alive
        (the launchers read only the parameters' dtype and device from the operand lists, and gradients share
        both)."""
        key = (norms, addresses)
        found = self._tables.get(key)
        if found is None:
            params, exp_avgs, exp_avg_sqs, masters, comp, m_absmax, v_absmax = self.lists
            made = (
                tables.prepare([grads])
                if norms
                else tables.prepare_formats([params, grads, exp_avgs, exp_avg_sqs], masters, comp, (m_absmax, v_absmax))
            )
            if made is None:  # every tensor empty
                return None
            keep = made[0]
            found = (keep, [params[i] for i in keep]) + made[2:]  # (keep, kept params, table[, eight])
            if norms:  # the norm pass's partial sums: one buffer per table, not one allocation per call
                found += (torch.empty(made[2].n_chunks, dtype=torch.float32, device=params[0].device),)
            self._tables[key] = found
            if len(self._tables) > _TABLES_KEPT:
                self._tables.popitem(last=False)
        else:
            self._tables.move_to_end(key)
        keep, kept, *rest = found
        return (keep, (kept,), *rest) if norms else (keep, [kept], *rest)

    def grad_sq_norms_(self, grads: Sequence[Tensor], out: Tensor) -> Tensor:
        """out[i] += sum(grads[i]**2) in fp32 (one launch on the fused backends), `out` being a contiguous 1-D
        fp32 tensor of one entry per parameter. A call of this object with the same gradients right after
        does not check them again."""
        if not self.lists[0]:
            checks.check_same_length(params=self.lists[0], grads=checks.as_tensor_list("grads", grads))
            return out
        grads, plain, _ = self._grads(grads)
        checks.check_grad_sq_norms(out, len(grads), self._seen.device)
        addresses = []  # taken by the fused backends only (the torch backend needs no table)

        def table():
            addresses.append(tuple(map(Tensor.data_ptr, grads)))
            return self._table(grads, addresses[0], norms=True)

        ops.run_grad_sq_norms(grads, self._seen.device, plain, self.backend, out=out, prepared=table)
        self._checked = (grads, addresses[0] if addresses else None)
        return out

    def __call__(
        self,
        grads: Sequence[Tensor],
        *,
        lr,
        beta1: float = 0.9,
        beta2: float = 0.999,
        eps: float = 1e-8,
        weight_decay: float = 0.0,
        step,
        fresh: bool = False,
        grad_sq_norms: Optional[Tensor] = None,
        rounding: str = "nearest",
        seed: int = 0,
        skip: Optional[Tensor] = None,
    ) -> None:
        """`adamw_step_(params, grads, exp_avgs, exp_avg_sqs, ..., **kept)` with the kept lists prepared."""
        if not self.lists[0]:
            checks.check_same_length(params=self.lists[0], grads=checks.as_tensor_list("grads", grads))
            return
        grads, plain, addresses = self._grads(grads)
        params, exp_avgs, exp_avg_sqs, masters, comp, m_absmax, v_absmax = self.lists

        def table():
            return self._table(grads, addresses or tuple(map(Tensor.data_ptr, grads)), norms=False)

        ops.run_adamw_step(
            [params, grads, exp_avgs, exp_avg_sqs, masters, comp, m_absmax, v_absmax],
            self._seen.device,
            plain,
            self.backend,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            weight_decay=weight_decay,
            step=step,
            fresh=fresh,
            grad_sq_norms=grad_sq_norms,
            rounding=rounding,
            seed=seed,
            skip=skip,
            prepared=table,
            written=self._counters,
        )


def prepare_adamw_step(
    params: Sequence[Tensor],
    exp_avgs: Sequence[Tensor],
    exp_avg_sqs: Sequence[Tensor],
    *,
    master_params: Optional[Sequence[Tensor]] = None,
    compensation: Optional[Sequence[Tensor]] = None,
    exp_avg_absmax: Optional[Sequence[Tensor]] = None,
    exp_avg_sq_absmax: Optional[Sequence[Tensor]] = None,
    backend: str = "auto",
) -> PreparedAdamW:
    """`adamw_step_` with everything but the gradients and scalars given once: the lists are checked now
    (the same checks, the same errors) and copied (later changes to the lists are not seen; moved storage
    is), and the returned object is called as `adamw_step_` without them:

        step = prepare_adamw_step(params, exp_avgs, exp_avg_sqs, master_params=masters)
        step(grads, lr=lr, step=t, grad_sq_norms=norms)

    It saves the host time of checking and tabling the kept tensors at every call. The backend is
    resolved at every call, as `adamw_step_` resolves it."""
    return PreparedAdamW(
        params, exp_avgs, exp_avg_sqs, (master_params, compensation, exp_avg_absmax, exp_avg_sq_absmax), backend
    )
