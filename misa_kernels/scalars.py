"""Host-side folding of the AdamW hyperparameters into the numbers a kernel needs, and the stochastic
rounding hash every backend shares.

A kernel never does arithmetic on a hyperparameter: it reads `1 - beta1`, `beta2`, `1 - beta2`,
`step_size`, `bias_correction2_sqrt` and `decay`, each computed here in float64 and then rounded to
fp32, exactly as a GPU launch hands a Python float to a kernel. Computing `1 - beta2` from an fp32
beta2 inside a kernel is 1.3e-5 off (fp32(0.999) = 0.99900001287); folding here also keeps
`beta**step` exact and makes the hyperparameters plain runtime arguments, so a new lr never
recompiles a kernel. Rounding to fp32 on the host matters under Triton's interpreter: it would
otherwise do float64 arithmetic on the scalars and hide the class of bug a GPU shows.

When `lr` or `step` is a 0-d device tensor (CUDA-graph capture), the lr/step-dependent numbers are
computed by tiny tensor ops on the device and the kernel reads them through a pointer instead.
"""

from __future__ import annotations

import functools
import struct
from typing import NamedTuple, Optional, Union

import torch

Number = Union[int, float]
_MASK32 = 0xFFFFFFFF


def fp32(x: float) -> float:
    """x rounded to the nearest fp32 value, as a GPU kernel argument receives it."""
    return struct.unpack("f", struct.pack("f", float(x)))[0]


class KernelScalars(NamedTuple):
    """What a kernel reads (immutable; a NamedTuple, whose construction costs a tenth of a frozen dataclass's
    at every call)."""

    one_minus_beta1: float
    beta2: float
    one_minus_beta2: float
    eps: float
    # Either all three are Python floats (device is None) ...
    step_size: float = 0.0
    bias_correction2_sqrt: float = 1.0
    decay: float = 1.0
    # ... or they live on the device as fp32 [step_size, bias_correction2_sqrt, decay], once or (per_tensor,
    # for a step count per tensor) one row per tensor, flattened.
    device: Optional[torch.Tensor] = None
    per_tensor: bool = False


def _fold(lr, step, beta1: float, beta2: float, weight_decay: float, flush: bool):
    if flush:
        # The momentum the period would still apply if gradients stopped: beta1 + beta1^2 + ...
        lr = lr * (beta1 / (1.0 - beta1))
        weight_decay = 0.0
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return lr / bc1, bc2**0.5, 1.0 - lr * weight_decay


@functools.lru_cache(maxsize=64)
def _betas(beta1: float, beta2: float, eps: float) -> dict:
    # The same few numbers at every step of a run: folded once.
    return dict(one_minus_beta1=fp32(1.0 - beta1), beta2=fp32(beta2), one_minus_beta2=fp32(1.0 - beta2), eps=fp32(eps))


def kernel_scalars(
    lr, step, *, beta1: float, beta2: float, eps: float, weight_decay: float = 0.0, flush: bool = False
) -> KernelScalars:
    betas = _betas(beta1, beta2, eps)
    if not isinstance(lr, torch.Tensor) and not isinstance(step, torch.Tensor):
        step_size, bc2_sqrt, decay = _fold(float(lr), float(step), beta1, beta2, weight_decay, flush)
        return KernelScalars(
            **betas, step_size=fp32(step_size), bias_correction2_sqrt=fp32(bc2_sqrt), decay=fp32(decay)
        )
    device = lr.device if isinstance(lr, torch.Tensor) else step.device
    per_tensor = isinstance(step, torch.Tensor) and step.dim() == 1
    if not isinstance(lr, torch.Tensor):
        return KernelScalars(
            **betas, device=_fold_device_step(float(lr), step, beta1, beta2, weight_decay, flush), per_tensor=per_tensor
        )

    def on_device(x):
        # torch.full launches a fill; a tensor built from host data would be a copy that waits on a GPU
        if isinstance(x, torch.Tensor):
            return x.to(torch.float64)
        return torch.full((), float(x), dtype=torch.float64, device=device)

    step_size, bc2_sqrt, decay = _fold(on_device(lr), on_device(step), beta1, beta2, weight_decay, flush)
    bc2_sqrt, decay = on_device(bc2_sqrt), on_device(decay)
    if per_tensor:  # rows [step_size, bc2_sqrt, decay] per tensor
        packed = (
            torch.stack([step_size.expand(step.shape), bc2_sqrt.expand(step.shape), decay.expand(step.shape)], dim=1)
            .to(torch.float32)
            .reshape(-1)
        )
        return KernelScalars(**betas, device=packed, per_tensor=True)
    packed = torch.stack([step_size, bc2_sqrt, decay]).to(torch.float32)
    return KernelScalars(**betas, device=packed)


