import math
import warnings

import pytest
import torch

from convzoo import ops
from convzoo.ops import _checks


def test_check_tensor_names_argument_and_expectation():
    with pytest.raises(TypeError, match=r"weight must be a torch.Tensor, got list"):
        _checks.check_tensor("weight", [1.0])
    with pytest.raises(ValueError, match=r"x must be a 4-D tensor, got shape \(2, 3\)"):
        _checks.check_tensor("x", torch.zeros(2, 3), ndim=4)
    with pytest.raises(TypeError, match=r"x must have dtype in .*float32.*got int64"):
        _checks.check_tensor("x", torch.zeros(2, dtype=torch.long))


def test_check_same_dtype_and_device():
    a = torch.zeros(2)
    with pytest.raises(TypeError, match="bias must have the dtype of x"):
        _checks.check_same("bias", a.double(), "x", a)
    _checks.check_same("bias", a.clone(), "x", a)


@pytest.mark.parametrize("value, expected", [(3, (3, 3)), ((1, 2), (1, 2)), ([4, 5], (4, 5))])
def test_pair_accepts_ints_and_pairs(value, expected):
    assert _checks.pair("stride", value, minimum=1) == expected


@pytest.mark.parametrize("value", [(1, 2, 3), "2", 1.5, True, (1, 2.0)])
def test_pair_rejects_other_types(value):
    with pytest.raises(TypeError, match="stride must be an int or a pair of ints"):
        _checks.pair("stride", value)


def test_pair_checks_minimum():
    with pytest.raises(ValueError, match="stride must be >= 1, got 0"):
        _checks.pair("stride", 0, minimum=1)


def test_impl_choice():
    x = torch.zeros(1)
    assert _checks.use_triton("op", "reference", x) is False
    assert _checks.use_triton("op", "auto", x) is False  # CPU tensors never take Triton by default
    with pytest.raises(ValueError, match=r"impl must be one of .*got 'cuda'"):
        _checks.use_triton("op", "cuda", x)
    if _checks.triton_importable():
        assert _checks.use_triton("op", "triton", x) is True


def test_auto_on_cuda_without_triton_warns_once(monkeypatch):
    class FakeCuda:
        is_cuda = True

    monkeypatch.setattr(_checks, "triton_importable", lambda: False)
    _checks._warn_no_triton.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _checks.use_triton("someop", "auto", FakeCuda()) is False
        assert _checks.use_triton("someop", "auto", FakeCuda()) is False
    assert len([w for w in caught if "someop" in str(w.message)]) == 1


def test_autocast_casts_only_when_enabled():
    x = torch.zeros(2, dtype=torch.bfloat16)
    w = torch.zeros(2)
    assert _checks.autocast_to_lower(x, w, None) == (x, w, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        lowered = _checks.autocast_to_lower(x, w, None, torch.zeros(2, dtype=torch.long))
        widened = _checks.autocast_to_widest(x, w)
    assert [t.dtype for t in lowered[:2]] == [torch.bfloat16, torch.bfloat16]
    assert lowered[2] is None and lowered[3].dtype == torch.long
    assert [t.dtype for t in widened] == [torch.float32, torch.float32]


def test_autocast_helpers_accept_meta_tensors():
    meta = torch.empty(2, device="meta")
    assert _checks.autocast_to_lower(meta, None) == (meta, None)
    assert _checks.autocast_to_widest(meta) == (meta,)


def test_same_mistake_same_error_in_every_family():
    """A bool where an int is expected, and a non-finite float, get the same error everywhere."""
    x = torch.randn(1, 5, 5, 4)
    dcnv3_args = [x, torch.zeros(1, 5, 5, 36), torch.rand(1, 5, 5, 18), 3, 3, 1, 1, 1, 1, 1, 1, 2, 2, 1.0]
    features, rois = torch.randn(1, 4, 8, 8), torch.tensor([[0.0, 0, 0, 4, 4]])
    bad_int = [lambda: ops.dcnv3(*dcnv3_args[:3], True, *dcnv3_args[4:]),
               lambda: ops.roi_align(features, rois, 2, 1.0, sampling_ratio=True)]
    for call in bad_int:
        with pytest.raises(TypeError, match="must be an int, got True"):
            call()
    bad_float = [lambda: ops.dcnv3(*dcnv3_args[:-1], math.nan),
                 lambda: ops.deform_roi_pool(features, rois, None, 2, 1.0, 0, math.inf)]
    for call in bad_float:
        with pytest.raises(TypeError, match="must be a finite float"):
            call()
    for call in (lambda: ops.dcnv3(*dcnv3_args, False, "auto"), lambda: ops.dwconv2d(features, torch.randn(4, 1, 3, 3),
                                                                                   None, 1, 1, 1, "auto")):
        with pytest.raises(TypeError):  # impl is keyword-only in every family
            call()


def test_triton_on_cpu_tensors_without_the_interpreter_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    x = torch.randn(1, 4, 8, 8)
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors, got tensors on the cpu"):
        ops.dwconv2d(x, torch.randn(4, 1, 3, 3), padding=1, impl="triton")
    with pytest.raises(ValueError, match="impl='triton' needs CUDA tensors"):
        _checks.use_triton("dcnv3", "triton", x)


@pytest.mark.parametrize("operator", [ops.deform_conv2d, ops.dcnv3, ops.dwconv2d, ops.roi_align, ops.ps_roi_align,
                                      ops.roi_pool, ops.ps_roi_pool, ops.deform_roi_pool,
                                      ops.modulated_deform_roi_pool, ops.deform_ps_roi_pool],
                         ids=lambda op: op.__name__)
def test_torch_jit_script_is_refused_with_the_supported_paths(operator):
    """torch.jit.script is not supported (torch.compile / torch.export are): a clear error, for the
    operator and for a module that calls it."""
    with pytest.raises(RuntimeError, match=rf"convzoo.ops.{operator.__name__} does not support torch.jit.script\. "
                                           r"Use torch.compile or torch.export"):
        torch.jit.script(operator)


def test_torch_jit_script_of_a_layer_names_the_operator():
    from convzoo.layers import DeformConv2d

    with pytest.raises(RuntimeError, match=r"convzoo.ops.deform_conv2d does not support torch.jit.script"):
        torch.jit.script(DeformConv2d(2, 2, 3))
