"""Latency, throughput and peak memory of a model, in inference and training modes.

Timing follows the usual rules: warm-up iterations first, then ``repeats`` timed iterations,
each bracketed by ``torch.cuda.synchronize`` on CUDA; the median is reported (robust to the
outliers of a shared machine), with the minimum and maximum beside it.

Peak memory:

* on CUDA, ``torch.cuda.max_memory_allocated`` over one iteration, minus what was allocated
  before it (``method="cuda_max_memory_allocated"``);
* on CPU, PyTorch has no allocator statistics, so the process's resident set size is sampled
  every millisecond by a background thread during one iteration and the growth of its maximum
  over the value just before the iteration is reported (``method="cpu_rss_growth"``). Freed heap
  memory is handed back to the OS first (glibc ``malloc_trim``) so pages kept from the warm-up do
  not hide the iteration's allocations. It is an estimate: it counts every allocation of the
  process, also those of other threads.
"""
from __future__ import annotations

import copy
import ctypes
import ctypes.util
import dataclasses
import logging
import os
import statistics
import threading
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .complexity import count_flops, count_params

_logger = logging.getLogger(__name__)

MODES = ("inference", "train")


@dataclasses.dataclass
class ModeResult:
    """Timings of one mode (``"inference"``: eval + inference_mode forward; ``"train"``:
    train-mode forward + backward of the summed logits, gradients zeroed, no optimizer step)."""

    mode: str
    batch_size: int
    latency_ms: float  # median over the timed iterations, one iteration = one batch
    latency_ms_min: float
    latency_ms_max: float
    throughput: float  # images per second at the median latency
    peak_memory_mb: Optional[float]
    memory_method: str
    warmup: int
    repeats: int


@dataclasses.dataclass
class BenchResult:
    """Everything ``convzoo bench`` reports about one model."""

    model: str
    reparameterized: bool
    device: str
    dtype: str
    channels_last: bool
    input_size: Tuple[int, int]
    batch_size: int
    params: int  # parameters of the measured (inference-form when reparameterized) model
    params_train: int  # parameters of the training form
    flops: Optional[int]  # forward FLOPs per image (2 * MACs) of the measured model, None when not counted
    results: Dict[str, ModeResult]
    optimized: bool = False  # inference timed on what ``optimize`` returned (e.g. convzoo.optimize_for_inference)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["input_size"] = list(self.input_size)
        return out


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _make_step(model: nn.Module, x: torch.Tensor, mode: str) -> Callable[[], None]:
    """One iteration of ``mode`` as a closure (the model's train/eval flag is set here)."""
    if mode == "inference":
        model.eval()

        def step() -> None:
            with torch.inference_mode():
                model(x)

        return step
    if mode == "train":
        model.train()

        def step() -> None:
            out = model(x)
            out = out if isinstance(out, torch.Tensor) else torch.cat([o.flatten(1) for o in out], 1)
            out.float().sum().backward()
            model.zero_grad(set_to_none=True)

        return step
    raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def time_step(step: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> List[float]:
    """Run ``step`` ``warmup`` times, then time ``repeats`` runs; the times in milliseconds."""
    for _ in range(warmup):
        step()
    _synchronize(device)
    times = []
    for _ in range(repeats):
        _synchronize(device)
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append((time.perf_counter() - start) * 1e3)
    return times


def _rss_bytes() -> Optional[int]:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _release_free_heap() -> None:
    name = ctypes.util.find_library("c")
    if not name:
        return
    try:
        ctypes.CDLL(name).malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _RSSSampler:
    """Samples the resident set size every ``interval`` seconds in a thread; ``peak`` is the max."""

    def __init__(self, interval: float = 1e-3):
        self.interval = interval
        self.peak = _rss_bytes() or 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _rss_bytes() or 0)
            self._stop.wait(self.interval)

    def __enter__(self) -> "_RSSSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes() or 0)


def peak_memory(step: Callable[[], None], device: torch.device) -> Tuple[Optional[float], str]:
    """Peak memory in MiB that one run of ``step`` adds, and how it was measured (module doc)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20, "cuda_max_memory_allocated"
    _release_free_heap()
    before = _rss_bytes()
    if before is None:
        return None, "unavailable"
    with _RSSSampler() as sampler:
        step()
    return max(sampler.peak - before, 0) / 2**20, "cpu_rss_growth"


def measure_mode(
    model: nn.Module,
    x: torch.Tensor,
    mode: str,
    warmup: int = 3,
    repeats: int = 10,
) -> ModeResult:
    """Latency, throughput and peak memory of ``model`` on the batch ``x`` (N, C, H, W) in ``mode``."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    step = _make_step(model, x, mode)
    times = time_step(step, x.device, warmup, repeats)
    memory, method = peak_memory(step, x.device)
    median = statistics.median(times)
    return ModeResult(
        mode=mode,
        batch_size=x.shape[0],
        latency_ms=median,
        latency_ms_min=min(times),
        latency_ms_max=max(times),
        throughput=x.shape[0] / (median / 1e3) if median > 0 else float("inf"),
        peak_memory_mb=memory,
        memory_method=method,
        warmup=warmup,
        repeats=repeats,
    )


