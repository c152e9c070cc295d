#!/usr/bin/env bash
# Install (if needed) and run the test suite offline on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
