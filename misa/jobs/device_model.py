"""What a CUDA device holds during a training step beyond the tensors the step itself makes: the terms the
memory planner (issue 26) adds to a step run on fake CPU tensors, which show none of them. Each term is
measured by `benchmarks/bench_gpu_terms.py` (run first by `benchmarks/gpu_check.sh`), and
`tests/test_device_model.py` checks every function here against the committed measurement.

- cuBLAS workspace. torch gives each (cuBLAS handle, stream) pair a workspace from the caching allocator at
  its first product. Handles are per thread and autograd runs backward on its own device thread, so a
  training step holds two: forward's and backward's (the H200 run: 32 MiB at the first product and 32 MiB
  more at the first backward). Size: `CUBLAS_WORKSPACE_CONFIG` (":KiB:count" pairs, summed) when set, else
  torch's default, 4096 KiB x 8 on Hopper (measured) and 4096 KiB x 2 + 16 KiB x 8 before it (torch's
  documented default, not measured here).
- The caching allocator's rounding: every block it hands out is a multiple of 512 B (measured from 1 B to
  64 MiB + 1).
- Attention. On the H200 (torch 2.11, bf16, causal, head dim 128, grouped or repeated heads) SDPA takes the
  cuDNN kernel, which saves its output, the fp32 log-sum-exp (batch x heads x sequence) and 16 B more (the
  dropout generator's seed and offset): the CPU flash kernel that the planner runs saves the first two, so
  the GPU adds the 16 B per call, in blocks of their own.
- Our kernels' scratch. A steady MISA step on the CUDA backend allocates 2 KiB (chunk table and norm
  buffers) beyond its states, the first one 5 KiB. The Triton backend's tuner, at the first launch on a
  machine without its cache file, times its candidates on scratch operands of SCRATCH_TENSORS x
  SCRATCH_NUMEL elements per operand (misa_kernels/triton/tune.py): 1 GiB for an fp32 step. That is
  the first step's peak, once per machine, unless MISA_TRITON_AUTOTUNE=0 or a cached choice skips it.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence, Tuple

import torch

BLOCK_BYTES = 512  # the caching allocator's granularity
HANDLES_PER_TRAINING_STEP = 2  # the forward thread's and autograd's device thread's
SDPA_CUDNN_EXTRA_BYTES = 16  # the seed and offset the cuDNN attention kernel saves beside its output
STEP_SCRATCH_BYTES = {"cuda": 2048, "cuda_first": 5120}  # measured; Triton's steady step: 1536
WORKSPACE_ENV = "CUBLAS_WORKSPACE_CONFIG"


def allocator_bytes(nbytes: int) -> int:
    """Bytes the caching allocator hands out for a request of `nbytes`."""
    if nbytes < 0:
        raise ValueError(f"nbytes: expected a size >= 0, got {nbytes}")
    return -(-nbytes // BLOCK_BYTES) * BLOCK_BYTES


def cublas_workspace_bytes(capability: Tuple[int, int], config: Optional[str] = None) -> int:
    """One cuBLAS handle's workspace on a device of compute `capability` (major, minor). `config` is a
    CUBLAS_WORKSPACE_CONFIG value (":4096:8" is 8 buffers of 4096 KiB); the environment's when None."""
    config = os.environ.get(WORKSPACE_ENV) if config is None else config
    if config:
        parts = config.split(":")
        try:
            if parts[0] != "" or len(parts) % 2 == 0:
                raise ValueError
            sizes = [(int(kib), int(count)) for kib, count in zip(parts[1::2], parts[2::2])]
        except ValueError:
            raise ValueError(
                f"{WORKSPACE_ENV}: expected ':KiB:count' pairs such as ':4096:8', got {config!r}"
            ) from None
        return sum(kib * 1024 * count for kib, count in sizes)
    if capability[0] >= 9:
        return 4096 * 1024 * 8
    return 4096 * 1024 * 2 + 16 * 1024 * 8


def training_step_workspace_bytes(capability: Tuple[int, int], config: Optional[str] = None) -> int:
    """Every cuBLAS workspace a training step holds (forward's handle and backward's)."""
    return HANDLES_PER_TRAINING_STEP * cublas_workspace_bytes(capability, config)


def sdpa_saved_bytes(batch: int, heads: int, seq: int, head_dim: int, dtype: torch.dtype) -> int:
    """Bytes the GPU's attention kernel saves for backward beyond its inputs, before the allocator's
    rounding: output, fp32 log-sum-exp, and the cuDNN kernel's seed and offset."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    return batch * heads * seq * head_dim * itemsize + batch * heads * seq * 4 + SDPA_CUDNN_EXTRA_BYTES


def triton_tuner_scratch_bytes(dtypes: Sequence[torch.dtype]) -> int:
    """The Triton tuner's scratch at its first launch: SCRATCH_TENSORS tensors of SCRATCH_NUMEL elements for
    each operand dtype of the call (parameter, gradient, states, master), the chunk table aside."""
    from misa_kernels.triton import tune

    return sum(tune.SCRATCH_TENSORS * tune.SCRATCH_NUMEL * torch.empty((), dtype=d).element_size() for d in dtypes)
