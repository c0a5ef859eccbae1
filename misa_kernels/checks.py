"""Argument checks shared by every public op. They run before any backend, so a bad call raises a
clear error naming the argument and mutates nothing."""

from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Optional, Sequence

import torch
from torch import Tensor

from . import quant
from .scalars import check_seed

PARAM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
STATE_DTYPE = torch.float32
COMPENSATION_DTYPE = torch.bfloat16


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
            raise ValueError(f"{name}[{i}]: expected a contiguous tensor (shape {tuple(t.shape)}, stride {t.stride()})")
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
            raise TypeError(
                f"params[{i}]: all params of one call must share a dtype; got {dtype} and "
                f"{p.dtype} (call once per dtype)"
            )
        if g.dtype != p.dtype:
            raise TypeError(f"grads[{i}]: expected dtype {p.dtype} (the parameter's), got {g.dtype}")
        if g.shape != p.shape:
            raise ValueError(f"grads[{i}]: expected shape {tuple(p.shape)} (the parameter's), got {tuple(g.shape)}")
    return dtype


def check_states(params: Sequence[Tensor], **states: Sequence[Tensor]) -> bool:
    """fp32 states, or (all of them) uint8 codes of the 8-bit format. Returns True for 8-bit."""
    every = [t for tensors in states.values() for t in tensors]
    eight = bool(every) and every[0].dtype == quant.CODE_DTYPE
    want = quant.CODE_DTYPE if eight else STATE_DTYPE
    for name, tensors in states.items():
        for i, (p, s) in enumerate(zip(params, tensors)):
            if s.dtype != want:
                if s.dtype in (STATE_DTYPE, quant.CODE_DTYPE):
                    raise TypeError(
                        f"{name}[{i}]: all states of one call share one format (float32, or uint8 "
                        f"codes of the 8-bit format); got {s.dtype} after {every[0].dtype} (call once "
                        "per format)"
                    )
                raise TypeError(
                    f"{name}[{i}]: optimizer states must be float32 (or uint8 codes of the 8-bit format), got {s.dtype}"
                )
            if s.numel() != p.numel():
                raise ValueError(
                    f"{name}[{i}]: expected {p.numel()} elements (shape {tuple(p.shape)}, "
                    f"the parameter's), got shape {tuple(s.shape)}"
                )
    return eight


def check_absmax(params: Sequence[Tensor], eight: bool, **absmaxes) -> list:
    """The fp32 block scales of 8-bit states (one per 256 elements): required with uint8 states, refused
    with fp32 ones."""
    given = {name: value for name, value in absmaxes.items() if value is not None}
    if not eight:
        if given:
            name = next(iter(given))
            raise ValueError(f"{name}: block scales go with 8-bit (uint8) states; the states are float32: pass None")
        return [[] for _ in absmaxes]
    out = []
    for name, value in absmaxes.items():
        if value is None:
            raise ValueError(
                f"{name}: 8-bit (uint8) states need their fp32 block scales (one per "
                f"{quant.BLOCK} elements): pass a list of tensors"
            )
        value = as_tensor_list(name, value)
        if len(value) != len(params):
            raise ValueError(f"{name}: expected {len(params)} tensors (one per parameter), got {len(value)}")
        for i, (p, a) in enumerate(zip(params, value)):
            if a.dtype != torch.float32:
                raise TypeError(f"{name}[{i}]: block scales must be float32, got {a.dtype}")
            if a.numel() != quant.n_blocks(p.numel()):
                raise ValueError(
                    f"{name}[{i}]: expected {quant.n_blocks(p.numel())} block scales (one per "
                    f"{quant.BLOCK} of the parameter's {p.numel()} elements), got {a.numel()}"
                )
        out.append(value)
    return out


