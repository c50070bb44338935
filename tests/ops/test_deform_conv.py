"""Tests of convzoo.ops.deform_conv2d: a naive loop oracle, autograd reference vs chunked kernels,
gradcheck, torchvision's border and derivative conventions, non-finite offsets, layouts, dtypes,
errors, torch.library registration (opcheck, compile, export, FLOP formula)."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from convzoo.ops import deform_conv2d
from convzoo.ops.deform_conv import reference
from _export_check import exported_call_targets

# ---------------------------------------------------------------------------------------------
# Independent oracle written from the definition (torchvision's bilinear rule), float64 loops.
# ---------------------------------------------------------------------------------------------


def naive_bilinear(image, y, x):
    """Bilinear read of image (H, W) at (y, x); zero outside, each neighbour outside reads zero."""
    height, width = image.shape
    if not (math.isfinite(y) and math.isfinite(x)):
        return 0.0
    if y <= -1 or y >= height or x <= -1 or x >= width:
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    total = 0.0
    for row, weight_y in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for col, weight_x in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= row < height and 0 <= col < width:
                total += weight_y * weight_x * float(image[row, col])
    return total


def naive_deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask):
    n_batch, channels, _, _ = x.shape
    out_channels, group_channels, kh, kw = weight.shape
    weight_groups = channels // group_channels
    offset_groups = offset.shape[1] // (2 * kh * kw)
    out_h, out_w = offset.shape[2:]
    out = torch.zeros(n_batch, out_channels, out_h, out_w, dtype=torch.float64)
    for n in range(n_batch):
        for o in range(out_channels):
            group = o // (out_channels // weight_groups)
            for oy in range(out_h):
                for ox in range(out_w):
                    total = 0.0 if bias is None else float(bias[o])
                    for ci in range(group_channels):
                        c = group * group_channels + ci
                        g = c // (channels // offset_groups)
                        for i in range(kh):
                            for j in range(kw):
                                k = g * kh * kw + i * kw + j
                                y = oy * stride[0] - padding[0] + i * dilation[0] + float(offset[n, 2 * k, oy, ox])
                                xx = ox * stride[1] - padding[1] + j * dilation[1] + float(offset[n, 2 * k + 1, oy, ox])
                                value = naive_bilinear(x[n, c], y, xx)
                                if mask is not None:
                                    value *= float(mask[n, k, oy, ox])
                                total += float(weight[o, ci, i, j]) * value
                    out[n, o, oy, ox] = total
    return out


def _conv(stride, padding, dilation) -> reference.Conv:
    return reference.Conv(stride_h=stride[0], stride_w=stride[1], pad_h=padding[0], pad_w=padding[1],
                          dilation_h=dilation[0], dilation_w=dilation[1])


def make_case(
    batch=2,
    channels=4,
    out_channels=6,
    size=(5, 7),
    kernel=(3, 2),
    stride=(1, 2),
    padding=(1, 0),
    dilation=(2, 1),
    weight_groups=2,
    offset_groups=2,
    with_mask=True,
    with_bias=True,
    offset_scale=3.0,
    dtype=torch.float64,
    seed=0,
):
    gen = torch.Generator().manual_seed(seed)
    out_h, out_w = reference.output_size(*size, *kernel, _conv(stride, padding, dilation))
    kk = kernel[0] * kernel[1]
    x = torch.randn(batch, channels, *size, generator=gen, dtype=torch.float64)
    offset = torch.randn(batch, 2 * offset_groups * kk, out_h, out_w, generator=gen, dtype=torch.float64) * offset_scale
    weight = torch.randn(out_channels, channels // weight_groups, *kernel, generator=gen, dtype=torch.float64)
    bias = torch.randn(out_channels, generator=gen, dtype=torch.float64) if with_bias else None
    mask = torch.rand(batch, offset_groups * kk, out_h, out_w, generator=gen, dtype=torch.float64) if with_mask else None
    cast = lambda t: None if t is None else t.to(dtype)  # noqa: E731
    return dict(
        x=cast(x), offset=cast(offset), weight=cast(weight), bias=cast(bias), mask=cast(mask),
        stride=stride, padding=padding, dilation=dilation,
    )


def call(case, impl="auto", **overrides):
    args = {**case, **overrides}
    return deform_conv2d(
        args["x"], args["offset"], args["weight"], args["bias"], args["stride"], args["padding"], args["dilation"],
        mask=args["mask"], impl=impl,
    )


def naive(case):
    return naive_deform_conv2d(
        case["x"], case["offset"], case["weight"], case["bias"], case["stride"], case["padding"], case["dilation"],
        case["mask"],
    )


ORACLE_CASES = [
    pytest.param(dict(), id="v2-groups2-offgroups2-nonsquare"),
    pytest.param(dict(with_mask=False, with_bias=False), id="v1-nobias"),
    pytest.param(dict(weight_groups=1, offset_groups=1, kernel=(3, 3), stride=(1, 1), padding=(1, 1), dilation=(1, 1)), id="3x3-pad1"),
    pytest.param(dict(channels=3, out_channels=5, weight_groups=1, offset_groups=3, size=(4, 3), kernel=(2, 2),
                      stride=(2, 1), padding=(2, 1), dilation=(1, 1), offset_scale=5.0), id="odd-channels-far-offsets"),
    pytest.param(dict(batch=1, size=(1, 1), kernel=(1, 1), stride=(1, 1), padding=(1, 1), dilation=(1, 1)), id="1x1-image"),
]


@pytest.mark.parametrize("overrides", ORACLE_CASES)
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_matches_naive_loops(overrides, impl):
    case = make_case(**overrides)
    torch.testing.assert_close(call(case, impl), naive(case), rtol=1e-10, atol=1e-10)


def test_integer_sampling_points_on_and_beyond_the_border():
    """Offsets that put samples exactly on -1, 0, H-1, H and beyond (torchvision's rule at the edges)."""
    case = make_case(weight_groups=1, offset_groups=1, size=(3, 4), kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                     dilation=(1, 1))
    values = torch.tensor([-3.0, -2.0, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, 2.5, 3.0, 4.0])
    index = torch.randint(0, len(values), case["offset"].shape, generator=torch.Generator().manual_seed(1))
    case["offset"] = values[index].double()
    torch.testing.assert_close(call(case), naive(case), rtol=1e-10, atol=1e-10)


def test_zero_offsets_without_mask_is_conv2d():
    case = make_case(with_mask=False, offset_scale=0.0)
    expected = F.conv2d(case["x"], case["weight"], case["bias"], case["stride"], case["padding"], case["dilation"], groups=2)
    torch.testing.assert_close(call(case), expected)


def test_chunked_kernels_match_autograd_reference_across_chunks():
    case = make_case(batch=3)
    inputs = [case[k].clone().requires_grad_() for k in ("x", "offset", "weight", "bias", "mask")]
    conv = _conv(case["stride"], case["padding"], case["dilation"])
    expected = reference.deform_conv2d_reference(*inputs, conv)
    grad_out = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, inputs, grad_out)
    for chunk_elements in (1, 37, 10_000):
        out = reference.deform_conv2d_forward(*[case[k] for k in ("x", "offset", "weight", "bias", "mask")], conv,
                                              chunk_elements=chunk_elements)
        torch.testing.assert_close(out, expected)
        grads = reference.deform_conv2d_backward(grad_out, case["x"], case["offset"], case["weight"], case["mask"], conv,
                                                 chunk_elements=chunk_elements)
        grad_x, grad_offset, grad_mask, grad_weight, grad_bias = grads
        for got, want in zip((grad_x, grad_offset, grad_weight, grad_bias, grad_mask), expected_grads):
            torch.testing.assert_close(got, want)


