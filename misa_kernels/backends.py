"""The one place that picks a backend.

`resolve(requested, device)` turns "auto" | "torch" | "triton" | "cuda" into the backend that runs.
"auto" picks cuda > triton > torch for CUDA tensors and torch for CPU tensors, quietly falling back;
an explicit request (argument or the MISA_KERNELS_BACKEND variable) that cannot run raises and says
why. `last_backend()` reports what the latest call used, so a fallback is never hidden.
"""

from __future__ import annotations

import importlib
import os
from typing import Dict, List, Optional, Tuple

import torch

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "MISA_KERNELS_BACKEND"


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run for these tensors."""


_last: Optional[str] = None
_modules: Dict[str, object] = {}


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def _triton_problem(device: torch.device) -> Optional[str]:
    try:
        importlib.import_module("triton")
    except Exception as exc:  # ImportError, or a broken install
        return f"triton cannot be imported ({exc})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and _interpreting():
        return None
    return (
        f"triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 "
        f"(set before triton is imported); got {device.type} tensors"
    )


def _cuda_problem(device: torch.device) -> Optional[str]:
    if device.type != "cuda":
        return f"the cuda backend needs CUDA tensors, got {device.type} tensors"
    from . import cuda

    return cuda.load_error()


def _problem(backend: str, device: torch.device) -> Optional[str]:
    if backend == "torch":
        return None
    if backend == "triton":
        return _triton_problem(device)
    return _cuda_problem(device)


def resolve(requested: str, device: torch.device) -> str:
    if not isinstance(requested, str) or requested not in ("auto",) + BACKENDS:
        raise ValueError(f"backend: expected one of 'auto', 'torch', 'triton', 'cuda', got {requested!r}")
    source = "backend"
    if requested == "auto" and os.environ.get(ENV_VAR):
        requested, source = os.environ[ENV_VAR], ENV_VAR
        if requested not in ("auto",) + BACKENDS:
            raise ValueError(f"{ENV_VAR}: expected one of 'auto', 'torch', 'triton', 'cuda', got {requested!r}")
    if requested == "auto":
        candidates: Tuple[str, ...] = ("cuda", "triton", "torch") if device.type == "cuda" else ("torch",)
        for backend in candidates:
            if _problem(backend, device) is None:
                return backend
        return "torch"
    problem = _problem(requested, device)
    if problem is not None:
        raise BackendUnavailable(f"{source}={requested!r} cannot run: {problem}")
    return requested


def implementation(backend: str):
    """The module that implements the ops for `backend` (imported on first use)."""
    if backend not in _modules:
        name = {"torch": ".reference", "triton": ".triton", "cuda": ".cuda"}[backend]
        _modules[backend] = importlib.import_module(name, __package__)
    return _modules[backend]


def record(backend: str) -> None:
    global _last
    _last = backend


def last_backend() -> Optional[str]:
    """The backend the most recent op call ran on (None before the first call)."""
    return _last


def available_backends(device="cuda") -> List[str]:
    """The backends that can run on `device` here, best first."""
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        return []
    return [b for b in ("cuda", "triton", "torch") if _problem(b, device) is None]
