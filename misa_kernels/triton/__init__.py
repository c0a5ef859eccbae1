"""The Triton backend: each op is one multi-tensor launch (plus a tiny per-tensor reduction for norms)."""

from .ops import adamw_step_, grad_sq_norms, momentum_flush_

__all__ = ["adamw_step_", "grad_sq_norms", "momentum_flush_"]
