"""Depthwise 2-D convolution in plain PyTorch: the oracle for the tests and the ONNX/JIT path.

Shapes used throughout the package::

    x        (N, C, H, W)
    weight   (C * m, 1, kh, kw)          m = channel multiplier
    bias     (C * m,) or None
    out      (N, C * m, Ho, Wo)
    padding  (top, bottom, left, right)  always four ints once normalised

Output channel ``o`` reads input channel ``o // m`` (the grouping of ``F.conv2d(groups=C)``).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

Pad4 = Tuple[int, int, int, int]


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> Tuple[int, int]:
    """(before, after) padding of one dimension for ``padding='same'``.

    Stride 1 gives ``out == size`` exactly like ``F.conv2d(padding='same')`` (the odd pixel of an
    even total goes after).  Stride s > 1 follows TensorFlow: ``out == ceil(size / s)``.
    """
    out = -(-size // stride)
    total = max((out - 1) * stride + dilation * (kernel - 1) + 1 - size, 0)
    return total // 2, total - total // 2


def output_size(size: int, kernel: int, stride: int, pad_before: int, pad_after: int, dilation: int) -> int:
    """Output length of one dimension (may be <= 0 when the kernel does not fit)."""
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def output_shape(x_shape: Sequence[int], w_shape: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int], dilation: Sequence[int]) -> Tuple[int, int, int, int]:
    """``(N, C*m, Ho, Wo)`` of a depthwise conv of ``x_shape`` with ``w_shape``."""
    n, _, h, w = x_shape
    c_out, _, kh, kw = w_shape
    ho = output_size(h, kh, stride[0], padding[0], padding[1], dilation[0])
    wo = output_size(w, kw, stride[1], padding[2], padding[3], dilation[1])
    return n, c_out, ho, wo


def is_symmetric(padding: Sequence[int]) -> bool:
    return padding[0] == padding[1] and padding[2] == padding[3]


def dwconv2d_reference(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                       stride: Sequence[int], padding: Pad4, dilation: Sequence[int]) -> torch.Tensor:
    """Depthwise conv with ``F.conv2d(groups=C)``; differentiable by plain autograd.

    Args:
        x (Tensor[N, C, H, W]), weight (Tensor[C*m, 1, kh, kw]), bias (Tensor[C*m] or None),
        stride (h, w), padding (top, bottom, left, right), dilation (h, w).
    Returns:
        Tensor[N, C*m, Ho, Wo].
    """
    if is_symmetric(padding):
        conv_padding = (padding[0], padding[2])
    else:
        x = F.pad(x, (padding[2], padding[3], padding[0], padding[1]))
        conv_padding = (0, 0)
    return F.conv2d(x, weight, bias, tuple(stride), conv_padding, tuple(dilation), groups=x.shape[1])
