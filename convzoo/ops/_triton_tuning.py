"""Which configs Triton's autotuner tries for convzoo's kernels (imported by the ``triton`` modules only).

* Under ``TRITON_INTERPRET=1`` (CPU tensors, the test suite without a GPU) timing means nothing:
  one config, chosen for the interpreter's speed.
* With ``CONVZOO_TRITON_AUTOTUNE=0`` the first config of each list, the default, is used without
  timing anything: one compile per kernel specialization instead of one per config, for short
  runs such as the GPU test session.
* Otherwise every config is compiled and timed once per autotuning key.

Both variables are read once, when the kernels are defined.
"""
from __future__ import annotations

import os
from typing import List, Sequence

import triton

INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"
AUTOTUNE = os.environ.get("CONVZOO_TRITON_AUTOTUNE", "1") != "0"


def tuning_configs(configs: Sequence[triton.Config], interpreted: triton.Config) -> List[triton.Config]:
    """The autotuner's candidates: ``configs`` (default first), or one config as described above."""
    if INTERPRETED:
        return [interpreted]
    return list(configs) if AUTOTUNE else [configs[0]]
