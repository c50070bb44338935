"""Tests of the Numba plumbing (convzoo.ops._numba): threads, disk cache, the no-Numba fallback."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import torch

from convzoo import ops
from convzoo.ops import _numba
from convzoo.ops.dcnv3 import cpu


def test_threads_follow_torch():
    """Run first in this file: the first launch also starts Numba's thread pool."""
    previous = torch.get_num_threads()
    try:
        for count in (1, 2):
            torch.set_num_threads(count)
            assert _numba.threads() == min(count, numba.config.NUMBA_NUM_THREADS)
            assert _numba.threads(work=_numba.GRAIN - 1) == 1  # small calls take one thread
            # 4 corners x 16 channels x 40*40*18 samples: more than two grains of work.
            x = torch.randn(1, 40, 40, 32)
            ops.dcnv3(x, torch.randn(1, 40, 40, 36), torch.rand(1, 40, 40, 18), 3, 3, 1, 1, 1, 1, 1, 1, 2, 16, 1.0)
            # The kernel ran with that count (set in the calling thread before each launch), and
            # starting Numba's OpenMP pool did not change PyTorch's.
            assert numba.get_num_threads() == _numba.threads()
            assert torch.get_num_threads() == count
    finally:
        torch.set_num_threads(previous)


def test_cache_dir_is_a_user_directory(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert _numba.cache_dir() == tmp_path / "convzoo" / "numba"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert _numba.cache_dir() == Path.home() / ".cache" / "convzoo" / "numba"


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env={**os.environ, **env}, timeout=300)


DCNV3_TWICE = """
    import logging, sys
    logging.basicConfig(level=logging.INFO)
    {prelude}
    import torch
    from convzoo import ops
    x, offset, mask = torch.randn(1, 5, 5, 4), torch.randn(1, 5, 5, 36), torch.rand(1, 5, 5, 18)
    args = (3, 3, 1, 1, 1, 1, 1, 1, 2, 2, 1.0)
    for _ in range(2):
        torch.testing.assert_close(ops.dcnv3(x, offset, mask, *args), ops.dcnv3(x, offset, mask, *args, impl="reference"))
    from convzoo.ops import _numba
    print("numba module:", _numba.numba_module() is not None)
"""


def test_without_numba_everything_runs_with_one_notice():
    result = _run(DCNV3_TWICE.format(prelude="sys.modules['numba'] = None  # import numba raises ImportError"), {})
    assert result.returncode == 0, result.stderr
    assert "numba module: False" in result.stdout
    assert result.stderr.count("numba is not importable") == 1, result.stderr


def test_kernels_are_cached_in_the_user_cache_dir(tmp_path):
    """Without NUMBA_CACHE_DIR the compiled kernels land under $XDG_CACHE_HOME/convzoo/numba."""
    env = {"XDG_CACHE_HOME": str(tmp_path), "NUMBA_CACHE_DIR": ""}
    result = _run(DCNV3_TWICE.format(prelude=""), env)
    assert result.returncode == 0, result.stderr
    assert "numba module: True" in result.stdout and "not importable" not in result.stderr
    cached = list((tmp_path / "convzoo" / "numba").rglob("*.nbi"))
    assert any("_forward" in path.name for path in cached), cached
    package = Path(cpu.__file__).parent
    assert not list(package.rglob("*.nbi")), "kernels cached inside the package"
