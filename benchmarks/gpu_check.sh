#!/usr/bin/env bash
# One command on a GPU machine: build the CUDA backend from this tree, then the stages in STAGES, in order.
# Results land flat in one folder ($OUT if set, else benchmarks/results/gpu-<stamp>): a log, the GPU tests'
# junit XML, one results JSON per device and day (every bench script adds its rows to it), its kernel plot,
# and the fine-tuning summary one folder down: at most 8 files, at most 2 folders down, as the device tool
# brings back. Run GPU jobs one after another: processes sharing the GPU get no speed-up.
#
# The default stages fit one 10-minute call (each has its own time limit; they add up to 560 s):
#   build 75 s (42 s on the H200), the planner's GPU terms 30 s, tests 150 s, kernels (headline sizes) 110 s,
#   host time 75 s, 8B memory rows 110 s and the planner's figures beside them 10 s (the planner itself runs on
#   the CPU beside the GPU stages); the whole of it: 426 s there on 2026-12-04.
# A second call takes the rest:  STAGES=train,cap,arena,master bash benchmarks/gpu_check.sh
# and a third the fine-tuning comparison on a larger model in bf16:  STAGES=finetune bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
DEST="${OUT:-benchmarks/results/gpu-$(date +%Y%m%d-%H%M%S)}"
STAGES=",${STAGES:-terms,tests,kernels,host,mem8b},"
mkdir -p "$DEST"
LOG="$DEST/gpu_check.log"
export PYTHONUNBUFFERED=1
want() { [[ "$STAGES" == *",$1,"* ]]; }
{
  echo "== $(date -u) $(git rev-parse HEAD 2>/dev/null || echo no-git) stages:$STAGES"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  export MISA_FORCE_CUDA_BUILD=1 MISA_CUDA_ARCHS="${MISA_CUDA_ARCHS:-90}" MAX_JOBS="${MAX_JOBS:-16}"
  timeout 75 python -m pip install -q --no-build-isolation --no-deps -e . || { echo "BUILD FAILED"; exit 1; }
  python -c "import misa_kernels as mk; print('backends:', mk.available_backends('cuda'))"
  if want mem8b; then
    # The memory planner needs only the CPU: it plans the mem8b rows while the GPU stages run.
    timeout 400 python benchmarks/plan_vs_measured.py --save-plan "$DEST/planned-8b.json" &
    PLANNER=$!
  fi
  if want terms; then
    # First after the build: the cuBLAS workspace shows only at a process's first product.
    echo "== the planner's GPU terms"; timeout 30 python benchmarks/bench_gpu_terms.py --out "$DEST"
  fi
  if want tests; then
    echo "== gpu tests (the kernels' oracle first: the rest is slower and less telling)"
    timeout 150 python -m pytest -q -m "not distributed" -p no:cacheprovider --junitxml="$DEST/gpu-tests.xml" \
      tests/test_memory.py::test_the_tracked_peak_matches_the_cuda_allocator_within_2_percent tests/test_adamw_step.py tests/test_state_formats.py tests/test_cuda_graph.py tests/test_norms_and_flush.py \
      tests/test_master_weights.py tests/test_triton_tune.py tests/test_misa_optimizer.py tests/test_resume.py \
      tests/test_host_path.py tests/test_prepared.py
  fi
  if want kernels; then
    echo "== kernels"; timeout 110 python benchmarks/bench_kernels.py --out "$DEST" --budget-s 85
  fi
  if want host; then
    echo "== host time"; timeout 75 python benchmarks/bench_host.py --out "$DEST"
  fi
  if want mem8b; then
    # Each measured row is printed beside the memory planner's peak (benchmarks/plan_vs_measured.py).
    echo "== 8B memory rows with checkpointing: MISA delta=3% (default, 8-bit + Kahan, 8-bit + stochastic + release)"
    echo "   against LoRA r=16"
    timeout 110 python benchmarks/bench_train_step.py --out "$DEST" --shapes 8b --seqs 512,2048 \
      --methods misa_kernels,misa_8bit_kahan,misa_8bit_sr_release,lora_r16 --no-checkpointing-runs --steps 6 \
      --warmup 2 --budget-s 90
    echo "== the planner beside the measured peaks"; wait "$PLANNER"
    timeout 10 python benchmarks/plan_vs_measured.py --measured "$(ls -t "$DEST"/*.json | grep -v planned | head -1)" \
      --planned "$DEST/planned-8b.json"
  fi
  if want train; then
    echo "== train step"; timeout 220 python benchmarks/bench_train_step.py --out "$DEST" --budget-s 190
  fi
  if want cap; then
    echo "== 8B under a 24 GB cap (RTX 4090)"
    timeout 200 python benchmarks/bench_train_step.py --out "$DEST" --shapes 8b --seqs 512,2048,4096 \
      --memory-cap-gb 24 --methods misa_kernels,misa_8bit_sr_release,lora_r16,badam,adamw_fused --steps 12 \
      --budget-s 170
  fi
  if want arena; then echo "== arena"; timeout 60 python benchmarks/bench_arena.py --out "$DEST"; fi
  if want master; then echo "== master weights"; timeout 60 python benchmarks/bench_master_weights.py --out "$DEST"; fi
  if want finetune; then
    # The base is cached outside $DEST: only the summary (finetune.json, .md, .png) comes back.
    echo "== finetune"
    timeout 540 python -m misa.finetune --model-size base --dtype bf16 --base-steps 600 --max-steps 300 --seeds 3 \
      --equal-memory --eval-every 100 --no-progress --cache-dir "${TMPDIR:-/tmp}/misa-cache" --out "$DEST/finetune"
  fi
  echo "== render";      python benchmarks/render_readme.py --check-only "$DEST"/*.json || true
  echo "== done $(date -u)"
} 2>&1 | tee "$LOG"