def check_compensation(params: Sequence[Tensor], compensation, masters: list) -> list:
    """Kahan compensation buffers (bf16, one per bf16/fp16 parameter); [] when not given."""
    if compensation is None:
        return []
    compensation = as_tensor_list("compensation", compensation)
    if len(compensation) != len(params):
        raise ValueError(f"compensation: expected {len(params)} tensors (one per parameter), got {len(compensation)}")
    if params and params[0].dtype == torch.float32:
        raise TypeError("compensation: the parameters are float32 and need no compensation; pass None")
    if masters:
        raise ValueError(
            "compensation and master_params exclude each other: the compensation is the compact "
            "alternative to an fp32 master copy"
        )
    for i, (p, c) in enumerate(zip(params, compensation)):
        if c.dtype != COMPENSATION_DTYPE:
            raise TypeError(f"compensation[{i}]: compensation buffers must be bfloat16, got {c.dtype}")
        if c.numel() != p.numel():
            raise ValueError(
                f"compensation[{i}]: expected {p.numel()} elements (shape {tuple(p.shape)}, "
                f"the parameter's), got shape {tuple(c.shape)}"
            )
    return compensation


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
            raise ValueError(
                f"master_params[{i}]: expected {p.numel()} elements (shape {tuple(p.shape)}, "
                f"the parameter's), got shape {tuple(w.shape)}"
            )
    return masters


def check_rounding(rounding: str, dtype: torch.dtype, seed) -> bool:
    """True for stochastic rounding (which only bf16 parameters can use)."""
    if rounding not in ("nearest", "stochastic"):
        raise ValueError(f"rounding: expected 'nearest' or 'stochastic', got {rounding!r}")
    check_seed(seed)
    if rounding == "stochastic" and dtype == torch.float16:
        raise TypeError(
            "rounding='stochastic' supports bfloat16 parameters (float16 has too little range to "
            "train without a master copy): use master_params for float16"
        )
    return rounding == "stochastic" and dtype == torch.bfloat16


def check_rounding_with(compensation, rounding: str) -> None:
    if compensation and rounding == "stochastic":
        raise ValueError(
            "compensation and rounding='stochastic' exclude each other: the compensation keeps the "
            "rounding error that stochastic rounding leaves to chance"
        )


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
                raise ValueError(
                    f"{name}[{i}] is the same tensor as {seen[id(t)]}: every operand must be its own memory"
                )
            seen[id(t)] = f"{name}[{i}]"


def check_grad_sq_norms(out: Optional[Tensor], n: int, device: torch.device) -> None:
    if out is None:
        return
    if not isinstance(out, Tensor):
        raise TypeError(f"grad_sq_norms: expected a float32 tensor or None, got {type(out).__name__}")
    if out.dtype != torch.float32 or out.dim() != 1 or out.numel() != n or not out.is_contiguous():
        raise ValueError(
            f"grad_sq_norms: expected a contiguous 1-D float32 tensor of {n} elements, "
            f"got dtype {out.dtype}, shape {tuple(out.shape)}"
        )
    if out.device != device:
        raise ValueError(f"grad_sq_norms: expected a tensor on {device}, got one on {out.device}")


def check_skip(skip: Optional[Tensor], device: torch.device) -> None:
    if skip is None:
        return
    if not isinstance(skip, Tensor) or skip.dim() != 0 or skip.dtype != torch.float32:
        raise TypeError(
            f"skip: expected None or a 0-d float32 tensor, got {type(skip).__name__} "
            f"{getattr(skip, 'dtype', '')} {tuple(getattr(skip, 'shape', ()))}"
        )
    if skip.device != device:
        raise ValueError(f"skip: expected a tensor on {device}, got one on {skip.device}")


def check_scalar_or_0d(
    name: str, value, device: torch.device, minimum: Optional[float] = None, integer: bool = False
) -> None:
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


def check_step(step, n: int, device: torch.device) -> None:
    """A number >= 1, a 0-d device tensor, or a 1-D float32 device tensor with one step per tensor (tensors
    activated at different steps in one call)."""
    if isinstance(step, Tensor) and step.dim() == 1:
        if step.numel() != n or step.dtype != torch.float32 or not step.is_contiguous():
            raise ValueError(
                f"step: a per-tensor step must be a contiguous 1-D float32 tensor of {n} entries (one per "
                f"parameter), got dtype {step.dtype}, shape {tuple(step.shape)}"
            )
        if step.device != device:
            raise ValueError(f"step: expected a tensor on {device}, got one on {step.device}")
        return
    check_scalar_or_0d("step", step, device, minimum=1, integer=True)


