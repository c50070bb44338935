"""Tests of convzoo.ops.dcnv3: naive loop from InternImage's CUDA definition, fast CPU path vs
reference, gradients, layout converters, errors, compile/export, and the Triton kernels under
the interpreter."""
import contextlib
import importlib
import math

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from convzoo import ops
from convzoo.ops import _numba
from convzoo.ops.dcnv3 import cpu, reference
from convzoo.ops.dcnv3.reference import Geometry
from _export_check import exported_call_targets

# (kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels,
#  offset_scale, remove_center)
CASES = [
    pytest.param((3, 3, 1, 1, 1, 1, 1, 1, 2, 3, 1.0, False), id="3x3-g2-gc3"),
    pytest.param((3, 2, 2, 1, 0, 1, 2, 1, 1, 2, 0.5, True), id="3x2-s21-d2-scale0.5-rc"),
    pytest.param((3, 3, 2, 2, 1, 1, 1, 1, 3, 1, 2.0, True), id="3x3-s2-g3-gc1-rc"),
    pytest.param((1, 3, 1, 2, 0, 2, 1, 3, 2, 5, 1.5, False), id="1x3-pad-w-only-d3"),
    pytest.param((2, 2, 1, 1, 1, 0, 1, 1, 1, 4, 1.0, True), id="2x2-even-rc"),
]


def naive_dcnv3(x, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                group, group_channels, offset_scale, remove_center):
    """Loop transcription of InternImage's dcnv3_im2col_gpu_kernel (one output value at a time)."""
    n_batch, height, width, _ = x.shape
    height_out = (height + 2 * pad_h - (dilation_h * (kernel_h - 1) + 1)) // stride_h + 1
    width_out = (width + 2 * pad_w - (dilation_w * (kernel_w - 1) + 1)) // stride_w + 1
    points = kernel_h * kernel_w - int(remove_center)
    out = torch.zeros(n_batch, height_out, width_out, group * group_channels, dtype=torch.float64)
    half_h = (dilation_h * (kernel_h - 1)) // 2
    half_w = (dilation_w * (kernel_w - 1)) // 2
    for n in range(n_batch):
        for ho in range(height_out):
            for wo in range(width_out):
                p0_w = half_w - pad_w + wo * stride_w
                p0_h = half_h - pad_h + ho * stride_h
                top_left_w = p0_w - half_w * offset_scale
                top_left_h = p0_h - half_h * offset_scale
                for g in range(group):
                    point = 0
                    for i in range(kernel_w):
                        for j in range(kernel_h):
                            if remove_center and i == kernel_w // 2 and j == kernel_h // 2:
                                continue
                            k = (g * points + point) * 2
                            loc_w = top_left_w + (i * dilation_w + float(offset[n, ho, wo, k])) * offset_scale
                            loc_h = top_left_h + (j * dilation_h + float(offset[n, ho, wo, k + 1])) * offset_scale
                            weight = float(mask[n, ho, wo, g * points + point])
                            point += 1
                            if not (loc_h > -1 and loc_w > -1 and loc_h < height and loc_w < width):
                                continue
                            h_low, w_low = math.floor(loc_h), math.floor(loc_w)
                            lh, lw = loc_h - h_low, loc_w - w_low
                            for hh, ww, wgt in ((h_low, w_low, (1 - lh) * (1 - lw)), (h_low, w_low + 1, (1 - lh) * lw),
                                                (h_low + 1, w_low, lh * (1 - lw)), (h_low + 1, w_low + 1, lh * lw)):
                                if 0 <= hh < height and 0 <= ww < width:
                                    chans = slice(g * group_channels, (g + 1) * group_channels)
                                    out[n, ho, wo, chans] += weight * wgt * x[n, hh, ww, chans].double()
    return out


def make_inputs(params, n=2, height=5, width=6, dtype=torch.float64, spread=2.0, requires_grad=False):
    kh, kw, sh, sw, ph, pw, dh, dw, group, gc, _, rc = params
    height_out, width_out = reference.output_size(height, width, kh, kw, sh, sw, ph, pw, dh, dw)
    points = kh * kw - int(rc)
    x = torch.randn(n, height, width, group * gc, dtype=dtype)
    offset = (torch.randn(n, height_out, width_out, group * points * 2) * spread).to(dtype)
    mask = torch.rand(n, height_out, width_out, group * points, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (x, offset, mask)]


