"""convzoo.optimize_for_inference: re-parameterization on a copy, memory layout, inductor with
freezing (scoped), the no-compiler fallback, the check against the eager model, and bad input.

Three tests compile (tiny models: inductor's compile costs seconds even then)."""
from __future__ import annotations

import time
import warnings

import pytest
import torch
import torch._inductor.config as inductor_config
import torch.nn as nn
import torch.nn.functional as F

import convzoo
from convzoo.deploy.optimize import InferenceModel, cpp_compiler
from convzoo.layers import ReparamLargeKernelConv, is_reparameterized


def _tiny(channels: int = 8) -> nn.Module:
    """conv + BN + ReLU, a RepLKNet large-kernel block (branches + BNs to merge), pool, linear."""
    model = nn.Sequential(
        nn.Conv2d(3, channels, 3, padding=1), nn.BatchNorm2d(channels), nn.ReLU(),
        ReparamLargeKernelConv(channels, 7, small_kernels=(3,)),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 5),
    )
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):  # trained-like statistics, so folding changes the weights
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
    model.in_chans = 3
    return model.eval()


class _WrongFold(nn.Module):
    """A layer whose ``reparameterize()`` is wrong (it doubles the weight): the check must catch it."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        return self.conv(x) if self.bn is None else self.bn(self.conv(x))

    def reparameterize(self):
        with torch.no_grad():
            self.conv.weight.mul_(2)
        self.bn = None


@pytest.mark.slow
def test_compiled_form_matches_eager_and_leaves_no_global_switch():
    model, x = _tiny(), torch.randn(2, 3, 16, 16)
    before = inductor_config.freezing
    with torch.no_grad():
        expected = model(x)
    fast = convzoo.optimize_for_inference(model, x, compile=True, memory_format="channels_last")
    assert isinstance(fast, InferenceModel) and fast.compiled and fast.compile_seconds > 0
    assert fast.timed_ms is None  # compile=True keeps the compiled form without timing it
    assert fast.max_rel_error < 1e-5
    assert inductor_config.freezing == before  # freezing was scoped to the calls
    # the caller's model keeps its training form (re-parameterized on a copy)
    assert not is_reparameterized(model) and model[3].lkb_reparam is None
    assert is_reparameterized(fast.module)
    assert fast.module[0].weight.is_contiguous(memory_format=torch.channels_last)
    other = torch.randn(2, 3, 16, 16)  # same shape, new values: the compiled graph, not a recompile
    with torch.no_grad():
        torch.testing.assert_close(fast(other), model(other), rtol=1e-4, atol=1e-5)
    assert inductor_config.freezing == before


class _Linears(nn.Module):
    """(1, 1024, 8, 8) -> 64 rows of 1024 -> a 1024 -> 1024 linear (64 Mi multiply-adds), GELU,
    a 1024 -> 8 linear (0.5 Mi)."""

    def __init__(self):
        super().__init__()
        self.big, self.small = nn.Linear(1024, 1024), nn.Linear(1024, 8)

    def forward(self, x):
        return self.small(F.gelu(self.big(x.flatten(2).transpose(1, 2))))


def _slowed(monkeypatch, slow_form: str) -> None:
    """InferenceModel.run sleeps 50 ms more for ``slow_form`` ("compiled" or "eager"): the
    timed choice of compile="auto" then has one clear answer."""
    run = InferenceModel.run

    def slowed(self, x, *, compiled):
        if compiled == (slow_form == "compiled"):
            time.sleep(0.05)
        return run(self, x, compiled=compiled)

    monkeypatch.setattr(InferenceModel, "run", slowed)


def test_large_frozen_linears_run_through_onednn_small_ones_through_mkl(monkeypatch):
    """The compiled code calls oneDNN's pre-packed product for the linear of at least
    ONEDNN_LINEAR_MIN_MACS multiply-adds and MKL's for the small one; the pass is scoped too.
    compile="auto" keeps the compiled form when it is the faster one."""
    from torch._inductor.utils import run_and_get_code

    from convzoo.deploy.optimize import ONEDNN_LINEAR_MIN_MACS

    assert 64 * 1024 * 1024 >= ONEDNN_LINEAR_MIN_MACS > 64 * 1024 * 8
    model, x = _Linears().eval(), torch.randn(1, 1024, 8, 8)
    _slowed(monkeypatch, "eager")
    with inductor_config.patch(fx_graph_cache=False):  # a cached graph would bring no code to read
        fast, codes = run_and_get_code(convzoo.optimize_for_inference, model, x, memory_format="contiguous")
    code = "\n".join(codes)
    assert code.count("mkldnn._linear_pointwise.default(") == 1 and code.count("mkl._mkl_linear.default(") == 1
    assert fast.compiled and fast.max_rel_error < 1e-5
    assert fast.timed_ms["eager"] > fast.timed_ms["compiled"] + 40
    assert inductor_config.post_grad_custom_post_pass is None


def test_auto_keeps_the_eager_module_when_it_is_faster(monkeypatch):
    model, x = _tiny(), torch.randn(1, 3, 16, 16)
    _slowed(monkeypatch, "compiled")
    fast = convzoo.optimize_for_inference(model, x, memory_format="contiguous")
    assert not fast.compiled and fast.compile_seconds > 0  # compiled, timed, discarded
    assert fast.timed_ms["compiled"] > fast.timed_ms["eager"] + 40
    assert fast.max_rel_error < 1e-5
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)


def test_without_a_cxx_compiler_it_warns_once_and_runs_eager():
    model, x = _tiny(), torch.randn(1, 3, 12, 12)
    # inductor looks for its compiler in config.cpp.cxx (CXX or g++): point it at nothing
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/bin/c++")}):
        assert cpp_compiler() is None
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            fast = convzoo.optimize_for_inference(model, x, memory_format="contiguous")
    ours = [w for w in caught if "C++ compiler" in str(w.message)]
    assert len(ours) == 1 and ours[0].category is RuntimeWarning, [str(w.message) for w in caught]
    assert not fast.compiled and fast.compile_seconds is None
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-5, atol=1e-6)
    assert cpp_compiler() is not None  # this machine has one: the fallback above was the patch's doing


def test_copy_by_default_inplace_on_request():
    model, x = _tiny(), torch.randn(1, 3, 12, 12)
    fast = convzoo.optimize_for_inference(model, x, compile=False, memory_format="contiguous")
    assert fast.module is not model and not is_reparameterized(model) and is_reparameterized(fast.module)
    fast_inplace = convzoo.optimize_for_inference(model, x, compile=False, memory_format="contiguous", inplace=True)
    assert fast_inplace.module is model and is_reparameterized(model)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), fast_inplace(x))


def test_auto_layout_picks_one_and_converts_inputs_and_weights():
    model, x = _tiny(), torch.randn(2, 3, 16, 16)
    fast = convzoo.optimize_for_inference(model, x, compile=False)
    assert fast.memory_format in ("contiguous", "channels_last")
    wanted = torch.channels_last if fast.memory_format == "channels_last" else torch.contiguous_format
    assert fast.module[0].weight.is_contiguous(memory_format=wanted)
    assert fast.max_rel_error <= fast.tolerance


def test_a_real_model_eager_path_agrees():
    model = convzoo.create_model("replknet_tiny", num_classes=7).eval()
    x = torch.randn(1, 3, 32, 32)
    fast = convzoo.optimize_for_inference(model, x, compile=False, memory_format="channels_last")
    with torch.no_grad():
        torch.testing.assert_close(fast(x), model(x), rtol=1e-4, atol=1e-5)
    assert fast.max_rel_error < 1e-5


def test_disagreement_with_the_eager_model_is_an_error():
    model = nn.Sequential(_WrongFold()).eval()
    with pytest.raises(RuntimeError, match=r"differs from the eager model on example_input by .* above tolerance=0.001"):
        convzoo.optimize_for_inference(model, torch.randn(1, 3, 8, 8), compile=False, memory_format="contiguous")


def test_the_result_is_inference_only():
    fast = convzoo.optimize_for_inference(_tiny(), torch.randn(1, 3, 8, 8), compile=False, memory_format="contiguous")
    assert not fast.training and fast.eval() is fast
    with pytest.raises(RuntimeError, match="inference only"):
        fast.train()
    out = fast(torch.randn(1, 3, 8, 8).requires_grad_())
    assert not out.requires_grad


@pytest.mark.parametrize("make, error, message", [
    pytest.param(lambda m, x: (m.train(), x), ValueError, "training mode; .* call model.eval", id="train-mode"),
    pytest.param(lambda m, x: ("model", x), TypeError, "model must be a torch.nn.Module, got str", id="not-a-module"),
    pytest.param(lambda m, x: (m, [x]), TypeError, "example_input must be a tensor", id="not-a-tensor"),
    pytest.param(lambda m, x: (m, x[0]), ValueError, r"shape \(N, C, H, W\) with N >= 1, got \(3, 8, 8\)", id="3d"),
    pytest.param(lambda m, x: (m, x[:0]), ValueError, "N >= 1", id="empty-batch"),
    pytest.param(lambda m, x: (m, x.int()), TypeError, "floating-point tensor, got torch.int32", id="int"),
    pytest.param(lambda m, x: (m, x[:, :2]), ValueError, "has 2 channels but the model takes 3", id="channels"),
    pytest.param(lambda m, x: (m, x.double()), ValueError, "torch.float64 on cpu but the model's parameters are torch.float32",
                 id="dtype"),
    pytest.param(lambda m, x: (m, x * float("nan")), ValueError, "not finite", id="nan-example"),
])
def test_bad_input_is_refused_before_any_work(make, error, message):
    model, x = make(_tiny(), torch.randn(1, 3, 8, 8))
    with pytest.raises(error, match=message):
        convzoo.optimize_for_inference(model, x, inplace=True)
    if isinstance(model, nn.Module):
        assert not is_reparameterized(model)  # nothing was changed


@pytest.mark.parametrize("option, message", [
    (dict(memory_format="nhwc"), "memory_format must be one of auto, contiguous, channels_last, got 'nhwc'"),
    (dict(tolerance=0), "tolerance must be a positive number, got 0"),
    (dict(compile="yes"), "compile must be True, False or 'auto', got 'yes'"),
])
def test_bad_options_are_refused(option, message):
    model = _tiny()
    with pytest.raises(ValueError, match=message):
        convzoo.optimize_for_inference(model, torch.randn(1, 3, 8, 8), inplace=True, **option)
    assert not is_reparameterized(model)


def test_an_inference_model_is_not_optimized_twice():
    fast = convzoo.optimize_for_inference(_tiny(), torch.randn(1, 3, 8, 8), compile=False, memory_format="contiguous")
    with pytest.raises(TypeError, match="already an InferenceModel"):
        convzoo.optimize_for_inference(fast, torch.randn(1, 3, 8, 8))
