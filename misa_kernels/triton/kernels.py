"""Triton kernels: one program per chunk of the chunk table (tables.py), fp32 math.

Hyperparameters are runtime arguments, folded on the host (misa_kernels/scalars.py): a kernel only
multiplies and adds them, and a new lr or step never recompiles. Only the dtype, the mode flags and
the block sizes are compile-time constants. Each program walks its chunk in full blocks without a
mask (so that the compiler can use 16-byte vector accesses when the host vouches for alignment with
ALIGNED) and one masked tail block. Norms are written as one partial per chunk and summed per
tensor by `reduce_partials_kernel` in a fixed order: deterministic, no atomics.

MASTER: the update reads and writes an fp32 master copy (operand 4 of the table) and writes the
parameter as the rounded master; on a FRESH step the master is set from the parameter, never read.
STOCHASTIC: bf16 results are rounded stochastically with the hash of scalars.hash32, keyed by
(seed, tensor index, element index), so the torch and CUDA backends round identically.
"""

import triton
import triton.language as tl


@triton.jit
def _typed(address, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    ptr = address.to(tl.pointer_type(DTYPE))
    if ALIGNED:
        ptr = tl.multiple_of(ptr, 16)
    return ptr


@triton.jit
def _load(ptr, idx, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(ptr + idx, mask=mask, other=0.0)
    else:
        return tl.load(ptr + idx)


@triton.jit
def _store(ptr, idx, value, mask, MASKED: tl.constexpr):
    if MASKED:
        tl.store(ptr + idx, value, mask=mask)
    else:
        tl.store(ptr + idx, value)


@triton.jit
def _hash32(x):
    # lowbias32, on uint32 (multiplications wrap mod 2**32): scalars.hash32 in Python.
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _tensor_key(seed, t):
    return _hash32(seed.to(tl.uint32) + t.to(tl.uint32) * 0x9E3779B9)


@triton.jit
def _to_param(x, idx, key, DTYPE: tl.constexpr, STOCHASTIC: tl.constexpr, SOFT_BF16: tl.constexpr):
    if STOCHASTIC and DTYPE == tl.bfloat16:
        # Adding 16 random low bits before truncating rounds up with probability equal to the
        # distance from the lower bf16 neighbour: unbiased.
        noise = _hash32(idx.to(tl.uint32) ^ key) & 0xFFFF
        bits = (x.to(tl.uint32, bitcast=True) + noise) & 0xFFFF0000
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(DTYPE), rounded)
    elif SOFT_BF16 and DTYPE == tl.bfloat16:
        # Triton's interpreter truncates fp32 -> bf16; round to nearest even by hand there so the
        # interpreter checks the same numbers the GPU computes.
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        rounded = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(x != x, x.to(DTYPE), rounded)
    else:
        return x.to(DTYPE)


@triton.jit
def _chunk_bounds(chunk_tensor_ptr, chunk_start_ptr, numel_ptr, CHUNK: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor_ptr + pid)
    start = tl.multiple_of(tl.load(chunk_start_ptr + pid), BLOCK)
    n = tl.load(numel_ptr + t)
    length = tl.minimum(n - start, CHUNK)
    full = length // BLOCK * BLOCK  # blocks that need no mask
    return pid, t, start, n, length, full


@triton.jit
def _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, idx, n, key, one_minus_beta1, beta2, one_minus_beta2, eps,
                 step_size, bc2_sqrt, decay, PARAM_DTYPE: tl.constexpr, FRESH: tl.constexpr, MASTER: tl.constexpr,
                 STOCHASTIC: tl.constexpr, SOFT_BF16: tl.constexpr, MASKED: tl.constexpr):
    mask = idx < n
    g = _load(g_ptr, idx, mask, MASKED).to(tl.float32)
    if FRESH:
        m = one_minus_beta1 * g
        v = one_minus_beta2 * g * g
    else:
        m = _load(m_ptr, idx, mask, MASKED)
        v = _load(v_ptr, idx, mask, MASKED)
        m = m + one_minus_beta1 * (g - m)
        v = beta2 * v + one_minus_beta2 * g * g
    if MASTER and not FRESH:
        p = _load(w_ptr, idx, mask, MASKED)
    else:
        p = _load(p_ptr, idx, mask, MASKED).to(tl.float32)
    denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p * decay - step_size * (m / denom)
    if MASTER:
        _store(w_ptr, idx, p, mask, MASKED)
    _store(p_ptr, idx, _to_param(p, idx, key, PARAM_DTYPE, STOCHASTIC, SOFT_BF16), mask, MASKED)
    _store(m_ptr, idx, m, mask, MASKED)
    _store(v_ptr, idx, v, mask, MASKED)
    return g * g


