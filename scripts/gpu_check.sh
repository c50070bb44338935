#!/usr/bin/env bash
# One prepared session on an NVIDIA GPU: the Triton kernels' tests compiled for the GPU (not the
# interpreter), then benchmarks/gpu.py. Needs torch, triton, pytest and hypothesis already there
# (torchvision for the deform_conv baseline); installs nothing, and runs from the source tree.
#
#   bash scripts/gpu_check.sh OUTDIR [TEST_SECONDS BENCH_SECONDS [gpu.py arguments...]]
#
# Writes OUTDIR/env.txt, tests.txt, bench.txt and gpu.md (rewritten after each benchmark section,
# so a run cut short by BENCH_SECONDS keeps the finished tables). The tests run with
# CONVZOO_TRITON_AUTOTUNE=0 (default configs: one compile per kernel specialization); the
# benchmark autotunes as users do.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:?usage: bash scripts/gpu_check.sh OUTDIR [TEST_SECONDS BENCH_SECONDS [gpu.py arguments...]]}
test_seconds=${2:-180}
bench_seconds=${3:-360}
shift $(( $# < 3 ? $# : 3 ))
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
} 2>&1 | tee "$out/env.txt"
CONVZOO_TRITON_AUTOTUNE=0 timeout "$test_seconds" python3 -m pytest -q -p no:cacheprovider --durations=10 \
  tests/ops/test_dwconv_triton.py tests/ops/test_dcnv3.py tests/ops/test_deform_conv.py -k triton 2>&1 | tee "$out/tests.txt"
tests_status=${PIPESTATUS[0]}
timeout "$bench_seconds" python3 benchmarks/gpu.py --output "$out/gpu.md" "$@" 2>&1 | tee "$out/bench.txt"
bench_status=${PIPESTATUS[0]}
echo "gpu_check: tests exit $tests_status, benchmark exit $bench_status (124 = stopped at its time limit)"
[ "$tests_status" -eq 0 ] && [ "$bench_status" -eq 0 ]
