#!/usr/bin/env bash
# Create .venv and install gdrt with its pinned dependencies (CPU torch). Idempotent and quick when
# nothing changed. GPU users: see docs/operations.md for the CUDA build of torch.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.gdrt-installed
want=$(cat pyproject.toml | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "gdrt: installing dependencies into .venv (first run takes a few minutes)" >&2
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  # torch first and pinned (here the local CPU wheel), so that no resolver step picks another build
  .venv/bin/python -m pip install -q "torch==2.13.0"
  DS_BUILD_OPS=0 .venv/bin/python -m pip install -q -e ".[dev,multinode]"
  echo "$want" > "$stamp"
fi
