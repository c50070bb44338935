"""dwconv2d: native CPU path and custom op against the reference and a naive loop."""
import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from convzoo.ops import dwconv2d
from convzoo.ops.dwconv import cpu, dwconv2d_reference
from convzoo.ops.dwconv.reference import same_padding
from _export_check import exported_call_targets


def naive_dwconv2d(x, weight, bias, stride, padding, dilation):
    """From the definition: out[n, o, p, q] = b[o] + sum_ij w[o, i, j] * xpad[n, o // m, p*sh + i*dh, q*sw + j*dw]."""
    n, channels, height, width = x.shape
    c_out, _, kh, kw = weight.shape
    top, bottom, left, right = padding
    xpad = torch.zeros(n, channels, height + top + bottom, width + left + right, dtype=x.dtype)
    xpad[:, :, top:top + height, left:left + width] = x
    out_h = (xpad.shape[2] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    out_w = (xpad.shape[3] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    out = torch.zeros(n, c_out, out_h, out_w, dtype=x.dtype)
    for b, o, p, q in itertools.product(range(n), range(c_out), range(out_h), range(out_w)):
        total = 0.0 if bias is None else bias[o].item()
        for i, j in itertools.product(range(kh), range(kw)):
            total += weight[o, 0, i, j].item() * xpad[b, o // (c_out // channels), p * stride[0] + i * dilation[0],
                                                      q * stride[1] + j * dilation[1]].item()
        out[b, o, p, q] = total
    return out


def _grads(out, inputs, seed=1):
    grad_out = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(seed))
    return torch.autograd.grad(out, [t for t in inputs if t is not None], grad_out)


def _leaf(shape, dtype=torch.float64, memory_format=torch.contiguous_format):
    return torch.randn(shape, dtype=dtype).contiguous(memory_format=memory_format).requires_grad_()


def _check_against_reference(x, weight, bias, stride, padding, dilation, padding4, atol=1e-10, rtol=1e-10):
    out = dwconv2d(x, weight, bias, stride, padding, dilation)
    expected = dwconv2d_reference(x, weight, bias, stride if isinstance(stride, tuple) else (stride, stride),
                                  padding4, dilation if isinstance(dilation, tuple) else (dilation, dilation))
    torch.testing.assert_close(out, expected, atol=atol, rtol=rtol)
    for got, want in zip(_grads(out, (x, weight, bias)), _grads(expected, (x, weight, bias))):
        torch.testing.assert_close(got, want, atol=atol, rtol=rtol)


@pytest.mark.parametrize("stride,padding,dilation,multiplier,kernel", [
    pytest.param((1, 1), (1, 1, 1, 1), (1, 1), 1, (3, 3), id="3x3"),
    pytest.param((2, 1), (0, 2, 1, 0), (1, 2), 2, (2, 3), id="stride-dilation-asym-m2"),
    pytest.param((1, 2), (2, 2, 3, 3), (2, 1), 1, (3, 4), id="rect"),
    pytest.param((1, 1), (5, 5, 4, 4), (1, 1), 1, (11, 10), id="fft-weight-grad"),
])
def test_matches_naive_loop(stride, padding, dilation, multiplier, kernel):
    x = _leaf((2, 3, 7, 6))
    weight = _leaf((3 * multiplier, 1) + kernel)
    bias = _leaf((3 * multiplier,))
    expected = naive_dwconv2d(x.detach(), weight.detach(), bias.detach(), stride, padding, dilation)
    reference = dwconv2d_reference(x, weight, bias, stride, padding, dilation)
    torch.testing.assert_close(reference, expected)
    if padding[0] == padding[1] and padding[2] == padding[3]:
        out = dwconv2d(x, weight, bias, stride, (padding[0], padding[2]), dilation)
        torch.testing.assert_close(out, expected)
        for got, want in zip(_grads(out, (x, weight, bias)), _grads(reference, (x, weight, bias))):
            torch.testing.assert_close(got, want)


@given(
    n=st.integers(1, 2), channels=st.integers(1, 4), multiplier=st.integers(1, 2),
    height=st.integers(1, 12), width=st.integers(1, 12), kh=st.integers(1, 13), kw=st.integers(1, 13),
    sh=st.integers(1, 3), sw=st.integers(1, 3), dh=st.integers(1, 2), dw=st.integers(1, 2),
    pad=st.one_of(st.sampled_from(["same", "valid"]), st.tuples(st.integers(0, 7), st.integers(0, 7))),
    with_bias=st.booleans(), channels_last=st.booleans(),
)
def test_random_shapes_match_reference(n, channels, multiplier, height, width, kh, kw, sh, sw, dh, dw, pad,
                                       with_bias, channels_last):
    if isinstance(pad, tuple):
        padding4 = (pad[0], pad[0], pad[1], pad[1])
    elif pad == "same":
        padding4 = same_padding(height, kh, sh, dh) + same_padding(width, kw, sw, dw)
    else:
        padding4 = (0, 0, 0, 0)
    fits = all(size + before + after >= d * (k - 1) + 1 for size, before, after, d, k in
               ((height, padding4[0], padding4[1], dh, kh), (width, padding4[2], padding4[3], dw, kw)))
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    x = _leaf((n, channels, height, width), memory_format=memory_format)
    weight = _leaf((channels * multiplier, 1, kh, kw))
    bias = _leaf((channels * multiplier,)) if with_bias else None
    if not fits:
        with pytest.raises(ValueError, match="smaller than the dilated kernel"):
            dwconv2d(x, weight, bias, (sh, sw), pad, (dh, dw))
        return
    _check_against_reference(x, weight, bias, (sh, sw), pad, (dh, dw), padding4)


@pytest.mark.parametrize("kernel,padding,stride", [
    pytest.param((5, 5), 2, 1, id="5x5"),
    pytest.param((11, 12), "same", 2, id="rect-same-stride2"),
    pytest.param((15, 15), 7, 1, id="15x15-fft-grad-weight"),
])
def test_gradcheck(kernel, padding, stride):
    x = _leaf((1, 2, 8, 7))
    weight = _leaf((4, 1) + kernel)
    bias = _leaf((4,))
    assert torch.autograd.gradcheck(lambda *a: dwconv2d(*a, stride=stride, padding=padding), (x, weight, bias),
                                    fast_mode=True)


def test_fft_grad_weight_chosen_for_large_kernels_only():
    x = torch.randn(1, 2, 8, 7, dtype=torch.float64)
    grad_15 = torch.randn(1, 4, 8, 7, dtype=torch.float64)
    assert cpu.use_fft_grad_weight(x, grad_15, (4, 1, 15, 15), (1, 1), (7, 7, 7, 7))
    assert not cpu.use_fft_grad_weight(x, grad_15, (4, 1, 3, 3), (1, 1), (1, 1, 1, 1))
    big = torch.randn(8, 128, 56, 56)
    assert cpu.use_fft_grad_weight(big, big, (128, 1, 31, 31), (1, 1), (15,) * 4)
    assert not cpu.use_fft_grad_weight(big, big, (128, 1, 7, 7), (1, 1), (3,) * 4)


@pytest.mark.parametrize("stride,dilation,padding", [
    ((1, 1), (1, 1), (15, 15, 15, 15)), ((2, 3), (1, 1), (3, 7, 0, 9)), ((1, 1), (2, 3), (1, 0, 4, 2)),
])
def test_fft_grad_weight_matches_autograd(stride, dilation, padding):
    x = _leaf((3, 2, 17, 13))
    weight = _leaf((4, 1, 9, 7))
    out = dwconv2d_reference(x, weight, None, stride, padding, dilation)
    grad_out = torch.randn_like(out)
    (expected,) = torch.autograd.grad(out, weight, grad_out)
    got = cpu.grad_weight_fft(grad_out, x.detach(), weight.shape, stride, padding, dilation)
    torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("stride,dilation,padding,multiplier,kernel", [
    ((1, 1), (1, 1), (15, 15, 15, 15), 1, (31, 31)),
    ((2, 3), (1, 1), (3, 7, 0, 9), 2, (9, 7)),
    ((1, 1), (2, 3), (1, 0, 4, 2), 3, (4, 5)),
    ((3, 2), (2, 1), (0, 6, 5, 0), 1, (6, 8)),
])
def test_fft_forward_and_grad_input_match_the_naive_loop_and_autograd(stride, dilation, padding, multiplier, kernel):
    x = _leaf((2, 3, 17, 13))
    weight = _leaf((3 * multiplier, 1) + kernel)
    bias = torch.randn(3 * multiplier, dtype=torch.float64)
    expected = dwconv2d_reference(x, weight, bias, stride, padding, dilation)
    got = cpu.forward_fft(x.detach(), weight.detach(), bias, stride, padding, dilation)
    torch.testing.assert_close(got, expected.detach())
    if kernel == (9, 7):
        torch.testing.assert_close(got, naive_dwconv2d(x.detach(), weight.detach(), bias, stride, padding, dilation))
    grad_out = torch.randn_like(expected)
    (want,) = torch.autograd.grad(expected, x, grad_out)
    torch.testing.assert_close(cpu.grad_input_fft(grad_out, x.shape, weight.detach(), stride, padding, dilation), want)


@pytest.fixture
def cpu_capability(monkeypatch):
    """Pretend to run on a CPU with the given instruction set (the cached choices are cleared)."""
    def pretend(capability):
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        cpu._read_cpu_capability.cache_clear()
    yield pretend
    cpu._read_cpu_capability.cache_clear()


def test_fft_paths_with_a_kernel_wider_than_the_transform():
    """3 columns padded by 4 on each side: the FFT is 8 wide and the 9-wide kernel wraps onto itself
    (the taps that share a place only ever read padding, so the result is still exact)."""
    x = _leaf((2, 3, 5, 3))
    weight = _leaf((3, 1, 2, 9))
    padding = (1, 0, 4, 4)
    assert cpu._fft_sizes(x.shape, (0, 0, 5, 3), (1, 1), padding)[1] < 9
    expected = dwconv2d_reference(x, weight, None, (1, 1), padding, (1, 1))
    torch.testing.assert_close(cpu.forward_fft(x.detach(), weight.detach(), None, (1, 1), padding, (1, 1)),
                               expected.detach())
    grad_out = torch.randn_like(expected)
    (want,) = torch.autograd.grad(expected, x, grad_out)
    torch.testing.assert_close(cpu.grad_input_fft(grad_out, x.shape, weight.detach(), (1, 1), padding, (1, 1)), want)


def test_fft_conv_chosen_for_large_kernels_on_cpus_without_avx512(cpu_capability):
    big = torch.randn(8, 128, 56, 56)
    small = torch.randn(8, 512, 14, 14)
    cpu_capability("AVX2")
    assert cpu.use_fft_conv(big, (128, 1, 31, 31), (56, 56), (1, 1), (15,) * 4)
    assert not cpu.use_fft_conv(big, (128, 1, 13, 13), (56, 56), (1, 1), (6,) * 4)
    assert not cpu.use_fft_conv(small, (512, 1, 27, 27), (14, 14), (1, 1), (13,) * 4)   # small FFTs lose
    assert not cpu.use_fft_conv(big.double(), (128, 1, 31, 31), (56, 56), (1, 1), (15,) * 4)
    assert not cpu.use_fft_conv(big[:0], (128, 1, 31, 31), (56, 56), (1, 1), (15,) * 4)
    cpu_capability("AVX512")
    assert not cpu.use_fft_conv(big, (128, 1, 31, 31), (56, 56), (1, 1), (15,) * 4)   # brdgmm_dw is faster


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_dwconv2d_through_the_fft_path(cpu_capability, memory_format):
    cpu_capability("AVX2")
    x = _leaf((2, 3, 32, 30), torch.float32, memory_format)
    weight = _leaf((3, 1, 31, 31), torch.float32)
    bias = _leaf((3,), torch.float32)
    assert cpu.use_fft_conv(x, weight.shape, (32, 30), (1, 1), (15,) * 4)
    out = dwconv2d(x, weight, bias, padding=15)
    assert out.is_contiguous(memory_format=memory_format)
    expected = dwconv2d_reference(x, weight, bias, (1, 1), (15,) * 4, (1, 1))
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    for got, want in zip(_grads(out, (x, weight, bias)), _grads(expected, (x, weight, bias))):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)
    with torch.no_grad():   # also without the custom op's dispatch (eager inference)
        torch.testing.assert_close(dwconv2d(x, weight, bias, padding=15), expected, atol=1e-4, rtol=1e-4)


