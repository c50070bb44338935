"""Depthwise 2-D convolution for kernels from 1x1 to 63x63 and beyond (RepLKNet).

``dwconv2d`` validates its arguments, then runs one of

* ``impl="reference"``: :func:`reference.dwconv2d_reference`, plain ``F.conv2d(groups=C)`` with
  PyTorch autograd (traceable by ``torch.onnx``/``torch.jit``);
* the custom op ``convzoo::dwconv2d`` (``impl="auto"``/``"triton"``), one node for
  ``torch.compile``/``torch.export``, with its backward the custom op ``convzoo::dwconv2d_backward``.
  Its kernels are the Triton kernels of :mod:`.triton` (CUDA tensors with Triton importable, or
  ``impl="triton"``), otherwise the native path of :mod:`.cpu`, which picks the memory layout
  and the grad-weight algorithm that are fast on the CPU.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch.utils.flop_counter import register_flop_formula

from .._checks import (autocast_to_lower, check_impl, check_same, check_tensor, pair, plain_cpu_eager,
                       script_unsupported, use_triton)
from . import cpu
from .reference import dwconv2d_reference, output_shape, same_padding

__all__ = ["dwconv2d", "dwconv2d_reference"]

PaddingArg = Union[int, Tuple[int, int], Sequence[int], str]

#: Values of ``dwconv2d``'s ``triton_kernel`` (those of :data:`.triton.KERNELS`, kept here so that
#: checking them needs no Triton).
TRITON_KERNELS = ("auto", "direct", "band")


@script_unsupported
def dwconv2d(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None, stride=1,
             padding: PaddingArg = 0, dilation=1, *, impl: str = "auto", triton_kernel: str = "auto") -> torch.Tensor:
    """Depthwise 2-D convolution: every output channel sees one input channel.

    Equal to ``F.conv2d(x, weight, bias, stride, padding, dilation, groups=C)``, on CPU much faster
    for large kernels, with Triton kernels on CUDA.

    Args:
        x (Tensor[N, C, H, W]): input, any memory format (the output has the same one).
        weight (Tensor[C*m, 1, kh, kw]): one kernel per output channel; output channel ``o`` reads
            input channel ``o // m`` (channel multiplier ``m >= 1``).
        bias (Tensor[C*m] or None): added per output channel.
        stride (int or (int, int)): >= 1.
        padding (int, (int, int), 'same' or 'valid'): zero padding of each side.  'same' keeps the
            size at stride 1 (the odd pixel of an even kernel span goes bottom/right, as in
            ``F.conv2d``); with stride s it gives ``ceil(H / s)`` (TensorFlow's convention).
        dilation (int or (int, int)): >= 1.
        impl ("auto", "triton" or "reference"): "auto" runs Triton for CUDA tensors when Triton is
            importable, the native path otherwise; "triton" forces the Triton kernels (CPU tensors
            need ``TRITON_INTERPRET=1``); "reference" runs plain ``F.conv2d`` with PyTorch autograd.
        triton_kernel ("auto", "direct" or "band"): on the Triton path, which kernel computes each
            pass where the row-band kernels apply (fp32/fp16/bf16): "auto" times both once per layer
            shape, layout and pass on the GPU and keeps the faster; the others force one. Ignored
            on the other paths.

    Not scriptable by ``torch.jit.script``: ``torch.compile`` and ``torch.export`` are the supported
    graph paths (one custom-op node); ``torch.jit.trace`` and ONNX export work with ``impl="reference"``.

    Returns:
        Tensor[N, C*m, Ho, Wo].

    Example::

        >>> x = torch.randn(2, 8, 56, 56)
        >>> w = torch.randn(8, 1, 31, 31)
        >>> dwconv2d(x, w, padding="same").shape
        torch.Size([2, 8, 56, 56])
    """
    check_impl(impl)
    if triton_kernel not in TRITON_KERNELS:
        raise ValueError(f"triton_kernel must be one of {TRITON_KERNELS}, got {triton_kernel!r}")
    x, weight, bias = autocast_to_lower(x, weight, bias)  # custom ops are not cast by autocast
    stride, padding4, dilation = _check_args(x, weight, bias, stride, padding, dilation)
    if impl == "reference":
        return dwconv2d_reference(x, weight, bias, stride, padding4, dilation)
    backend = "triton" if use_triton("dwconv2d", impl, x) else "native"
    if backend == "native" and _croppable(x, weight, bias):
        # Past the custom op: eager skips its dispatch; torch.compile traces the plain convs
        # (or FFTs), so inductor's freezing pre-packs the weights and fuses what follows.
        weight, padding4 = crop_to_reach(x.shape, weight, stride, padding4, dilation)
        return cpu.forward(x, weight, bias, stride, padding4, dilation)
    return torch.ops.convzoo.dwconv2d(x, weight, bias, list(stride), list(padding4), list(dilation), backend,
                                      triton_kernel)


def _check_args(x, weight, bias, stride, padding, dilation):
    """Validate every argument; return (stride, (top, bottom, left, right), dilation)."""
    check_tensor("x", x, ndim=4)
    check_tensor("weight", weight, ndim=4)
    check_same("weight", weight, "x", x)
    channels = x.shape[1]
    if channels < 1:
        raise ValueError(f"x must have at least one channel, got shape {tuple(x.shape)}")
    c_out, per_group, kh, kw = weight.shape
    if per_group != 1 or c_out < 1 or c_out % channels != 0 or kh < 1 or kw < 1:
        raise ValueError(
            f"weight must have shape (C*m, 1, kh, kw) with C={channels} (x's channels), m >= 1 and "
            f"kh, kw >= 1, got {tuple(weight.shape)}")
    if bias is not None:
        check_tensor("bias", bias, ndim=1)
        check_same("bias", bias, "x", x)
        if bias.shape[0] != c_out:
            raise ValueError(f"bias must have shape ({c_out},) (weight's output channels), got {tuple(bias.shape)}")
    stride = pair("stride", stride, minimum=1)
    dilation = pair("dilation", dilation, minimum=1)
    padding4 = _padding4(padding, x.shape, (kh, kw), stride, dilation)
    _, _, out_h, out_w = output_shape(x.shape, weight.shape, stride, padding4, dilation)
    if out_h < 1 or out_w < 1:
        raise ValueError(
            f"x of spatial size {tuple(x.shape[2:])} padded by {padding4} (top, bottom, left, right) is smaller "
            f"than the dilated kernel {(dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)}")
    return stride, padding4, dilation


def _croppable(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> bool:
    """Whether this call may drop the kernel taps that only read padding (:func:`crop_to_reach`):
    CPU inference (no gradient to record), eager on plain tensors or inside ``torch.compile``
    with a static map size (the graph then holds the cropped kernel, which inductor's freezing
    folds into a constant). Not in ``torch.export`` programs (they keep the model's kernels) nor
    under FLOP counting or other modes, which count the full kernel."""
    if x.device.type != "cpu" or (torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                                                   for t in (x, weight, bias))):
        return False
    if torch.compiler.is_compiling():
        return not torch.compiler.is_exporting() and all(isinstance(size, int) for size in x.shape[2:])
    return plain_cpu_eager(x, weight, bias)


def _taps_in_reach(size: int, kernel: int, stride: int, pad_before: int, pad_after: int,
                   dilation: int) -> Tuple[int, int, int, int]:
    """Along one axis: the first and last kernel tap that reads the input for some output, and the
    padding that keeps the output size once the other taps are dropped.

    Returns ``(first, last, new_pad_before, new_pad_after)``.  Output ``y`` reads input row
    ``y*stride - pad_before + tap*dilation``; taps that land outside ``[0, size)`` for every ``y``
    only ever multiply zero padding.
    """
    out = (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1
    first = max(0, -((-(pad_before - (out - 1) * stride)) // dilation))  # ceil division
    last = min(kernel - 1, (size - 1 + pad_before) // dilation)
    return first, last, pad_before - first * dilation, pad_after - (kernel - 1 - last) * dilation


def crop_to_reach(x_shape, weight: torch.Tensor, stride, padding4, dilation):
    """Drop the kernel taps that only ever read zero padding (a 27x27 kernel on an 8x8 map keeps its
    central 15x15): the same output, computed with a smaller kernel.

    Args:
        x_shape: (N, C, H, W) of the input.
        weight (Tensor[C*m, 1, kh, kw]): the kernel.
        stride, dilation: (h, w) pairs; padding4: (top, bottom, left, right).

    Returns:
        ``(weight, padding4)``, unchanged when every tap can read the input or when cropping would
        need a negative padding.
    """
    top, bottom, left, right = padding4
    first_h, last_h, top, bottom = _taps_in_reach(x_shape[2], weight.shape[2], stride[0], top, bottom, dilation[0])
    first_w, last_w, left, right = _taps_in_reach(x_shape[3], weight.shape[3], stride[1], left, right, dilation[1])
    cropped_shape = (last_h - first_h + 1, last_w - first_w + 1)
    if cropped_shape == tuple(weight.shape[2:]) or min(top, bottom, left, right) < 0 or min(cropped_shape) < 1:
        return weight, padding4
    cropped = weight[:, :, first_h:last_h + 1, first_w:last_w + 1].contiguous()
    return cropped, (top, bottom, left, right)


def _padding4(padding: PaddingArg, x_shape, kernel, stride, dilation) -> Tuple[int, int, int, int]:
    """Normalise ``padding`` to (top, bottom, left, right)."""
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":
            top, bottom = same_padding(x_shape[2], kernel[0], stride[0], dilation[0])
            left, right = same_padding(x_shape[3], kernel[1], stride[1], dilation[1])
            return top, bottom, left, right
        raise ValueError(f"padding must be an int, a pair of ints, 'same' or 'valid', got {padding!r}")
    pad_h, pad_w = pair("padding", padding, minimum=0)
    return pad_h, pad_h, pad_w, pad_w


# ----------------------------------------------------------------------------- custom ops


def _run_forward(x, weight, bias, stride, padding, dilation, backend, triton_kernel):
    if backend == "triton":
        from .triton import dwconv2d_forward

        return dwconv2d_forward(x, weight, bias, stride, padding, dilation, triton_kernel)
    return cpu.forward(x, weight, bias, stride, padding, dilation)


@torch.library.custom_op("convzoo::dwconv2d", mutates_args=())
def _dwconv2d_op(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: List[int],
                 padding: List[int], dilation: List[int], backend: str, triton_kernel: str) -> torch.Tensor:
    """Depthwise conv; ``padding`` is (top, bottom, left, right), ``backend`` "native" or "triton",
    ``triton_kernel`` the Triton kernel choice (see :func:`dwconv2d`)."""
    return _run_forward(x, weight, bias, stride, padding, dilation, backend, triton_kernel)


@_dwconv2d_op.register_fake
def _dwconv2d_fake(x, weight, bias, stride, padding, dilation, backend, triton_kernel):
    shape = output_shape(x.shape, weight.shape, stride, padding, dilation)
    return torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=cpu.output_memory_format(x))


@torch.library.custom_op("convzoo::dwconv2d_backward", mutates_args=())
def _dwconv2d_backward_op(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: List[int],
                          padding: List[int], dilation: List[int], backend: str, triton_kernel: str,
                          output_mask: List[bool]) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients (x, weight, bias); an entry not asked for in ``output_mask`` is an empty tensor."""
    if backend == "triton":
        from .triton import dwconv2d_backward

        grads = dwconv2d_backward(grad_out, x, weight, stride, padding, dilation, output_mask, triton_kernel)
    else:
        grads = cpu.backward(grad_out, x, weight, stride, padding, dilation, output_mask)
    return tuple(g if g is not None else x.new_empty(0) for g in grads)


@_dwconv2d_backward_op.register_fake
def _dwconv2d_backward_fake(grad_out, x, weight, stride, padding, dilation, backend, triton_kernel, output_mask):
    grad_x = torch.empty_like(x, memory_format=cpu.output_memory_format(x)) if output_mask[0] else x.new_empty(0)
    grad_weight = torch.empty_like(weight, memory_format=torch.contiguous_format) if output_mask[1] \
        else x.new_empty(0)
    grad_bias = x.new_empty(weight.shape[0]) if output_mask[2] else x.new_empty(0)
    return grad_x, grad_weight, grad_bias


def _setup_context(ctx, inputs, output):
    x, weight, bias, stride, padding, dilation, backend, triton_kernel = inputs
    ctx.save_for_backward(x, weight)
    ctx.has_bias = bias is not None
    ctx.conv_args = (stride, padding, dilation, backend, triton_kernel)


def _backward(ctx, grad_out):
    x, weight = ctx.saved_tensors
    needs = ctx.needs_input_grad
    mask = [bool(needs[0]), bool(needs[1]), bool(ctx.has_bias and needs[2])]
    grads = torch.ops.convzoo.dwconv2d_backward(grad_out, x, weight, *ctx.conv_args, mask)
    grad_x, grad_weight, grad_bias = (g if wanted else None for g, wanted in zip(grads, mask))
    return grad_x, grad_weight, grad_bias, None, None, None, None, None


_dwconv2d_op.register_autograd(_backward, setup_context=_setup_context)


@register_flop_formula(torch.ops.convzoo.dwconv2d)
def _dwconv2d_flops(x_shape, w_shape, bias_shape, stride, padding, dilation, backend, triton_kernel, out_shape=None,
                    **kwargs):
    """2 * MACs, the convention of FlopCounterMode's aten.convolution formula (bias not counted)."""
    return 2 * math.prod(out_shape) * w_shape[2] * w_shape[3]


@register_flop_formula(torch.ops.convzoo.dwconv2d_backward)
def _dwconv2d_backward_flops(grad_shape, x_shape, w_shape, stride, padding, dilation, backend, triton_kernel,
                             output_mask, out_shape=None, **kwargs):
    """2 * MACs per gradient asked for: grad-input and grad-weight each cost one forward."""
    forward = 2 * math.prod(grad_shape) * w_shape[2] * w_shape[3]
    return forward * (int(output_mask[0]) + int(output_mask[1]))
