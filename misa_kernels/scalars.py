"""Host-side folding of the AdamW hyperparameters into the three numbers a kernel needs.

Kernels never see `lr` or `step` directly: they read `step_size`, `bias_correction2_sqrt` and
`decay`. Folding on the host in float64 keeps `beta**step` exact (an fp32 `pow` on the device loses
~1e-7 relative, which is visible at step 1), and makes the hyperparameters plain runtime arguments,
so a new lr never recompiles a kernel. When `lr` or `step` is a 0-d device tensor (CUDA-graph
capture), the same formulas run as tiny tensor ops on the device and the kernel reads the result
through a pointer instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Union

import torch

Number = Union[int, float]


@dataclass(frozen=True)
class KernelScalars:
    beta1: float
    beta2: float
    eps: float
    # Either all three are Python floats (device is None) ...
    step_size: float = 0.0
    bias_correction2_sqrt: float = 1.0
    decay: float = 1.0
    # ... or they live on the device as fp32 [step_size, bias_correction2_sqrt, decay].
    device: Optional[torch.Tensor] = None


def _fold(lr, step, beta1: float, beta2: float, weight_decay: float, flush: bool):
    if flush:
        # The momentum the period would still apply if gradients stopped: beta1 + beta1^2 + ...
        lr = lr * (beta1 / (1.0 - beta1))
        weight_decay = 0.0
    bc1 = 1.0 - beta1**step
    bc2 = 1.0 - beta2**step
    return lr / bc1, bc2**0.5, 1.0 - lr * weight_decay


def kernel_scalars(
    lr, step, *, beta1: float, beta2: float, eps: float, weight_decay: float = 0.0, flush: bool = False
) -> KernelScalars:
    if not isinstance(lr, torch.Tensor) and not isinstance(step, torch.Tensor):
        step_size, bc2_sqrt, decay = _fold(float(lr), float(step), beta1, beta2, weight_decay, flush)
        return KernelScalars(beta1, beta2, eps, step_size, bc2_sqrt, decay)
    device = lr.device if isinstance(lr, torch.Tensor) else step.device
    lr_t = torch.as_tensor(lr, dtype=torch.float64, device=device)
    step_t = torch.as_tensor(step, dtype=torch.float64, device=device)
    step_size, bc2_sqrt, decay = _fold(lr_t, step_t, beta1, beta2, weight_decay, flush)
    if not isinstance(bc2_sqrt, torch.Tensor):
        bc2_sqrt = torch.tensor(bc2_sqrt, dtype=torch.float64, device=device)
    if not isinstance(decay, torch.Tensor):
        decay = torch.tensor(decay, dtype=torch.float64, device=device)
    packed = torch.stack([step_size, bc2_sqrt, decay]).to(torch.float32)
    return KernelScalars(beta1, beta2, eps, device=packed)