@functools.lru_cache(maxsize=64)  # the same few values at every call of a run
def check_hyper(beta1: float, beta2: float, eps: float, weight_decay: float = 0.0) -> None:
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name}: expected 0 <= {name} < 1, got {value}")
    if not eps > 0.0:
        raise ValueError(f"eps: expected eps > 0, got {eps}")
    if not weight_decay >= 0.0:
        raise ValueError(f"weight_decay: expected weight_decay >= 0, got {weight_decay}")


# ---- the per-call path: lists a caller keeps are checked once, gradients every call ----
# A training loop hands the same parameters, states and masters to every call, while the gradients
# are usually new tensors after each backward. Checking every tensor of every list on every call cost
# more host time than torch's fused AdamW spends in total (the H100 profile: 13 ms at 2048 tensors), so
# a validated set of kept lists is remembered by the identity *and* address of every tensor in it. A
# tensor object whose storage moved (`.data =`, `set_`, FSDP's resharding) has a new address, so the set
# is checked again; only an in-place metadata change that keeps the address (`resize_`, `as_strided_`
# on a parameter) would go unseen, and those are not things done to a parameter between steps.
PLAIN_TYPES = (Tensor, torch.nn.Parameter)
_PLAIN_SET = set(PLAIN_TYPES)
_CACHE_SIZE = 64
_validated: "OrderedDict[int, tuple]" = OrderedDict()


class Validated:
    """What a validated set of kept lists lets a later call skip: the device, the parameters' dtype and
    shapes (which gradients must match), and the identities a gradient must not share."""

    __slots__ = ("device", "dtype", "shapes", "ids", "plain")

    def __init__(self, device, dtype, shapes, ids, plain):
        self.device, self.dtype, self.shapes, self.ids, self.plain = device, dtype, shapes, ids, plain


def _key(kept: Sequence[Sequence[Tensor]]):
    if not all(isinstance(ts, (list, tuple)) for ts in kept):
        return None
    flat = [t for ts in kept for t in ts]
    if not all(type(t) in PLAIN_TYPES for t in flat):
        return None  # subclasses (fake tensors while tracing, DTensor) take the full checks and the op
    try:
        return tuple(map(len, kept)), tuple(map(id, flat)), tuple(map(Tensor.data_ptr, flat))
    except Exception:  # not a tensor, or one without storage (sparse, fake): the full checks handle it
        return None


def _remember(key, value: "Validated") -> None:
    _validated[hash(key)] = (key, value)
    if len(_validated) > _CACHE_SIZE:
        _validated.popitem(last=False)


def _lookup(key) -> Optional["Validated"]:
    # Keyed by the hash, computed once: hashing a tuple of 10k addresses costs as much as a check.
    if key is None:
        return None
    h = hash(key)
    found = _validated.get(h)
    if found is None or found[0] != key:
        return None
    _validated.move_to_end(h)
    return found[1]


def _grads_fit(grads, seen: "Validated") -> bool:
    """True when every gradient passes every check (the full checks then need not run); False sends the
    call through the full checks, which name the problem. Mapped over the list rather than looped: this
    runs on every call, for every tensor."""
    if not isinstance(grads, (list, tuple)) or len(grads) != len(seen.shapes):
        return False
    try:
        fits = (
            set(map(type, grads)) <= _PLAIN_SET
            and list(map(Tensor.size, grads)) == seen.shapes
            and all(map(Tensor.is_contiguous, grads))  # raises for a sparse tensor: caught below
            and (
                not grads
                or torch._C._group_tensors_by_device_and_dtype([list(grads)], False).keys()
                == {(seen.device, seen.dtype)}
            )
        )
    except Exception:
        return False
    ids = set(map(id, grads))
    return fits and len(ids) == len(grads) and ids.isdisjoint(seen.ids)


