#!/usr/bin/env bash
# Issue 18's GPU measurements in one resumable run (each result file is skipped when it exists):
#   1. training throughput and MFU of gdrt train's step (benchmarks/bench_gpu.py): LoRA and full fine-tuning,
#      SFT and GDRT, random and length-grouped batches (sampling=group_by_length), bf16;
#   2. evaluation windows/s, gdrt's constrained beam search against the transformers reference
#      (benchmarks/bench_pretrained.py --device cuda --only-evaluate).
# Usage: OUT=docs/bench bash scripts/gpu_bench.sh     (PYTHON=python3 where torch with CUDA is not in .venv)
# Needs the backbone in the cache (python -m gdrt_core.pretrained fetch smollm2-135m, or GDRT_CACHE_DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-docs/bench}
PY=${PYTHON:-.venv/bin/python}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false GDRT_TRACKING=off PYTHONUNBUFFERED=1
mkdir -p "$OUT"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'gpu_bench: torch sees no GPU')"
[ -f "$OUT/gpu_train.json" ] || "$PY" benchmarks/bench_gpu.py --pretrained smollm2-135m --batch 32 --steps 20 \
  --warmup 3 --peak-tflops "${PEAK_TFLOPS:-989}" --json "$OUT/gpu_train.json"
[ -f "$OUT/gpu_eval.json" ] || "$PY" benchmarks/bench_pretrained.py --device cuda --only-evaluate --eval-windows 512 \
  --reference-windows 32 --eval-batch-size 64 --workers 1 --previous-rev none --json "$OUT/gpu_eval.json"
