"""Numba CPU kernels of ``ps_roi_pool`` (imported through ``_numba.kernels`` only).

One loop per output bin: the mean of the bin's integer window of its own channel, accumulated
in float64 (as the reference's summed-area table). The backward spreads ``grad / area`` over
each window; the tasks own input channels (every bin of every RoI reading channel ``c`` is
handled by the task owning ``c``), so no two threads add into the same element. The bins are
those of :func:`convzoo.ops.roi.reference.ps_roi_pool_bins`.
"""
from __future__ import annotations

from typing import Tuple

import torch

from .._numba import as_array, launch, require_numba
from .reference import ps_roi_pool_bins

numba = require_numba()


@numba.njit(parallel=True, cache=True, nogil=True)
def _forward(input, batch_index, h0, h1, w0, w1, out):
    """``input`` (N, C, H, W); bins (K, ph) / (K, pw); ``out`` (K, C/(ph*pw), ph, pw)."""
    rois, channels_out, pooled_h, pooled_w = out.shape
    for task in numba.prange(rois * channels_out):
        k = task // channels_out
        c = task - k * channels_out
        image = input[batch_index[k]]
        for i in range(pooled_h):
            for j in range(pooled_w):
                y0, y1, x0, x1 = h0[k, i], h1[k, i], w0[k, j], w1[k, j]
                if y1 <= y0 or x1 <= x0:
                    out[k, c, i, j] = 0
                    continue
                plane = image[(c * pooled_h + i) * pooled_w + j]
                total = 0.0
                for y in range(y0, y1):
                    for x in range(x0, x1):
                        total += plane[y, x]
                out[k, c, i, j] = total / ((y1 - y0) * (x1 - x0))


@numba.njit(parallel=True, cache=True, nogil=True)
def _backward(grad, batch_index, h0, h1, w0, w1, grad_input):
    """``grad_input`` (N, C, H, W), zeroed, of ``grad`` (K, C/(ph*pw), ph, pw); tasks own channels."""
    rois, channels_out, pooled_h, pooled_w = grad.shape
    bins = pooled_h * pooled_w
    for channel in numba.prange(grad_input.shape[1]):
        c = channel // bins
        i = (channel - c * bins) // pooled_w
        j = channel - c * bins - i * pooled_w
        for k in range(rois):
            y0, y1, x0, x1 = h0[k, i], h1[k, i], w0[k, j], w1[k, j]
            if y1 <= y0 or x1 <= x0:
                continue
            share = grad[k, c, i, j] / ((y1 - y0) * (x1 - x0))
            plane = grad_input[batch_index[k], channel]
            for y in range(y0, y1):
                for x in range(x0, x1):
                    plane[y, x] += share


def _bins(rois: torch.Tensor, height: int, width: int, output_size: Tuple[int, int], spatial_scale: float, dtype):
    """``batch_index`` (K,), ``h0``/``h1`` (K, ph) and ``w0``/``w1`` (K, pw) as NumPy arrays."""
    batch_index, h0, h1, w0, w1 = ps_roi_pool_bins(rois.to(dtype), height, width, output_size, spatial_scale)
    count, (pooled_h, pooled_w) = rois.shape[0], output_size
    return (as_array(batch_index.contiguous()),) + tuple(
        as_array(t.reshape(count, size).contiguous()) for t, size in ((h0, pooled_h), (h1, pooled_h), (w0, pooled_w),
                                                                      (w1, pooled_w)))


def ps_roi_pool(input: torch.Tensor, rois: torch.Tensor, output_size: Tuple[int, int],
                spatial_scale: float) -> torch.Tensor:
    """As :func:`convzoo.ops.roi.reference.ps_roi_pool` (float32/float64 kernels, halves in float32)."""
    n, channels, height, width = input.shape
    pooled_h, pooled_w = output_size
    dtype = torch.float64 if input.dtype == torch.float64 else torch.float32
    batch_index, h0, h1, w0, w1 = _bins(rois, height, width, output_size, spatial_scale, dtype)
    out = torch.empty((rois.shape[0], channels // (pooled_h * pooled_w), pooled_h, pooled_w), dtype=dtype)
    launch(_forward, as_array(input.to(dtype).contiguous()), batch_index, h0, h1, w0, w1, as_array(out),
           work=out.numel() * max(1, height * width // max(1, pooled_h * pooled_w)))
    return out.to(input.dtype)


def ps_roi_pool_backward(grad_out: torch.Tensor, rois: torch.Tensor, input_shape, output_size: Tuple[int, int],
                         spatial_scale: float) -> torch.Tensor:
    """As :func:`convzoo.ops.roi.reference.ps_roi_pool_backward`."""
    n, channels, height, width = input_shape
    dtype = torch.float64 if grad_out.dtype == torch.float64 else torch.float32
    batch_index, h0, h1, w0, w1 = _bins(rois, height, width, output_size, spatial_scale, dtype)
    grad_input = torch.zeros(tuple(input_shape), dtype=dtype)
    launch(_backward, as_array(grad_out.to(dtype).contiguous()), batch_index, h0, h1, w0, w1,
           as_array(grad_input), work=grad_input.numel())
    return grad_input.to(grad_out.dtype)