@pytest.mark.parametrize("impl", ["reference", "auto"])
@pytest.mark.parametrize("params", CASES)
def test_matches_naive_loop(params, impl):
    x, offset, mask = make_inputs(params, spread=3.0)
    offset[0, 0, 0, 0] = float("nan")
    offset[1, -1, -1, 1] = float("inf")
    expected = naive_dcnv3(x, offset, mask, *params)
    torch.testing.assert_close(ops.dcnv3(x, offset, mask, *params, impl=impl), expected)


def _grads(impl, x, offset, mask, params, grad, mask_softmax=False):
    inputs = [t.detach().clone().requires_grad_() for t in (x, offset, mask)]
    out = ops.dcnv3(*inputs, *params, mask_softmax=mask_softmax, impl=impl)
    out.backward(grad)
    return [out.detach()] + [t.grad for t in inputs]


#: Random dcnv3 arguments for the hypothesis tests (``spread``: the offsets' standard deviation).
RANDOM_ARGUMENTS = dict(
    n=st.integers(1, 2), height=st.integers(1, 6), width=st.integers(1, 6),
    kernel_h=st.integers(1, 3), kernel_w=st.integers(1, 3), stride=st.integers(1, 2),
    pad=st.integers(0, 2), dilation=st.integers(1, 2), group=st.integers(1, 3), group_channels=st.integers(1, 5),
    offset_scale=st.sampled_from([0.5, 1.0, 2.0]), remove_center=st.booleans(), spread=st.sampled_from([0.5, 4.0]),
    mask_softmax=st.booleans(),
)


@given(**RANDOM_ARGUMENTS)
def test_fast_cpu_kernels_match_reference(n, height, width, kernel_h, kernel_w, stride, pad, dilation, group,
                                          group_channels, offset_scale, remove_center, spread, mask_softmax):
    """The Numba kernels against the reference's autograd, with ``mask_softmax`` against the reference
    softmax followed by the reference operator."""
    remove_center = remove_center and kernel_h * kernel_w > 1
    params = (kernel_h, kernel_w, stride, stride, pad, pad, dilation, dilation, group, group_channels, offset_scale,
              remove_center)
    height_out, width_out = reference.output_size(height, width, kernel_h, kernel_w, stride, stride, pad, pad,
                                                  dilation, dilation)
    assume(height_out >= 1 and width_out >= 1)
    x, offset, mask = make_inputs(params, n, height, width, spread=spread)
    if mask_softmax:
        mask = (mask - 0.5) * 8   # logits
    grad = torch.randn(n, height_out, width_out, group * group_channels, dtype=torch.float64)
    want = _grads("reference", x, offset, mask, params, grad, mask_softmax)
    geometry = Geometry(*params)
    torch.testing.assert_close(cpu.dcnv3_forward(x, offset, mask, geometry, mask_softmax), want[0])
    for got, expected in zip(cpu.dcnv3_backward(grad, x, offset, mask, geometry, mask_softmax), want[1:]):
        torch.testing.assert_close(got, expected)
    probs = reference.softmax_points(mask, group) if mask_softmax else mask
    grad_x, grad_offset, grad_probs = reference.dcnv3_backward(grad, x, offset, probs, *params)
    if mask_softmax:
        grad_probs = reference.softmax_points_backward(probs, grad_probs, group)
    for got, expected in zip((grad_x, grad_offset, grad_probs), want[1:]):
        torch.testing.assert_close(got, expected)


def test_custom_op_runs_the_numba_kernels(monkeypatch):
    """On CPU tensors (float32 and float64) the custom op never falls back to the reference."""
    assert _numba.kernels(cpu.__name__) is cpu

    def fail(*args, **kwargs):
        raise AssertionError("the reference ran")

    params = CASES[0].values[0]
    for dtype in (torch.float32, torch.float64):
        x, offset, mask = make_inputs(params, dtype=dtype, spread=3.0)
        grad = torch.randn(2, 5, 6, 6, dtype=dtype)
        want = _grads("reference", x, offset, mask, params, grad)
        with monkeypatch.context() as patch:
            patch.setattr(reference, "dcnv3_forward", fail)
            patch.setattr(reference, "dcnv3_backward", fail)
            got = _grads("auto", x, offset, mask, params, grad)
        for got_tensor, want_tensor in zip(got, want):
            torch.testing.assert_close(got_tensor, want_tensor)


