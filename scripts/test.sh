#!/usr/bin/env bash
# Fresh machine -> install -> the whole test suite. Exit code 5 (no tests collected) counts as failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test
python3 -m pytest -q -p no:cacheprovider "$@"
