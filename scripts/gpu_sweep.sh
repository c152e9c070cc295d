#!/usr/bin/env bash
# The pretrained-backbone study on one GPU: every stage of the sweeps in its own process, up to JOBS at once,
# under CUDA MPS when the machine allows it (several processes then share the GPU's compute). Resumable: a
# finished stage leaves runs/<sweep>/stages/<name>.done.json and is skipped when this script runs again;
# results.json / results.md are rewritten as stages finish. Usage:
#   JOBS=12 bash scripts/gpu_sweep.sh [SWEEP ...]     # default: the Office, Toy, Book and Game sweeps (smollm2)
# Needs torch with CUDA in .venv (docs/operations.md) and the backbone in the cache
# (python -m gdrt_core.pretrained fetch smollm2-135m, or GDRT_CACHE_DIR pointing at a filled cache).
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-12}
sweeps=("$@")
[ ${#sweeps[@]} -gt 0 ] || sweeps=(pipelines/sweeps/office-smollm2.yaml pipelines/sweeps/toy-smollm2.yaml
                                   pipelines/sweeps/books-smollm2.yaml pipelines/sweeps/games-smollm2.yaml)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$PWD/runs/mlflow.db}
mkdir -p runs
if command -v nvidia-cuda-mps-control >/dev/null 2>&1 && ! pgrep -x nvidia-cuda-mps >/dev/null 2>&1; then
  export CUDA_MPS_PIPE_DIRECTORY=${CUDA_MPS_PIPE_DIRECTORY:-$PWD/runs/.mps-pipe}
  export CUDA_MPS_LOG_DIRECTORY=${CUDA_MPS_LOG_DIRECTORY:-$PWD/runs/.mps-log}
  mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
  nvidia-cuda-mps-control -d && trap 'echo quit | nvidia-cuda-mps-control' EXIT && echo "gpu_sweep: CUDA MPS on" >&2
fi
.venv/bin/python -m gdrt_core.pretrained fetch smollm2-135m >&2
for sweep in "${sweeps[@]}"; do
  name=$(basename "$sweep" .yaml)
  echo "gpu_sweep: $sweep -> runs/$name" >&2
  .venv/bin/gdrt sweep "$sweep" --jobs "$JOBS" --out "runs/$name" || echo "gpu_sweep: $sweep had failed stages" >&2
done