def test_eager_training_runs_the_kernels_past_the_custom_op(monkeypatch):
    """Eager autograd on plain CPU tensors calls the Numba kernels directly (no custom-op dispatch), with
    the reference's output and gradients; under a dispatch mode (FLOP counting) the op is still one node."""
    dcnv3_module = importlib.import_module("convzoo.ops.dcnv3")   # ops.dcnv3 is the function
    params = CASES[1].values[0]
    x, offset, mask = make_inputs(params, spread=3.0)
    grad = torch.randn(2, *reference.output_size(5, 6, *params[:8]), params[8] * params[9], dtype=torch.float64)
    want = _grads("reference", x, offset, mask, params, grad)
    with monkeypatch.context() as patch:
        patch.setattr(dcnv3_module, "_dcnv3_op", pytest.fail)
        got = _grads("auto", x, offset, mask, params, grad)
    for got_tensor, want_tensor in zip(got, want):
        torch.testing.assert_close(got_tensor, want_tensor)
    inputs = [t.detach().float().requires_grad_() for t in (x, offset, mask)]
    with FlopCounterMode(display=False) as counter:
        ops.dcnv3(*inputs, *params).sum().backward()
    assert counter.get_total_flops() > 0
    leaves = [t.detach().requires_grad_() for t in (x, offset, mask)]
    (grad_x,) = torch.autograd.grad(ops.dcnv3(*leaves, *params).square().sum(), leaves[0], create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):   # no double backward (nor has the custom op)
        grad_x.sum().backward()