_FOLD_CONSTANTS: dict = {}


def _fold_device_step(
    lr: float, step: torch.Tensor, beta1: float, beta2: float, weight_decay: float, flush: bool
) -> torch.Tensor:
    """[step_size, bias_correction2_sqrt, decay] for a number lr and a device step (MISA's step once
    skips are counted on the device), in float64, in 6 small launches rather than one per operation:

        [lr, 1, 1 - lr*wd] * (1 - [beta1, beta2, 0] ** step) ** [-1, 0.5, 0]

    (0**step = 0 for step >= 1, so the last entry is the decay itself). The constant vectors are made
    once per (device, betas, weight decay), the lr vector once per lr (a launch with the lr as its
    argument, never a copy from the host); torch functions rather than operators, whose Python wrappers
    cost host time at every step."""
    key = (step.device, beta1, beta2, weight_decay, flush)
    consts = _FOLD_CONSTANTS.get(key)
    if consts is None:
        scale = beta1 / (1.0 - beta1) if flush else 1.0  # the flush's lr multiplier (no decay there)
        rows = torch.tensor(
            [[beta1, beta2, 0.0], [-1.0, 0.5, 0.0], [0.0, 1.0, 1.0], [scale, 0.0, 0.0 if flush else -weight_decay]],
            dtype=torch.float64,
        ).to(step.device)
        consts = _FOLD_CONSTANTS[key] = [*rows.unbind(), None, None]  # bases, powers, base_a, per_lr, (lr, vector)
    bases, powers, base_a, per_lr, lr_seen, per_lr_vector = consts
    if lr_seen != lr:
        per_lr_vector = consts[5] = torch.add(base_a, per_lr, alpha=lr)
        consts[4] = lr
    steps = step if step.dtype == torch.float64 else step.to(torch.float64)
    per_tensor = steps.dim() == 1
    if per_tensor:  # a step per tensor: a row per tensor, flattened
        steps = steps.unsqueeze(1)
    corrections = torch.pow(torch.rsub(torch.pow(bases, steps), 1.0), powers)
    packed = corrections.mul_(per_lr_vector).to(torch.float32)
    return packed.view(-1) if per_tensor else packed


# ---- stochastic rounding: one counter-based hash, the same in torch, Triton and CUDA C++ ----
# A rounding decision depends only on (seed, tensor index in the call, element index), so every
# backend rounds every element the same way and a run is reproducible from its seed.
HASH_M1 = 0x7FEB352D
HASH_M2 = 0x846CA68B
GOLDEN = 0x9E3779B9


def hash32(x: int) -> int:
    """lowbias32 (C. Wellons): a well-mixed 32-bit integer hash."""
    x &= _MASK32
    x ^= x >> 16
    x = (x * HASH_M1) & _MASK32
    x ^= x >> 15
    x = (x * HASH_M2) & _MASK32
    x ^= x >> 16
    return x


def tensor_key(seed: int, tensor_index: int) -> int:
    """The per-tensor key that an element index is mixed with: hash32(seed + index * golden)."""
    return hash32((seed + tensor_index * GOLDEN) & _MASK32)


def check_seed(seed) -> int:
    # One integer type for every value keeps Triton from compiling a kernel per seed range.
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31:
        raise ValueError(f"seed: expected an int in [0, 2**31), got {seed!r}")
    return seed
