"""Build script. The CUDA extension (csrc/) is optional: it is compiled when nvcc and a CUDA build of
torch are present, and skipped otherwise (the Triton and torch backends still install).

Switches (environment variables):
  MISA_SKIP_CUDA_BUILD=1    never build the extension
  MISA_FORCE_CUDA_BUILD=1   build it, and fail loudly if that is impossible
  MISA_CUDA_ARCHS="89;90"   compute capabilities to compile for (RTX 4090, H100/H200)
  NVCC_THREADS=4            nvcc --threads
  MAX_JOBS                  parallel compile jobs (default: from cores and memory)

With pip, build against the torch you run: pip install --no-build-isolation .
"""

import os
import shutil
import sys

from setuptools import find_packages, setup

HERE = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _say(msg: str) -> None:
    print(f"[misa-kernels] {msg}", file=sys.stderr)


def _default_cuda_home() -> None:
    # torch guesses CUDA_HOME from `which nvcc`; a wrapper script in /usr/local/bin makes it guess
    # /usr/local, which has no CUDA headers. Prefer the toolkit's own folder when it exists.
    if "CUDA_HOME" not in os.environ and "CUDA_PATH" not in os.environ:
        for candidate in ("/usr/local/cuda",):
            if os.path.exists(os.path.join(candidate, "bin", "nvcc")):
                os.environ["CUDA_HOME"] = candidate
                return


def _max_jobs() -> None:
    if "MAX_JOBS" in os.environ:
        return
    try:
        mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gb = 8
    # ~4 GB per nvcc job keeps a small machine out of swap.
    os.environ["MAX_JOBS"] = str(max(1, min(os.cpu_count() or 1, int(mem_gb // 4))))


def cuda_extensions():
    if _flag("MISA_SKIP_CUDA_BUILD"):
        _say("MISA_SKIP_CUDA_BUILD=1: installing without the CUDA backend")
        return [], {}
    force = _flag("MISA_FORCE_CUDA_BUILD")
    _default_cuda_home()
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError as exc:
        if force:
            raise RuntimeError(
                "MISA_FORCE_CUDA_BUILD=1 but torch is not importable in the build "
                "environment; use pip install --no-build-isolation"
            ) from exc
        _say(
            "torch is not importable at build time (pip's build isolation?): installing without the CUDA "
            "backend. To build it: pip install --no-build-isolation ."
        )
        return [], {}
    problem = None
    if torch.version.cuda is None:
        problem = f"torch {torch.__version__} is a CPU-only build"
    elif CUDA_HOME is None or shutil.which(os.path.join(CUDA_HOME, "bin", "nvcc")) is None:
        problem = "nvcc was not found (set CUDA_HOME)"
    if problem:
        if force:
            raise RuntimeError(f"MISA_FORCE_CUDA_BUILD=1 but {problem}")
        _say(f"{problem}: installing without the CUDA backend (Triton and torch backends only)")
        return [], {}
    _max_jobs()
    archs = [a.strip().replace(".", "") for a in os.environ.get("MISA_CUDA_ARCHS", "89;90").split(";") if a.strip()]
    gencode = []
    for arch in archs:
        gencode += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    gencode += ["-gencode", f"arch=compute_{archs[-1]},code=compute_{archs[-1]}"]  # PTX for newer GPUs
    nvcc_flags = ["-O3", "-std=c++17", "-lineinfo", f"--threads={os.environ.get('NVCC_THREADS', '4')}"] + gencode
    _say(
        f"building the CUDA backend with {CUDA_HOME}/bin/nvcc for sm_{', sm_'.join(archs)} "
        f"(MAX_JOBS={os.environ['MAX_JOBS']})"
    )
    ext = CUDAExtension(
        name="misa_kernels._C",
        sources=["csrc/misa_ops.cpp", "csrc/cuda/adamw.cu", "csrc/cuda/adamw8bit.cu", "csrc/cuda/norms.cu"],
        include_dirs=[os.path.join(HERE, "csrc")],
        extra_compile_args={"cxx": ["-O3", "-std=c++20"], "nvcc": nvcc_flags},
    )
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = cuda_extensions()

setup(
    packages=find_packages(include=["misa_kernels", "misa_kernels.*", "misa", "misa.*"]),
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