@given(
    batch=st.integers(1, 2),
    group_channels=st.integers(1, 3),
    weight_groups=st.integers(1, 2),
    offset_groups=st.integers(1, 2),
    out_per_group=st.integers(1, 3),
    height=st.integers(1, 6),
    width=st.integers(1, 6),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    with_mask=st.booleans(),
    with_bias=st.booleans(),
    offset_scale=st.sampled_from([0.0, 0.7, 4.0]),
    seed=st.integers(0, 2**16),
)
def test_op_forward_and_gradients_match_reference(
    batch, group_channels, weight_groups, offset_groups, out_per_group, height, width, kernel, stride, padding,
    dilation, with_mask, with_bias, offset_scale, seed,
):
    channels = group_channels * weight_groups * offset_groups
    out_h, out_w = reference.output_size(height, width, *kernel, _conv(stride, padding, dilation))
    assume(out_h > 0 and out_w > 0)
    case = make_case(batch, channels, out_per_group * weight_groups, (height, width), kernel, stride, padding, dilation,
                     weight_groups, offset_groups, with_mask, with_bias, offset_scale, seed=seed)
    names = [k for k in ("x", "offset", "weight", "bias", "mask") if case[k] is not None]
    outs, grads = [], []
    for impl in ("auto", "reference"):
        leaves = {k: case[k].clone().requires_grad_() for k in names}
        out = call(case, impl, **leaves)
        outs.append(out)
        grads.append(torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out) + out.detach()))
    torch.testing.assert_close(outs[0], outs[1])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("with_mask", [True, False], ids=["v2", "v1"])
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_gradcheck_float64(with_mask, impl):
    case = make_case(batch=2, channels=4, out_channels=2, size=(4, 3), kernel=(2, 2), stride=(1, 1), padding=(1, 0),
                     dilation=(1, 1), with_mask=with_mask, offset_scale=1.3)
    names = [k for k in ("x", "offset", "weight", "bias", "mask") if case[k] is not None]
    leaves = [case[k].clone().requires_grad_() for k in names]

    def fn(*tensors):
        return call(case, impl, **dict(zip(names, tensors)))

    assert torch.autograd.gradcheck(fn, leaves, eps=1e-6, atol=1e-5)


