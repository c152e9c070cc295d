#!/usr/bin/env bash
# Install (if needed) and run the main job on the bundled Office dataset.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/gdrt curate --source data/office --format sliding --domain office --out runs/quickstart/dataset "$@"
