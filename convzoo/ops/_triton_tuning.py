"""Which configs Triton's autotuner tries for convzoo's kernels (imported by the ``triton`` modules only).

* Under ``TRITON_INTERPRET=1`` (CPU tensors, the test suite without a GPU) timing means nothing:
  one config, chosen for the interpreter's speed.
* With ``CONVZOO_TRITON_AUTOTUNE=0`` the first config of each list, the default, is used without
  timing anything: one compile per kernel specialization instead of one per config, for short
  runs such as the GPU test session.
* Otherwise every config is compiled and timed once per autotuning key, by :func:`time_ms`: a
  5 ms warm-up and 25 ms of timed runs per config instead of Triton's 25 and 100, so that the
  first call of a new layer shape costs a fraction of a second per kernel, not seconds.

Both variables are read once, when the kernels are defined.
"""
from __future__ import annotations

import os
from typing import List, Sequence

import triton

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("CONVZOO_TRITON_AUTOTUNE", "1") != "0"


#: Warm-up and timed window (ms) per candidate when timing kernels; see :func:`time_ms`.
TIMING_WARMUP_MS, TIMING_REP_MS = 5, 25


def time_ms(fn, quantiles=None):
    """Median milliseconds of ``fn`` (or the given ``quantiles``) by Triton's ``do_bench`` over a
    short window: the timer of convzoo's autotuned kernels and of dwconv2d's kernel choice."""
    return triton.testing.do_bench(fn, warmup=TIMING_WARMUP_MS, rep=TIMING_REP_MS, quantiles=quantiles,
                                   return_mode="median")


def tuning_configs(configs: Sequence[triton.Config], interpreted: triton.Config) -> List[triton.Config]:
    """The autotuner's candidates: ``configs`` (default first), or one config as described above."""
    if INTERPRETED:
        return [interpreted]
    return list(configs) if AUTOTUNE else [configs[0]]
