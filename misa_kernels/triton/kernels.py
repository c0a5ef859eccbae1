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
KAHAN: operand 4 is a bf16 compensation instead: the fp32 value is param + compensation, the parameter
is written as its nearest rounding and the compensation as the rounding error.

The 8-bit kernels (`adamw8_kernel`, `flush8_kernel`) hold states as uint8 codes and one fp32 absmax per
block of 256 elements (misa_kernels/quant.py defines the format): a program works on R x 256 tiles, so
that each quantization block is one row and its new absmax is a row reduction before its codes are
written.
"""

import triton
import triton.language as tl

from .. import quant


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
def _value_operand(address_ptr, fallback, MASTER: tl.constexpr, KAHAN: tl.constexpr, ALIGNED: tl.constexpr):
    # The fp32 master, or the bf16 compensation, or (neither) an unused pointer.
    if MASTER:
        return _typed(tl.load(address_ptr), tl.float32, ALIGNED)
    elif KAHAN:
        return _typed(tl.load(address_ptr), tl.bfloat16, ALIGNED)
    else:
        return fallback


@triton.jit
def _call_scalars(
    scalars_ptr, t, step_size, bc2_sqrt, decay, SCALARS_ON_DEVICE: tl.constexpr, PER_TENSOR: tl.constexpr
):
    # [step_size, bc2_sqrt, decay]: the launch's arguments, or read on the device, once for the call or
    # (PER_TENSOR: a step count per tensor) a row per tensor
    if SCALARS_ON_DEVICE:
        row = scalars_ptr + 3 * t if PER_TENSOR else scalars_ptr
        step_size = tl.load(row)
        bc2_sqrt = tl.load(row + 1)
        decay = tl.load(row + 2)
    return step_size, bc2_sqrt, decay


@triton.jit
def _skip_flag(skip_ptr, SKIP: tl.constexpr):
    skip = 0.0
    if SKIP:
        skip = tl.load(skip_ptr)
    return skip


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
def _load_value(
    p_ptr, w_ptr, idx, mask, FRESH: tl.constexpr, MASTER: tl.constexpr, KAHAN: tl.constexpr, MASKED: tl.constexpr
):
    # The fp32 value the update starts from: the master, or param + compensation, or the param (a fresh
    # step reads neither master nor compensation).
    if MASTER and not FRESH:
        p = _load(w_ptr, idx, mask, MASKED)
    else:
        p = _load(p_ptr, idx, mask, MASKED).to(tl.float32)
        if KAHAN and not FRESH:
            p = p + _load(w_ptr, idx, mask, MASKED).to(tl.float32)
    return p


@triton.jit
def _store_value(
    p_ptr,
    w_ptr,
    idx,
    p,
    mask,
    key,
    PARAM_DTYPE: tl.constexpr,
    MASTER: tl.constexpr,
    KAHAN: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    MASKED: tl.constexpr,
):
    rounded = _to_param(p, idx, key, PARAM_DTYPE, STOCHASTIC, SOFT_BF16)
    if MASTER:
        _store(w_ptr, idx, p, mask, MASKED)
    if KAHAN:
        error = p - rounded.to(tl.float32)
        _store(w_ptr, idx, _to_param(error, idx, key, tl.bfloat16, False, SOFT_BF16), mask, MASKED)
    _store(p_ptr, idx, rounded, mask, MASKED)


@triton.jit
def _adamw_block(
    p_ptr,
    g_ptr,
    m_ptr,
    v_ptr,
    w_ptr,
    idx,
    n,
    key,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    step_size,
    bc2_sqrt,
    decay,
    PARAM_DTYPE: tl.constexpr,
    FRESH: tl.constexpr,
    MASTER: tl.constexpr,
    KAHAN: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    MASKED: tl.constexpr,
):
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
    p = _load_value(p_ptr, w_ptr, idx, mask, FRESH, MASTER, KAHAN, MASKED)
    denom = tl.sqrt(v) / bc2_sqrt + eps
    p = p * decay - step_size * (m / denom)
    _store_value(p_ptr, w_ptr, idx, p, mask, key, PARAM_DTYPE, MASTER, KAHAN, STOCHASTIC, SOFT_BF16, MASKED)
    _store(m_ptr, idx, m, mask, MASKED)
    _store(v_ptr, idx, v, mask, MASKED)
    return g * g


@triton.jit
def _skipped_fresh_block(
    p_ptr, m_ptr, v_ptr, w_ptr, idx, n, MASTER: tl.constexpr, KAHAN: tl.constexpr, MASKED: tl.constexpr
):
    # A skipped fresh step defines its states as zero (and the master as the weight, the compensation as
    # zero), so that the next step starts from them as from a fresh step.
    mask = idx < n
    zero = tl.zeros(idx.shape, dtype=tl.float32)
    if MASTER:
        _store(w_ptr, idx, _load(p_ptr, idx, mask, MASKED).to(tl.float32), mask, MASKED)
    if KAHAN:
        _store(w_ptr, idx, zero.to(tl.bfloat16), mask, MASKED)
    _store(m_ptr, idx, zero, mask, MASKED)
    _store(v_ptr, idx, zero, mask, MASKED)


@triton.jit
def adamw_kernel(
    chunk_tensor_ptr,
    chunk_start_ptr,
    numel_ptr,
    addr_ptr,
    n_tensors,
    partials_ptr,
    scalars_ptr,
    skip_ptr,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    step_size,
    bc2_sqrt,
    decay,
    seed,
    PARAM_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    FRESH: tl.constexpr,
    NORMS: tl.constexpr,
    SCALARS_ON_DEVICE: tl.constexpr,
    ALIGNED: tl.constexpr,
    MASTER: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    SKIP: tl.constexpr,
    KAHAN: tl.constexpr = False,
    PER_TENSOR: tl.constexpr = False,
):
    pid, t, start, n, length, full = _chunk_bounds(chunk_tensor_ptr, chunk_start_ptr, numel_ptr, CHUNK, BLOCK)
    p_ptr = _typed(tl.load(addr_ptr + t), PARAM_DTYPE, ALIGNED)
    g_ptr = _typed(tl.load(addr_ptr + n_tensors + t), PARAM_DTYPE, ALIGNED)
    m_ptr = _typed(tl.load(addr_ptr + 2 * n_tensors + t), tl.float32, ALIGNED)
    v_ptr = _typed(tl.load(addr_ptr + 3 * n_tensors + t), tl.float32, ALIGNED)
    w_ptr = _value_operand(addr_ptr + 4 * n_tensors + t, m_ptr, MASTER, KAHAN, ALIGNED)
    key = _tensor_key(seed, t)
    step_size, bc2_sqrt, decay = _call_scalars(
        scalars_ptr, t, step_size, bc2_sqrt, decay, SCALARS_ON_DEVICE, PER_TENSOR
    )
    skip = _skip_flag(skip_ptr, SKIP)
    # The skip flag decides for the whole program (a branch, not a per-element store mask), so the
    # update keeps its unmasked, vectorized loads and stores.
    if skip == 0.0:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for off in range(0, full, BLOCK):
            idx = tl.multiple_of(start + off, BLOCK) + tl.arange(0, BLOCK)
            acc += _adamw_block(
                p_ptr,
                g_ptr,
                m_ptr,
                v_ptr,
                w_ptr,
                idx,
                n,
                key,
                one_minus_beta1,
                beta2,
                one_minus_beta2,
                eps,
                step_size,
                bc2_sqrt,
                decay,
                PARAM_DTYPE,
                FRESH,
                MASTER,
                KAHAN,
                STOCHASTIC,
                SOFT_BF16,
                False,
            )
        if full < length:
            idx = start + full + tl.arange(0, BLOCK)
            acc += _adamw_block(
                p_ptr,
                g_ptr,
                m_ptr,
                v_ptr,
                w_ptr,
                idx,
                n,
                key,
                one_minus_beta1,
                beta2,
                one_minus_beta2,
                eps,
                step_size,
                bc2_sqrt,
                decay,
                PARAM_DTYPE,
                FRESH,
                MASTER,
                KAHAN,
                STOCHASTIC,
                SOFT_BF16,
                True,
            )
        if NORMS:
            tl.store(partials_ptr + pid, tl.sum(acc, axis=0))
    else:
        if FRESH:
            for off in range(0, full, BLOCK):
                idx = tl.multiple_of(start + off, BLOCK) + tl.arange(0, BLOCK)
                _skipped_fresh_block(p_ptr, m_ptr, v_ptr, w_ptr, idx, n, MASTER, KAHAN, False)
            if full < length:
                idx = start + full + tl.arange(0, BLOCK)
                _skipped_fresh_block(p_ptr, m_ptr, v_ptr, w_ptr, idx, n, MASTER, KAHAN, True)
        if NORMS:
            tl.store(partials_ptr + pid, 0.0)  # a skipped step adds nothing to the norms either


@triton.jit
def _flush_block(
    p_ptr,
    m_ptr,
    v_ptr,
    w_ptr,
    idx,
    n,
    key,
    eps,
    step_size,
    bc2_sqrt,
    PARAM_DTYPE: tl.constexpr,
    MASTER: tl.constexpr,
    KAHAN: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    MASKED: tl.constexpr,
):
    mask = idx < n
    m = _load(m_ptr, idx, mask, MASKED)
    v = _load(v_ptr, idx, mask, MASKED)
    p = _load_value(p_ptr, w_ptr, idx, mask, False, MASTER, KAHAN, MASKED)
    p = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
    _store_value(p_ptr, w_ptr, idx, p, mask, key, PARAM_DTYPE, MASTER, KAHAN, STOCHASTIC, SOFT_BF16, MASKED)


@triton.jit
def flush_kernel(
    chunk_tensor_ptr,
    chunk_start_ptr,
    numel_ptr,
    addr_ptr,
    n_tensors,
    scalars_ptr,
    eps,
    step_size,
    bc2_sqrt,
    seed,
    PARAM_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    SCALARS_ON_DEVICE: tl.constexpr,
    ALIGNED: tl.constexpr,
    MASTER: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    KAHAN: tl.constexpr = False,
):
    pid, t, start, n, length, full = _chunk_bounds(chunk_tensor_ptr, chunk_start_ptr, numel_ptr, CHUNK, BLOCK)
    p_ptr = _typed(tl.load(addr_ptr + t), PARAM_DTYPE, ALIGNED)
    m_ptr = _typed(tl.load(addr_ptr + n_tensors + t), tl.float32, ALIGNED)
    v_ptr = _typed(tl.load(addr_ptr + 2 * n_tensors + t), tl.float32, ALIGNED)
    w_ptr = _value_operand(addr_ptr + 3 * n_tensors + t, m_ptr, MASTER, KAHAN, ALIGNED)
    key = _tensor_key(seed, t)
    if SCALARS_ON_DEVICE:
        step_size = tl.load(scalars_ptr)
        bc2_sqrt = tl.load(scalars_ptr + 1)
    for off in range(0, full, BLOCK):
        idx = tl.multiple_of(start + off, BLOCK) + tl.arange(0, BLOCK)
        _flush_block(
            p_ptr,
            m_ptr,
            v_ptr,
            w_ptr,
            idx,
            n,
            key,
            eps,
            step_size,
            bc2_sqrt,
            PARAM_DTYPE,
            MASTER,
            KAHAN,
            STOCHASTIC,
            SOFT_BF16,
            False,
        )
    if full < length:
        idx = start + full + tl.arange(0, BLOCK)
        _flush_block(
            p_ptr,
            m_ptr,
            v_ptr,
            w_ptr,
            idx,
            n,
            key,
            eps,
            step_size,
            bc2_sqrt,
            PARAM_DTYPE,
            MASTER,
            KAHAN,
            STOCHASTIC,
            SOFT_BF16,
            True,
        )


@triton.jit
def sq_norm_partials_kernel(
    chunk_tensor_ptr,
    chunk_start_ptr,
    numel_ptr,
    addr_ptr,
    partials_ptr,
    DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    ALIGNED: tl.constexpr,
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


# ---- 8-bit blockwise states (misa_kernels/quant.py): R x 256 tiles, one quantization block per row ----
# A jitted function reads a global only when it is a constexpr *value*: compiled Triton (3.6 on the H200)
# rejects an annotated int (`QBLOCK: tl.constexpr = 256`), which the interpreter accepts.
QBLOCK = tl.constexpr(quant.BLOCK)


@triton.jit
def _tile(first, R: tl.constexpr):
    # Element indices of R consecutive quantization blocks starting at element `first`, and their block indices.
    rows = tl.arange(0, R)
    idx = first + rows[:, None] * QBLOCK + tl.arange(0, QBLOCK)[None, :]
    return idx, first // QBLOCK + rows


@triton.jit
def _nearest_code(x, q_ptr):
    # The map is sorted: binary search for the largest index whose value is <= x (index 0 below the
    # map), then take the nearer of it and its upper neighbour, ties to the smaller code (quant.nearest_code).
    lo = tl.zeros(x.shape, dtype=tl.int32)
    for b in tl.static_range(8):
        candidate = lo + (128 >> b)
        lo = tl.where(tl.load(q_ptr + candidate) <= x, candidate, lo)
    hi = tl.minimum(lo + 1, 255)
    return tl.where(tl.load(q_ptr + hi) - x < x - tl.load(q_ptr + lo), hi, lo)


@triton.jit
def _dequantize(c_ptr, a_ptr, q_ptr, idx, blk, mask, bmask, MASKED: tl.constexpr):
    codes = _load(c_ptr, idx, mask, MASKED).to(tl.int32)
    scale = _load(a_ptr, blk, bmask, MASKED)
    return tl.load(q_ptr + codes) * scale[:, None]


@triton.jit
def _quantize(x, c_ptr, a_ptr, q_ptr, idx, blk, mask, bmask, MASKED: tl.constexpr):
    # x holds zeros outside the tensor, so a tail block's absmax is its own elements'.
    absmax = tl.max(tl.abs(x), axis=1)
    nonzero = absmax[:, None] > 0.0
    # IEEE division (as torch's): the interpreter, the GPU and the torch reference then pick the same codes.
    scaled = tl.where(nonzero, tl.math.div_rn(x, tl.where(nonzero, absmax[:, None], 1.0)), 0.0)
    _store(a_ptr, blk, absmax, bmask, MASKED)
    _store(c_ptr, idx, _nearest_code(scaled, q_ptr).to(tl.uint8), mask, MASKED)


@triton.jit
def _adamw8_tile(
    p_ptr,
    g_ptr,
    mc_ptr,
    vc_ptr,
    ma_ptr,
    va_ptr,
    w_ptr,
    qs_ptr,
    qu_ptr,
    first,
    n,
    n_blocks,
    key,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    step_size,
    bc2_sqrt,
    decay,
    PARAM_DTYPE: tl.constexpr,
    R: tl.constexpr,
    FRESH: tl.constexpr,
    MASTER: tl.constexpr,
    KAHAN: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    MASKED: tl.constexpr,
):
    idx, blk = _tile(first, R)
    mask = idx < n
    bmask = blk < n_blocks
    g = _load(g_ptr, idx, mask, MASKED).to(tl.float32)
    if FRESH:
        m = one_minus_beta1 * g
        v = one_minus_beta2 * g * g
    else:
        m = _dequantize(mc_ptr, ma_ptr, qs_ptr, idx, blk, mask, bmask, MASKED)
        v = _dequantize(vc_ptr, va_ptr, qu_ptr, idx, blk, mask, bmask, MASKED)
        m = m + one_minus_beta1 * (g - m)
        v = beta2 * v + one_minus_beta2 * g * g
    if MASKED:
        m = tl.where(mask, m, 0.0)
        v = tl.where(mask, v, 0.0)
    p = _load_value(p_ptr, w_ptr, idx, mask, FRESH, MASTER, KAHAN, MASKED)
    p = p * decay - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
    # The parameter comes from the unquantized new states; only what is stored is quantized.
    _store_value(p_ptr, w_ptr, idx, p, mask, key, PARAM_DTYPE, MASTER, KAHAN, STOCHASTIC, SOFT_BF16, MASKED)
    _quantize(m, mc_ptr, ma_ptr, qs_ptr, idx, blk, mask, bmask, MASKED)
    _quantize(v, vc_ptr, va_ptr, qu_ptr, idx, blk, mask, bmask, MASKED)
    return g * g


@triton.jit
def _skipped_fresh8_tile(
    p_ptr,
    mc_ptr,
    vc_ptr,
    ma_ptr,
    va_ptr,
    w_ptr,
    first,
    n,
    n_blocks,
    R: tl.constexpr,
    ZERO_M: tl.constexpr,
    ZERO_V: tl.constexpr,
    MASTER: tl.constexpr,
    KAHAN: tl.constexpr,
    MASKED: tl.constexpr,
):
    # Zero states (the zero codes, absmax 0), as quant.quantize writes for zeros; masters = weights.
    idx, blk = _tile(first, R)
    mask = idx < n
    bmask = blk < n_blocks
    zero = tl.zeros(idx.shape, dtype=tl.float32)
    if MASTER:
        _store(w_ptr, idx, _load(p_ptr, idx, mask, MASKED).to(tl.float32), mask, MASKED)
    if KAHAN:
        _store(w_ptr, idx, zero.to(tl.bfloat16), mask, MASKED)
    _store(mc_ptr, idx, (zero + ZERO_M).to(tl.uint8), mask, MASKED)
    _store(vc_ptr, idx, (zero + ZERO_V).to(tl.uint8), mask, MASKED)
    _store(ma_ptr, blk, tl.zeros(blk.shape, dtype=tl.float32), bmask, MASKED)
    _store(va_ptr, blk, tl.zeros(blk.shape, dtype=tl.float32), bmask, MASKED)


@triton.jit
def adamw8_kernel(
    chunk_tensor_ptr,
    chunk_start_ptr,
    numel_ptr,
    addr_ptr,
    n_tensors,
    partials_ptr,
    scalars_ptr,
    skip_ptr,
    qs_ptr,
    qu_ptr,
    one_minus_beta1,
    beta2,
    one_minus_beta2,
    eps,
    step_size,
    bc2_sqrt,
    decay,
    seed,
    PARAM_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    FRESH: tl.constexpr,
    NORMS: tl.constexpr,
    SCALARS_ON_DEVICE: tl.constexpr,
    ALIGNED: tl.constexpr,
    MASTER: tl.constexpr,
    KAHAN: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    SKIP: tl.constexpr,
    ZERO_M: tl.constexpr,
    ZERO_V: tl.constexpr,
    PER_TENSOR: tl.constexpr = False,
):
    # Operands: 0 param, 1 grad, 2/3 codes of exp_avg/exp_avg_sq, 4/5 their absmax, 6 master or compensation.
    R: tl.constexpr = BLOCK // QBLOCK
    pid, t, start, n, length, full = _chunk_bounds(chunk_tensor_ptr, chunk_start_ptr, numel_ptr, CHUNK, BLOCK)
    n_blocks = (n + QBLOCK - 1) // QBLOCK
    p_ptr = _typed(tl.load(addr_ptr + t), PARAM_DTYPE, ALIGNED)
    g_ptr = _typed(tl.load(addr_ptr + n_tensors + t), PARAM_DTYPE, ALIGNED)
    mc_ptr = _typed(tl.load(addr_ptr + 2 * n_tensors + t), tl.uint8, ALIGNED)
    vc_ptr = _typed(tl.load(addr_ptr + 3 * n_tensors + t), tl.uint8, ALIGNED)
    ma_ptr = _typed(tl.load(addr_ptr + 4 * n_tensors + t), tl.float32, ALIGNED)
    va_ptr = _typed(tl.load(addr_ptr + 5 * n_tensors + t), tl.float32, ALIGNED)
    w_ptr = _value_operand(addr_ptr + 6 * n_tensors + t, ma_ptr, MASTER, KAHAN, ALIGNED)
    key = _tensor_key(seed, t)
    step_size, bc2_sqrt, decay = _call_scalars(
        scalars_ptr, t, step_size, bc2_sqrt, decay, SCALARS_ON_DEVICE, PER_TENSOR
    )
    skip = _skip_flag(skip_ptr, SKIP)
    if skip == 0.0:
        acc = tl.zeros([R, QBLOCK], dtype=tl.float32)
        for off in range(0, full, BLOCK):
            acc += _adamw8_tile(
                p_ptr,
                g_ptr,
                mc_ptr,
                vc_ptr,
                ma_ptr,
                va_ptr,
                w_ptr,
                qs_ptr,
                qu_ptr,
                tl.multiple_of(start + off, BLOCK),
                n,
                n_blocks,
                key,
                one_minus_beta1,
                beta2,
                one_minus_beta2,
                eps,
                step_size,
                bc2_sqrt,
                decay,
                PARAM_DTYPE,
                R,
                FRESH,
                MASTER,
                KAHAN,
                STOCHASTIC,
                SOFT_BF16,
                False,
            )
        if full < length:
            acc += _adamw8_tile(
                p_ptr,
                g_ptr,
                mc_ptr,
                vc_ptr,
                ma_ptr,
                va_ptr,
                w_ptr,
                qs_ptr,
                qu_ptr,
                start + full,
                n,
                n_blocks,
                key,
                one_minus_beta1,
                beta2,
                one_minus_beta2,
                eps,
                step_size,
                bc2_sqrt,
                decay,
                PARAM_DTYPE,
                R,
                FRESH,
                MASTER,
                KAHAN,
                STOCHASTIC,
                SOFT_BF16,
                True,
            )
        if NORMS:
            tl.store(partials_ptr + pid, tl.sum(tl.sum(acc, axis=1), axis=0))
    else:
        if FRESH:
            for off in range(0, full, BLOCK):
                _skipped_fresh8_tile(
                    p_ptr,
                    mc_ptr,
                    vc_ptr,
                    ma_ptr,
                    va_ptr,
                    w_ptr,
                    tl.multiple_of(start + off, BLOCK),
                    n,
                    n_blocks,
                    R,
                    ZERO_M,
                    ZERO_V,
                    MASTER,
                    KAHAN,
                    False,
                )
            if full < length:
                _skipped_fresh8_tile(
                    p_ptr,
                    mc_ptr,
                    vc_ptr,
                    ma_ptr,
                    va_ptr,
                    w_ptr,
                    start + full,
                    n,
                    n_blocks,
                    R,
                    ZERO_M,
                    ZERO_V,
                    MASTER,
                    KAHAN,
                    True,
                )
        if NORMS:
            tl.store(partials_ptr + pid, 0.0)


@triton.jit
def _flush8_tile(
    p_ptr,
    mc_ptr,
    vc_ptr,
    ma_ptr,
    va_ptr,
    w_ptr,
    qs_ptr,
    qu_ptr,
    first,
    n,
    n_blocks,
    key,
    eps,
    step_size,
    bc2_sqrt,
    PARAM_DTYPE: tl.constexpr,
    R: tl.constexpr,
    MASTER: tl.constexpr,
    KAHAN: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    SOFT_BF16: tl.constexpr,
    MASKED: tl.constexpr,
):
    idx, blk = _tile(first, R)
    mask = idx < n
    bmask = blk < n_blocks
    m = _dequantize(mc_ptr, ma_ptr, qs_ptr, idx, blk, mask, bmask, MASKED)
    v = _dequantize(vc_ptr, va_ptr, qu_ptr, idx, blk, mask, bmask, MASKED)
    p = _load_value(p_ptr, w_ptr, idx, mask, False, MASTER, KAHAN, MASKED)
    p = p - step_size * (m / (tl.sqrt(v) / bc2_sqrt + eps))
    _store_value(p_ptr, w_ptr, idx, p, mask, key, PARAM_DTYPE, MASTER, KAHAN, STOCHASTIC, SOFT_BF16, MASKED)


@triton.jit
def flush8_kernel(
    chunk_tensor_ptr,
    chunk_start_ptr,
    numel_ptr,
    addr_ptr,
    n_tensors,
    scalars_ptr,
    qs_ptr,
    qu_ptr,
    eps,
    step_size,
    bc2_sqrt,
    seed,
    PARAM_DTYPE: tl.constexpr,
    CHUNK: tl.constexpr,
    BLOCK: tl.constexpr,
    SCALARS_ON_DEVICE: tl.constexpr,
    ALIGNED: tl.constexpr,
    MASTER: tl.constexpr,
    KAHAN: tl.constexpr,
    STOCHASTIC: tl.constexpr,
    SOFT_BF16: tl.constexpr,
):
    # Operands: 0 param, 1/2 codes, 3/4 absmax, 5 master or compensation. States are read only.
    R: tl.constexpr = BLOCK // QBLOCK
    pid, t, start, n, length, full = _chunk_bounds(chunk_tensor_ptr, chunk_start_ptr, numel_ptr, CHUNK, BLOCK)
    n_blocks = (n + QBLOCK - 1) // QBLOCK
    p_ptr = _typed(tl.load(addr_ptr + t), PARAM_DTYPE, ALIGNED)
    mc_ptr = _typed(tl.load(addr_ptr + n_tensors + t), tl.uint8, ALIGNED)
    vc_ptr = _typed(tl.load(addr_ptr + 2 * n_tensors + t), tl.uint8, ALIGNED)
    ma_ptr = _typed(tl.load(addr_ptr + 3 * n_tensors + t), tl.float32, ALIGNED)
    va_ptr = _typed(tl.load(addr_ptr + 4 * n_tensors + t), tl.float32, ALIGNED)
    w_ptr = _value_operand(addr_ptr + 5 * n_tensors + t, ma_ptr, MASTER, KAHAN, ALIGNED)
    key = _tensor_key(seed, t)
    if SCALARS_ON_DEVICE:
        step_size = tl.load(scalars_ptr)
        bc2_sqrt = tl.load(scalars_ptr + 1)
    for off in range(0, full, BLOCK):
        _flush8_tile(
            p_ptr,
            mc_ptr,
            vc_ptr,
            ma_ptr,
            va_ptr,
            w_ptr,
            qs_ptr,
            qu_ptr,
            tl.multiple_of(start + off, BLOCK),
            n,
            n_blocks,
            key,
            eps,
            step_size,
            bc2_sqrt,
            PARAM_DTYPE,
            R,
            MASTER,
            KAHAN,
            STOCHASTIC,
            SOFT_BF16,
            False,
        )
    if full < length:
        _flush8_tile(
            p_ptr,
            mc_ptr,
            vc_ptr,
            ma_ptr,
            va_ptr,
            w_ptr,
            qs_ptr,
            qu_ptr,
            start + full,
            n,
            n_blocks,
            key,
            eps,
            step_size,
            bc2_sqrt,
            PARAM_DTYPE,
            R,
            MASTER,
            KAHAN,
            STOCHASTIC,
            SOFT_BF16,
            True,
        )
