"""Argument checks shared by every public op. They run before any backend, so a bad call raises a
clear error naming the argument and mutates nothing."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import Tensor

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPE = torch.float32


def canonical_device(device) -> torch.device:
    """`device` spelled as tensors on it report theirs: an index for accelerators, none for the CPU.
    torch.device("cuda") != torch.device("cuda:0"), so comparing a user's spelling with a tensor's
    device needs this."""
    device = torch.device(device)
    if device.type == "cpu":
        return torch.device("cpu")
    if device.index is None and device.type == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def as_tensor_list(name: str, tensors) -> list:
    if isinstance(tensors, Tensor) or not isinstance(tensors, (list, tuple)):
        raise TypeError(f"{name}: expected a list of tensors, got {type(tensors).__name__}")
    for i, t in enumerate(tensors):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name}[{i}]: expected a tensor, got {type(t).__name__}")
        if t.is_sparse or t.layout != torch.strided:
            raise ValueError(f"{name}[{i}]: sparse tensors are not supported (layout {t.layout})")
        if not t.is_contiguous():
            raise ValueError(f"{name}[{i}]: expected a contiguous tensor (shape {tuple(t.shape)}, "
                             f"stride {t.stride()})")
    return list(tensors)


def check_same_length(**lists: Sequence) -> int:
    lengths = {name: len(v) for name, v in lists.items()}
    if len(set(lengths.values())) > 1:
        detail = ", ".join(f"{k}={v}" for k, v in lengths.items())
        raise ValueError(f"tensor lists must have equal lengths, got {detail}")
    return next(iter(lengths.values()))


def check_device(device: torch.device, **lists: Sequence[Tensor]) -> None:
    for name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if t.device != device:
                raise ValueError(f"{name}[{i}]: expected a tensor on {device}, got one on {t.device}")


def check_params_and_grads(params: Sequence[Tensor], grads: Sequence[Tensor]) -> torch.dtype:
    dtype = params[0].dtype
    if dtype not in PARAM_DTYPES:
        raise TypeError(f"params[0]: dtype {dtype} is not supported; expected one of float32, bfloat16, float16")
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.dtype != dtype:
            raise TypeError(f"params[{i}]: all params of one call must share a dtype; got {dtype} and "
                            f"{p.dtype} (call once per dtype)")
        if g.dtype != p.dtype:
            raise TypeError(f"grads[{i}]: expected dtype {p.dtype} (the parameter's), got {g.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}]: expected shape {tuple(p.shape)} (the parameter's), got {tuple(g.shape)}")
    return dtype


def check_states(params: Sequence[Tensor], **states: Sequence[Tensor]) -> None:
    for name, tensors in states.items():
        for i, (p, s) in enumerate(zip(params, tensors)):
            if s.dtype != STATE_DTYPE:
                raise TypeError(f"{name}[{i}]: optimizer states must be float32, got {s.dtype}")
            if s.numel() != p.numel():
                raise ValueError(f"{name}[{i}]: expected {p.numel()} elements (shape {tuple(p.shape)}, "
                                 f"the parameter's), got shape {tuple(s.shape)}")


def check_master_params(params: Sequence[Tensor], masters: Optional[Sequence[Tensor]]) -> list:
    """The fp32 master copies, one per low-precision parameter; [] when not given."""
    if masters is None:
        return []
    masters = as_tensor_list("master_params", masters)
    if len(masters) != len(params):
        raise ValueError(f"master_params: expected {len(params)} tensors (one per parameter), got {len(masters)}")
    if params and params[0].dtype == torch.float32:
        raise TypeError("master_params: the parameters are float32 and need no master copy; pass None")
    for i, (p, w) in enumerate(zip(params, masters)):
        if w.dtype != torch.float32:
            raise TypeError(f"master_params[{i}]: master weights must be float32, got {w.dtype}")
        if w.numel() != p.numel():
            raise ValueError(f"master_params[{i}]: expected {p.numel()} elements (shape {tuple(p.shape)}, "
                             f"the parameter's), got shape {tuple(w.shape)}")
    return masters


def check_rounding(rounding: str, dtype: torch.dtype, seed) -> bool:
    """True for stochastic rounding (which only bf16 parameters can use)."""
    from .scalars import check_seed

    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {rounding!r}")
    check_seed(seed)
    if rounding == "stochastic" and dtype == torch.float16:
        raise TypeError("rounding='stochastic' supports bfloat16 parameters (float16 has too little range to "
                        "train without a master copy): use master_params for float16")
    return rounding == "stochastic" and dtype == torch.bfloat16


def check_distinct(**lists: Sequence[Tensor]) -> None:
    """No tensor may be passed twice (e.g. a parameter as its own exp_avg): the kernels read and write
    each operand once per element, so an alias would silently compute garbage. Checked by identity, which
    costs a set over the tensors (a per-element overlap test of every pair of views would cost more host
    time than the step itself for thousands of tensors)."""
    every = [t for tensors in lists.values() for t in tensors]
    if len({id(t) for t in every}) == len(every):
        return
    seen = {}
    for name, tensors in lists.items():
        for i, t in enumerate(tensors):
            if id(t) in seen:
                raise ValueError(f"{name}[{i}] is the same tensor as {seen[id(t)]}: every operand must be its own "
                                 "memory")
            seen[id(t)] = f"{name}[{i}]"


def check_grad_sq_norms(out: Optional[Tensor], n: int, device: torch.device) -> None:
    if out is None:
        return
    if not isinstance(out, Tensor):
        raise TypeError(f"grad_sq_norms: expected a float32 tensor or None, got {type(out).__name__}")
    if out.dtype != torch.float32 or out.dim() != 1 or out.numel() != n or not out.is_contiguous():
        raise ValueError(f"grad_sq_norms: expected a contiguous 1-D float32 tensor of {n} elements, "
                         f"got dtype {out.dtype}, shape {tuple(out.shape)}")
    if out.device != device:
        raise ValueError(f"grad_sq_norms: expected a tensor on {device}, got one on {out.device}")


def check_skip(skip: Optional[Tensor], device: torch.device) -> None:
    if skip is None:
        return
    if not isinstance(skip, Tensor) or skip.dim() != 0 or skip.dtype != torch.float32:
        raise TypeError(f"skip: expected None or a 0-d float32 tensor, got {type(skip).__name__} "
                        f"{getattr(skip, 'dtype', '')} {tuple(getattr(skip, 'shape', ()))}")
    if skip.device != device:
        raise ValueError(f"skip: expected a tensor on {device}, got one on {skip.device}")


def check_scalar_or_0d(name: str, value, device: torch.device, minimum: Optional[float] = None,
                       integer: bool = False) -> None:
    if isinstance(value, Tensor):
        if value.dim() != 0:
            raise ValueError(f"{name}: a tensor {name} must be 0-d, got shape {tuple(value.shape)}")
        if value.device != device:
            raise ValueError(f"{name}: expected a 0-d tensor on {device}, got one on {value.device}")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}: expected a number or a 0-d tensor, got {type(value).__name__}")
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"{name}: expected a finite number, got {value}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}: expected {name} >= {minimum}, got {value}")
    if integer and not float(value).is_integer():
        raise ValueError(f"{name}: expected a whole number, got {value}")


def check_hyper(beta1: float, beta2: float, eps: float, weight_decay: float = 0.0) -> None:
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}: expected 0 <= {name} < 1, got {value}")
    if not eps > 0.0:
        raise ValueError(f"eps: expected eps > 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay: expected weight_decay >= 0, got {weight_decay}")
