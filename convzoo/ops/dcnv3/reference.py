"""DCNv3 core in plain, vectorised PyTorch: the test oracle, ``impl="reference"`` (autograd,
traceable by torch.onnx/torch.jit), the path for small CPU inputs and for CUDA without Triton.

Semantics are those of InternImage's CUDA kernel (``dcnv3_im2col_cuda.cuh``); see
:func:`convzoo.ops.dcnv3` for the full definition. Everything here works on any device and
computes in float32 for float16/bfloat16 inputs (the CUDA kernel's ``opmath_t``).

The forward is one bilinear gather over all groups, points and the four corners at once
(``index_select`` on the rows of ``x`` viewed as ``(N*H*W*group, group_channels)``) followed by
one batched matmul with the corner weights, which already hold the mask. The hand-written
backward recomputes the gather and returns the three gradients with one ``index_add_`` and a
batched matmul. The faster CPU kernels for large inputs are in ``cpu.py``.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch

from .._checks import compute_dtype


class Geometry(NamedTuple):
    """DCNv3 window geometry: the public function's arguments of the same names, in their order."""

    kernel_h: int
    kernel_w: int
    stride_h: int
    stride_w: int
    pad_h: int
    pad_w: int
    dilation_h: int
    dilation_w: int
    group: int
    group_channels: int
    offset_scale: float
    remove_center: bool


def output_size(height: int, width: int, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
                pad_h: int, pad_w: int, dilation_h: int, dilation_w: int) -> Tuple[int, int]:
    """``(H_out, W_out)`` of DCNv3 (the usual convolution formula, as in InternImage's CUDA code)."""
    height_out = (height + 2 * pad_h - (dilation_h * (kernel_h - 1) + 1)) // stride_h + 1
    width_out = (width + 2 * pad_w - (dilation_w * (kernel_w - 1) + 1)) // stride_w + 1
    return height_out, width_out