def test_nan_filled_empty_catches_a_kernel_that_leaves_output_unwritten(monkeypatch):
    """tests/ops/conftest.py fills torch.empty with NaN: a forward kernel deliberately broken to skip
    the last output row then fails the comparison with the reference (it would pass on zeroed memory)."""
    assert torch.isnan(torch.empty(3)).all() and torch.isnan(torch.empty_like(torch.zeros(2))).all()
    kernel = cpu._forward

    def skips_the_last_row(x, offset, mask, *constants_and_out):
        *constants, out = constants_and_out
        kernel(x, offset[:, :-1], mask[:, :-1], *constants, out[:, :-1])

    params = CASES[0].values[0]
    x, offset, mask = make_inputs(params)
    expected = reference.dcnv3_forward(x, offset, mask, *params)
    monkeypatch.setattr(cpu, "_forward", skips_the_last_row)
    got = cpu.dcnv3_forward(x, offset, mask, Geometry(*params))
    assert torch.isnan(got[:, -1]).all()
    torch.testing.assert_close(got[:, :-1], expected[:, :-1])
    with pytest.raises(AssertionError):
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("n, threads, by_batch", [(1, 2, False), (3, 2, False), (4, 2, True), (3, 1, True)])
def test_backward_owners_of_grad_x(n, threads, by_batch, monkeypatch):
    """Each grad_x ownership (whole batch elements, or blocks of rows with private copies) is exact."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert cpu._backward_copies(n, 1000, work=1 << 30)[0] is by_batch
        params = (3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0, False)
        x, offset, mask = make_inputs(params, n, 7, 6, spread=3.0)
        grad = torch.randn(n, 7, 6, 8, dtype=torch.float64)
        want = reference.dcnv3_backward(grad, x, offset, mask, *params)
        monkeypatch.setattr(_numba, "GRAIN", 1)  # so that these small inputs take all the threads
        for got, expected in zip(cpu.dcnv3_backward(grad, x, offset, mask, Geometry(*params)), want):
            torch.testing.assert_close(got, expected)
    finally:
        torch.set_num_threads(previous)


def test_channels_last_input():
    """x as the NHWC view of a channels_last NCHW tensor, and of a plain (channels-first) one."""
    params = CASES[0].values[0]
    x, offset, mask = make_inputs(params)
    x_cl = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    x_channels_first = x.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    assert not x_channels_first.is_contiguous()
    for x_in in (x_cl, x_channels_first):
        torch.testing.assert_close(ops.dcnv3(x_in, offset, mask, *params), naive_dcnv3(x, offset, mask, *params))


def _off_integer_offsets(params, n=1, height=4, width=5):
    """Inputs whose samples keep away from integer coordinates (bilinear kinks) for gradcheck."""
    x, offset, mask = make_inputs(params, n, height, width)
    whole = torch.randint(-2, 3, offset.shape, dtype=torch.float64)
    offset = whole + torch.rand(offset.shape, dtype=torch.float64) * 0.6 + 0.2
    return x, offset / params[10], mask


@pytest.mark.parametrize("impl", ["auto", "reference"])
@pytest.mark.parametrize("params", [CASES[0], CASES[2]])
def test_gradcheck(params, impl):
    x, offset, mask = _off_integer_offsets(params)
    inputs = [t.requires_grad_() for t in (x, offset, mask)]
    assert torch.autograd.gradcheck(lambda a, b, c: ops.dcnv3(a, b, c, *params, impl=impl), inputs)


@pytest.mark.parametrize("through", ["eager", "custom op"])
def test_mask_softmax_gradcheck_and_softmax_then_dcnv3(through):
    """``mask_softmax=True`` on logits equals InternImage's softmax over each group's points followed by
    dcnv3 (values and gradients, the centre point removed: P = 8), and passes gradcheck in float64, both
    through the eager kernels and through the custom op (which a dispatch mode such as FLOP counting keeps)."""
    params = CASES[2].values[0]
    x, offset, logits = _off_integer_offsets(params)
    logits = (logits - 0.5) * 6
    group, points = params[8], 8
    grad = torch.randn(1, 2, 3, params[8] * params[9], dtype=torch.float64)
    mode = FlopCounterMode(display=False) if through == "custom op" else contextlib.nullcontext()
    with mode:
        got = _grads("auto", x, offset, logits, params, grad, mask_softmax=True)
        inputs = [t.detach().clone().requires_grad_() for t in (x, offset, logits)]
        assert torch.autograd.gradcheck(lambda a, b, c: ops.dcnv3(a, b, c, *params, mask_softmax=True), inputs)
    inputs = [t.detach().clone().requires_grad_() for t in (x, offset, logits)]
    probs = torch.softmax(inputs[2].view(1, 2, 3, group, points), -1).view(inputs[2].shape)
    out = ops.dcnv3(inputs[0], inputs[1], probs, *params, impl="reference")
    out.backward(grad)
    for got_tensor, want_tensor in zip(got, [out.detach()] + [t.grad for t in inputs]):
        torch.testing.assert_close(got_tensor, want_tensor)
    # a different test against the naive loop: it sees only the normalised mask
    torch.testing.assert_close(got[0], naive_dcnv3(x, offset, probs.detach(), *params))


def test_opcheck_custom_op():
    x, offset, mask = make_inputs(CASES[1].values[0], dtype=torch.float32, requires_grad=True)
    for mask_softmax in (False, True):
        args = (x, offset, mask, *CASES[1].values[0], mask_softmax, False)
        torch.library.opcheck(torch.ops.convzoo.dcnv3.default, args)


def test_non_finite_offsets_contribute_zero():
    params = CASES[0].values[0]
    x, offset, mask = make_inputs(params)
    points = 9
    offset[0, 1, 2, 0] = float("nan")  # group 0, point 0, x
    offset[1, 0, 0, 2 * (points + 4) + 1] = float("-inf")  # group 1, point 4, y
    zeroed = mask.clone()
    zeroed[0, 1, 2, 0] = 0
    zeroed[1, 0, 0, points + 4] = 0
    finite = torch.nan_to_num(offset, nan=0.0, neginf=0.0)
    grad = torch.ones(2, 5, 6, 6, dtype=torch.float64)
    out, grad_x, grad_offset, grad_mask = _grads("auto", x, offset, mask, params, grad)
    torch.testing.assert_close(out, ops.dcnv3(x, finite, zeroed, *params))
    assert torch.isfinite(grad_x).all() and torch.isfinite(grad_offset).all() and torch.isfinite(grad_mask).all()
    assert grad_mask[0, 1, 2, 0] == 0 and grad_offset[0, 1, 2, 0] == 0


def test_offsets_outside_the_input_read_zero():
    params = CASES[0].values[0]
    x, offset, mask = make_inputs(params)
    far = torch.full_like(offset, 50.0)
    assert ops.dcnv3(x, far, mask, *params).abs().max() == 0
    # Samples exactly at loc_x = -1 and loc_x = W read zero as well (loc_x = wo + ix - 1 + offset_x).
    wo = torch.arange(6, dtype=torch.float64).view(1, 1, 6, 1, 1)
    ix = (torch.arange(9) // 3).to(torch.float64).view(1, 1, 1, 1, 9)
    for target in (-1, 6):
        edge = torch.zeros(2, 5, 6, 2, 9, 2, dtype=torch.float64)
        edge[..., 0] = target + 1 - wo - ix
        assert ops.dcnv3(x, edge.view(2, 5, 6, 36), mask, *params).abs().max() == 0


def test_zero_offsets_equal_masked_window_sum():
    """Zero offsets, scale 1: a masked 3x3 window sum with zero padding (checked with unfold)."""
    params = (3, 3, 1, 1, 1, 1, 1, 1, 1, 4, 1.0, False)
    x, offset, mask = make_inputs(params)
    offset.zero_()
    out = ops.dcnv3(x, offset, mask, *params)
    cols = torch.nn.functional.unfold(x.permute(0, 3, 1, 2), 3, padding=1).view(2, 4, 3, 3, 30)  # (n, c, iy, ix, q)
    cols = cols.transpose(2, 3).reshape(2, 4, 9, 5, 6)  # point p = ix * 3 + iy
    expected = (cols * mask.permute(0, 3, 1, 2)[:, None]).sum(2).permute(0, 2, 3, 1)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_batch_size_zero(impl):
    params = CASES[0].values[0]
    x, offset, mask = make_inputs(params, n=0)
    inputs = [t.requires_grad_() for t in (x, offset, mask)]
    out = ops.dcnv3(*inputs, *params, impl=impl)
    assert out.shape == (0, 5, 6, 6)
    out.sum().backward()
    assert inputs[0].grad.shape == x.shape and inputs[1].grad.shape == offset.shape


def test_non_contiguous_inputs():
    params = CASES[0].values[0]
    x, offset, mask = make_inputs(params)
    x_nc = x.permute(0, 3, 1, 2).contiguous(memory_format=torch.channels_last).permute(0, 2, 3, 1)
    x_nc = torch.cat([x_nc, x_nc], -1)[..., ::2]
    x_nc.copy_(x)
    offset_nc = torch.stack([offset, offset], -1)[..., 0]
    mask_nc = mask.transpose(1, 2).contiguous().transpose(1, 2)
    assert not (x_nc.is_contiguous() or offset_nc.is_contiguous() or mask_nc.is_contiguous())
    for impl in ("auto", "reference"):
        torch.testing.assert_close(ops.dcnv3(x_nc, offset_nc, mask_nc, *params, impl=impl),
                                   ops.dcnv3(x, offset, mask, *params))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype):
    params = CASES[0].values[0]
    x, offset, mask = make_inputs(params, dtype=torch.float32)
    out, *grads = _grads("auto", x.to(dtype), offset.to(dtype), mask.to(dtype), params,
                         torch.ones(2, 5, 6, 6, dtype=dtype))
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    want = ops.dcnv3(x.to(dtype).float(), offset.to(dtype).float(), mask.to(dtype).float(), *params)
    torch.testing.assert_close(out.float(), want, rtol=2e-2, atol=2e-2)


def test_flop_formula():
    params = CASES[0].values[0]
    x, offset, mask = make_inputs(params, dtype=torch.float32)
    with FlopCounterMode(display=False) as counter:
        ops.dcnv3(x, offset, mask, *params)
    # 2 * 5 MACs (4 bilinear + 1 mask) per output pixel, point and channel.
    assert counter.get_total_flops() == 2 * 5 * 2 * 5 * 6 * 9 * 6


class _Wrapped(torch.nn.Module):
    def forward(self, x, offset, mask):
        return ops.dcnv3(x, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, 2, 3, 1.0) * 2


def test_torch_compile_fullgraph():
    x, offset, mask = make_inputs(CASES[0].values[0], dtype=torch.float32, requires_grad=True)
    compiled = torch.compile(_Wrapped(), fullgraph=True, backend="aot_eager")
    out = compiled(x, offset, mask)
    out.sum().backward()
    torch.testing.assert_close(out, _Wrapped()(x, offset, mask))
    assert x.grad is not None and offset.grad is not None and mask.grad is not None


def test_torch_compile_inductor_through_the_fast_cpu_kernels():
    """Inductor checks the strides of the custom ops' outputs against their fake kernels."""
    x, offset, mask = make_inputs(CASES[0].values[0], dtype=torch.float32, requires_grad=True)
    compiled = torch.compile(_Wrapped(), fullgraph=True)
    compiled(x, offset, mask).sum().backward()
    got = [t.grad for t in (x, offset, mask)]
    for t in (x, offset, mask):
        t.grad = None
    _Wrapped()(x, offset, mask).sum().backward()
    for grad, want in zip(got, (x.grad, offset.grad, mask.grad)):
        torch.testing.assert_close(grad, want)


