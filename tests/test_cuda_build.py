"""The CUDA sources compile here when nvcc exists: the .cu files alone (no torch headers), and the
installed extension imports. Nothing built from them runs without a GPU."""

import os
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
    cmd = [nvcc, "-std=c++17", "-O3", "-gencode", "arch=compute_90,code=sm_90", "-c",
           str(CSRC / "cuda" / source), "-o", str(tmp_path / "out.o")]
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
    result = subprocess.run([nvcc, "-std=c++17", "-O3", "-arch=sm_90", "-ptx", str(CSRC / "cuda" / "adamw.cu"),
                             "-o", str(ptx)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    text = ptx.read_text()
    assert "ld.global.v4.f32" in text and "st.global.v4.f32" in text  # fp32 params and the fp32 states
    assert "ld.global.v4.u32" in text and "st.global.v4.u32" in text  # 8 bf16/fp16 values at a time
