#!/usr/bin/env bash
# One command on a GPU machine: build the CUDA backend from this tree, run the gpu tests, then the
# benchmarks; results JSON, plots and a log land in one folder ($OUT if set, else benchmarks/results/<stamp>).
# STAGES picks what runs (default: all, about 15 minutes). A 10-minute slot takes two calls, e.g.
#   STAGES=tests,kernels,host bash benchmarks/gpu_check.sh ; STAGES=arena,master,train,cap bash benchmarks/gpu_check.sh
#   STAGES=finetune bash benchmarks/gpu_check.sh   (MISA, LISA, BAdam, AdamW, LoRA, DoRA fine-tuning in bf16)
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}"
STAGES=",${STAGES:-tests,kernels,host,arena,master,train,cap,finetune},"
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
export PYTHONUNBUFFERED=1
want() { [[ "$STAGES" == *",$1,"* ]]; }
{
  echo "== $(date -u) $(git rev-parse HEAD 2>/dev/null || echo no-git) stages:$STAGES"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  export MISA_FORCE_CUDA_BUILD=1 MISA_CUDA_ARCHS="${MISA_CUDA_ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-8}"
  python -m pip install -q --no-build-isolation --no-deps -e . || { echo "BUILD FAILED"; exit 1; }
  python -c "import misa_kernels as mk; print('backends:', mk.available_backends('cuda'))"
  if want tests; then
    echo "== gpu tests"
    timeout 300 python -m pytest -q -m "not distributed" tests -p no:cacheprovider --junitxml="$DEST/gpu-tests.xml"
  fi
  if want kernels; then echo "== kernels"; timeout 200 python benchmarks/bench_kernels.py --out "$DEST" --budget-s 170; fi
  if want host; then echo "== host time"; timeout 90 python benchmarks/bench_host.py --out "$DEST"; fi
  if want arena; then echo "== arena"; timeout 60 python benchmarks/bench_arena.py --out "$DEST"; fi
  if want master; then echo "== master weights"; timeout 60 python benchmarks/bench_master_weights.py --out "$DEST"; fi
  if want train; then
    echo "== train step"; timeout 220 python benchmarks/bench_train_step.py --out "$DEST" --budget-s 190
  fi
  if want cap; then
    echo "== 8B under a 24 GB cap (RTX 4090)"
    timeout 200 python benchmarks/bench_train_step.py --out "$DEST" --shapes 8b --seqs 512,2048,4096 \
      --memory-cap-gb 24 --methods misa_kernels,lora_r16,badam,adamw_fused --steps 12 --budget-s 170
  fi
  if want finetune; then
    # Fine-tuning against LoRA on a larger model in bf16 (the users' setting); only the summary files come back.
    echo "== finetune"
    timeout 540 python -m misa.finetune --model-size base --dtype bf16 --base-steps 600 --max-steps 300 --seeds 3 \
      --equal-memory --eval-every 100 --no-progress --cache-dir "$DEST/.cache" --out "$DEST/finetune"
  fi
  echo "== render";      python benchmarks/render_readme.py --check-only "$DEST"/*.json || true
  echo "== done $(date -u)"
} 2>&1 | tee "$LOG"
