"""The 8-bit blockwise state format (bitsandbytes' `Optimizer2State`, blocksize 256), defined in torch.

A state tensor of n elements is stored as n uint8 codes plus one fp32 absmax per block of 256
elements: element i holds `qmap[code[i]] * absmax[i // 256]`. The first moment uses the *signed*
dynamic map, the second moment the *unsigned* one (bitsandbytes' `create_dynamic_map(signed=...)`:
a sign bit, a run of zero bits that sets a decimal exponent, then linear fractions, so that small
values keep their relative precision). Quantizing a block divides it by its largest magnitude and
takes the nearest code (ties go to the smaller code); an all-zero block has absmax 0 and the zero
code. Every backend quantizes with these rules; `quantize`/`dequantize` here are the definition.

Tensors below MIN_NUMEL keep fp32 states (bitsandbytes' `min_8bit_size`): for them the codes and
absmax would save a few bytes and cost precision where a model is most sensitive (norms, biases).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Dict, Tuple

import torch
from torch import Tensor

BLOCK = 256
MIN_NUMEL = 4096
CODE_DTYPE = torch.uint8
# Per element: two codes plus two fp32 absmax per 256 elements.
BYTES_PER_ELEMENT = 2 + 2 * 4 / BLOCK


def n_blocks(numel: int) -> int:
    return (int(numel) + BLOCK - 1) // BLOCK


@lru_cache(maxsize=None)
def _dynamic_map_values(signed: bool) -> Tuple[float, ...]:
    # The construction of bitsandbytes' create_dynamic_map(signed, max_exponent_bits=7, total_bits=8),
    # with its arithmetic (fp32 linspace and midpoints, scaled in float64, stored as fp32) so that the
    # codes mean the same numbers: for exponent i, 2**i (signed) or 2**(i+1) (unsigned) fractions
    # evenly spaced in [0.1, 1], scaled by 10**(i-6); plus 0 and 1.
    values = []
    for i in range(7):
        count = 2**i + 1 if signed else 2 ** (i + 1) + 1
        edges = torch.linspace(0.1, 1, count, dtype=torch.float32)
        mids = ((edges[:-1] + edges[1:]) / 2.0).tolist()
        scale = 10 ** (i - 6)
        values += [scale * x for x in mids]
        if signed:
            values += [-scale * x for x in mids]
    values += [0.0, 1.0]
    assert len(values) == 256
    return tuple(sorted(torch.tensor(values, dtype=torch.float32).tolist()))


def dynamic_map(signed: bool, device="cpu") -> Tensor:
    """The 256 sorted fp32 values a code stands for."""
    return _maps_on(torch.device(device))[0 if signed else 1]


_on_device: Dict[torch.device, Tuple[Tensor, Tensor]] = {}


def _maps_on(device: torch.device) -> Tuple[Tensor, Tensor]:
    maps = _on_device.get(device)
    if maps is None:
        maps = _on_device[device] = tuple(
            torch.tensor(_dynamic_map_values(s), dtype=torch.float32, device=device) for s in (True, False)
        )
    return maps


def maps(device) -> Tuple[Tensor, Tensor]:
    """(signed map for exp_avg, unsigned map for exp_avg_sq) on `device`, made once."""
    return _maps_on(torch.device(device))


def zero_code(signed: bool) -> int:
    return _dynamic_map_values(signed).index(0.0)


def _blocks(x: Tensor) -> Tensor:
    """x (flat fp32) padded with zeros to whole blocks, as [blocks, BLOCK]."""
    n = x.numel()
    pad = n_blocks(n) * BLOCK - n
    if pad:
        x = torch.cat([x, x.new_zeros(pad)])
    return x.view(-1, BLOCK)


def nearest_code(x: Tensor, qmap: Tensor) -> Tensor:
    """Index of the map value nearest to each element of x (ties to the smaller index), as int64."""
    lo = (torch.searchsorted(qmap, x, right=True) - 1).clamp_(0, qmap.numel() - 1)
    hi = (lo + 1).clamp_(max=qmap.numel() - 1)
    return torch.where(qmap[hi] - x < x - qmap[lo], hi, lo)


def quantize(x: Tensor, qmap: Tensor) -> Tuple[Tensor, Tensor]:
    """(uint8 codes shaped like x, fp32 absmax per block) of an fp32 tensor."""
    blocks = _blocks(x.reshape(-1).float())
    absmax = blocks.abs().amax(dim=1)
    # An all-zero block would divide 0 by 0: its elements normalize to 0 (the zero code).
    scaled = torch.where(absmax[:, None] > 0, blocks / absmax[:, None], torch.zeros_like(blocks))
    codes = nearest_code(scaled.reshape(-1)[: x.numel()], qmap).to(CODE_DTYPE)
    return codes.view(x.shape), absmax


def dequantize(codes: Tensor, absmax: Tensor, qmap: Tensor) -> Tensor:
    """The fp32 values that codes and absmax stand for, shaped like codes."""
    n = codes.numel()
    values = _blocks(qmap[codes.reshape(-1).long()]) * absmax.reshape(-1, 1)
    return values.reshape(-1)[:n].view(codes.shape)
