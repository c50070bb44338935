"""Numba CPU kernels of the RoI operators (imported through ``_numba.kernels`` only).

One loop per output bin, no per-sample tensors:

* **Bilinear pools** (``roi_align``, ``ps_roi_align``, ``deform_roi_pool``): a bin's samples
  form a ``grid_h x grid_w`` lattice and the bilinear weights of a point clamped into the map
  are a product of a row weight and a column weight, so the bin's sum of samples is
  ``wy^T plane wx`` with ``wy`` (rows) and ``wx`` (columns) the summed 1-D weights of its
  samples (:func:`_axis_weights`). Only the samples that can read the map (inside
  ``[-1, H]``) are visited, so a huge box costs what a box the size of the map does.
  The bins come from :func:`convzoo.ops.roi.reference.align_bins`.
* **Integer-bin pools** (``ps_roi_pool``: mean; ``roi_pool``: maximum): the bins of
  :func:`convzoo.ops.roi.reference.ps_roi_pool_bins` / ``roi_pool_bins``.

Tasks own output elements in the forwards and input channels in the backwards, so no two
threads add into the same element. Tasks walk channels in the outer loop and RoIs in the inner
one, so that a task's feature planes stay in cache across the RoIs.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .._numba import as_array, launch, require_numba, threads
from .reference import AlignGeometry, PoolGeometry, align_bins, ps_roi_pool_bins, roi_pool_bins

numba = require_numba()


# --------------------------------------------------------------------------------------
# Bilinear pools
# --------------------------------------------------------------------------------------
@numba.njit(cache=True, nogil=True)
def _axis_weights(origin, bin_size, grid, size, weight, slope, touched, index, weight_out, slope_out):
    """One bin's samples along one axis, as the rows they touch: returns their count ``n``.

    Sample ``t < grid`` sits at ``origin + (t + 0.5) * bin_size / grid``; outside ``[-1, size]``
    it reads nothing; inside it is clamped to ``[0, size - 1]`` and split between its two
    neighbouring rows (torchvision's ``bilinear_interpolate``). Writes the touched rows to
    ``index[:n]`` (ascending), their summed weights to ``weight_out[:n]`` and the derivatives
    of those with respect to ``origin`` to ``slope_out[:n]``. ``weight``, ``slope`` (float, size)
    and ``touched`` (bool, size) are zeroed scratch, left zeroed.
    """
    if grid <= 0.0:
        return 0
    step = bin_size / grid
    repeats = 1.0
    if step == 0.0:  # every sample on the corner: one point, counted grid times
        lo, hi, repeats = 0.0, 0.0, grid
    else:
        a = (-1.0 - origin) / step - 0.5
        b = (size - origin) / step - 0.5
        if not (math.isfinite(a) and math.isfinite(b)):
            return 0
        lo = max(math.floor(min(a, b)) - 1.0, 0.0)
        hi = min(math.ceil(max(a, b)) + 1.0, grid - 1.0)
    first, end = size, 0
    t = lo
    while t <= hi:
        y = origin + (t + 0.5) * bin_size / grid
        t += 1.0
        if not (y >= -1.0 and y <= size):
            continue
        moving = True
        if y <= 0.0:
            y = 0.0
            moving = False
        low = int(y)
        if low >= size - 1:
            low = size - 1
            high = low
            y = float(low)
            moving = False
        else:
            high = low + 1
        frac = y - low
        weight[low] += repeats * (1.0 - frac)
        weight[high] += repeats * frac
        touched[low] = True
        touched[high] = True
        if moving:
            slope[low] -= repeats
            slope[high] += repeats
        first = min(first, low)
        end = max(end, high + 1)
    n = 0
    for r in range(first, end):
        if touched[r]:
            index[n] = r
            weight_out[n] = weight[r]
            slope_out[n] = slope[r]
            n += 1
            weight[r] = 0.0
            slope[r] = 0.0
            touched[r] = False
    return n


@numba.njit(cache=True, nogil=True)
def _input_channel(c, i, j, pooled_h, pooled_w, position_sensitive):
    if position_sensitive:
        return (c * pooled_h + i) * pooled_w + j
    return c


@numba.njit(cache=True, nogil=True)
def _bin_sum(plane, rows, wy, ny, cols, wx, nx):
    """``sum_a sum_b wy[a] * wx[b] * plane[rows[a], cols[b]]`` in float64."""
    total = 0.0
    for a in range(ny):
        row = 0.0
        for b in range(nx):
            row += wx[b] * plane[rows[a], cols[b]]
        total += wy[a] * row
    return total


@numba.njit(cache=True, nogil=True)
def _scratch(size):
    """Per-task scratch of one axis for :func:`_axis_weights` (dense weight, slope, touched; compact
    index, weight, slope)."""
    return (np.zeros(size), np.zeros(size), np.zeros(size, dtype=np.bool_), np.zeros(size, dtype=np.int64),
            np.zeros(size), np.zeros(size))


@numba.njit(parallel=True, cache=True, nogil=True)
def _align_forward(input, batch_index, origin_h, origin_w, bin_h, bin_w, grid_h, grid_w, position_sensitive,
                   chunk, out):
    """``out`` (K, C_out, ph, pw) of ``input`` (N, C, H, W); tasks: (output-channel chunk, RoI)."""
    rois, channels_out, pooled_h, pooled_w = out.shape
    height, width = input.shape[2], input.shape[3]
    chunks = (channels_out + chunk - 1) // chunk
    for parallel_task in numba.prange(chunks * rois):
        task = np.int64(parallel_task)
        c0 = (task // rois) * chunk
        c1 = min(channels_out, c0 + chunk)
        k = task - (task // rois) * rois
        dy, sy, ty, rows, wy, gy = _scratch(height)
        dx, sx, tx, cols, wx, gx = _scratch(width)
        count = max(grid_h[k] * grid_w[k], 1.0)
        image = input[batch_index[k]]
        for i in range(pooled_h):
            for j in range(pooled_w):
                ny = _axis_weights(origin_h[k, i, j], bin_h[k], grid_h[k], height, dy, sy, ty, rows, wy, gy)
                nx = _axis_weights(origin_w[k, i, j], bin_w[k], grid_w[k], width, dx, sx, tx, cols, wx, gx)
                for c in range(c0, c1):
                    plane = image[_input_channel(c, i, j, pooled_h, pooled_w, position_sensitive)]
                    out[k, c, i, j] = _bin_sum(plane, rows, wy, ny, cols, wx, nx) / count


@numba.njit(parallel=True, cache=True, nogil=True)
def _align_backward_input(grad, batch_index, origin_h, origin_w, bin_h, bin_w, grid_h, grid_w, position_sensitive,
                          chunk, grad_input):
    """Add the input gradient of ``grad`` (K, C_out, ph, pw) into ``grad_input`` (N, C, H, W), zeroed.

    Tasks own chunks of input channels (all RoIs), so no two threads add into one element.
    """
    rois, channels_out, pooled_h, pooled_w = grad.shape
    channels, height, width = grad_input.shape[1], grad_input.shape[2], grad_input.shape[3]
    bins = pooled_h * pooled_w
    chunks = (channels + chunk - 1) // chunk
    for parallel_task in numba.prange(chunks):
        task = np.int64(parallel_task)
        c0 = task * chunk
        c1 = min(channels, c0 + chunk)
        dy, sy, ty, rows, wy, gy = _scratch(height)
        dx, sx, tx, cols, wx, gx = _scratch(width)
        for k in range(rois):
            count = max(grid_h[k] * grid_w[k], 1.0)
            image = grad_input[batch_index[k]]
            for i in range(pooled_h):
                for j in range(pooled_w):
                    # the output channels of this bin whose input channel the task owns
                    if position_sensitive:
                        p = i * pooled_w + j
                        first = max(0, (c0 - p + bins - 1) // bins)
                        last = min(channels_out, (c1 - p + bins - 1) // bins)
                    else:
                        first, last = c0, c1
                    if last <= first:
                        continue
                    ny = _axis_weights(origin_h[k, i, j], bin_h[k], grid_h[k], height, dy, sy, ty, rows, wy, gy)
                    nx = _axis_weights(origin_w[k, i, j], bin_w[k], grid_w[k], width, dx, sx, tx, cols, wx, gx)
                    for c in range(first, last):
                        plane = image[_input_channel(c, i, j, pooled_h, pooled_w, position_sensitive)]
                        share = grad[k, c, i, j] / count
                        for a in range(ny):
                            row_share = share * wy[a]
                            r = rows[a]
                            for b in range(nx):
                                plane[r, cols[b]] += row_share * wx[b]


@numba.njit(parallel=True, cache=True, nogil=True)
def _align_backward_origin(grad, input, batch_index, origin_h, origin_w, bin_h, bin_w, grid_h, grid_w,
                           position_sensitive, grad_origin_h, grad_origin_w):
    """Gradients (K, ph, pw) of the loss with respect to the bins' corners; tasks own RoIs."""
    rois, channels_out, pooled_h, pooled_w = grad.shape
    height, width = input.shape[2], input.shape[3]
    for k in numba.prange(rois):
        dy, sy, ty, rows, wy, gy = _scratch(height)
        dx, sx, tx, cols, wx, gx = _scratch(width)
        count = max(grid_h[k] * grid_w[k], 1.0)
        image = input[batch_index[k]]
        for i in range(pooled_h):
            for j in range(pooled_w):
                ny = _axis_weights(origin_h[k, i, j], bin_h[k], grid_h[k], height, dy, sy, ty, rows, wy, gy)
                nx = _axis_weights(origin_w[k, i, j], bin_w[k], grid_w[k], width, dx, sx, tx, cols, wx, gx)
                along_h = 0.0
                along_w = 0.0
                for c in range(channels_out):
                    plane = image[_input_channel(c, i, j, pooled_h, pooled_w, position_sensitive)]
                    g = grad[k, c, i, j]
                    along_h += g * _bin_sum(plane, rows, gy, ny, cols, wx, nx)
                    along_w += g * _bin_sum(plane, rows, wy, ny, cols, gx, nx)
                grad_origin_h[k, i, j] = along_h / count
                grad_origin_w[k, i, j] = along_w / count


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _align_arguments(bins):
    """The kernels' bin arguments (NumPy) from :class:`~convzoo.ops.roi.reference.AlignBins`."""
    def f64(t):
        return as_array(t.detach().to(torch.float64).contiguous())

    return (as_array(bins.batch_index.contiguous()), f64(bins.origin_h), f64(bins.origin_w), f64(bins.bin_h),
            f64(bins.bin_w), f64(bins.grid_h), f64(bins.grid_w))


def _chunk(channels: int, tasks_per_chunk: int, work: int) -> int:
    """Channels per task: a few tasks per thread, 16 channels at most."""
    return max(1, min(16, channels * tasks_per_chunk // (4 * threads(work))))


def _align_work(rois, geometry: AlignGeometry, height: int, width: int, channels: int) -> int:
    """Multiply-adds of a pass, counting about 3 rows x 3 columns per bin and channel."""
    return max(1, rois.shape[0] * channels * geometry.pooled_h * geometry.pooled_w * 9)


def align_forward(input: torch.Tensor, rois: torch.Tensor, offset, geometry: AlignGeometry) -> torch.Tensor:
    """As :func:`convzoo.ops.roi.reference.align_pool` (float32/float64 kernels, halves in float32)."""
    dtype = _compute_dtype(input.dtype)
    n, channels, height, width = input.shape
    bins = align_bins(rois.to(dtype), geometry, None if offset is None else offset.to(dtype))
    per_bin = geometry.pooled_h * geometry.pooled_w if geometry.position_sensitive else 1
    channels_out = channels // per_bin
    out = torch.empty((rois.shape[0], channels_out, geometry.pooled_h, geometry.pooled_w), dtype=dtype)
    if out.numel():
        work = _align_work(rois, geometry, height, width, channels_out)
        chunk = _chunk(channels_out, rois.shape[0], work)
        launch(_align_forward, as_array(input.to(dtype).contiguous()), *_align_arguments(bins),
               geometry.position_sensitive, chunk, as_array(out), work=work)
    return out.to(input.dtype)


def align_backward(grad: torch.Tensor, input: torch.Tensor, rois: torch.Tensor, offset, geometry: AlignGeometry,
                   need_input_grad: bool, need_offset_grad: bool):
    """``(grad_input or None, grad_offset or None)`` of :func:`align_forward`."""
    dtype = _compute_dtype(input.dtype)
    n, channels, height, width = input.shape
    work_offset = None if offset is None else offset.to(dtype)
    bins = align_bins(rois.to(dtype), geometry, work_offset)
    arguments = _align_arguments(bins)
    work_grad = as_array(grad.to(dtype).contiguous())
    work = _align_work(rois, geometry, height, width, grad.shape[1])
    grad_input = grad_offset = None
    if need_input_grad:
        grad_input = torch.zeros((n, channels, height, width), dtype=dtype)
        if grad.numel():
            launch(_align_backward_input, work_grad, *arguments, geometry.position_sensitive,
                   _chunk(channels, 1, work), as_array(grad_input), work=work)
        grad_input = grad_input.to(input.dtype)
    if need_offset_grad and offset is not None:
        grad_origin_h = torch.zeros(bins.origin_h.shape, dtype=torch.float64)
        grad_origin_w = torch.zeros(bins.origin_w.shape, dtype=torch.float64)
        if grad.numel():
            launch(_align_backward_origin, work_grad, as_array(input.to(dtype).contiguous()), *arguments,
                   geometry.position_sensitive, as_array(grad_origin_h), as_array(grad_origin_w), work=2 * work)
        # the bin corner moves by gamma * roi size * offset
        scale_w = (geometry.gamma * bins.roi_w).view(-1, 1, 1).to(torch.float64)
        scale_h = (geometry.gamma * bins.roi_h).view(-1, 1, 1).to(torch.float64)
        grad_offset = torch.stack([grad_origin_w * scale_w, grad_origin_h * scale_h], dim=1).to(offset.dtype)
    return grad_input, grad_offset


# --------------------------------------------------------------------------------------
# Integer-bin pools
# --------------------------------------------------------------------------------------
@numba.njit(parallel=True, cache=True, nogil=True)
def _ps_forward(input, batch_index, h0, h1, w0, w1, out):
    """``input`` (N, C, H, W); bins (K, ph) / (K, pw); ``out`` (K, C/(ph*pw), ph, pw).

    Tasks own input channels: channel ``(c*ph + i)*pw + j`` feeds output ``(k, c, i, j)`` of every
    RoI ``k`` only.
    """
    rois, channels_out, pooled_h, pooled_w = out.shape
    bins = pooled_h * pooled_w
    for channel in numba.prange(input.shape[1]):
        c = channel // bins
        i = (channel - c * bins) // pooled_w
        j = channel - c * bins - i * pooled_w
        for k in range(rois):
            y0, y1, x0, x1 = h0[k, i], h1[k, i], w0[k, j], w1[k, j]
            if y1 <= y0 or x1 <= x0:
                out[k, c, i, j] = 0
                continue
            plane = input[batch_index[k], channel]
            total = 0.0
            for y in range(y0, y1):
                for x in range(x0, x1):
                    total += plane[y, x]
            out[k, c, i, j] = total / ((y1 - y0) * (x1 - x0))


@numba.njit(parallel=True, cache=True, nogil=True)
def _ps_backward(grad, batch_index, h0, h1, w0, w1, grad_input):
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


@numba.njit(parallel=True, cache=True, nogil=True)
def _max_forward(input, batch_index, h0, h1, w0, w1, floor, out, argmax):
    """torchvision's roi_pool: per bin the first value above ``floor`` that beats all before it
    (row-major); ``argmax`` ``y*W + x`` or -1. Tasks own channels."""
    rois, channels, pooled_h, pooled_w = out.shape
    width = input.shape[3]
    for c in numba.prange(channels):
        for k in range(rois):
            plane = input[batch_index[k], c]
            for i in range(pooled_h):
                for j in range(pooled_w):
                    y0, y1, x0, x1 = h0[k, i], h1[k, i], w0[k, j], w1[k, j]
                    best = floor if (y1 > y0 and x1 > x0) else 0.0
                    where = -1
                    for y in range(y0, y1):
                        for x in range(x0, x1):
                            if plane[y, x] > best:
                                best = plane[y, x]
                                where = y * width + x
                    out[k, c, i, j] = best
                    argmax[k, c, i, j] = where


@numba.njit(parallel=True, cache=True, nogil=True)
def _max_backward(grad, batch_index, argmax, grad_input):
    """Add ``grad`` (K, C, ph, pw) at ``argmax`` into ``grad_input`` (N, C, H, W), zeroed; tasks own channels."""
    rois, channels, pooled_h, pooled_w = grad.shape
    width = grad_input.shape[3]
    for c in numba.prange(channels):
        for k in range(rois):
            plane = grad_input[batch_index[k], c]
            for i in range(pooled_h):
                for j in range(pooled_w):
                    where = argmax[k, c, i, j]
                    if where >= 0:
                        plane[where // width, where - (where // width) * width] += grad[k, c, i, j]


def _integer_bins(bins_of, rois: torch.Tensor, height: int, width: int, geometry: PoolGeometry, dtype):
    """``batch_index`` (K,), ``h0``/``h1`` (K, ph) and ``w0``/``w1`` (K, pw) as NumPy arrays."""
    batch_index, h0, h1, w0, w1 = bins_of(rois.to(dtype), height, width, geometry)
    count = rois.shape[0]
    return (as_array(batch_index.contiguous()),) + tuple(
        as_array(t.reshape(count, size).contiguous())
        for t, size in ((h0, geometry.pooled_h), (h1, geometry.pooled_h), (w0, geometry.pooled_w),
                        (w1, geometry.pooled_w)))


def ps_roi_pool(input: torch.Tensor, rois: torch.Tensor, geometry: PoolGeometry) -> torch.Tensor:
    """As :func:`convzoo.ops.roi.reference.ps_roi_pool` (float32/float64 kernels, halves in float32)."""
    n, channels, height, width = input.shape
    bins = geometry.pooled_h * geometry.pooled_w
    dtype = _compute_dtype(input.dtype)
    arguments = _integer_bins(ps_roi_pool_bins, rois, height, width, geometry, dtype)
    out = torch.empty((rois.shape[0], channels // bins, geometry.pooled_h, geometry.pooled_w), dtype=dtype)
    launch(_ps_forward, as_array(input.to(dtype).contiguous()), *arguments, as_array(out),
           work=out.numel() * max(1, height * width // bins))
    return out.to(input.dtype)


def ps_roi_pool_backward(grad_out: torch.Tensor, rois: torch.Tensor, input_shape, geometry: PoolGeometry):
    """As :func:`convzoo.ops.roi.reference.ps_roi_pool_backward`."""
    n, channels, height, width = input_shape
    dtype = _compute_dtype(grad_out.dtype)
    arguments = _integer_bins(ps_roi_pool_bins, rois, height, width, geometry, dtype)
    grad_input = torch.zeros(tuple(input_shape), dtype=dtype)
    launch(_ps_backward, as_array(grad_out.to(dtype).contiguous()), *arguments, as_array(grad_input),
           work=grad_input.numel())
    return grad_input.to(grad_out.dtype)


def roi_pool(input: torch.Tensor, rois: torch.Tensor, geometry: PoolGeometry, floor: float):
    """As :func:`convzoo.ops.roi.reference.roi_pool_argmax`: ``(out, argmax)``."""
    n, channels, height, width = input.shape
    dtype = _compute_dtype(input.dtype)
    arguments = _integer_bins(roi_pool_bins, rois, height, width, geometry, dtype)
    shape = (rois.shape[0], channels, geometry.pooled_h, geometry.pooled_w)
    out = torch.empty(shape, dtype=dtype)
    argmax = torch.empty(shape, dtype=torch.int64)
    launch(_max_forward, as_array(input.to(dtype).contiguous()), *arguments, floor, as_array(out), as_array(argmax),
           work=out.numel() * max(1, height * width // (geometry.pooled_h * geometry.pooled_w)))
    return out.to(input.dtype), argmax


def roi_pool_backward(grad_out: torch.Tensor, rois: torch.Tensor, argmax: torch.Tensor, input_shape) -> torch.Tensor:
    """Gradient of :func:`roi_pool`: ``grad_out`` added at each bin's ``argmax``."""
    dtype = _compute_dtype(grad_out.dtype)
    grad_input = torch.zeros(tuple(input_shape), dtype=dtype)
    launch(_max_backward, as_array(grad_out.to(dtype).contiguous()), as_array(rois[:, 0].long().contiguous()),
           as_array(argmax.contiguous()), as_array(grad_input), work=grad_out.numel())
    return grad_input.to(grad_out.dtype)