def test_torch_export_single_node():
    x, offset, mask = make_inputs(CASES[0].values[0], dtype=torch.float32)
    assert "convzoo.dcnv3.default" in exported_call_targets(_Wrapped(), x, offset, mask)


# ------------------------------------------------------------------------------------------------
# Argument errors.

GOOD = (3, 3, 1, 1, 1, 1, 1, 1, 2, 3, 1.0)


def _good_inputs():
    x, offset, mask = make_inputs(CASES[0].values[0], dtype=torch.float32)
    return x, offset, mask


@pytest.mark.parametrize("change, error, match", [
    (lambda a: a.update(x=a["x"].numpy()), TypeError, "x must be a torch.Tensor"),
    (lambda a: a.update(x=a["x"][0]), ValueError, "x must be a 4-D tensor"),
    (lambda a: a.update(x=a["x"].int()), TypeError, "x must have dtype"),
    (lambda a: a.update(offset=a["offset"].double()), TypeError, "offset must have the dtype of x"),
    (lambda a: a.update(mask=a["mask"][..., :-1]), ValueError, r"mask must have shape \(2, 5, 6, 18\)"),
    (lambda a: a.update(offset=a["offset"][:, :-1]), ValueError, r"offset must have shape \(2, 5, 6, 36\)"),
    (lambda a: a.update(x=torch.cat([a["x"], a["x"]], -1)), ValueError, "x must have group \\* group_channels = 6"),
    (lambda a: a.update(args=(0,) + GOOD[1:]), ValueError, "kernel_h must be >= 1, got 0"),
    (lambda a: a.update(args=GOOD[:2] + (0,) + GOOD[3:]), ValueError, "stride_h must be >= 1"),
    (lambda a: a.update(args=GOOD[:4] + (-1,) + GOOD[5:]), ValueError, "pad_h must be >= 0"),
    (lambda a: a.update(args=GOOD[:7] + (2.0,) + GOOD[8:]), TypeError, "dilation_w must be an int"),
    (lambda a: a.update(args=GOOD[:10] + (float("nan"),)), TypeError, "offset_scale must be a finite float"),
    (lambda a: a.update(remove_center="yes"), TypeError, "remove_center must be a bool"),
    (lambda a: a.update(mask_softmax="yes"), TypeError, "mask_softmax must be a bool"),
    (lambda a: a.update(impl="cuda"), ValueError, "impl must be one of"),
])
def test_bad_arguments(change, error, match):
    x, offset, mask = _good_inputs()
    call = dict(x=x, offset=offset, mask=mask, args=GOOD, remove_center=False, mask_softmax=False, impl="auto")
    change(call)
    with pytest.raises(error, match=match):
        ops.dcnv3(call["x"], call["offset"], call["mask"], *call["args"], remove_center=call["remove_center"],
                  mask_softmax=call["mask_softmax"], impl=call["impl"])


