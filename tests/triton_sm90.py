"""Compiles the Triton kernels for sm_90 without a GPU (Triton's own LLVM and ptxas) and prints, as
JSON, the global load/store instructions of each variant. Run in a process without TRITON_INTERPRET."""

import json
import re
import sys

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from misa_kernels.triton import kernels

POINTERS = {"chunk_tensor_ptr": "*i64", "chunk_start_ptr": "*i64", "numel_ptr": "*i64", "addr_ptr": "*i64",
            "chunk_begin_ptr": "*i64", "partials_ptr": "*fp32", "scalars_ptr": "*fp32", "out_ptr": "*fp32"}
SCALARS = {"n_tensors": "i32", "one_minus_beta1": "fp32", "beta2": "fp32", "one_minus_beta2": "fp32", "eps": "fp32",
           "step_size": "fp32", "bc2_sqrt": "fp32", "decay": "fp32", "seed": "i32"}


def instructions(fn, constexprs):
    names = fn.arg_names
    sig = {n: POINTERS.get(n) or SCALARS.get(n) or "constexpr" for n in names}
    consts = {(names.index(k),): v for k, v in constexprs.items()}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in POINTERS}
    ptx = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs),
                         target=GPUTarget("cuda", 90, 32)).asm["ptx"]
    return sorted(set(re.findall(r"(?:ld|st)\.global[.\w]*", ptx)))


def main():
    out = {}
    for dname, dtype in (("fp32", tl.float32), ("bf16", tl.bfloat16)):
        for aligned in (True, False):
            key = f"{dname}-{'aligned' if aligned else 'unaligned'}"
            out[f"adamw-{key}"] = instructions(kernels.adamw_kernel, dict(
                PARAM_DTYPE=dtype, CHUNK=65536, BLOCK=1024, FRESH=False, NORMS=True, SCALARS_ON_DEVICE=False,
                ALIGNED=aligned, MASTER=False, STOCHASTIC=False, SOFT_BF16=False))
            out[f"flush-{key}"] = instructions(kernels.flush_kernel, dict(
                PARAM_DTYPE=dtype, CHUNK=65536, BLOCK=1024, SCALARS_ON_DEVICE=True, ALIGNED=aligned,
                MASTER=False, STOCHASTIC=False, SOFT_BF16=False))
            if dname == "bf16":  # master weights and stochastic rounding keep the vector accesses
                out[f"adamw_master-{key}"] = instructions(kernels.adamw_kernel, dict(
                    PARAM_DTYPE=dtype, CHUNK=65536, BLOCK=1024, FRESH=False, NORMS=True, SCALARS_ON_DEVICE=False,
                    ALIGNED=aligned, MASTER=True, STOCHASTIC=True, SOFT_BF16=False))
                out[f"flush_master-{key}"] = instructions(kernels.flush_kernel, dict(
                    PARAM_DTYPE=dtype, CHUNK=65536, BLOCK=1024, SCALARS_ON_DEVICE=False, ALIGNED=aligned,
                    MASTER=True, STOCHASTIC=False, SOFT_BF16=False))
            out[f"norms-{key}"] = instructions(kernels.sq_norm_partials_kernel, dict(
                DTYPE=dtype, CHUNK=65536, BLOCK=1024, ALIGNED=aligned))
    out["reduce"] = instructions(kernels.reduce_partials_kernel, dict(BLOCK=256))
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