def test_fft_path_in_bfloat16_computes_in_float32(cpu_capability):
    cpu_capability("AVX2")
    x = torch.randn(2, 3, 32, 30).bfloat16().requires_grad_()
    weight = torch.randn(3, 1, 31, 31).div(31).bfloat16().requires_grad_()
    out = dwconv2d(x, weight, padding=15)
    assert out.dtype == torch.bfloat16
    expected = F.conv2d(x.detach().float(), weight.detach().float(), None, 1, 15, 1, 3)
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=2e-2)
    (grad_x, grad_w) = torch.autograd.grad(out.float().sum(), (x, weight))
    assert grad_x.dtype == grad_w.dtype == torch.bfloat16
    assert torch.isfinite(grad_x.float()).all() and torch.isfinite(grad_w.float()).all()


def test_63x63_kernel_float32_channels_last():
    x = _leaf((2, 3, 20, 19), torch.float32, torch.channels_last)
    weight = _leaf((3, 1, 63, 63), torch.float32)
    bias = _leaf((3,), torch.float32)
    out = dwconv2d(x, weight, bias, padding="same")
    assert out.shape == (2, 3, 20, 19) and out.is_contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x, weight, bias, padding="same", groups=3)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    for got, want in zip(_grads(out, (x, weight, bias)), _grads(expected, (x, weight, bias))):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-4)


