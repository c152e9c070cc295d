#!/usr/bin/env bash
# Install (if needed) and run the main job: the whole pipeline (curate -> SFT -> group -> GDRT -> evaluate ->
# attribute -> report -> register) locally (pipelines/graph.py, gdrt run), on the bundled Office data with the embedded
# default model, logging to the local MLflow store ./mlflow.db. Extra arguments go to `gdrt run`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/gdrt run --config pipelines/configs/quickstart.yaml --jobs 2 "$@"
