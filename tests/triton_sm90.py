"""Compiles the Triton kernels for sm_90 without a GPU (Triton's own LLVM and ptxas) and prints, as
JSON, the global load/store instructions of each variant and the registers per thread of the default
launch config (tune.DEFAULT) in each mode. Run in a process without TRITON_INTERPRET."""

import json
import re
import shutil
import subprocess
import sys
import tempfile

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from misa_kernels.triton import kernels, tune

POINTERS = {
    "chunk_tensor_ptr": "*i64",
    "chunk_start_ptr": "*i64",
    "numel_ptr": "*i64",
    "addr_ptr": "*i64",
    "chunk_begin_ptr": "*i64",
    "partials_ptr": "*fp32",
    "scalars_ptr": "*fp32",
    "out_ptr": "*fp32",
    "skip_ptr": "*fp32",
    "qs_ptr": "*fp32",
    "qu_ptr": "*fp32",
}
SCALARS = {
    "n_tensors": "i32",
    "one_minus_beta1": "fp32",
    "beta2": "fp32",
    "one_minus_beta2": "fp32",
    "eps": "fp32",
    "step_size": "fp32",
    "bc2_sqrt": "fp32",
    "decay": "fp32",
    "seed": "i32",
}


def compile_sm90(fn, constexprs, num_warps=4):
    names = fn.arg_names
    sig = {n: POINTERS.get(n) or SCALARS.get(n) or "constexpr" for n in names}
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in POINTERS}
    return triton.compile(
        ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=num_warps),
    ).asm["ptx"]


def instructions(fn, constexprs):
    return sorted(set(re.findall(r"(?:ld|st)\.global[.\w]*", compile_sm90(fn, constexprs))))


def _ptxas():
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        try:
            return get_ptxas(90).path
        except TypeError:
            return get_ptxas().path
    except Exception:
        return shutil.which("ptxas")


def registers(fn, constexprs, num_warps):
    """Registers per thread that ptxas allocates (what bounds how many programs an SM holds)."""
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(compile_sm90(fn, constexprs, num_warps))
    result = subprocess.run(
        [_ptxas(), "-v", "-arch=sm_90a", f.name, "-o", "/dev/null"], capture_output=True, text=True, check=True
    )
    return int(re.findall(r"Used (\d+) registers", result.stderr)[0])


