"""Deformable convolution v1/v2 with ``torchvision.ops.deform_conv2d`` semantics.

See :mod:`convzoo.ops.deform_conv.reference` for the exact definition. The public function
validates its arguments, then runs one of:

* ``impl="reference"``: the autograd-differentiable plain PyTorch reference (traceable by
  ``torch.jit.trace`` and ``torch.onnx.export``);
* otherwise the custom op ``convzoo::deform_conv2d`` (one node for ``torch.compile`` and
  ``torch.export``, with a registered fake kernel, autograd and FLOP formula), whose kernel is the
  chunked CPU implementation of ``reference.py`` or, on CUDA (or with ``impl="triton"``), the
  Triton kernels of ``triton.py``.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch.utils.flop_counter import register_flop_formula

from .._checks import autocast_to_widest, check_impl, check_same, check_tensor, pair, script_unsupported, use_triton
from . import reference
from .reference import Conv

__all__ = ["deform_conv2d"]

_OP_NAME = "deform_conv2d"


def _run_triton(name: str, *args):
    from . import triton as triton_kernels

    return getattr(triton_kernels, name)(*args)


@torch.library.custom_op("convzoo::deform_conv2d", mutates_args=())
def _deform_conv2d_op(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    triton: bool,
) -> torch.Tensor:
    conv = Conv(stride_h=stride_h, stride_w=stride_w, pad_h=pad_h, pad_w=pad_w, dilation_h=dilation_h,
                dilation_w=dilation_w)
    if triton:
        return _run_triton("deform_conv2d_forward", x, offset, weight, bias, mask, conv)
    return reference.deform_conv2d_forward(x, offset, weight, bias, mask, conv)


@_deform_conv2d_op.register_fake
def _(x, offset, weight, bias, mask, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, triton):
    return x.new_empty((x.shape[0], weight.shape[0], offset.shape[2], offset.shape[3]))


@torch.library.custom_op("convzoo::deform_conv2d_backward", mutates_args=())
def _deform_conv2d_backward_op(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    mask: Optional[torch.Tensor],
    stride_h: int,
    stride_w: int,
    pad_h: int,
    pad_w: int,
    dilation_h: int,
    dilation_w: int,
    triton: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (grad_x, grad_offset, grad_mask, grad_weight, grad_bias); grad_mask is empty without a mask."""
    conv = Conv(stride_h=stride_h, stride_w=stride_w, pad_h=pad_h, pad_w=pad_w, dilation_h=dilation_h,
                dilation_w=dilation_w)
    if triton:
        grads = _run_triton("deform_conv2d_backward", grad_out.contiguous(), x, offset, weight, mask, conv)
    else:
        grads = reference.deform_conv2d_backward(grad_out, x, offset, weight, mask, conv)
    grad_x, grad_offset, grad_mask, grad_weight, grad_bias = grads
    if grad_mask is None:
        grad_mask = x.new_empty((0,))
    return grad_x, grad_offset, grad_mask, grad_weight, grad_bias


@_deform_conv2d_backward_op.register_fake
def _(grad_out, x, offset, weight, mask, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, triton):
    grad_mask = torch.empty_like(mask, memory_format=torch.contiguous_format) if mask is not None else x.new_empty((0,))
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(offset, memory_format=torch.contiguous_format),
        grad_mask,
        torch.empty_like(weight, memory_format=torch.contiguous_format),
        weight.new_empty((weight.shape[0],)),
    )


def _setup_context(ctx, inputs, output):
    x, offset, weight, bias, mask, *options = inputs
    ctx.save_for_backward(x, offset, weight, mask)
    ctx.options = options  # the conv arguments and the Triton flag, as the op takes them
    ctx.has_bias = bias is not None


def _backward(ctx, grad_out):
    x, offset, weight, mask = ctx.saved_tensors
    grad_x, grad_offset, grad_mask, grad_weight, grad_bias = _deform_conv2d_backward_op(
        grad_out, x, offset, weight, mask, *ctx.options
    )
    return (
        grad_x,
        grad_offset,
        grad_weight,
        grad_bias if ctx.has_bias else None,
        grad_mask if mask is not None else None,
    ) + (None,) * len(ctx.options)


