"""Which autotuning configs the Triton kernels get (convzoo.ops._triton_tuning)."""
import subprocess
import sys

import triton

from convzoo.ops import _triton_tuning

CONFIGS = [triton.Config({"BLOCK": 128}, num_warps=4), triton.Config({"BLOCK": 64}, num_warps=2)]
SMALL = triton.Config({"BLOCK": 16}, num_warps=1)


def test_every_config_by_default(monkeypatch):
    monkeypatch.setattr(_triton_tuning, "INTERPRETED", False)
    monkeypatch.setattr(_triton_tuning, "AUTOTUNE", True)
    assert _triton_tuning.tuning_configs(CONFIGS, SMALL) == CONFIGS


def test_default_only_when_autotuning_is_off(monkeypatch):
    monkeypatch.setattr(_triton_tuning, "INTERPRETED", False)
    monkeypatch.setattr(_triton_tuning, "AUTOTUNE", False)
    assert _triton_tuning.tuning_configs(CONFIGS, SMALL) == CONFIGS[:1]


def test_interpreter_config_under_the_interpreter(monkeypatch):
    monkeypatch.setattr(_triton_tuning, "INTERPRETED", True)
    assert _triton_tuning.tuning_configs(CONFIGS, SMALL) == [SMALL]


def test_environment_variable_read_when_the_kernels_are_defined():
    code = ("from convzoo.ops.dwconv import triton as t; from convzoo.ops.dcnv3 import triton as d; "
            "print(len(t._forward_kernel.configs), len(d._dcnv3_fwd_kernel.configs))")
    counts = {}
    for value in ("0", "1"):
        env = {"CONVZOO_TRITON_AUTOTUNE": value, "TRITON_INTERPRET": "0", "PATH": ""}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
        counts[value] = tuple(int(n) for n in done.stdout.split())
    assert counts["0"] == (1, 1)
    assert counts["1"] == (9, 3)


def test_dwconv_pixel_tiles_that_would_spill_are_pruned():
    import triton.language as tl

    from convzoo.ops.dwconv import triton as dwconv_triton

    configs = [triton.Config({"BLOCK_P": p}, num_warps=w) for p in (64, 128, 256) for w in (2, 4, 8)]

    def kept(block_c, acc):
        pruned = dwconv_triton._fit_in_registers(configs, {}, BLOCK_C=block_c, ACC=acc)
        return {(c.kwargs["BLOCK_P"], c.num_warps) for c in pruned}

    assert len(kept(1, tl.float32)) == 9                      # NCHW: one channel per program, all fit
    assert (256, 2) not in kept(32, tl.float32) and (256, 4) in kept(32, tl.float32)
    assert (256, 4) not in kept(32, tl.float64) and (128, 4) in kept(32, tl.float64)
    assert kept(1024, tl.float64) == {(64, 8)}                # none fits: the lightest is kept


def _autotuned_kernels():
    from triton.runtime.autotuner import Autotuner

    from convzoo.ops.dcnv3 import triton as dcnv3_triton
    from convzoo.ops.dwconv import triton as dwconv_triton

    for module in (dwconv_triton, dcnv3_triton):
        for name in dir(module):
            kernel = getattr(module, name)
            while not isinstance(kernel, Autotuner) and hasattr(kernel, "fn"):   # through @triton.heuristics
                kernel = kernel.fn
            if name.endswith("_kernel") and isinstance(kernel, Autotuner):
                yield name, kernel


def test_every_autotuned_kernel_times_its_configs_over_the_short_window():
    kernels = dict(_autotuned_kernels())
    assert {"_forward_kernel", "_grad_weight_band_kernel", "_dcnv3_fwd_kernel", "_dcnv3_bwd_kernel"} <= set(kernels)
    for name, kernel in kernels.items():
        assert kernel.do_bench is _triton_tuning.time_ms, name


def test_time_ms_asks_do_bench_for_the_short_window_and_the_median(monkeypatch):
    calls = []
    monkeypatch.setattr(triton.testing, "do_bench", lambda fn, **kwargs: calls.append(kwargs) or 1.5)
    assert _triton_tuning.time_ms(lambda: None) == 1.5
    assert _triton_tuning.time_ms(lambda: None, quantiles=(0.5, 0.2, 0.8)) == 1.5
    assert calls[0] == {"warmup": 5, "rep": 25, "quantiles": None, "return_mode": "median"}
    assert calls[1]["quantiles"] == (0.5, 0.2, 0.8)