@triton.jit
def _skipped_fresh_block(p_ptr, m_ptr, v_ptr, w_ptr, idx, n, MASTER: tl.constexpr, MASKED: tl.constexpr):
    # A skipped fresh step defines its states as zero (and the master as the weight), so that the next
    # step starts from them as from a fresh step.
    mask = idx < n
    zero = tl.zeros(idx.shape, dtype=tl.float32)
    if MASTER:
        _store(w_ptr, idx, _load(p_ptr, idx, mask, MASKED).to(tl.float32), mask, MASKED)
    _store(m_ptr, idx, zero, mask, MASKED)
    _store(v_ptr, idx, zero, mask, MASKED)


@triton.jit
def adamw_kernel(
    chunk_tensor_ptr, chunk_start_ptr, numel_ptr, addr_ptr, n_tensors,
    partials_ptr, scalars_ptr, skip_ptr,
    one_minus_beta1, beta2, one_minus_beta2, eps, step_size, bc2_sqrt, decay, seed,
    PARAM_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    FRESH: tl.constexpr, NORMS: tl.constexpr, SCALARS_ON_DEVICE: tl.constexpr, ALIGNED: tl.constexpr,
    MASTER: tl.constexpr, STOCHASTIC: tl.constexpr, SOFT_BF16: tl.constexpr, SKIP: tl.constexpr,
):
    pid, t, start, n, length, full = _chunk_bounds(chunk_tensor_ptr, chunk_start_ptr, numel_ptr, CHUNK, BLOCK)
    p_ptr = _typed(tl.load(addr_ptr + t), PARAM_DTYPE, ALIGNED)
    g_ptr = _typed(tl.load(addr_ptr + n_tensors + t), PARAM_DTYPE, ALIGNED)
    m_ptr = _typed(tl.load(addr_ptr + 2 * n_tensors + t), tl.float32, ALIGNED)
    v_ptr = _typed(tl.load(addr_ptr + 3 * n_tensors + t), tl.float32, ALIGNED)
    w_ptr = m_ptr
    if MASTER:
        w_ptr = _typed(tl.load(addr_ptr + 4 * n_tensors + t), tl.float32, ALIGNED)
    key = _tensor_key(seed, t)
    if SCALARS_ON_DEVICE:
        step_size = tl.load(scalars_ptr)
        bc2_sqrt = tl.load(scalars_ptr + 1)
        decay = tl.load(scalars_ptr + 2)
    skip = 0.0
    if SKIP:
        skip = tl.load(skip_ptr)
    # The skip flag decides for the whole program (a branch, not a per-element store mask), so the
    # update keeps its unmasked, vectorized loads and stores.
    if skip == 0.0:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, full, BLOCK):
            idx = tl.multiple_of(start + off, BLOCK) + tl.arange(0, BLOCK)
            acc += _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, idx, n, key, one_minus_beta1, beta2,
                                one_minus_beta2, eps, step_size, bc2_sqrt, decay,
                                PARAM_DTYPE, FRESH, MASTER, STOCHASTIC, SOFT_BF16, False)
        if full < length:
            idx = start + full + tl.arange(0, BLOCK)
            acc += _adamw_block(p_ptr, g_ptr, m_ptr, v_ptr, w_ptr, idx, n, key, one_minus_beta1, beta2,
                                one_minus_beta2, eps, step_size, bc2_sqrt, decay,
                                PARAM_DTYPE, FRESH, MASTER, STOCHASTIC, SOFT_BF16, True)
        if NORMS:
            tl.store(partials_ptr + pid, tl.sum(acc, axis=0))
    else:
        if FRESH:
            for off in range(0, full, BLOCK):
                idx = tl.multiple_of(start + off, BLOCK) + tl.arange(0, BLOCK)
                _skipped_fresh_block(p_ptr, m_ptr, v_ptr, w_ptr, idx, n, MASTER, False)
            if full < length:
                idx = start + full + tl.arange(0, BLOCK)
                _skipped_fresh_block(p_ptr, m_ptr, v_ptr, w_ptr, idx, n, MASTER, True)
        if NORMS:
            tl.store(partials_ptr + pid, 0.0)  # a skipped step adds nothing to the norms either