_OPTIONAL = ("master_params", "compensation", "exp_avg_absmax", "exp_avg_sq_absmax")


def _as_lists(optional) -> list:
    return [list(x) if x is not None else [] for x in optional]


def _check_kept(device, params, exp_avgs, exp_avg_sqs, optional, **other_lists) -> list:
    """The checks of the lists a caller keeps from call to call (params, states, masters, compensation,
    block scales): returns the optional lists as lists ([] where not given)."""
    master_params, compensation, m_absmax, v_absmax = optional
    check_device(device, params=params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    eight = check_states(params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    masters = check_master_params(params, master_params)
    comp = check_compensation(params, compensation, masters)
    m_absmax, v_absmax = check_absmax(params, eight, exp_avg_absmax=m_absmax, exp_avg_sq_absmax=v_absmax)
    check_device(device, master_params=masters, compensation=comp, exp_avg_absmax=m_absmax, exp_avg_sq_absmax=v_absmax)
    check_distinct(
        params=params,
        **other_lists,
        exp_avgs=exp_avgs,
        exp_avg_sqs=exp_avg_sqs,
        master_params=masters,
        compensation=comp,
        exp_avg_absmax=m_absmax,
        exp_avg_sq_absmax=v_absmax,
    )
    return [masters, comp, m_absmax, v_absmax]


def kept_operands(params, exp_avgs, exp_avg_sqs, optional=(None,) * 4):
    """The checks of the lists an `adamw_step_` caller keeps (everything but the gradients), made once when a
    PreparedAdamW is made. Returns (lists, seen): lists as `adamw_operands` returns them without the
    gradients, [params, exp_avgs, exp_avg_sqs, masters, compensation, exp_avg_absmax, exp_avg_sq_absmax],
    and the Validated record a call's gradients are checked against (None when there are no tensors)."""
    params = as_tensor_list("params", params)
    exp_avgs = as_tensor_list("exp_avgs", exp_avgs)
    exp_avg_sqs = as_tensor_list("exp_avg_sqs", exp_avg_sqs)
    if check_same_length(params=params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs) == 0:
        return [[]] * 7, None
    device = params[0].device
    dtype = check_params_and_grads(params, params)
    rest = _check_kept(device, params, exp_avgs, exp_avg_sqs, optional)
    every = params + exp_avgs + exp_avg_sqs + [t for ts in rest for t in ts]
    seen = Validated(
        device, dtype, [p.shape for p in params], set(map(id, every)), all(type(t) in PLAIN_TYPES for t in every)
    )
    return [params, exp_avgs, exp_avg_sqs] + rest, seen


def adamw_scalars(
    n: int,
    device,
    dtype,
    *,
    lr,
    beta1,
    beta2,
    eps,
    weight_decay,
    step,
    grad_sq_norms,
    skip,
    rounding,
    seed,
    compensation,
) -> bool:
    """The checks of an `adamw_step_` call's scalars and small tensors; returns whether it rounds
    stochastically."""
    stochastic = check_rounding(rounding, dtype, seed)
    check_rounding_with(compensation, rounding)
    check_grad_sq_norms(grad_sq_norms, n, device)
    check_skip(skip, device)
    check_scalar_or_0d("lr", lr, device, minimum=0.0)
    check_step(step, n, device)
    check_hyper(beta1, beta2, eps, weight_decay)
    return stochastic


def adamw_operands(params, grads, exp_avgs, exp_avg_sqs, optional=(None,) * 4, remember: bool = True):
    """Every tensor-list check of an `adamw_step_` call. `optional` is (master_params, compensation,
    exp_avg_absmax, exp_avg_sq_absmax), each None when not given. Returns (lists, device, plain) where lists
    are [params, grads, exp_avgs, exp_avg_sqs, masters, compensation, exp_avg_absmax, exp_avg_sq_absmax]
    ([] for an optional list not given) and plain says that every tensor is an ordinary tensor (no
    subclass), so the call may bypass the dispatcher. `remember=False` (while torch.compile traces)
    neither consults nor fills the cache."""
    kept = [params, exp_avgs, exp_avg_sqs] + [x if x is not None else () for x in optional]
    key = _key(kept) if remember else None
    seen = _lookup(key)
    if seen is not None and _grads_fit(grads, seen):
        return (
            [list(params), list(grads), list(exp_avgs), list(exp_avg_sqs)] + _as_lists(optional),
            seen.device,
            seen.plain,
        )
    params = as_tensor_list("params", params)
    grads = as_tensor_list("grads", grads)
    exp_avgs = as_tensor_list("exp_avgs", exp_avgs)
    exp_avg_sqs = as_tensor_list("exp_avg_sqs", exp_avg_sqs)
    n = check_same_length(params=params, grads=grads, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    if n == 0:
        return [[]] * 8, None, True
    device = params[0].device
    check_device(device, grads=grads)
    dtype = check_params_and_grads(params, grads)
    rest = _check_kept(device, params, exp_avgs, exp_avg_sqs, optional, grads=grads)
    every = params + exp_avgs + exp_avg_sqs + [t for ts in rest for t in ts]
    plain = all(type(t) in PLAIN_TYPES for t in every)
    if key is not None:
        _remember(key, Validated(device, dtype, [p.shape for p in params], set(map(id, every)), plain))
    return [params, grads, exp_avgs, exp_avg_sqs] + rest, device, plain and all(type(g) in PLAIN_TYPES for g in grads)


def flush_operands(params, exp_avgs, exp_avg_sqs, optional=(None,) * 4, remember: bool = True):
    """Every tensor-list check of a `momentum_flush_` call: (lists, device, plain) as `adamw_operands`, lists
    being [params, exp_avgs, exp_avg_sqs, masters, compensation, exp_avg_absmax, exp_avg_sq_absmax]."""
    kept = [params, exp_avgs, exp_avg_sqs] + [x if x is not None else () for x in optional]
    key = _key(kept) if remember else None
    key = key and ("flush",) + key
    seen = _lookup(key)
    if seen is not None:
        return [list(params), list(exp_avgs), list(exp_avg_sqs)] + _as_lists(optional), seen.device, seen.plain
    params = as_tensor_list("params", params)
    exp_avgs = as_tensor_list("exp_avgs", exp_avgs)
    exp_avg_sqs = as_tensor_list("exp_avg_sqs", exp_avg_sqs)
    n = check_same_length(params=params, exp_avgs=exp_avgs, exp_avg_sqs=exp_avg_sqs)
    if n == 0:
        return [[]] * 7, None, True
    device = params[0].device
    dtype = check_params_and_grads(params, params)
    rest = _check_kept(device, params, exp_avgs, exp_avg_sqs, optional)
    every = params + exp_avgs + exp_avg_sqs + [t for ts in rest for t in ts]
    plain = all(type(t) in PLAIN_TYPES for t in every)
    if key is not None:
        _remember(key, Validated(device, dtype, [p.shape for p in params], set(map(id, every)), plain))
    return [params, exp_avgs, exp_avg_sqs] + rest, device, plain


def norm_operands(tensors):
    """The checks of a `grad_sq_norms` call: (tensors, device, plain)."""
    tensors = as_tensor_list("tensors", tensors)
    if not tensors:
        return tensors, None, True
    device = tensors[0].device
    check_device(device, tensors=tensors)
    dtype = tensors[0].dtype
    for i, t in enumerate(tensors):
        if t.dtype not in PARAM_DTYPES:
            raise TypeError(f"tensors[{i}]: dtype {t.dtype} is not supported; expected float32, bfloat16 or float16")
        if t.dtype != dtype:
            raise TypeError(f"tensors[{i}]: all tensors of one call must share a dtype; got {dtype} and {t.dtype}")
    return tensors, device, all(type(t) in PLAIN_TYPES for t in tensors)
