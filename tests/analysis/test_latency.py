"""Latency / throughput / memory measurement: what is run, what is reported, what is left alone."""
import time

import pytest
import torch
import torch.nn as nn

from convzoo.analysis.latency import MODES, benchmark, measure_mode, peak_memory, time_step
from convzoo.layers.reparam import fuse_conv_bn


class ConvBNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 4)
        self.calls = []

    def forward(self, x):
        self.calls.append((self.training, torch.is_grad_enabled(), torch.is_inference_mode_enabled()))
        if self.bn is None:
            y = self.conv(x)
        else:
            y = self.bn(self.conv(x))
        return self.head(y.mean((2, 3)))

    def reparameterize(self):
        self.conv, self.bn = fuse_conv_bn(self.conv, self.bn), None


def test_time_step_runs_warmup_then_repeats():
    calls = []
    times = time_step(lambda: calls.append(time.sleep(0.002)), torch.device("cpu"), warmup=2, repeats=3)
    assert len(calls) == 5 and len(times) == 3
    assert all(t >= 2.0 for t in times)


@pytest.mark.parametrize("mode, expected", [("inference", (False, False, True)), ("train", (True, True, False))])
def test_modes_run_the_model_as_documented(mode, expected):
    model = ConvBNNet()
    result = measure_mode(model, torch.randn(2, 3, 8, 8), mode, warmup=1, repeats=2)
    assert set(model.calls) == {expected}
    assert len(model.calls) == 1 + 2 + 1  # warm-up, timed, memory
    assert all(p.grad is None for p in model.parameters())  # gradients not left behind
    assert result.mode == mode and result.batch_size == 2 and result.repeats == 2
    assert result.latency_ms_min <= result.latency_ms <= result.latency_ms_max
    assert result.throughput == pytest.approx(2 / (result.latency_ms / 1e3))


def test_cpu_peak_memory_sees_a_held_allocation():
    def step():
        block = torch.ones(16 * 2**20, dtype=torch.float32)  # 64 MiB, written
        time.sleep(0.3)  # long enough for the sampling thread to run even on a loaded machine
        del block

    memory, method = peak_memory(step, torch.device("cpu"))
    assert method == "cpu_rss_growth"
    assert 48 <= memory < 1024


def test_benchmark_reparam_measures_a_copy():
    model = ConvBNNet()
    result = benchmark(model, input_size=(8, 10), batch_size=3, reparam=True, warmup=0, repeats=1)
    assert model.bn is not None  # the caller's model keeps its training form
    assert result.params == result.params_train - 2 * 8 + 8  # BN's weight and bias become the conv bias
    assert result.reparameterized and result.input_size == (8, 10) and result.batch_size == 3
    assert list(result.results) == list(MODES)
    summary = result.to_dict()
    assert summary["input_size"] == [8, 10] and summary["model"] == "ConvBNNet"
    assert summary["results"]["train"]["batch_size"] == 3


def test_benchmark_one_mode_and_channels_last():
    result = benchmark(ConvBNNet(), input_size=(6, 6), modes=("inference",), channels_last=True, warmup=0, repeats=1, name="x")
    assert list(result.results) == ["inference"] and result.channels_last and result.model == "x"


@pytest.mark.parametrize("kwargs, message", [
    (dict(modes=("fly",)), "modes must be a non-empty subset"),
    (dict(modes=()), "modes must be a non-empty subset"),
    (dict(batch_size=0), "batch_size must be >= 1"),
    (dict(repeats=0), "need warmup >= 0 and repeats >= 1"),
])
def test_benchmark_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        benchmark(ConvBNNet(), input_size=(4, 4), warmup=0, **kwargs)
