"""Numba plumbing shared by the CPU kernels (dcnv3, deform_conv2d, the RoI operators).

Numba is a dependency of convzoo, but a Python release may come before Numba supports it. So
the operator modules never import their kernel modules (which import Numba) at import time:
they ask :func:`kernels` for them, which gives None when Numba is not importable. Then the
operators keep running on their plain-PyTorch paths, and one notice is logged for the whole
process. A kernel module starts with ``numba = require_numba()``.

* **Disk cache.** Kernels are compiled once per signature and cached on disk, in
  ``$NUMBA_CACHE_DIR`` when the user set it, else in :func:`cache_dir`
  (``~/.cache/convzoo/numba``, or under ``$XDG_CACHE_HOME``): never next to the package in
  site-packages, which may be read-only or shared.
* **Threads.** Kernels run with as many threads as PyTorch uses (:func:`threads`), so that
  Numba's pool and PyTorch's do not oversubscribe the cores; :func:`launch` sets that count in
  the calling thread before every call.
* **Dtypes.** The kernels are compiled for float32 and float64; callers compute half-precision
  inputs in float32 (:func:`convzoo.ops._checks.compute_dtype`).
"""
from __future__ import annotations

import functools
import importlib
import logging
import os
from pathlib import Path
from types import ModuleType
from typing import Callable, Optional

import numpy as np
import torch

logger = logging.getLogger("convzoo.ops")

__all__ = ["as_array", "cache_dir", "kernels", "launch", "numba_module", "require_numba", "threads"]


def cache_dir() -> Path:
    """Where compiled kernels are cached when ``NUMBA_CACHE_DIR`` is not set."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "convzoo" / "numba"


@functools.lru_cache(maxsize=None)
def numba_module():
    """The ``numba`` module, or None (logged once) when it cannot be imported."""
    try:
        import numba
    except Exception as error:  # ImportError, or a Numba that refuses this Python/NumPy
        logger.warning("convzoo: numba is not importable (%s); the CPU operators run on their slower "
                       "plain-PyTorch paths. pip install numba for the compiled CPU kernels.", error)
        return None
    if not os.environ.get("NUMBA_CACHE_DIR") and not numba.config.CACHE_DIR:
        # Read when a cached function is first compiled: our kernels' cache leaves site-packages.
        numba.config.CACHE_DIR = str(cache_dir())
    return numba


def require_numba():
    """The configured ``numba`` module for a kernel module to import; ImportError without it."""
    numba = numba_module()
    if numba is None:
        raise ImportError("numba is not importable")
    return numba


@functools.lru_cache(maxsize=None)
def kernels(module_name: str) -> Optional[ModuleType]:
    """The kernel module ``module_name`` (absolute), imported on first use; None without Numba."""
    if numba_module() is None:
        return None
    return importlib.import_module(module_name)


# Multiply-adds worth a thread (~0.1 ms): smaller calls run on fewer threads, because a thread
# that another process keeps off its core holds up the others at the end of every parallel loop.
GRAIN = 1 << 18


def threads(work: int = GRAIN * 1024) -> int:
    """Threads for a call of ``work`` multiply-adds: PyTorch's count, within Numba's pool, one per :data:`GRAIN`."""
    numba = numba_module()
    return max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS, work // GRAIN))


def launch(kernel: Callable, *args, work: int):
    """Run a compiled ``kernel`` of ``work`` multiply-adds with :func:`threads` threads.

    Numba's thread count is per calling thread, so it is set before every launch.

    Numba's OpenMP threading layer shares PyTorch's OpenMP runtime, and starting it sets that
    runtime's thread count to Numba's pool size: PyTorch's count is put back afterwards.
    """
    torch_threads = torch.get_num_threads()
    numba_module().set_num_threads(threads(work))
    try:
        return kernel(*args)
    finally:
        if torch.get_num_threads() != torch_threads:
            torch.set_num_threads(torch_threads)


def as_array(tensor: torch.Tensor) -> np.ndarray:
    """A NumPy view of a contiguous CPU tensor (shared memory: kernels write into torch outputs)."""
    return (tensor.detach() if tensor.requires_grad else tensor).numpy()