def test_too_small_input_and_single_point_remove_center():
    x = torch.randn(1, 2, 2, 3)
    with pytest.raises(ValueError, match="too small"):
        ops.dcnv3(x, torch.zeros(1, 1, 1, 18), torch.zeros(1, 1, 1, 9), 3, 3, 1, 1, 0, 0, 1, 1, 1, 3, 1.0)
    with pytest.raises(ValueError, match="remove_center needs a kernel with more than one point"):
        ops.dcnv3(x, torch.zeros(1, 2, 2, 0), torch.zeros(1, 2, 2, 0), 1, 1, 1, 1, 0, 0, 1, 1, 1, 3, 1.0, True)


# ------------------------------------------------------------------------------------------------
# Layout converters vs torchvision's convention (own naive loop: depthwise, all-ones weight).


def naive_torchvision_depthwise(x_nchw, tv_offset, tv_mask, kernel_h, kernel_w, stride, pad, dilation):
    """torchvision.ops.deform_conv2d semantics, weight ones (C, 1, kh, kw), offset groups from shapes."""
    n_batch, channels, height, width = x_nchw.shape
    _, _, height_out, width_out = tv_offset.shape
    offset_groups = tv_offset.shape[1] // (2 * kernel_h * kernel_w)
    per_group = channels // offset_groups
    out = torch.zeros(n_batch, channels, height_out, width_out, dtype=torch.float64)
    for n in range(n_batch):
        for c in range(channels):
            g = c // per_group
            for ho in range(height_out):
                for wo in range(width_out):
                    for iy in range(kernel_h):
                        for ix in range(kernel_w):
                            k = g * kernel_h * kernel_w + iy * kernel_w + ix
                            y = ho * stride[0] - pad[0] + iy * dilation[0] + float(tv_offset[n, 2 * k, ho, wo])
                            xx = wo * stride[1] - pad[1] + ix * dilation[1] + float(tv_offset[n, 2 * k + 1, ho, wo])
                            if y <= -1 or y >= height or xx <= -1 or xx >= width:
                                continue
                            y0, x0 = math.floor(y), math.floor(xx)
                            ly, lx = y - y0, xx - x0
                            val = 0.0
                            for yy, xq, wgt in ((y0, x0, (1 - ly) * (1 - lx)), (y0, x0 + 1, (1 - ly) * lx),
                                                (y0 + 1, x0, ly * (1 - lx)), (y0 + 1, x0 + 1, ly * lx)):
                                if 0 <= yy < height and 0 <= xq < width:
                                    val += wgt * float(x_nchw[n, c, yy, xq])
                            out[n, c, ho, wo] += float(tv_mask[n, k, ho, wo]) * val
    return out


