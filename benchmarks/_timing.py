"""Timing helper shared by the benchmark scripts: median milliseconds of a callable after warm-up."""
from __future__ import annotations

import statistics
import time
from typing import Callable, List

import torch


def median_ms(run: Callable[[], object], repeats: int, warmup: int = 1, device: str | torch.device = "cpu") -> float:
    """Median wall time of ``run()`` in milliseconds over ``repeats`` calls, after ``warmup`` calls.

    On a CUDA device each call is timed with CUDA events (kernels are asynchronous); elsewhere with
    ``time.perf_counter``.
    """
    for _ in range(warmup):
        run()
    if torch.device(device).type == "cuda":
        return statistics.median(_cuda_event_times_ms(run, repeats))
    times: List[float] = []
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _cuda_event_times_ms(run: Callable[[], object], repeats: int) -> List[float]:
    torch.cuda.synchronize()
    times: List[float] = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return times


def busy_core():
    """Start one other process that keeps a core busy (a spinning loop); returns it (``.terminate()`` it)."""
    import subprocess
    import sys

    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def peak_gflops(threads: int, size: int = 1024, repeats: int = 10) -> float:
    """The machine's measured float32 limit: GFLOP/s of the fastest of ``repeats`` ``size``-cube
    matmuls on ``threads`` threads (after a warm-up that starts MKL's threads)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    try:
        fastest = min(median_ms(lambda: a @ b, 1, warmup=3 if i == 0 else 0) for i in range(repeats))
        return 2 * size**3 / fastest / 1e6
    finally:
        torch.set_num_threads(previous)