@triton.jit
def _flush_block(p_ptr, m_ptr, v_ptr, w_ptr, idx, n, key, eps, step_size, bc2_sqrt,
                 PARAM_DTYPE: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
                 SOFT_BF16: tl.constexpr, MASKED: tl.constexpr):
    mask = idx < n
    m = _load(m_ptr, idx, mask, MASKED)
    v = _load(v_ptr, idx, mask, MASKED)
    if MASTER:
        p = _load(w_ptr, idx, mask, MASKED)
    else:
        p = _load(p_ptr, idx, mask, MASKED).to(tl.float32)
    p = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
    if MASTER:
        _store(w_ptr, idx, p, mask, MASKED)
    _store(p_ptr, idx, _to_param(p, idx, key, PARAM_DTYPE, STOCHASTIC, SOFT_BF16), mask, MASKED)


@triton.jit
def flush_kernel(
    chunk_tensor_ptr, chunk_start_ptr, numel_ptr, addr_ptr, n_tensors,
    scalars_ptr, eps, step_size, bc2_sqrt, seed,
    PARAM_DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
    SCALARS_ON_DEVICE: tl.constexpr, ALIGNED: tl.constexpr, MASTER: tl.constexpr, STOCHASTIC: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    pid, t, start, n, length, full = _chunk_bounds(chunk_tensor_ptr, chunk_start_ptr, numel_ptr, CHUNK, BLOCK)
    p_ptr = _typed(tl.load(addr_ptr + t), PARAM_DTYPE, ALIGNED)
    m_ptr = _typed(tl.load(addr_ptr + n_tensors + t), tl.float32, ALIGNED)
    v_ptr = _typed(tl.load(addr_ptr + 2 * n_tensors + t), tl.float32, ALIGNED)
    w_ptr = m_ptr
    if MASTER:
        w_ptr = _typed(tl.load(addr_ptr + 3 * n_tensors + t), tl.float32, ALIGNED)
    key = _tensor_key(seed, t)
    if SCALARS_ON_DEVICE:
        step_size = tl.load(scalars_ptr)
        bc2_sqrt = tl.load(scalars_ptr + 1)
    for off in range(0, full, BLOCK):
        idx = tl.multiple_of(start + off, BLOCK) + tl.arange(0, BLOCK)
        _flush_block(p_ptr, m_ptr, v_ptr, w_ptr, idx, n, key, eps, step_size, bc2_sqrt, PARAM_DTYPE, MASTER,
                     STOCHASTIC, SOFT_BF16, False)
    if full < length:
        idx = start + full + tl.arange(0, BLOCK)
        _flush_block(p_ptr, m_ptr, v_ptr, w_ptr, idx, n, key, eps, step_size, bc2_sqrt, PARAM_DTYPE, MASTER,
                     STOCHASTIC, SOFT_BF16, True)


@triton.jit
def sq_norm_partials_kernel(
    chunk_tensor_ptr, chunk_start_ptr, numel_ptr, addr_ptr, partials_ptr,
    DTYPE: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, ALIGNED: tl.constexpr,
):
    pid, t, start, n, length, full = _chunk_bounds(chunk_tensor_ptr, chunk_start_ptr, numel_ptr, CHUNK, BLOCK)
    x_ptr = _typed(tl.load(addr_ptr + t), DTYPE, ALIGNED)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for off in range(0, full, BLOCK):
        idx = tl.multiple_of(start + off, BLOCK) + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + idx).to(tl.float32)
        acc += x * x
    if full < length:
        idx = start + full + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + idx, mask=idx < n, other=0.0).to(tl.float32)
        acc += x * x
    tl.store(partials_ptr + pid, tl.sum(acc, axis=0))


@triton.jit
def reduce_partials_kernel(partials_ptr, chunk_begin_ptr, out_ptr, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    begin = tl.load(chunk_begin_ptr + t)
    end = tl.load(chunk_begin_ptr + t + 1)
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i in range(begin, end, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + idx, mask=idx < end, other=0.0)
    total = tl.load(out_ptr + t) + tl.sum(acc, axis=0)
    tl.store(out_ptr + t, total)