def test_offset_gradient_at_integer_points_is_the_derivative_from_above():
    """torchvision's convention: at integer coordinates (e.g. zero offsets, and y = -1 on the padding
    border) the offset gradient is the one-sided derivative towards larger coordinates."""
    case = make_case(batch=1, channels=2, out_channels=3, size=(3, 4), kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                     dilation=(1, 1), weight_groups=1, offset_groups=1, offset_scale=0.0)
    offset = case["offset"].clone().requires_grad_()
    out = call(case, offset=offset)
    grad_out = torch.randn_like(out)
    (grad,) = torch.autograd.grad(out, offset, grad_out)
    eps = 1e-7
    flat = case["offset"].reshape(-1)
    for index in range(0, flat.numel(), 7):
        shifted = flat.clone()
        shifted[index] += eps
        moved = call(case, offset=shifted.view_as(case["offset"]))
        one_sided = ((moved - out.detach()) * grad_out).sum() / eps
        assert abs(float(grad.reshape(-1)[index]) - float(one_sided)) < 1e-5


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), 1e30, -1e30])
@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_non_finite_and_huge_offsets_read_zero(bad, impl):
    case = make_case()
    case["offset"][0, 3, 1, 0] = bad  # the x of one tap of offset group 0
    case["offset"][1, 2 * case["offset"].shape[1] // 4, 0, 1] = bad  # the y of a tap of offset group 1
    expected = naive(case)
    names = ["x", "offset", "weight", "bias", "mask"]
    leaves = {k: case[k].clone().requires_grad_() for k in names}
    out = call(case, impl, **leaves)
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    grads = torch.autograd.grad(out.sum(), list(leaves.values()))
    assert all(torch.isfinite(g).all() for g in grads)
    grad_offset = grads[1]
    assert grad_offset[0, 3, 1, 0] == 0


@pytest.mark.parametrize("impl", ["auto", "reference"])
def test_batch_zero(impl):
    case = make_case(batch=0)
    leaves = {k: case[k].clone().requires_grad_() for k in ("x", "offset", "weight", "bias", "mask")}
    out = call(case, impl, **leaves)
    assert out.shape == (0, 6, 3, 3)
    out.sum().backward()
    assert leaves["weight"].grad.abs().sum() == 0
    assert leaves["x"].grad.shape == leaves["x"].shape


def test_non_contiguous_and_channels_last_inputs():
    case = make_case()
    expected = call(case)
    channels_last = {k: case[k].contiguous(memory_format=torch.channels_last) for k in ("x", "offset", "weight", "mask")}
    torch.testing.assert_close(call(case, **channels_last), expected)
    # Non-contiguous views: every tensor is a strided slice of a larger one.
    strided = {k: torch.repeat_interleave(case[k], 2, dim=-1)[..., ::2] for k in ("x", "offset", "weight", "mask")}
    strided["bias"] = torch.stack([case["bias"], case["bias"]], 1)[:, 0]
    assert not strided["x"].is_contiguous()
    leaves = {k: v.clone().requires_grad_() for k, v in strided.items()}
    out = call(case, **{k: leaves[k] for k in leaves})
    torch.testing.assert_close(out, expected)
    out.sum().backward()
    reference_leaves = {k: case[k].clone().requires_grad_() for k in leaves}
    call(case, "reference", **reference_leaves).sum().backward()
    for k in leaves:
        torch.testing.assert_close(leaves[k].grad, reference_leaves[k].grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_lower_precision_dtypes(dtype):
    case64 = make_case()
    case = make_case(dtype=dtype)
    leaves = {k: case[k].clone().requires_grad_() for k in ("x", "offset", "weight", "bias", "mask")}
    out = call(case, **leaves)
    assert out.dtype == dtype
    tol = {torch.float32: 1e-5, torch.float16: 2e-2, torch.bfloat16: 1e-1}[dtype]
    expected = call({k: (v.to(dtype).double() if isinstance(v, torch.Tensor) else v) for k, v in case64.items()})
    torch.testing.assert_close(out.double(), expected, rtol=tol, atol=tol * 10)
    out.float().sum().backward()
    assert all(leaf.grad.dtype == dtype and torch.isfinite(leaf.grad).all() for leaf in leaves.values())


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_reference_impl_is_traceable_by_jit_trace():
    case = make_case(dtype=torch.float32)

    def fn(x, offset, mask):
        return deform_conv2d(x, offset, case["weight"], case["bias"], case["stride"], case["padding"], case["dilation"],
                             mask=mask, impl="reference")

    traced = torch.jit.trace(fn, (case["x"], case["offset"], case["mask"]), check_trace=False)
    other = make_case(dtype=torch.float32, seed=3)
    torch.testing.assert_close(traced(other["x"], other["offset"], other["mask"]), fn(other["x"], other["offset"], other["mask"]))


# ---------------------------------------------------------------------------------------------
# torch.library registration
# ---------------------------------------------------------------------------------------------


def test_opcheck_custom_op():
    case = make_case(dtype=torch.float32, batch=1, channels=2, out_channels=2, size=(4, 5), weight_groups=1)
    args = (case["x"].requires_grad_(), case["offset"].requires_grad_(), case["weight"].requires_grad_(),
            case["bias"], case["mask"].requires_grad_(), 1, 2, 1, 0, 2, 1, False)
    # test_aot_dispatch_dynamic is left to test_torch_compile_fullgraph (it costs half a minute here).
    utils = ("test_schema", "test_autograd_registration", "test_faketensor")
    torch.library.opcheck(torch.ops.convzoo.deform_conv2d.default, args, test_utils=utils)


class _Module(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
        self.offset_conv = torch.nn.Conv2d(3, 27, 3, padding=1)

    def forward(self, x):
        predicted = self.offset_conv(x)
        return deform_conv2d(x, predicted[:, :18], self.weight, padding=1, mask=predicted[:, 18:].sigmoid()) * 2


def test_torch_compile_fullgraph():
    module = _Module()
    x = torch.randn(2, 3, 5, 6, requires_grad=True)
    expected = module(x)
    compiled = torch.compile(module, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, expected)
    (grad,) = torch.autograd.grad(out.sum(), x)
    (expected_grad,) = torch.autograd.grad(expected.sum(), x)
    torch.testing.assert_close(grad, expected_grad)


def test_torch_export_captures_one_node():
    module = _Module()
    x = torch.randn(1, 3, 5, 6)
    assert "convzoo.deform_conv2d.default" in exported_call_targets(module, x)


def test_flop_formula_counts_like_conv2d():
    from torch.utils.flop_counter import FlopCounterMode

    case = make_case(dtype=torch.float32, with_mask=False)
    with FlopCounterMode(display=False) as ours:
        call(case)
    with FlopCounterMode(display=False) as conv:
        F.conv2d(case["x"], case["weight"], case["bias"], case["stride"], case["padding"], case["dilation"], groups=2)
    assert ours.get_total_flops() == conv.get_total_flops() > 0


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

ERROR_CASES = [
    pytest.param(dict(x=[1.0]), TypeError, "input must be a torch.Tensor", id="input-type"),
    pytest.param(dict(x=torch.zeros(2, 4, 5)), ValueError, "input must be a 4-D tensor", id="input-ndim"),
    pytest.param(dict(x=torch.zeros(2, 4, 5, 7, dtype=torch.int64)), TypeError, "input must have dtype", id="input-dtype"),
    pytest.param(dict(offset=torch.zeros(2, 24, 3, 3, dtype=torch.float64)), TypeError, "offset must have the dtype", id="offset-dtype"),
    pytest.param(dict(weight=torch.zeros(6, 3, 3, 2)), ValueError, r"input channels \(4\) must be divisible by weight.shape\[1\] \(3\)", id="weight-groups"),
    pytest.param(dict(weight=torch.zeros(5, 2, 3, 2)), ValueError, r"weight.shape\[0\] \(5\) must be divisible", id="out-channels-groups"),
    pytest.param(dict(offset=torch.zeros(2, 23, 5, 3)), ValueError, r"offset.shape\[1\] must be a positive multiple of 2 \* kernel_h \* kernel_w = 12", id="offset-channels"),
    pytest.param(dict(offset=torch.zeros(2, 36, 3, 3), mask=None), ValueError, r"divisible by the number of offset groups \(3", id="offset-groups"),
    pytest.param(dict(offset=torch.zeros(2, 24, 5, 4)), ValueError, r"offset must have shape .* = \(2, 24, 3, 3\), got \(2, 24, 5, 4\)", id="offset-spatial"),
    pytest.param(dict(offset=torch.zeros(1, 24, 3, 3)), ValueError, r"offset must have shape", id="offset-batch"),
    pytest.param(dict(mask=torch.zeros(2, 6, 3, 3)), ValueError, r"mask must have shape .* = \(2, 12, 3, 3\)", id="mask-shape"),
    pytest.param(dict(bias=torch.zeros(5)), ValueError, r"bias must have shape \(6,\)", id="bias-shape"),
    pytest.param(dict(stride=0), ValueError, "stride must be >= 1", id="stride"),
    pytest.param(dict(padding=-1), ValueError, "padding must be >= 0", id="padding"),
    pytest.param(dict(dilation=(1, 2, 3)), TypeError, "dilation must be an int or a pair", id="dilation"),
    pytest.param(dict(x=torch.zeros(2, 4, 1, 1), padding=0), ValueError, "too small", id="too-small"),
]


@pytest.mark.parametrize("overrides,error,match", ERROR_CASES)
def test_bad_arguments(overrides, error, match):
    case = make_case(dtype=torch.float64)
    case = {k: (v.float() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    with pytest.raises(error, match=match):
        call(case, **overrides)


def test_bad_impl():
    case = make_case()
    with pytest.raises(ValueError, match="impl must be one of"):
        call(case, impl="cuda")


# ---------------------------------------------------------------------------------------------
# Triton kernels (under TRITON_INTERPRET=1 on CPU tensors when there is no GPU; kept tiny)
# ---------------------------------------------------------------------------------------------

TRITON_CASES = [
    pytest.param(dict(batch=2, channels=6, out_channels=4, size=(5, 7), weight_groups=2, offset_groups=3), id="v2-wg2-og3-nonsquare"),
    pytest.param(dict(batch=2, channels=5, out_channels=3, size=(3, 5), kernel=(3, 3), stride=(1, 1), padding=(1, 1),
                      dilation=(1, 1), weight_groups=1, offset_groups=1, with_mask=False, offset_scale=4.0), id="v1-odd-channels-far"),
    pytest.param(dict(batch=2, channels=34, out_channels=2, size=(3, 5), kernel=(2, 2), stride=(2, 1), padding=(1, 2),
                      dilation=(1, 2), weight_groups=1, offset_groups=1, with_bias=False), id="channels-beyond-one-block"),
]


@pytest.mark.parametrize("overrides", TRITON_CASES)
def test_triton_forward_and_gradients_match_reference(overrides, triton_device):
    case = make_case(dtype=torch.float32, **overrides)
    case = {k: (v.to(triton_device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    # Integer offsets put some samples exactly on the border and on pixel centres.
    case["offset"][:, ::3] = case["offset"][:, ::3].round()
    names = [k for k in ("x", "offset", "weight", "bias", "mask") if case[k] is not None]
    results = {}
    for impl in ("triton", "reference"):
        leaves = {k: case[k].clone().requires_grad_() for k in names}
        out = call(case, impl, **leaves)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out.device)
        results[impl] = (out, torch.autograd.grad(out, list(leaves.values()), grad_out))
    torch.testing.assert_close(results["triton"][0], results["reference"][0], rtol=1e-5, atol=1e-5)
    for name, got, want in zip(names, results["triton"][1], results["reference"][1]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


def test_triton_non_finite_offsets_and_batch_zero(triton_device):
    case = make_case(dtype=torch.float32, batch=1, channels=2, out_channels=2, weight_groups=1, offset_groups=1)
    case = {k: (v.to(triton_device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    case["offset"][0, 0, 0, 0] = float("nan")
    case["offset"][0, 3, 1, 1] = float("inf")
    offset = case["offset"].clone().requires_grad_()
    out = call(case, "triton", offset=offset)
    torch.testing.assert_close(out.cpu(), naive({k: (v.double().cpu() if isinstance(v, torch.Tensor) else v) for k, v in case.items()}).float(),
                               rtol=1e-5, atol=1e-5)
    (grad,) = torch.autograd.grad(out.sum(), offset)
    assert torch.isfinite(grad).all() and grad[0, 0, 0, 0] == 0
    empty = make_case(dtype=torch.float32, batch=0)
    empty = {k: (v.to(triton_device) if isinstance(v, torch.Tensor) else v) for k, v in empty.items()}
    assert call(empty, "triton").shape == (0, 6, 3, 3)


@settings(max_examples=10)
@given(
    batch=st.integers(1, 2), group_channels=st.integers(1, 3), weight_groups=st.integers(1, 2),
    offset_groups=st.integers(1, 2), out_per_group=st.integers(1, 3), height=st.integers(1, 6),
    width=st.integers(1, 6), kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)), padding=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 2)), with_mask=st.booleans(), with_bias=st.booleans(),
    offset_scale=st.sampled_from([0.0, 0.7, 4.0]), seed=st.integers(0, 2**16),
)
def test_triton_random_shapes_match_reference(
    batch, group_channels, weight_groups, offset_groups, out_per_group, height, width, kernel, stride, padding,
    dilation, with_mask, with_bias, offset_scale, seed, triton_device,
):
    channels = group_channels * weight_groups * offset_groups
    height = max(height, dilation[0] * (kernel[0] - 1) + 1 - 2 * padding[0])   # at least one output row
    width = max(width, dilation[1] * (kernel[1] - 1) + 1 - 2 * padding[1])     # and column
    case = make_case(batch, channels, out_per_group * weight_groups, (height, width), kernel, stride, padding, dilation,
                     weight_groups, offset_groups, with_mask, with_bias, offset_scale, dtype=torch.float32, seed=seed)
    names = [k for k in ("x", "offset", "weight", "bias", "mask") if case[k] is not None]
    results = {}
    for impl, device in (("triton", triton_device), ("reference", torch.device("cpu"))):
        leaves = {k: case[k].to(device).requires_grad_() for k in names}
        out = call(case, impl, **leaves)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(device)
        grads = torch.autograd.grad(out, list(leaves.values()), grad_out)
        results[impl] = [out.detach().cpu()] + [g.cpu() for g in grads]
    for name, got, want in zip(["out"] + names, results["triton"], results["reference"]):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision(dtype, triton_device):
    case = make_case(dtype=torch.float32, batch=1, channels=4, out_channels=3, weight_groups=1, offset_groups=2)
    case = {k: (v.to(triton_device) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    expected = call(case, "reference")
    low = {k: (v.to(dtype) if isinstance(v, torch.Tensor) else v) for k, v in case.items()}
    leaves = {k: low[k].clone().requires_grad_() for k in ("x", "offset", "weight", "bias", "mask")}
    out = call(low, "triton", **leaves)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, rtol=5e-2, atol=1e-1)
    out.float().sum().backward()
    assert all(leaf.grad.dtype == dtype and torch.isfinite(leaf.grad).all() for leaf in leaves.values())


def test_autocast_samples_in_the_widest_dtype_and_returns_input_dtype():
    x = torch.randn(2, 4, 7, 6)
    offset = torch.randn(2, 18, 7, 6) * 2
    weight = torch.randn(5, 4, 3, 3)
    mask = torch.rand(2, 9, 7, 6)
    expected = deform_conv2d(x.bfloat16().float(), offset, weight, padding=1, mask=mask)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = deform_conv2d(x.bfloat16(), offset, weight, padding=1, mask=mask)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=2e-2)
    with pytest.raises(TypeError, match="weight must have the dtype of input"):
        deform_conv2d(x.bfloat16(), offset.bfloat16(), weight, padding=1)
