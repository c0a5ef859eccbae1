"""misa_kernels: fused multi-tensor optimizer ops for MISA, with torch, Triton and CUDA C++ backends.

    adamw_step_     AdamW over a list of tensors, squared grad norms accumulated in the same pass
    grad_sq_norms   sum(x*x) of every tensor, one launch
    momentum_flush_ MISA's end-of-period momentum step
    prepare_adamw_step  adamw_step_ with the lists kept between calls checked once (an optimizer's step)
    StateArena      fixed device buffer for the active modules' optimizer states

Every op takes backend="auto" | "torch" | "triton" | "cuda"; `last_backend()` says which one ran.
"""

from .arena import ArenaFull, StateArena
from .backends import BackendUnavailable, available_backends, last_backend
from .ops import adamw_step_, grad_sq_norms, momentum_flush_
from .prepared import PreparedAdamW, prepare_adamw_step

__version__ = "0.1.0"

__all__ = [
    "adamw_step_",
    "grad_sq_norms",
    "momentum_flush_",
    "prepare_adamw_step",
    "PreparedAdamW",
    "StateArena",
    "ArenaFull",
    "available_backends",
    "last_backend",
    "BackendUnavailable",
    "__version__",
]