def main():
    out = {}
    for dname, dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
        for aligned in (True, False):
            key = f"{dname}-{'aligned' if aligned else 'unaligned'}"
            out[f"adamw-{key}"] = instructions(
                kernels.adamw_kernel,
                dict(
                    PARAM_DTYPE=dtype,
                    CHUNK=65536,
                    BLOCK=1024,
                    FRESH=False,
                    NORMS=True,
                    SCALARS_ON_DEVICE=False,
                    ALIGNED=aligned,
                    MASTER=False,
                    STOCHASTIC=False,
                    SOFT_BF16=False,
                    SKIP=False,
                ),
            )
            out[f"flush-{key}"] = instructions(
                kernels.flush_kernel,
                dict(
                    PARAM_DTYPE=dtype,
                    CHUNK=65536,
                    BLOCK=1024,
                    SCALARS_ON_DEVICE=True,
                    ALIGNED=aligned,
                    MASTER=False,
                    STOCHASTIC=False,
                    SOFT_BF16=False,
                ),
            )
            if dname == "bf16":  # master weights, stochastic rounding and the skip flag (MISA's call) keep them
                out[f"adamw_master-{key}"] = instructions(
                    kernels.adamw_kernel,
                    dict(
                        PARAM_DTYPE=dtype,
                        CHUNK=65536,
                        BLOCK=1024,
                        FRESH=False,
                        NORMS=True,
                        SCALARS_ON_DEVICE=False,
                        ALIGNED=aligned,
                        MASTER=True,
                        STOCHASTIC=True,
                        SOFT_BF16=False,
                        SKIP=True,
                    ),
                )
                out[f"flush_master-{key}"] = instructions(
                    kernels.flush_kernel,
                    dict(
                        PARAM_DTYPE=dtype,
                        CHUNK=65536,
                        BLOCK=1024,
                        SCALARS_ON_DEVICE=False,
                        ALIGNED=aligned,
                        MASTER=True,
                        STOCHASTIC=False,
                        SOFT_BF16=False,
                    ),
                )
            out[f"norms-{key}"] = instructions(
                kernels.sq_norm_partials_kernel, dict(DTYPE=dtype, CHUNK=65536, BLOCK=1024, ALIGNED=aligned)
            )
    out["reduce"] = instructions(kernels.reduce_partials_kernel, dict(BLOCK=256))
    block, warps = tune.DEFAULT
    adamw = dict(
        CHUNK=65536,
        BLOCK=block,
        FRESH=False,
        NORMS=True,
        SCALARS_ON_DEVICE=False,
        ALIGNED=True,
        MASTER=False,
        STOCHASTIC=False,
        SOFT_BF16=False,
        SKIP=True,
    )
    flush = dict(
        CHUNK=65536, BLOCK=block, SCALARS_ON_DEVICE=False, ALIGNED=True, MASTER=False, STOCHASTIC=False, SOFT_BF16=False
    )
    out["registers"] = {
        "adamw-fp32": registers(kernels.adamw_kernel, dict(adamw, PARAM_DTYPE=tl.float32), warps),
        "adamw-bf16": registers(kernels.adamw_kernel, dict(adamw, PARAM_DTYPE=tl.bfloat16), warps),
        "adamw-bf16-master": registers(kernels.adamw_kernel, dict(adamw, PARAM_DTYPE=tl.bfloat16, MASTER=True), warps),
        "adamw-bf16-master-fresh": registers(
            kernels.adamw_kernel, dict(adamw, PARAM_DTYPE=tl.bfloat16, MASTER=True, FRESH=True), warps
        ),
        "flush-bf16-master": registers(kernels.flush_kernel, dict(flush, PARAM_DTYPE=tl.bfloat16, MASTER=True), warps),
        "norms-bf16": registers(
            kernels.sq_norm_partials_kernel, dict(DTYPE=tl.bfloat16, CHUNK=65536, BLOCK=block, ALIGNED=True), warps
        ),
    }
    # Every config the tuner may pick compiles (MISA's call: bf16, masters, norms, skip flag).
    out["candidates"] = {
        f"{b},{w}": registers(kernels.adamw_kernel, dict(adamw, BLOCK=b, PARAM_DTYPE=tl.bfloat16, MASTER=True), w)
        for b, w in tune.CANDIDATES
    }
    # The 8-bit kernels in each mode MISA calls them in (compiled code is stricter than the interpreter: a global
    # the kernel reads must be a constexpr value).
    eight = dict(
        CHUNK=65536,
        BLOCK=block,
        SCALARS_ON_DEVICE=False,
        ALIGNED=True,
        MASTER=False,
        KAHAN=False,
        STOCHASTIC=False,
        SOFT_BF16=False,
    )
    out["eight_bit"] = {}
    for name, mode in (
        ("plain-fp32", dict(PARAM_DTYPE=tl.float32)),
        ("kahan-bf16", dict(PARAM_DTYPE=tl.bfloat16, KAHAN=True)),
        ("master-bf16", dict(PARAM_DTYPE=tl.bfloat16, MASTER=True)),
        ("sr-bf16", dict(PARAM_DTYPE=tl.bfloat16, STOCHASTIC=True)),
    ):
        out["eight_bit"][f"adamw8-{name}"] = registers(
            kernels.adamw8_kernel,
            dict(eight, **mode, FRESH=False, NORMS=True, SKIP=True, ZERO_M=False, ZERO_V=False),
            warps,
        )
        out["eight_bit"][f"flush8-{name}"] = registers(kernels.flush8_kernel, dict(eight, **mode), warps)
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
