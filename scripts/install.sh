#!/usr/bin/env bash
# Installs convzoo and what it needs. Installs the pinned CPU torch first when no torch is present,
# so that the open `torch>=2.4` requirement never pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if ! "$PY" -c "import torch" >/dev/null 2>&1; then
  "$PY" -m pip install --quiet "torch==2.13.0"
fi
"$PY" -m pip install --quiet -e ".[${1:-test}]"
