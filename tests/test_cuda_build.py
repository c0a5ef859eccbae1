"""The CUDA sources compile here when nvcc exists: the .cu files alone (no torch headers), and the
installed extension imports. Nothing built from them runs without a GPU."""

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    candidate = Path(home) / "bin" / "nvcc"
    return str(candidate) if candidate.exists() else shutil.which("nvcc")


@pytest.mark.parametrize("source", sorted(p.name for p in (CSRC / "cuda").glob("*.cu")))
def test_cu_file_compiles_without_torch_headers(source, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    text = (CSRC / "cuda" / source).read_text()
    assert "torch/" not in text and "ATen/" not in text, "kernels must not include torch headers"
    cmd = [
        nvcc,
        "-std=c++17",
        "-O3",
        "-gencode",
        "arch=compute_90,code=sm_90",
        "-c",
        str(CSRC / "cuda" / source),
        "-o",
        str(tmp_path / "out.o"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr


def test_installed_extension_imports_when_built():
    if _nvcc() is None:
        pytest.skip("nvcc not found: the extension is not expected")
    import torch

    if torch.version.cuda is None:
        pytest.skip("CPU-only torch: the extension is not expected")
    if os.environ.get("MISA_SKIP_CUDA_BUILD", "0") == "1":
        pytest.skip("MISA_SKIP_CUDA_BUILD=1")
    from misa_kernels import cuda

    ext = cuda.extension()  # raises with the reason if the build is missing
    for name in ("adamw_step_", "grad_sq_norms", "momentum_flush_"):
        assert hasattr(ext, name)
    if not torch.cuda.is_available():
        assert "no CUDA device" in cuda.load_error()


def test_cuda_kernels_use_16_byte_accesses(tmp_path):
    """The vector path exists in the generated code (sm_90 PTX): ld/st.global.v4 for fp32 and bf16."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    ptx = tmp_path / "adamw.ptx"
    result = subprocess.run(
        [nvcc, "-std=c++17", "-O3", "-arch=sm_90", "-ptx", str(CSRC / "cuda" / "adamw.cu"), "-o", str(ptx)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    text = ptx.read_text()
    assert "ld.global.v4.f32" in text and "st.global.v4.f32" in text  # fp32 params and the fp32 states
    assert "ld.global.v4.u32" in text and "st.global.v4.u32" in text  # 8 bf16/fp16 values at a time
    # The operand addresses come from the device-side chunk table; every access must still be a global
    # one (a generic ld/st checks the address space on every access).
    generic = re.findall(r"^\s*((?:ld|st)\.(?!global|param|shared|local|const)[\w.]*)", text, re.M)
    assert not generic, sorted(set(generic))
    # One launch covers any number of tensors because no table travels in the parameter space: each
    # kernel's parameters are the table pointer and a few scalars.
    sizes = [int(n) for n in re.findall(r"\.param \.align \d+ \.b8 \w+\[(\d+)\]", text)]
    assert sizes and max(sizes) <= 64, sizes


DECODER = r"""
#include <cstdio>
#include <vector>
#include "cuda/multi_tensor.cuh"
// Reads a chunk table as misa_kernels/tables.py lays it out and prints what the kernels' own accessors
// (chunk_of, operand, chunk_begins) make of it, one line per chunk, then one per tensor.
int main() {
  long long n_chunks, n_tensors, chunk, n_operands;
  if (std::scanf("%lld %lld %lld %lld", &n_chunks, &n_tensors, &chunk, &n_operands) != 4) return 2;
  std::vector<int64_t> data(2 * n_chunks + 2 * n_tensors + 1 + n_operands * n_tensors);
  for (auto& x : data) if (std::scanf("%lld", reinterpret_cast<long long*>(&x)) != 1) return 3;
  const misa::ChunkTable t{data.data(), n_chunks, n_tensors, chunk};
  for (long long id = 0; id < n_chunks; ++id) {
    const misa::Chunk c = misa::chunk_of(t, id);
    std::printf("chunk %lld %lld %lld", (long long)c.tensor, (long long)c.begin, (long long)c.len);
    for (int d = 0; d < n_operands; ++d) std::printf(" %lld", (long long)misa::operand<char>(t, d, c));
    std::printf("\n");
  }
  for (long long i = 0; i < n_tensors; ++i)
    std::printf("tensor %lld %lld\n", (long long)misa::chunk_begins(t)[i], (long long)misa::chunk_begins(t)[i + 1]);
  return 0;
}
"""


def test_cuda_kernels_read_the_chunk_table_as_python_lays_it_out(tmp_path):
    """The CUDA kernels' table accessors, compiled for the host and run here on a table built by
    misa_kernels/tables.py (awkward sizes, 5 operands, more chunks than one wave): every chunk decodes to
    the tensor, offset, length and operand addresses Python meant, and every tensor to its chunk range."""
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found")
    import torch

    from misa_kernels import tables

    source = tmp_path / "decode.cu"
    source.write_text(DECODER)
    exe = tmp_path / "decode"
    result = subprocess.run(
        [nvcc, "-std=c++17", "-I", str(CSRC), str(source), "-o", str(exe)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    chunk = 64
    sizes = [1, 127, 64, 4097, 3 * 64 + 5]
    lists = [
        [torch.empty(n, dtype=dt) for n in sizes]
        for dt in (torch.bfloat16, torch.bfloat16, torch.float32, torch.float32, torch.float32)
    ]
    table = tables.build(lists, chunk)
    header = f"{table.n_chunks} {table.n_tensors} {chunk} {len(lists)}\n"
    run = subprocess.run(
        [str(exe)], input=header + " ".join(map(str, table.flat.tolist())), capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    want = []
    for t, n in enumerate(sizes):
        for begin in range(0, n, chunk):
            want.append(
                "chunk "
                + " ".join(map(str, [t, begin, min(chunk, n - begin)] + [ts[t].data_ptr() + begin for ts in lists]))
            )
    first = 0
    for n in sizes:
        count = -(-n // chunk)
        want.append(f"tensor {first} {first + count}")
        first += count
    assert run.stdout.split("\n")[:-1] == want