def kernel_grid(kernel_h: int, kernel_w: int, dilation_h: int, dilation_w: int, remove_center: bool,
                device=None, dtype=torch.float32) -> Tuple[torch.Tensor, torch.Tensor]:
    """Centred kernel grid ``(grid_x, grid_y)``, each of shape ``(P,)``, in DCNv3's x-major point order.

    Point ``p = ix * kernel_h + iy`` (the centre point dropped when ``remove_center``) sits at
    ``grid_x = ix * dilation_w - (dilation_w * (kernel_w - 1)) // 2`` and
    ``grid_y = iy * dilation_h - (dilation_h * (kernel_h - 1)) // 2``.
    """
    ix = torch.arange(kernel_w, device=device).repeat_interleave(kernel_h)
    iy = torch.arange(kernel_h, device=device).repeat(kernel_w)
    if remove_center:
        keep = (ix != kernel_w // 2) | (iy != kernel_h // 2)
        ix, iy = ix[keep], iy[keep]
    grid_x = ix * dilation_w - (dilation_w * (kernel_w - 1)) // 2
    grid_y = iy * dilation_h - (dilation_h * (kernel_h - 1)) // 2
    return grid_x.to(dtype), grid_y.to(dtype)


def sampling_locations(offset: torch.Tensor, kernel_h: int, kernel_w: int, stride_h: int, stride_w: int,
                       pad_h: int, pad_w: int, dilation_h: int, dilation_w: int, group: int,
                       offset_scale: float, remove_center: bool) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sampling locations ``(loc_x, loc_y)`` in input pixel units, each ``(N, H_out, W_out, group, P)``.

    ``loc_x = wo * stride_w - pad_w + half_w + (grid_x[p] + offset_x) * offset_scale`` with
    ``half_w = (dilation_w * (kernel_w - 1)) // 2`` (likewise for y); pixel ``i`` has its centre
    at coordinate ``i``.
    """
    n, height_out, width_out, offset_channels = offset.shape
    off = offset.reshape(n, height_out, width_out, group, offset_channels // (2 * group), 2)
    grid_x, grid_y = kernel_grid(kernel_h, kernel_w, dilation_h, dilation_w, remove_center, offset.device, offset.dtype)
    half_h = (dilation_h * (kernel_h - 1)) // 2
    half_w = (dilation_w * (kernel_w - 1)) // 2
    base_y = torch.arange(height_out, device=offset.device, dtype=offset.dtype) * stride_h + (half_h - pad_h)
    base_x = torch.arange(width_out, device=offset.device, dtype=offset.dtype) * stride_w + (half_w - pad_w)
    loc_x = base_x[None, None, :, None, None] + (grid_x + off[..., 0]) * offset_scale
    loc_y = base_y[None, :, None, None, None] + (grid_y + off[..., 1]) * offset_scale
    return loc_x, loc_y


class Corners(NamedTuple):
    """The four bilinear corners of every sample, corner order (y0x0, y0x1, y1x0, y1x1).

    rows: ``(N, Q, group, P, 4)`` row indices into ``x`` viewed as ``(N*H*W*group, C)``.
    weight: ``(N, Q, group, P, 4)`` bilinear weights, zero for corners outside the input and
    for samples the CUDA kernel skips (outside ``(-1, H) x (-1, W)`` or non-finite).
    frac_x, frac_y: ``(N, Q, group, P)`` fractional parts, zero for skipped samples.
    inside: ``(N, Q, group, P, 4)`` corner validity as the weight's dtype.
    """

    rows: torch.Tensor
    weight: torch.Tensor
    frac_x: torch.Tensor
    frac_y: torch.Tensor
    inside: torch.Tensor


def bilinear_corners(loc_x: torch.Tensor, loc_y: torch.Tensor, height: int, width: int, group: int) -> Corners:
    """Corner rows and weights for locations ``loc_x``/``loc_y`` of shape ``(N, H_out, W_out, group, P)``."""
    n = loc_x.shape[0]
    loc_x = loc_x.flatten(1, 2)
    loc_y = loc_y.flatten(1, 2)
    # The CUDA kernel samples only when -1 < loc < size; NaN and inf fail this test.
    sampled = (loc_x > -1) & (loc_y > -1) & (loc_x < width) & (loc_y < height)
    loc_x = torch.where(sampled, loc_x, torch.zeros_like(loc_x))
    loc_y = torch.where(sampled, loc_y, torch.zeros_like(loc_y))
    x0f = torch.floor(loc_x)
    y0f = torch.floor(loc_y)
    frac_x = loc_x - x0f
    frac_y = loc_y - y0f
    x0 = x0f.long()
    y0 = y0f.long()
    xs = torch.stack((x0, x0 + 1, x0, x0 + 1), -1)
    ys = torch.stack((y0, y0, y0 + 1, y0 + 1), -1)
    inside = (xs >= 0) & (xs < width) & (ys >= 0) & (ys < height) & sampled[..., None]
    wx = torch.stack((1 - frac_x, frac_x, 1 - frac_x, frac_x), -1)
    wy = torch.stack((1 - frac_y, 1 - frac_y, frac_y, frac_y), -1)
    inside_f = inside.to(loc_x.dtype)
    weight = wx * wy * inside_f
    pixel = ys.clamp(0, height - 1) * width + xs.clamp(0, width - 1)
    batch = torch.arange(n, device=loc_x.device).view(n, 1, 1, 1, 1) * (height * width)
    groups = torch.arange(group, device=loc_x.device).view(1, 1, group, 1, 1)
    rows = (batch + pixel) * group + groups
    return Corners(rows, weight, frac_x, frac_y, inside_f)


def dcnv3_forward(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_h: int, kernel_w: int,
                  stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int,
                  group: int, group_channels: int, offset_scale: float, remove_center: bool) -> torch.Tensor:
    """DCNv3 forward, differentiable by autograd.

    Args:
        x: ``(N, H, W, group * group_channels)``.
        offset: ``(N, H_out, W_out, group * P * 2)``, (x, y) pairs.
        mask: ``(N, H_out, W_out, group * P)``.

    Returns:
        ``(N, H_out, W_out, group * group_channels)`` in the dtype of ``x``.
    """
    out_dtype = x.dtype
    dtype = compute_dtype(x.dtype)
    n, height, width, _ = x.shape
    _, height_out, width_out, _ = offset.shape
    loc_x, loc_y = sampling_locations(offset.to(dtype), kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                      dilation_h, dilation_w, group, offset_scale, remove_center)
    corners = bilinear_corners(loc_x, loc_y, height, width, group)
    points = loc_x.shape[-1]
    q = height_out * width_out
    weight = corners.weight * mask.to(dtype).reshape(n, q, group, points, 1)
    rows = x.to(dtype).reshape(n * height * width * group, group_channels)
    values = rows.index_select(0, corners.rows.reshape(-1)).view(n * q * group, points * 4, group_channels)
    out = torch.bmm(weight.reshape(n * q * group, 1, points * 4), values)
    return out.view(n, height_out, width_out, group * group_channels).to(out_dtype)


def dcnv3_backward(grad_out: torch.Tensor, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                   kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
                   dilation_h: int, dilation_w: int, group: int, group_channels: int, offset_scale: float,
                   remove_center: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(grad_x, grad_offset, grad_mask)`` of :func:`dcnv3_forward`, written out by hand.

    The derivative of the bilinear weights is taken with the corners' floor fixed (as the CUDA
    kernel does); samples the kernel skips get zero gradient.
    """
    dtype = compute_dtype(x.dtype)
    n, height, width, channels = x.shape
    _, height_out, width_out, _ = offset.shape
    loc_x, loc_y = sampling_locations(offset.to(dtype), kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                      dilation_h, dilation_w, group, offset_scale, remove_center)
    corners = bilinear_corners(loc_x, loc_y, height, width, group)
    points = loc_x.shape[-1]
    q = height_out * width_out
    m = mask.to(dtype).reshape(n, q, group, points, 1)
    grad = grad_out.to(dtype).reshape(n * q * group, group_channels, 1)
    flat_rows = corners.rows.reshape(-1)

    # d out / d (corner value): weight * mask, scattered back onto the input rows.
    weight = (corners.weight * m).reshape(n * q * group, points * 4, 1)
    grad_rows = torch.zeros(n * height * width * group, group_channels, dtype=dtype, device=x.device)
    grad_rows.index_add_(0, flat_rows, (weight * grad.view(n * q * group, 1, group_channels)).view(-1, group_channels))

    # <corner value, grad_out> for every corner; skipped corners contribute zero.
    values = x.to(dtype).reshape(-1, group_channels).index_select(0, flat_rows)
    dots = torch.bmm(values.view(n * q * group, points * 4, group_channels), grad)
    dots = dots.view(n, q, group, points, 4) * corners.inside

    grad_mask = (dots * corners.weight).sum(-1)
    fx = corners.frac_x
    fy = corners.frac_y
    # d(bilinear weight)/d(frac_x) per corner: -(1-fy), (1-fy), -fy, fy; likewise for frac_y.
    d_wx = torch.stack((fy - 1, 1 - fy, -fy, fy), -1)
    d_wy = torch.stack((fx - 1, -fx, 1 - fx, fx), -1)
    scale = m[..., 0] * offset_scale
    grad_off_x = (dots * d_wx).sum(-1) * scale
    grad_off_y = (dots * d_wy).sum(-1) * scale
    grad_offset = torch.stack((grad_off_x, grad_off_y), -1)

    grad_x = grad_rows.view(n, height, width, channels).to(x.dtype)
    grad_offset = grad_offset.reshape(offset.shape).to(offset.dtype)
    grad_mask = grad_mask.reshape(mask.shape).to(mask.dtype)
    return grad_x, grad_offset, grad_mask


def softmax_points(logits: torch.Tensor, group: int) -> torch.Tensor:
    """Softmax of ``(N, H_out, W_out, group * P)`` mask logits over the ``P`` points of each group
    (DCNv3's mask normalisation), computed in the compute dtype, returned in the logits' dtype."""
    n, height_out, width_out, channels = logits.shape
    grouped = logits.to(compute_dtype(logits.dtype)).reshape(n, height_out, width_out, group, channels // group)
    return torch.softmax(grouped, -1).reshape(logits.shape).to(logits.dtype)


def softmax_points_backward(probs: torch.Tensor, grad: torch.Tensor, group: int) -> torch.Tensor:
    """Gradient of the logits of :func:`softmax_points` from its output ``probs`` and the gradient
    ``grad`` of that output: ``probs * (grad - sum over the group's points of probs * grad)``."""
    n, height_out, width_out, channels = probs.shape
    dtype = compute_dtype(probs.dtype)
    s = probs.to(dtype).reshape(n, height_out, width_out, group, channels // group)
    g = grad.to(dtype).reshape(s.shape)
    return (s * (g - (s * g).sum(-1, keepdim=True))).reshape(probs.shape).to(grad.dtype)
