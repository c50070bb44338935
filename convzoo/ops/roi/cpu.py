"""Numba CPU kernels of the channel-owned RoI operators (imported through ``_numba.kernels`` only).

``ps_roi_pool`` (mean) and ``roi_pool`` (maximum), one loop per output bin over the bins of
:func:`convzoo.ops.roi.reference.ps_roi_pool_bins` / ``roi_pool_bins``. Tasks own input
channels (every RoI's bins reading that channel), so the backwards add without races, and a
task's feature plane stays in cache across the RoIs. The position-sensitive bilinear pools
(``ps_roi_align``, ``deform_ps_roi_pool``) sum the reference's samples the same way, tasks owning
channel groups of the NCHW input (:func:`grouped_gather`, :func:`grouped_scatter`): no feature table
is built, and each backward writes its channels' gradient whole. (``roi_align`` and ``deform_roi_pool``,
whose every bin reads every channel, run on the row-gather engine of :mod:`convzoo.ops._bilinear_rows`.)
"""
from __future__ import annotations

import numpy as np
import torch

from .._numba import as_array, launch, require_numba, threads
from .reference import PoolGeometry, ps_roi_pool_bins, roi_pool_bins

numba = require_numba()


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


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


@numba.njit(parallel=True, cache=True, nogil=True)
def _scatter_rows(grad_rows, columns, values, grad, chunk):
    """``grad_rows[columns[r, e], c] += values[r, e] * grad[r, c]``; tasks own chunks of columns ``c``."""
    rows, entries = columns.shape
    width = grad.shape[1]
    for parallel_task in numba.prange((width + chunk - 1) // chunk):
        c0 = np.int64(parallel_task) * chunk
        c1 = min(width, c0 + chunk)
        for r in range(rows):
            for e in range(entries):
                value = values[r, e]
                if value != 0:
                    target = columns[r, e]
                    for c in range(c0, c1):
                        grad_rows[target, c] += value * grad[r, c]


def scatter_rows(grad_rows: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, grad: torch.Tensor) -> None:
    """The input gradient's scatter of the bilinear RoI poolings (see :func:`_scatter_rows`), in place
    into the contiguous ``grad_rows`` (rows, C)."""
    width = grad.shape[1]
    chunk = max(1, -(-width // (4 * threads())))
    launch(_scatter_rows, as_array(grad_rows), as_array(columns.to(torch.int64).contiguous()),
           as_array(values.to(grad.dtype).contiguous()), as_array(grad.contiguous()), chunk,
           work=values.numel() * width)


# --------------------------------------------------------------------------------------
# Position-sensitive bilinear pools, straight from the NCHW input
# --------------------------------------------------------------------------------------
@numba.njit(parallel=True, cache=True, nogil=True)
def _grouped_gather(input, columns, values, batch_index, group_bins, group_start, coord_sets, out):
    """``out`` (K, Q*Cq, P) of :func:`convzoo.ops.roi.reference.bilinear_pool_fast` from ``input``
    (N, C, H*W), C = Q*Cq*G; ``columns``/``values`` (K*Q*P, E) index the rows of the reference's
    feature table; bins ``group_bins[group_start[g]:group_start[g + 1]]`` read group ``g``.

    Tasks own ``(coordinate set q, group g)``: input channels ``(q*Cq + c)*G + g`` for every ``c``,
    read by those bins only. A bin's entries are turned into plane offsets once and reused for
    its ``Cq`` channels, whose planes stay in cache across the RoIs.
    """
    plane = input.shape[2]
    rois, sets_channels, bins = out.shape
    groups = group_start.shape[0] - 1
    per_group = sets_channels // coord_sets
    entries = columns.shape[1]
    for parallel_task in numba.prange(coord_sets * groups):
        task = np.int64(parallel_task)
        q = task // groups
        g = task - q * groups
        pixel = np.empty(entries, dtype=np.int64)
        for k in range(rois):
            image = batch_index[k]
            base = ((image * coord_sets + q) * groups + g) * plane
            for i in range(group_start[g], group_start[g + 1]):
                p = group_bins[i]
                r = (k * coord_sets + q) * bins + p
                for e in range(entries):
                    pixel[e] = columns[r, e] - base
                for c in range(per_group):
                    src = input[image, (q * per_group + c) * groups + g]
                    total = 0.0
                    for e in range(entries):
                        total += values[r, e] * src[pixel[e]]
                    out[k, q * per_group + c, p] = total


@numba.njit(parallel=True, cache=True, nogil=True)
def _grouped_scatter(grad, columns, values, batch_index, group_bins, group_start, coord_sets, grad_input):
    """The input gradient (N, C, H*W) of :func:`_grouped_gather` for ``grad`` (K, Q*Cq, P), written
    whole (no zeroing needed before); tasks own the same channels, so no two add into the same memory."""
    plane = grad_input.shape[2]
    rois, sets_channels, bins = grad.shape
    groups = group_start.shape[0] - 1
    per_group = sets_channels // coord_sets
    entries = columns.shape[1]
    for parallel_task in numba.prange(coord_sets * groups):
        task = np.int64(parallel_task)
        q = task // groups
        g = task - q * groups
        for image in range(grad_input.shape[0]):
            for c in range(per_group):
                grad_input[image, (q * per_group + c) * groups + g, :] = 0
        pixel = np.empty(entries, dtype=np.int64)
        for k in range(rois):
            image = batch_index[k]
            base = ((image * coord_sets + q) * groups + g) * plane
            for i in range(group_start[g], group_start[g + 1]):
                p = group_bins[i]
                r = (k * coord_sets + q) * bins + p
                for e in range(entries):
                    pixel[e] = columns[r, e] - base
                for c in range(per_group):
                    dst = grad_input[image, (q * per_group + c) * groups + g]
                    share = grad[k, q * per_group + c, p]
                    for e in range(entries):
                        dst[pixel[e]] += values[r, e] * share


def _group_lists(bin_group: torch.Tensor, groups: int):
    """``(group_bins, group_start)``: the bins of group ``g`` are ``group_bins[group_start[g]:group_start[g+1]]``."""
    order = torch.argsort(bin_group, stable=True)
    start = torch.zeros(groups + 1, dtype=torch.int64)
    start[1:] = torch.bincount(bin_group, minlength=groups).cumsum(0)
    return as_array(order.contiguous()), as_array(start)


def grouped_gather(input: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, batch_index: torch.Tensor,
                   bin_group: torch.Tensor, groups: int, coord_sets: int) -> torch.Tensor:
    """The position-sensitive pooling (K, Q*Cq, P) of :func:`_grouped_gather`, in ``input``'s dtype
    (float32 or float64); ``columns``/``values`` (K*Q*P, E)."""
    n, channels, height, width = input.shape
    rois, bins = batch_index.shape[0], bin_group.shape[0]
    out = input.new_empty((rois, channels // groups, bins))
    launch(_grouped_gather, as_array(input.contiguous()).reshape(n, channels, height * width),
           as_array(columns.contiguous()), as_array(values.to(input.dtype).contiguous()),
           as_array(batch_index.to(torch.int64).contiguous()), *_group_lists(bin_group, groups), coord_sets,
           as_array(out), work=values.numel() * (channels // (groups * coord_sets)))
    return out


def grouped_scatter(grad: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, batch_index: torch.Tensor,
                    bin_group: torch.Tensor, groups: int, coord_sets: int, input_shape) -> torch.Tensor:
    """The input gradient (N, C, H, W) of :func:`grouped_gather` for ``grad`` (K, Q*Cq, P)."""
    n, channels, height, width = input_shape
    grad_input = grad.new_empty((n, channels, height * width))
    launch(_grouped_scatter, as_array(grad.contiguous()), as_array(columns.contiguous()),
           as_array(values.to(grad.dtype).contiguous()), as_array(batch_index.to(torch.int64).contiguous()),
           *_group_lists(bin_group, groups), coord_sets, as_array(grad_input),
           work=values.numel() * (channels // (groups * coord_sets)))
    return grad_input.view(n, channels, height, width)


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