@dataclasses.dataclass
class Comparison:
    """Two models timed in turn on the same input (median ms, and the middle half of each's times)."""

    latency_ms: Tuple[float, float]
    spread_ms: Tuple[float, float]  # interquartile range of each model's times
    repeats: int

    @property
    def decided(self) -> bool:
        """Whether the difference of the medians exceeds the spread of both: else the machine's noise
        is as large as the difference, and the comparison tells nothing."""
        return abs(self.latency_ms[0] - self.latency_ms[1]) > max(self.spread_ms)


def compare_inference(first: nn.Module, second: nn.Module, x: torch.Tensor, repeats: int = 5, warmup: int = 1) -> Comparison:
    """Time ``first`` and ``second`` (eval, no grad) on ``x`` interleaved, one call each in turn,
    so that a change of the machine's load hits both alike; medians and spreads of each."""
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    steps = [_make_step(first, x, "inference"), _make_step(second, x, "inference")]
    times: Tuple[List[float], List[float]] = ([], [])
    for i in range(warmup + repeats):
        for step, out in zip(steps, times):
            measured = time_step(step, x.device, 0, 1)
            if i >= warmup:
                out.extend(measured)

    def spread(values: List[float]) -> float:
        if len(values) < 4:
            return max(values) - min(values)
        quartiles = statistics.quantiles(values, n=4)
        return quartiles[2] - quartiles[0]

    return Comparison(
        latency_ms=(statistics.median(times[0]), statistics.median(times[1])),
        spread_ms=(spread(times[0]), spread(times[1])),
        repeats=repeats,
    )


def count_forward_flops(model: nn.Module, x: torch.Tensor) -> Optional[int]:
    """Forward FLOPs (2 * MACs) per image of ``model`` at ``x``'s shape, None when not countable."""
    try:
        return count_flops(model, (1,) + tuple(x.shape[1:])).flops
    except Exception as error:  # an operator without a FLOP formula must not sink the benchmark
        _logger.warning("FLOPs not counted: %s", error)
        return None


def benchmark(
    model: nn.Module,
    input_size: Tuple[int, int] = (224, 224),
    batch_size: int = 1,
    modes: Sequence[str] = MODES,
    reparam: bool = False,
    warmup: int = 3,
    repeats: int = 10,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    name: Optional[str] = None,
    optimize: Optional[Callable[[nn.Module, torch.Tensor], nn.Module]] = None,
) -> BenchResult:
    """Benchmark ``model`` (a classifier taking (N, C, H, W)) in each of ``modes``.

    Training is measured on the training form. With ``reparam`` the inference mode, the
    parameter count and the FLOPs are those of a re-parameterized copy. ``optimize(copy, x)``,
    when given, turns that re-parameterized copy into the model whose inference is timed (such as
    :func:`convzoo.optimize_for_inference`; the parameters and FLOPs stay those of the copy).
    ``model`` itself is moved to ``device``/``dtype`` (and memory format), and the training-mode
    runs update its BatchNorm running statistics.
    """
    unknown = [m for m in modes if m not in MODES]
    if unknown or not modes:
        raise ValueError(f"modes must be a non-empty subset of {MODES}, got {tuple(modes)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device=device, dtype=dtype, memory_format=memory_format)
    in_chans = getattr(model, "in_chans", 3)
    x = torch.randn(batch_size, in_chans, *input_size, device=device, dtype=dtype)
    x = x.contiguous(memory_format=memory_format)
    results = {}
    params_train = count_params(model)
    if "train" in modes:
        results["train"] = measure_mode(model, x, "train", warmup, repeats)
    measured = model
    from ..layers.reparam import is_reparameterized, reparameterize

    if (reparam or optimize is not None) and not is_reparameterized(model):
        measured = reparameterize(copy.deepcopy(model))
    if "inference" in modes:
        timed = optimize(measured.eval(), x) if optimize is not None else measured
        results["inference"] = measure_mode(timed, x, "inference", warmup, repeats)
    return BenchResult(
        model=name or getattr(model, "model_name", type(model).__name__),
        reparameterized=reparam or optimize is not None,
        device=str(device),
        dtype=str(dtype).replace("torch.", ""),
        channels_last=channels_last,
        input_size=tuple(input_size),
        batch_size=batch_size,
        params=count_params(measured),
        params_train=params_train,
        flops=count_forward_flops(measured, x),
        results={m: results[m] for m in MODES if m in results},
        optimized=optimize is not None and "inference" in modes,
    )

