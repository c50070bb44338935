"""Fast DCNv3 kernels for the CPU, built on sparse-times-dense matrix products.

Bilinear sampling is a sparse matrix (:mod:`convzoo.ops._bilinear_sparse`): every (batch,
output pixel, group) "bag" reads 4 corners of each of its P points. With the input zero-padded
by one pixel (so that every sampled corner has a valid row and out-of-image corners read zero),
the rows of ``x`` viewed as ``(N*(H+2)*(W+2)*group, group_channels)`` are the dense operand, and

* forward: ``out = A @ rows`` with ``A`` (bags x rows) holding ``mask * bilinear weight``;
* grad x: ``A^T @ grad_out``;
* grad offset and grad mask: the dot product of each corner's row with the bag's ``grad_out``
  (one sampled dense-dense product), combined with the bilinear weights and their derivatives
  (the CUDA kernel's formulas).

The definition is that of :mod:`convzoo.ops.dcnv3`; the reference in ``reference.py`` is the
oracle these are tested against.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

from .._bilinear_sparse import add_transposed_product, corner_dots, index_dtype, sample, sampling_matrix
from .._checks import compute_dtype
from .reference import sampling_locations


# Below this many samples (N * H_out * W_out * group * P) the dense gather of reference.py is
# faster: creating sparse matrices and starting MKL's threads costs more than the work.
MIN_SAMPLES = 2**15


def worth_it(x: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether these kernels should run for ``x``/``mask`` (CPU tensors, large enough)."""
    return x.device.type == "cpu" and mask.numel() >= MIN_SAMPLES


class _Samples(NamedTuple):
    """Per sample ``s = (((n * H_out + ho) * W_out + wo) * group + g) * P + p``, each ``(S,)``.

    ``top_left`` is the row of the padded input holding corner (y0, x0); corner k of the sample
    is row ``top_left + shifts[k]`` for corners (y0x0, y0x1, y1x0, y1x1). Skipped samples (the
    CUDA kernel's ``-1 < loc < size`` test fails, NaN/inf included) have ``valid == 0`` and
    location 0.
    """

    top_left: torch.Tensor
    shifts: Tuple[int, int, int, int]
    frac_x: torch.Tensor
    frac_y: torch.Tensor
    valid: torch.Tensor


def _samples(offset: torch.Tensor, height: int, width: int, params: tuple, int_dtype: torch.dtype) -> _Samples:
    kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group = params[:9]
    scale, remove_center = params[10], params[11]
    n = offset.shape[0]
    loc_x, loc_y = sampling_locations(offset, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w,
                                      dilation_h, dilation_w, group, scale, remove_center)
    inside = (loc_x > -1) & (loc_y > -1) & (loc_x < width) & (loc_y < height)
    loc_x = torch.where(inside, loc_x, 0.0)
    loc_y = torch.where(inside, loc_y, 0.0)
    x0 = loc_x.floor()
    y0 = loc_y.floor()
    padded_w = width + 2
    batch = torch.arange(n, device=offset.device, dtype=int_dtype).view(n, 1, 1, 1, 1) * (height + 2)
    groups = torch.arange(group, device=offset.device, dtype=int_dtype).view(1, 1, 1, group, 1)
    top_left = ((batch + y0.to(int_dtype) + 1) * padded_w + x0.to(int_dtype) + 1) * group + groups
    shifts = (0, group, padded_w * group, (padded_w + 1) * group)
    return _Samples(top_left.reshape(-1), shifts, (loc_x - x0).reshape(-1), (loc_y - y0).reshape(-1),
                    inside.reshape(-1).to(offset.dtype))


def _corner_weights(frac_x: torch.Tensor, frac_y: torch.Tensor, scale: torch.Tensor):
    """``scale`` times the bilinear weights of corners (y0x0, y0x1, y1x0, y1x1)."""
    scale_y1 = scale * frac_y
    scale_y0 = scale - scale_y1
    w01 = scale_y0 * frac_x
    w11 = scale_y1 * frac_x
    return scale_y0 - w01, w01, scale_y1 - w11, w11


def _padded_rows(x: torch.Tensor, group_channels: int) -> torch.Tensor:
    """(N, H, W, group*C) -> rows (N*(H+2)*(W+2)*group, C) of the input padded by one zero pixel."""
    return F.pad(x, (0, 0, 1, 1, 1, 1)).reshape(-1, group_channels)


def _prepare(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, params: tuple):
    """Compute dtype, padded rows ``(num_rows, C)``, samples, masked weights and ``(bags, P)``."""
    group_channels = params[9]
    dtype = compute_dtype(x.dtype)
    n, height, width, channels = x.shape
    rows = _padded_rows(x.to(dtype), group_channels)
    num_samples = mask.numel()
    bags = n * offset.shape[1] * offset.shape[2] * channels // group_channels
    points = num_samples // bags
    samples = _samples(offset.to(dtype), height, width, params, index_dtype(rows.shape[0] + 4 * points,
                                                                            4 * num_samples + 1))
    masked = mask.to(dtype).reshape(-1) * samples.valid
    return dtype, rows, samples, masked, (bags, points)


def dcnv3_forward(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *params) -> torch.Tensor:
    """Forward (no autograd): ``(N, H, W, G*C)`` -> ``(N, H_out, W_out, G*C)``; params as :func:`dcnv3`."""
    _, rows, samples, masked, bag_shape = _prepare(x, offset, mask, params)
    weights = _corner_weights(samples.frac_x, samples.frac_y, masked)
    out = sample(sampling_matrix(samples.top_left.view(bag_shape), samples.shifts, weights, rows.shape[0]), rows)
    return out.reshape(x.shape[0], offset.shape[1], offset.shape[2], x.shape[3]).to(x.dtype)


def dcnv3_backward(grad_out: torch.Tensor, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                   *params) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(grad_x, grad_offset, grad_mask)``; params as :func:`dcnv3`."""
    offset_scale = params[10]
    dtype, rows, samples, masked, bag_shape = _prepare(x, offset, mask, params)
    n, height, width, channels = x.shape
    grad_bags = grad_out.to(dtype).reshape(bag_shape[0], -1)
    top_left = samples.top_left.view(bag_shape)
    weights = _corner_weights(samples.frac_x, samples.frac_y, masked)

    grad_rows = torch.zeros_like(rows)
    add_transposed_product(grad_rows, top_left, samples.shifts, weights, grad_bags)
    grad_x = grad_rows.reshape(n, height + 2, width + 2, channels)[:, 1:-1, 1:-1].to(x.dtype).contiguous()

    # <corner value, grad_out> per sample and corner.
    matrix = sampling_matrix(top_left, samples.shifts, weights, rows.shape[0])
    d00, d01, d10, d11 = corner_dots(matrix, grad_bags, rows).unbind(1)
    fx, fy = samples.frac_x.view(bag_shape), samples.frac_y.view(bag_shape)
    row_y0 = d00 + fx * (d01 - d00)
    row_y1 = d10 + fx * (d11 - d10)
    grad_mask = (row_y0 + fy * (row_y1 - row_y0)) * samples.valid.view(bag_shape)
    scale = (masked * offset_scale).view(bag_shape)
    grad_loc = torch.empty(bag_shape + (2,), dtype=dtype, device=x.device)
    grad_loc[..., 0] = (d01 - d00 + fy * (d11 - d10 - d01 + d00)) * scale
    grad_loc[..., 1] = (row_y1 - row_y0) * scale
    return grad_x, grad_loc.reshape(offset.shape).to(offset.dtype), grad_mask.reshape(mask.shape).to(mask.dtype)