_deform_conv2d_op.register_autograd(_backward, setup_context=_setup_context)


def _conv_flops(x_shape, weight_shape, offset_shape) -> int:
    """2 * multiply-accumulates of the contraction, as FlopCounterMode counts aten.convolution."""
    batch = x_shape[0]
    out_channels, group_channels, kernel_h, kernel_w = weight_shape
    return 2 * batch * out_channels * offset_shape[2] * offset_shape[3] * group_channels * kernel_h * kernel_w


@register_flop_formula(torch.ops.convzoo.deform_conv2d)
def _deform_conv2d_flops(x_shape, offset_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    return _conv_flops(x_shape, weight_shape, offset_shape)


@register_flop_formula(torch.ops.convzoo.deform_conv2d_backward)
def _deform_conv2d_backward_flops(grad_out_shape, x_shape, offset_shape, weight_shape, *args, out_shape=None, **kwargs) -> int:
    # Input-side and weight-side contractions, each as large as the forward one.
    return 2 * _conv_flops(x_shape, weight_shape, offset_shape)


def _validate(x, offset, weight, bias, stride, padding, dilation, mask) -> Conv:
    """Check every argument; return the conv arguments by name."""
    check_tensor("input", x, ndim=4)
    check_tensor("offset", offset, ndim=4)
    check_tensor("weight", weight, ndim=4)
    check_same("offset", offset, "input", x)
    check_same("weight", weight, "input", x)
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same("bias", bias, "input", x)
    if mask is not None:
        check_tensor("mask", mask, ndim=4)
        check_same("mask", mask, "input", x)
    stride_h, stride_w = pair("stride", stride, minimum=1)
    pad_h, pad_w = pair("padding", padding, minimum=0)
    dilation_h, dilation_w = pair("dilation", dilation, minimum=1)
    conv = Conv(stride_h=stride_h, stride_w=stride_w, pad_h=pad_h, pad_w=pad_w, dilation_h=dilation_h,
                dilation_w=dilation_w)

    n, channels, in_h, in_w = x.shape
    out_channels, group_channels, kernel_h, kernel_w = weight.shape
    if out_channels == 0 or group_channels == 0 or kernel_h == 0 or kernel_w == 0:
        raise ValueError(f"weight must have non-zero sizes (out_channels, in_channels/groups, kh, kw), got {tuple(weight.shape)}")
    if channels % group_channels != 0:
        raise ValueError(
            f"input channels ({channels}) must be divisible by weight.shape[1] ({group_channels}), "
            f"which gives the number of weight groups"
        )
    weight_groups = channels // group_channels
    if out_channels % weight_groups != 0:
        raise ValueError(
            f"weight.shape[0] ({out_channels}) must be divisible by the number of weight groups "
            f"({weight_groups} = input channels {channels} / weight.shape[1] {group_channels})"
        )
    kernel_size = kernel_h * kernel_w
    offset_channels = offset.shape[1]
    if offset_channels == 0 or offset_channels % (2 * kernel_size) != 0:
        raise ValueError(
            f"offset.shape[1] must be a positive multiple of 2 * kernel_h * kernel_w = {2 * kernel_size} "
            f"(2 * offset_groups * kh * kw), got {offset_channels}"
        )
    offset_groups = offset_channels // (2 * kernel_size)
    if channels % offset_groups != 0:
        raise ValueError(
            f"input channels ({channels}) must be divisible by the number of offset groups "
            f"({offset_groups} = offset.shape[1] {offset_channels} / (2 * {kernel_h} * {kernel_w}))"
        )
    out_h, out_w = reference.output_size(in_h, in_w, kernel_h, kernel_w, conv)
    if out_h <= 0 or out_w <= 0:
        raise ValueError(
            f"input of spatial size {(in_h, in_w)} is too small for kernel {(kernel_h, kernel_w)} with "
            f"stride {(stride_h, stride_w)}, padding {(pad_h, pad_w)}, dilation {(dilation_h, dilation_w)}: "
            f"output size would be {(out_h, out_w)}"
        )
    expected_offset = (n, offset_channels, out_h, out_w)
    if tuple(offset.shape) != expected_offset:
        raise ValueError(
            f"offset must have shape (batch, 2*offset_groups*kh*kw, out_h, out_w) = {expected_offset}, "
            f"got {tuple(offset.shape)}"
        )
    if mask is not None:
        expected_mask = (n, offset_groups * kernel_size, out_h, out_w)
        if tuple(mask.shape) != expected_mask:
            raise ValueError(
                f"mask must have shape (batch, offset_groups*kh*kw, out_h, out_w) = {expected_mask}, "
                f"got {tuple(mask.shape)}"
            )
    if bias is not None and tuple(bias.shape) != (out_channels,):
        raise ValueError(f"bias must have shape ({out_channels},), got {tuple(bias.shape)}")
    return conv


@script_unsupported
def deform_conv2d(
    input: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    stride=1,
    padding=0,
    dilation=1,
    mask: Optional[torch.Tensor] = None,
    *,
    impl: str = "auto",
) -> torch.Tensor:
    """Deformable convolution v1 (Dai et al., 2017) and, with ``mask``, v2 (Zhu et al., 2019).

    Same semantics as ``torchvision.ops.deform_conv2d``: the number of weight groups is
    ``C // weight.shape[1]`` and the number of offset groups ``offset.shape[1] // (2 * kh * kw)``;
    offsets hold ``(dy, dx)`` per kernel position (row-major) and per offset group; samples are
    bilinear and read zero outside the input; a non-finite offset makes its sample zero.

    The arguments are named as torchvision's, so ``deform_conv2d(input=x, offset=o, weight=w,
    mask=m)`` works as it does there.

    Not scriptable by ``torch.jit.script``: ``torch.compile`` and ``torch.export`` are the supported
    graph paths (they see one custom-op node); ``torch.jit.trace`` and ONNX export work with
    ``impl="reference"``.

    Args:
        input (Tensor[batch, in_channels, in_h, in_w]): input.
        offset (Tensor[batch, 2 * offset_groups * kh * kw, out_h, out_w]): sampling offsets.
        weight (Tensor[out_channels, in_channels // weight_groups, kh, kw]): convolution weight.
        bias (Tensor[out_channels], optional): added to the output.
        stride, padding, dilation (int or (int, int)): as in ``torch.nn.Conv2d``.
        mask (Tensor[batch, offset_groups * kh * kw, out_h, out_w], optional): modulation (DCNv2).
        impl: ``"auto"`` (Triton on CUDA except for float64, the chunked CPU kernels otherwise:
            Numba's bilinear gather and PyTorch's GEMM), ``"triton"`` or ``"reference"`` (plain
            autograd PyTorch, for tracing/ONNX export).

    Returns:
        Tensor[batch, out_channels, out_h, out_w].

    Example:
        >>> x = torch.randn(2, 4, 8, 8)
        >>> weight = torch.randn(6, 4, 3, 3)
        >>> offset = torch.randn(2, 2 * 3 * 3, 6, 6)
        >>> deform_conv2d(x, offset, weight).shape
        torch.Size([2, 6, 6, 6])
    """
    check_impl(impl)
    check_tensor("input", input, ndim=4)
    # Under autocast, sample in the widest dtype given (torchvision's rule) and return the input's dtype.
    out_dtype = input.dtype
    x, offset, weight, bias, mask = autocast_to_widest(input, offset, weight, bias, mask)
    conv = _validate(x, offset, weight, bias, stride, padding, dilation, mask)
    if impl == "reference":
        return reference.deform_conv2d_reference(x, offset, weight, bias, mask, conv).to(out_dtype)
    # The Triton kernels compute in fp32; float64 (gradcheck) runs the plain PyTorch kernels on any device.
    triton = use_triton(_OP_NAME, impl, x, offset, weight) and not (impl == "auto" and x.dtype == torch.float64)
    return _deform_conv2d_op(x, offset, weight, bias, mask, conv.stride_h, conv.stride_w, conv.pad_h, conv.pad_w,
                             conv.dilation_h, conv.dilation_w, triton).to(out_dtype)