@pytest.mark.parametrize("kernel,padding,padding4", [
    pytest.param((16, 14), "same", (7, 8, 6, 7), id="even-wide-same"),
    pytest.param((3, 15), (2, 20), (2, 2, 20, 20), id="padding-beyond-kernel"),
])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_wide_kernels_asymmetric_and_large_padding(kernel, padding, padding4, dtype):
    x = _leaf((2, 3, 9, 11), dtype)
    weight = _leaf((3, 1) + kernel, dtype)
    tolerance = 1e-10 if dtype == torch.float64 else 1e-4
    _check_against_reference(x, weight, None, (1, 1), padding, (1, 1), padding4, atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize("kernel", [(4, 4), (3, 6)])
def test_same_padding_matches_torch_at_stride_1(kernel):
    x = torch.randn(1, 2, 9, 8)
    weight = torch.randn(2, 1, *kernel)
    torch.testing.assert_close(dwconv2d(x, weight, padding="same", dilation=2),
                               F.conv2d(x, weight, padding="same", dilation=2, groups=2))


def test_same_padding_at_stride_2_gives_ceil_size():
    out = dwconv2d(torch.randn(1, 2, 9, 8), torch.randn(2, 1, 4, 5), stride=2, padding="same")
    assert out.shape == (1, 2, 5, 4)


@pytest.mark.parametrize("kernel", [5, 15], ids=["direct", "fft-grad-weight"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(dtype, kernel):
    pad = kernel // 2
    x = torch.randn(2, 3, 10, 9)
    weight = torch.randn(3, 1, kernel, kernel) / kernel
    bias = torch.randn(3)
    xh, wh, bh = (t.to(dtype).requires_grad_() for t in (x, weight, bias))
    out = dwconv2d(xh, wh, bh, padding=pad)
    assert out.dtype == dtype
    xf, wf, bf = (t.detach().float().requires_grad_() for t in (xh, wh, bh))
    expected = F.conv2d(xf, wf, bf, padding=pad, groups=3)
    torch.testing.assert_close(out.float(), expected, atol=5e-2, rtol=5e-2)
    grads = torch.autograd.grad(out, (xh, wh, bh), torch.ones_like(out))
    ref_grads = torch.autograd.grad(expected, (xf, wf, bf), torch.ones_like(expected))
    for got, want in zip(grads, ref_grads):
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), want, atol=0.1, rtol=5e-2)


def test_batch_zero():
    x = _leaf((0, 3, 8, 8), torch.float32)
    weight = _leaf((3, 1, 13, 13), torch.float32)
    bias = _leaf((3,), torch.float32)
    out = dwconv2d(x, weight, bias, padding=6)
    assert out.shape == (0, 3, 8, 8)
    grad_x, grad_w, grad_b = torch.autograd.grad(out.sum(), (x, weight, bias))
    assert grad_x.shape == x.shape
    assert torch.equal(grad_w, torch.zeros_like(weight)) and torch.equal(grad_b, torch.zeros_like(bias))


@pytest.mark.parametrize("kernel", [3, 13])
def test_channels_last_in_channels_last_out(kernel):
    x = _leaf((2, 5, 9, 11), torch.float32, torch.channels_last)
    weight = _leaf((5, 1, kernel, kernel), torch.float32)
    out = dwconv2d(x, weight, padding=kernel // 2)
    assert out.is_contiguous(memory_format=torch.channels_last)
    expected = F.conv2d(x.contiguous(), weight, padding=kernel // 2, groups=5)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    (grad_x,) = torch.autograd.grad(out, x, torch.randn_like(out))
    assert grad_x.is_contiguous(memory_format=torch.channels_last)


def test_nchw_in_nchw_out_and_non_contiguous_input():
    base = _leaf((2, 9, 12, 4), torch.float64)
    x = base.transpose(2, 3)[:, ::3]  # (2, 3, 4, 12), neither contiguous nor channels_last
    weight = _leaf((3, 1, 3, 5))
    out = dwconv2d(x, weight, padding=(1, 2))
    assert out.is_contiguous()
    expected = F.conv2d(x, weight, padding=(1, 2), groups=3)
    torch.testing.assert_close(out, expected)
    for got, want in zip(_grads(out, (base, weight)), _grads(expected, (base, weight))):
        torch.testing.assert_close(got, want)


def test_impl_reference_is_plain_autograd():
    x = _leaf((1, 2, 6, 6))
    weight = _leaf((2, 1, 3, 3))
    out = dwconv2d(x, weight, padding="same", impl="reference")
    assert "ConvolutionBackward" in type(out.grad_fn).__name__
    torch.testing.assert_close(out, dwconv2d(x, weight, padding="same"))


def test_flop_count_matches_aten_convolution():
    x = torch.randn(2, 4, 10, 9)
    weight = torch.randn(8, 1, 5, 3)
    with FlopCounterMode(display=False) as ours:
        dwconv2d(x, weight, stride=2, padding=1)
    with FlopCounterMode(display=False) as theirs:
        F.conv2d(x, weight, stride=2, padding=1, groups=4)
    assert ours.get_total_flops() == theirs.get_total_flops() > 0


def test_plain_cpu_inference_skips_the_op_dispatch_and_nothing_else(monkeypatch):
    from convzoo.ops import dwconv as dwconv_module

    calls = []
    run_forward = dwconv_module._run_forward
    monkeypatch.setattr(dwconv_module, "_run_forward", lambda *args: calls.append(1) or run_forward(*args))
    x = torch.randn(2, 4, 10, 9)
    weight = torch.nn.Parameter(torch.randn(4, 1, 5, 5))
    with torch.no_grad():
        fast = dwconv2d(x, weight, padding=2)
    assert calls == []                                  # eager no-grad CPU call: the kernel directly
    torch.testing.assert_close(fast, F.conv2d(x, weight, None, 1, 2, 1, 4))
    dwconv2d(x, weight, padding=2).sum().backward()     # autograd needs the op
    assert calls == [1] and weight.grad is not None
    with torch.no_grad(), FlopCounterMode(display=False) as counter:   # so do the modes
        dwconv2d(x, weight, padding=2)
    assert calls == [1, 1] and counter.get_total_flops() == 2 * x.numel() * 25
    with torch.no_grad():
        block = _Block().eval()
        assert "convzoo.dwconv2d.default" in exported_call_targets(block, x[:, :4])   # and torch.export


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(4, 1, 7, 7))
        self.bias = torch.nn.Parameter(torch.randn(4))

    def forward(self, x):
        return dwconv2d(x, self.weight, self.bias, padding="same").relu()


@pytest.mark.parametrize("size,kernel,stride,padding,dilation,cropped", [
    pytest.param((8, 8), (27, 27), 1, 13, 1, (15, 15), id="replknet-31b-stage3-at-128"),
    pytest.param((5, 9), (13, 7), 1, "same", 1, (9, 7), id="rect-height-only"),
    pytest.param((9, 6), (15, 15), 2, 7, 1, (15, 10), id="stride-2"),
    pytest.param((6, 6), (9, 9), 1, 8, 2, (5, 5), id="dilation-2"),
    pytest.param((7, 10), (10, 10), (2, 1), "same", 1, (10, 10), id="even-kernel-nothing-to-crop"),
    pytest.param((3, 3), (31, 31), 1, 15, 1, (5, 5), id="31x31-on-3x3"),
])
def test_inference_crops_taps_that_only_read_padding(size, kernel, stride, padding, dilation, cropped):
    """Eager CPU inference drops kernel taps that can only multiply padding: the output is the full
    kernel's, computed with the smaller kernel and adjusted padding."""
    from convzoo.ops.dwconv import _check_args, crop_to_reach

    torch.manual_seed(0)
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    w = torch.randn(3, 1, *kernel, dtype=torch.float64)
    stride2, padding4, dilation2 = _check_args(x, w, None, stride, padding, dilation)
    small, small_padding = crop_to_reach(x.shape, w, stride2, padding4, dilation2)
    assert tuple(small.shape[2:]) == cropped
    expected = dwconv2d_reference(x, w, None, stride2, padding4, dilation2)
    torch.testing.assert_close(dwconv2d_reference(x, small, None, stride2, small_padding, dilation2), expected)
    with torch.no_grad():
        torch.testing.assert_close(dwconv2d(x, w, None, stride, padding, dilation), expected)


@given(height=st.integers(1, 9), width=st.integers(1, 9), kh=st.integers(1, 17), kw=st.integers(1, 17),
       sh=st.integers(1, 3), sw=st.integers(1, 3), dh=st.integers(1, 3), dw=st.integers(1, 3),
       pads=st.tuples(*[st.integers(0, 12)] * 4))
def test_cropping_keeps_the_output_on_random_shapes(height, width, kh, kw, sh, sw, dh, dw, pads):
    from convzoo.ops.dwconv import crop_to_reach

    assume(height + pads[0] + pads[1] >= dh * (kh - 1) + 1 and width + pads[2] + pads[3] >= dw * (kw - 1) + 1)
    x = torch.randn(1, 2, height, width, dtype=torch.float64)
    w = torch.randn(2, 1, kh, kw, dtype=torch.float64)
    small, small_padding = crop_to_reach(x.shape, w, (sh, sw), pads, (dh, dw))
    assert min(small_padding) >= 0 and small.shape[2] <= kh and small.shape[3] <= kw
    torch.testing.assert_close(dwconv2d_reference(x, small, None, (sh, sw), small_padding, (dh, dw)),
                               dwconv2d_reference(x, w, None, (sh, sw), pads, (dh, dw)))

class _LargeKernel(torch.nn.Module):
    """A 27x27 depthwise conv, RepLKNet-31B's stage-3 kernel (on 8x8 maps at 128x128 only the
    central 15x15 taps read the input)."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(3, 1, 27, 27))
        self.bias = torch.nn.Parameter(torch.randn(3))

    def forward(self, x):
        return dwconv2d(x, self.weight, self.bias, padding=13)


def _conv_weight_shapes(module, x):
    """The kernel shapes of the depthwise convs in ``module``'s torch.compile graph: of its
    ``convzoo::dwconv2d`` nodes and of its plain ``conv2d`` nodes (traced inference)."""
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    torch._dynamo.reset()
    out = torch.compile(module, backend=record, fullgraph=True, dynamic=False)(x)
    shapes = [(_node_kind(node), tuple(node.args[1].meta["example_value"].shape[2:])) for g in graphs
              for node in g.graph.nodes if _node_kind(node)]
    return out, shapes


def _node_kind(node):
    """"op" for a ``convzoo::dwconv2d`` node, "conv" for a plain conv2d, None otherwise."""
    if node.op != "call_function":
        return None
    if "dwconv2d" in str(node.target):
        return "op"
    return "conv" if node.target in (torch.conv2d, F.conv2d) else None


def test_compiled_inference_graph_holds_the_cropped_kernel_and_training_the_full_one():
    """Under torch.compile with a static map size, inference (no gradient) traces the plain conv
    with the cropped kernel, as eager inference runs it; with gradients the custom op gets the
    full kernel (its gradient is needed). torch.export programs and FLOP counting keep the full
    kernel."""
    torch.manual_seed(0)
    module = _LargeKernel()
    x = torch.randn(1, 3, 8, 8)
    expected = dwconv2d_reference(x, module.weight, module.bias, (1, 1), (13, 13, 13, 13), (1, 1))
    with torch.no_grad():
        out, shapes = _conv_weight_shapes(module, x)
    assert shapes == [("conv", (15, 15))]
    torch.testing.assert_close(out, expected)
    out, shapes = _conv_weight_shapes(module, x)
    assert shapes == [("op", (27, 27))]
    torch.testing.assert_close(out, expected)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        module(x)
    assert counter.get_total_flops() == 2 * 3 * 8 * 8 * 27 * 27
    with torch.no_grad():
        program = torch.export.export(module, (x,))
    assert [tuple(n.args[1].meta["val"].shape[2:]) for n in program.graph.nodes if "dwconv2d" in str(n.target)] == [(27, 27)]


@pytest.mark.parametrize("capability,size,kernel,path", [
    (None, 16, 7, "direct"), ("AVX2", 32, 31, "fft"), ("AVX512", 32, 31, "direct")])
def test_compiled_inference_traces_the_native_path_without_graph_break(cpu_capability, capability, size, kernel,
                                                                        path):
    """Inference under torch.compile runs the native path inside the graph (one graph, no break
    at the depthwise conv, whose CPU-capability query is a constant there): plain conv2d nodes
    that inductor's freezing pre-packs and fuses, or the FFT's ops, instead of the custom op.
    ``capability`` None: this CPU's own query (a torch function dynamo cannot trace)."""
    if capability is not None:
        cpu_capability(capability)
    torch.manual_seed(0)
    weight, bias = torch.randn(3, 1, kernel, kernel), torch.randn(3)
    x = torch.randn(2, 3, size, size)
    graphs = []

    def record(graph_module, example_inputs):
        graphs.append(graph_module)
        return graph_module.forward

    def block(x):
        return dwconv2d(x, weight, bias, padding="same").relu() + x

    torch._dynamo.reset()
    with torch.no_grad():
        out = torch.compile(block, backend=record, fullgraph=True, dynamic=False)(x)
    torch._dynamo.reset()
    expected = (dwconv2d_reference(x, weight, bias, (1, 1), (kernel // 2,) * 4, (1, 1)).relu() + x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    assert len(graphs) == 1
    targets = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert not any("dwconv2d" in t or "capability" in t for t in targets), targets
    assert any("rfft2" in t for t in targets) == (path == "fft"), targets
    assert any(_node_kind(node) == "conv" for node in graphs[0].graph.nodes) == (path == "direct"), targets


def test_torch_compile_fullgraph():
    block = _Block()
    x = torch.randn(2, 4, 9, 8, requires_grad=True)
    compiled = torch.compile(block, fullgraph=True)
    out = compiled(x)
    torch.testing.assert_close(out, block(x))
    out.sum().backward()
    grad_compiled = block.weight.grad.clone()
    block.weight.grad = None
    block(x).sum().backward()
    torch.testing.assert_close(grad_compiled, block.weight.grad)


def test_torch_export_captures_one_node():
    block = _Block()
    x = torch.randn(2, 4, 9, 8)
    assert "convzoo.dwconv2d.default" in exported_call_targets(block, x)


@pytest.mark.parametrize("call,error,match", [
    (lambda x, w: dwconv2d(x.numpy(), w), TypeError, "x must be a torch.Tensor"),
    (lambda x, w: dwconv2d(x[0], w), ValueError, "x must be a 4-D tensor"),
    (lambda x, w: dwconv2d(x.int(), w), TypeError, "x must have dtype"),
    (lambda x, w: dwconv2d(x, w.double()), TypeError, "weight must have the dtype of x"),
    (lambda x, w: dwconv2d(x, w[:, :, 0]), ValueError, "weight must be a 4-D tensor"),
    (lambda x, w: dwconv2d(x, w.repeat(1, 2, 1, 1)), ValueError, r"weight must have shape \(C\*m, 1, kh, kw\)"),
    (lambda x, w: dwconv2d(x, w[:2]), ValueError, r"weight must have shape .* C=3"),
    (lambda x, w: dwconv2d(x, w, torch.zeros(4)), ValueError, r"bias must have shape \(3,\)"),
    (lambda x, w: dwconv2d(x, w, torch.zeros(3, 1)), ValueError, "bias must be a 1-D tensor"),
    (lambda x, w: dwconv2d(x, w, torch.zeros(3, dtype=torch.float64)), TypeError, "bias must have the dtype of x"),
    (lambda x, w: dwconv2d(x, w, stride=0), ValueError, "stride must be >= 1"),
    (lambda x, w: dwconv2d(x, w, stride=(1, 2, 3)), TypeError, "stride must be an int or a pair"),
    (lambda x, w: dwconv2d(x, w, dilation=0), ValueError, "dilation must be >= 1"),
    (lambda x, w: dwconv2d(x, w, padding=-1), ValueError, "padding must be >= 0"),
    (lambda x, w: dwconv2d(x, w, padding="full"), ValueError, "padding must be an int, a pair of ints, 'same'"),
    (lambda x, w: dwconv2d(x, w, padding=1.5), TypeError, "padding must be an int or a pair"),
    (lambda x, w: dwconv2d(x[:, :, :2], w), ValueError, "smaller than the dilated kernel"),
    (lambda x, w: dwconv2d(x, w, impl="cuda"), ValueError, "impl must be one of"),
])
def test_bad_input_errors(call, error, match):
    x = torch.randn(2, 3, 8, 8)
    weight = torch.randn(3, 1, 3, 3)
    with pytest.raises(error, match=match):
        call(x, weight)


def test_jit_dw_width_limit_follows_the_instruction_set(cpu_capability):
    cpu_capability("AVX512")
    assert cpu.jit_dw_max_kernel_width() == 13
    cpu_capability("AVX2")
    assert cpu.jit_dw_max_kernel_width() == 9


def test_conv_layout_choice():
    nchw = torch.randn(1, 4, 8, 8)
    nhwc = nchw.contiguous(memory_format=torch.channels_last)
    assert cpu.conv_memory_format(nchw, (31, 31)) == torch.channels_last      # NCHW would be a gemm path
    widest = cpu.jit_dw_max_kernel_width()
    assert widest in (9, 13)
    assert cpu.conv_memory_format(nchw, (31, widest)) == torch.contiguous_format  # oneDNN jit_dw takes it
    assert cpu.conv_memory_format(nchw, (3, widest + 1)) == torch.channels_last
    assert cpu.conv_memory_format(nhwc, (13, 13)) == torch.channels_last
    assert cpu.conv_memory_format(nchw, (3, 3)) == torch.contiguous_format    # no conversion for small kernels
    assert cpu.conv_memory_format(nhwc, (3, 3)) == torch.channels_last
    assert cpu.conv_memory_format(nchw.double(), (31, 31)) == torch.contiguous_format


def test_autocast_casts_like_conv2d():
    x = torch.randn(2, 6, 9, 8)
    weight = torch.randn(6, 1, 5, 5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = dwconv2d(x.bfloat16(), weight, padding=2)
        expected = F.conv2d(x.bfloat16(), weight, padding=2, groups=6)
    assert out.dtype == expected.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, atol=5e-2, rtol=2e-2)
