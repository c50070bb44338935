#!/usr/bin/env bash
# Fresh machine -> install -> the main job: train the demo large-kernel segmentation model on the
# built-in band data set (docs/segmentation.md). Extra arguments go to `convzoo train`:
#   bash scripts/main.sh --task classification      # the classification demo instead (docs/demo.md)
#   bash scripts/main.sh --model-arg "kernel_sizes=(3,3,3)" --model-arg small_kernel=None   # 3x3 baseline
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
exec python3 -m convzoo train --task segmentation "$@"
