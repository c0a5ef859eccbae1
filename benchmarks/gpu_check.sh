#!/usr/bin/env bash
# One command on a GPU machine: build the CUDA backend from this tree, run the gpu tests, then every
# benchmark; results JSON, plots and a log land in one folder ($OUT if set, else benchmarks/results/<stamp>).
# Sized for a 10-minute slot: each benchmark has its own time budget.
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
export PYTHONUNBUFFERED=1
{
  echo "== $(date -u) $(git rev-parse HEAD 2>/dev/null || echo no-git)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  export MISA_FORCE_CUDA_BUILD=1 MISA_CUDA_ARCHS="${MISA_CUDA_ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-8}"
  python -m pip install -q --no-build-isolation --no-deps -e . || { echo "BUILD FAILED"; exit 1; }
  python -c "import misa_kernels as mk; print('backends:', mk.available_backends('cuda'))"
  echo "== gpu tests"
  timeout 240 python -m pytest -q -m "not distributed" tests -p no:cacheprovider \
    --junitxml="$DEST/gpu-tests.xml"
  echo "== kernels";     timeout 200 python benchmarks/bench_kernels.py --out "$DEST" --budget-s 150
  echo "== arena";       timeout 60  python benchmarks/bench_arena.py --out "$DEST"
  echo "== train step";  timeout 200 python benchmarks/bench_train_step.py --out "$DEST" --budget-s 150
  echo "== render";      python benchmarks/render_readme.py --check-only "$DEST"/*.json || true
  echo "== done $(date -u)"
} 2>&1 | tee "$LOG"