@pytest.mark.parametrize("params", [
    pytest.param((3, 3, 1, 1, 1, 1, 1, 1, 2, 2, 1.0, False), id="plain"),
    pytest.param((3, 2, 2, 1, 1, 0, 2, 1, 1, 3, 0.5, False), id="rect-s2-d2-scale0.5"),
    pytest.param((3, 3, 1, 2, 1, 1, 1, 2, 2, 1, 1.5, True), id="remove-center-scale1.5"),
])
def test_converter_matches_torchvision_convention(params):
    kh, kw, sh, sw, ph, pw, dh, dw, group, gc, scale, rc = params
    x, offset, mask = make_inputs(params, n=1, height=4, width=5)
    tv_offset, tv_mask = ops.dcnv3_offsets_to_torchvision(offset, mask, kh, kw, group, dh, dw, scale, rc)
    expected = naive_torchvision_depthwise(x.permute(0, 3, 1, 2), tv_offset, tv_mask, kh, kw, (sh, sw), (ph, pw),
                                           (dh, dw))
    torch.testing.assert_close(ops.dcnv3(x, offset, mask, *params), expected.permute(0, 2, 3, 1))
    back_offset, back_mask = ops.torchvision_offsets_to_dcnv3(tv_offset, tv_mask, kh, kw, group, dh, dw, scale, rc)
    torch.testing.assert_close(back_offset, offset)
    torch.testing.assert_close(back_mask, mask)


def test_converter_point_order_and_defaults():
    # One group, 2x3 kernel: DCNv3 point p = ix * 2 + iy, torchvision position iy * 3 + ix.
    offset = torch.arange(12.0).view(1, 1, 1, 12)  # point p holds (x, y) = (2p, 2p + 1)
    mask = torch.arange(6.0).view(1, 1, 1, 6)
    tv_offset, tv_mask = ops.dcnv3_offsets_to_torchvision(offset, mask, 2, 3, 1)
    for ix in range(3):
        for iy in range(2):
            p, k = ix * 2 + iy, iy * 3 + ix
            assert tv_offset[0, 2 * k, 0, 0] == 2 * p + 1  # dy
            assert tv_offset[0, 2 * k + 1, 0, 0] == 2 * p  # dx
            assert tv_mask[0, k, 0, 0] == p
    dcn_offset, dcn_mask = ops.torchvision_offsets_to_dcnv3(tv_offset, None, 2, 3, 1)
    torch.testing.assert_close(dcn_offset, offset)
    assert (dcn_mask == 1).all()
    with pytest.raises(ValueError, match="offset must have group \\* kernel_h \\* kernel_w \\* 2 = 12 channels"):
        ops.torchvision_offsets_to_dcnv3(tv_offset[:, :-2], None, 2, 3, 1)
    with pytest.raises(ValueError, match="offset_scale must be non-zero"):
        ops.dcnv3_offsets_to_torchvision(offset, mask, 2, 3, 1, offset_scale=0.0)


# ------------------------------------------------------------------------------------------------
# Triton kernels (interpreter on CPU tensors when there is no GPU).

TRITON_CASES = [
    pytest.param((3, 3, 1, 1, 1, 1, 1, 1, 2, 3, 1.0, False), 2, 5, 7, id="g2-gc3-nonsquare"),
    pytest.param((3, 3, 2, 2, 1, 1, 1, 1, 3, 5, 0.5, True), 2, 7, 6, id="s2-gc5-remove-center"),
    pytest.param((3, 2, 1, 2, 0, 1, 2, 1, 1, 17, 2.0, False), 1, 6, 5, id="rect-d2-gc17"),
    # group_channels with power-of-two factors 8 and 4: the kernels' alignment hint (_channel_alignment)
    pytest.param((3, 3, 1, 1, 1, 1, 1, 1, 2, 24, 1.0, False), 2, 4, 5, id="g2-gc24"),
    pytest.param((3, 3, 2, 1, 1, 1, 1, 1, 3, 12, 1.0, True), 1, 5, 4, id="g3-gc12-remove-center"),
]


