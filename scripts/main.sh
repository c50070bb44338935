#!/usr/bin/env bash
# Fresh machine -> install -> the main job: train the demo large-kernel model on the built-in data set.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
exec python3 -m convzoo train "$@"
