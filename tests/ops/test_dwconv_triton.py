"""dwconv2d Triton kernels (run under TRITON_INTERPRET=1 on CPU) against the reference."""
import pytest
import torch

from convzoo.ops import dwconv2d
from convzoo.ops.dwconv import dwconv2d_reference
from convzoo.ops.dwconv.reference import same_padding

CASES = [
    # (n, channels, multiplier, height, width, kernel, stride, padding, dilation)
    pytest.param(2, 3, 1, 7, 5, (5, 3), (1, 1), "same", (1, 1), id="rect-same"),
    pytest.param(2, 3, 1, 8, 7, (4, 4), (1, 1), "same", (1, 1), id="even-kernel-asym-pad"),
    pytest.param(2, 3, 1, 9, 6, (5, 5), (2, 2), "same", (1, 1), id="stride2-same"),
    pytest.param(1, 3, 2, 7, 8, (3, 2), (2, 1), (1, 2), (2, 1), id="mult2-stride-dilation"),
    pytest.param(2, 1, 1, 6, 5, (7, 7), (1, 1), (3, 3), (1, 1), id="kernel-larger-than-input"),
]


def _padding4(height, width, kernel, stride, padding, dilation):
    if padding == "same":
        return same_padding(height, kernel[0], stride[0], dilation[0]) + same_padding(width, kernel[1], stride[1],
                                                                                        dilation[1])
    return padding[0], padding[0], padding[1], padding[1]


def _run_both(n, channels, multiplier, height, width, kernel, stride, padding, dilation, memory_format, dtype):
    x = torch.randn(n, channels, height, width).contiguous(memory_format=memory_format)
    weight = torch.randn(channels * multiplier, 1, *kernel) / kernel[0]
    bias = torch.randn(channels * multiplier)
    ours = [t.to(dtype).requires_grad_() for t in (x, weight, bias)]
    ref = [t.to(dtype).detach().float().requires_grad_() for t in (x, weight, bias)]
    out = dwconv2d(*ours, stride=stride, padding=padding, dilation=dilation, impl="triton")
    expected = dwconv2d_reference(*ref, stride, _padding4(height, width, kernel, stride, padding, dilation), dilation)
    grad_out = torch.randn(expected.shape)
    grads = torch.autograd.grad(out, ours, grad_out.to(dtype))
    ref_grads = torch.autograd.grad(expected, ref, grad_out)
    return out, expected, grads, ref_grads, ours[0]


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "nhwc"])
@pytest.mark.parametrize("n,channels,multiplier,height,width,kernel,stride,padding,dilation", CASES)
def test_triton_matches_reference(n, channels, multiplier, height, width, kernel, stride, padding, dilation,
                                  memory_format):
    out, expected, grads, ref_grads, x = _run_both(n, channels, multiplier, height, width, kernel, stride, padding,
                                                   dilation, memory_format, torch.float32)
    assert out.is_contiguous(memory_format=memory_format)
    assert grads[0].is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(("x", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5, msg=lambda m: f"grad {name}: {m}")


def test_triton_float16_accumulates_in_float32():
    out, expected, grads, ref_grads, _ = _run_both(2, 3, 1, 7, 6, (5, 5), (1, 1), "same", (1, 1),
                                                   torch.channels_last, torch.float16)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=1e-2)


def test_triton_non_contiguous_input_and_batch_zero():
    base = torch.randn(2, 6, 5, 7)
    x = base.transpose(2, 3)[:, ::2].requires_grad_()  # (2, 3, 7, 5) strided view
    weight = torch.randn(3, 1, 3, 5, requires_grad=True)
    out = dwconv2d(x, weight, padding="same", impl="triton")
    expected = dwconv2d_reference(x, weight, None, (1, 1), (1, 1, 2, 2), (1, 1))
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(out)
    for got, want in zip(torch.autograd.grad(out, (x, weight), grad_out),
                         torch.autograd.grad(expected, (x, weight), grad_out)):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5)

    empty = torch.randn(0, 3, 7, 5, requires_grad=True)
    out = dwconv2d(empty, weight, padding="same", impl="triton")
    assert out.shape == (0, 3, 7, 5)
    grad_x, grad_w = torch.autograd.grad(out.sum(), (empty, weight))
    assert grad_x.shape == empty.shape and torch.equal(grad_w, torch.zeros_like(weight))