def _triton_grads(device, x, offset, mask, params, grad, mask_softmax=False):
    """Output and gradients of the Triton path on ``device``, brought back to the CPU."""
    inputs = (t.to(device) for t in (x, offset, mask))
    return [t.cpu() for t in _grads("triton", *inputs, params, grad.to(device), mask_softmax)]


@pytest.mark.parametrize("params, n, height, width", TRITON_CASES)
def test_triton_forward_and_gradients(params, n, height, width, triton_device):
    x, offset, mask = make_inputs(params, n, height, width, dtype=torch.float32, spread=4.0)  # crosses the border
    offset.view(-1)[3] = float("nan")
    grad = torch.randn(ops.dcnv3(x, offset, mask, *params).shape)
    got = _triton_grads(triton_device, x, offset, mask, params, grad)
    want = _grads("reference", x, offset, mask, params, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


@settings(max_examples=10)
@given(**{**RANDOM_ARGUMENTS, "group_channels": st.integers(1, 20)})   # past one 16-wide channel block
def test_triton_random_shapes_match_reference(n, height, width, kernel_h, kernel_w, stride, pad, dilation, group,
                                              group_channels, offset_scale, remove_center, spread, mask_softmax,
                                              triton_device):
    remove_center = remove_center and kernel_h * kernel_w > 1
    params = (kernel_h, kernel_w, stride, stride, pad, pad, dilation, dilation, group, group_channels, offset_scale,
              remove_center)
    height = max(height, dilation * (kernel_h - 1) + 1 - 2 * pad)   # at least one output row and column
    width = max(width, dilation * (kernel_w - 1) + 1 - 2 * pad)
    x, offset, mask = make_inputs(params, n, height, width, dtype=torch.float32, spread=spread)
    grad = torch.randn(ops.dcnv3(x, offset, mask, *params).shape)
    got = _triton_grads(triton_device, x, offset, mask, params, grad, mask_softmax)
    want = _grads("reference", x, offset, mask, params, grad, mask_softmax)
    for name, g, w in zip(("out", "x", "offset", "mask"), got, want):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype, triton_device):
    params = (3, 3, 1, 1, 1, 1, 1, 1, 2, 3, 1.0, False)
    x, offset, mask = [t.to(dtype) for t in make_inputs(params, 1, 4, 5, dtype=torch.float32)]
    got = _triton_grads(triton_device, x, offset, mask, params, torch.ones(1, 4, 5, 6, dtype=dtype))
    want = _grads("reference", x.float(), offset.float(), mask.float(), params, torch.ones(1, 4, 5, 6))
    for g, w in zip(got, want):
        assert g.dtype == dtype
        torch.testing.assert_close(g.float(), w, rtol=3e-2, atol=3e-2)


def test_triton_channel_alignment_divides_group_channels():
    from convzoo.ops.dcnv3.triton import _channel_alignment
    assert [_channel_alignment(gc) for gc in (1, 7, 12, 16, 20, 24, 40, 48, 64)] == [1, 1, 4, 16, 4, 8, 8, 16, 16]


def test_triton_rejects_float64():
    x, offset, mask = make_inputs(CASES[0].values[0])
    with pytest.raises(TypeError, match="impl='triton' supports"):
        ops.dcnv3(x, offset, mask, *CASES[0].values[0], impl="triton")


def test_autocast_mixed_dtypes_run_in_the_widest_and_return_x_dtype():
    x = torch.randn(2, 5, 6, 8)
    offset = torch.randn(2, 5, 6, 2 * 9 * 2)
    mask = torch.rand(2, 5, 6, 2 * 9)
    expected = ops.dcnv3(x.bfloat16().float(), offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ops.dcnv3(x.bfloat16(), offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=2e-2, rtol=2e-2)
    leaf = x.bfloat16().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ops.dcnv3(leaf, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0).sum().backward()
    assert leaf.grad.dtype == torch.bfloat16 and torch.isfinite(leaf.grad).all()
    with pytest.raises(TypeError, match="offset must have the dtype of x"):
        ops.dcnv3(x.bfloat16(), offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, 2, 4, 1.0)
