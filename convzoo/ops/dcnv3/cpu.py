"""DCNv3 CPU kernels compiled by Numba: forward and backward, float32 and float64.

Imported through :func:`convzoo.ops._numba.kernels` only (this module needs Numba). The
definition is that of :mod:`convzoo.ops.dcnv3`; ``reference.py`` is the oracle these kernels
are tested against.

Every array handed to the kernels is a contiguous view of the operator's own layouts:
``x`` ``(N, H, W, G, C)``, ``offset`` ``(N, H_out, W_out, G, P, 2)`` holding ``(x, y)`` pairs,
``mask`` ``(N, H_out, W_out, G, P)``, ``out``/``grad_out`` ``(N, H_out, W_out, G, C)``. The
kernels run in parallel over the ``N * H_out`` output rows:

* forward: each output row is written by one thread, one pass over the channels per sample
  (the four corners at once; a corner outside the input has weight zero);
* backward: ``grad_offset`` and ``grad_mask`` belong to the sample's output row, so each is
  written by one thread. ``grad_x`` is a scatter: a thread owns whole batch elements when there
  are enough of them (it writes ``grad_x`` directly), otherwise a contiguous block of output rows
  with its own zeroed copy of ``grad_x``, and the copies are summed afterwards. No two threads
  ever add into the same memory.

With ``softmax`` the mask holds logits: both kernels normalise each group's ``P`` of them into a
per-row scratch before sampling (one exponential per point), and the backward turns the mask
gradient into that of the logits.
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Tuple

import numpy as np
import torch

from .._checks import compute_dtype
from .._numba import as_array, launch, require_numba, threads
from .reference import Geometry, kernel_grid

numba = require_numba()

# A thread that owns a block of output rows in the backward accumulates grad_x into its own copy;
# the copies together stay below this many bytes (fewer copies, so fewer threads, beyond it).
MAX_BACKWARD_COPY_BYTES = 1 << 28


@numba.njit(inline="always")
def _corners(loc_x, loc_y, height, width, one):
    """Bilinear cell of a sample read by the CUDA kernel (``-1 < loc < size``).

    Returns the top-left pixel ``(iy, ix)``, the fractional parts ``(fx, fy)`` and the validity
    (1 or 0, the dtype of ``one``) of corners (y0x0, y0x1, y1x0, y1x1).
    """
    y0 = np.floor(loc_y)  # math.floor would give an int64 and turn float32 arithmetic into float64
    x0 = np.floor(loc_x)
    iy = int(y0)
    ix = int(x0)
    fy = loc_y - y0
    fx = loc_x - x0
    zero = one - one
    top = iy >= 0
    bottom = iy + 1 < height
    left = ix >= 0
    right = ix + 1 < width
    v00 = one if top and left else zero
    v01 = one if top and right else zero
    v10 = one if bottom and left else zero
    v11 = one if bottom and right else zero
    return iy, ix, fx, fy, v00, v01, v10, v11


@numba.njit(inline="always")
def _clamp(index, size):
    return min(max(index, 0), size - 1)


@numba.njit(inline="always")
def _softmax(logits, probs):
    """``probs[:] = softmax(logits)`` (one exponential per point), returns ``probs``."""
    top = logits[0]
    for p in range(1, logits.shape[0]):
        top = max(top, logits[p])
    probs[0] = np.exp(logits[0] - top)
    total = probs[0]
    for p in range(1, logits.shape[0]):
        probs[p] = np.exp(logits[p] - top)
        total += probs[p]
    for p in range(logits.shape[0]):
        probs[p] /= total
    return probs


@numba.njit(parallel=True, cache=True, nogil=True)
def _forward(x, offset, mask, grid_x, grid_y, base_x, base_y, scale, one, softmax, out):
    """``out`` ``(N, H_out, W_out, G, C)`` of the samples (shapes in the module docstring).

    ``softmax``: ``mask`` holds logits, normalised over the points of each group here.
    """
    n, height, width, group, channels = x.shape
    height_out, width_out, points = offset.shape[1], offset.shape[2], offset.shape[4]
    for row in numba.prange(n * height_out):
        b = row // height_out
        ho = row - b * height_out
        probs = np.empty_like(grid_x)  # (P,) in the compute dtype
        for wo in range(width_out):
            for g in range(group):
                acc = out[b, ho, wo, g]
                acc[:] = 0
                weights = _softmax(mask[b, ho, wo, g], probs) if softmax else mask[b, ho, wo, g]
                for p in range(points):
                    loc_x = base_x[wo] + (grid_x[p] + offset[b, ho, wo, g, p, 0]) * scale
                    loc_y = base_y[ho] + (grid_y[p] + offset[b, ho, wo, g, p, 1]) * scale
                    if not (loc_x > -1 and loc_y > -1 and loc_x < width and loc_y < height):
                        continue
                    iy, ix, fx, fy, v00, v01, v10, v11 = _corners(loc_x, loc_y, height, width, one)
                    m = weights[p]
                    my1 = m * fy
                    my0 = m - my1
                    w00 = (my0 - my0 * fx) * v00
                    w01 = my0 * fx * v01
                    w10 = (my1 - my1 * fx) * v10
                    w11 = my1 * fx * v11
                    y0, y1 = _clamp(iy, height), _clamp(iy + 1, height)
                    x0, x1 = _clamp(ix, width), _clamp(ix + 1, width)
                    a00, a01, a10, a11 = x[b, y0, x0, g], x[b, y0, x1, g], x[b, y1, x0, g], x[b, y1, x1, g]
                    for c in range(channels):
                        acc[c] += w00 * a00[c] + w01 * a01[c] + w10 * a10[c] + w11 * a11[c]


@numba.njit(inline="always")
def _softmax_backward(probs, grad):
    """Turn ``grad`` (of the softmax's output ``probs``) into the gradient of its logits, in place:
    ``probs * (grad - sum(probs * grad))``."""
    dot = probs[0] * grad[0]
    for p in range(1, probs.shape[0]):
        dot += probs[p] * grad[p]
    for p in range(probs.shape[0]):
        grad[p] = probs[p] * (grad[p] - dot)


@numba.njit(cache=True, nogil=True)
def _backward_rows(first_row, last_row, grad_out, x, offset, mask, grid_x, grid_y, base_x, base_y, scale, one,
                   softmax, grad_x, grad_offset, grad_mask):
    """Backward of output rows ``first_row <= row < last_row`` (of ``N * H_out``), adding into ``grad_x``.

    ``softmax``: ``mask`` holds logits (see :func:`_forward`); ``grad_mask`` is then theirs.
    """
    n, height, width, group, channels = x.shape
    height_out, width_out, points = offset.shape[1], offset.shape[2], offset.shape[4]
    probs = np.empty_like(grid_x)  # (P,) in the compute dtype
    for row in range(first_row, last_row):
        b = row // height_out
        ho = row - b * height_out
        for wo in range(width_out):
            for g in range(group):
                go = grad_out[b, ho, wo, g]
                weights = _softmax(mask[b, ho, wo, g], probs) if softmax else mask[b, ho, wo, g]
                for p in range(points):
                    loc_x = base_x[wo] + (grid_x[p] + offset[b, ho, wo, g, p, 0]) * scale
                    loc_y = base_y[ho] + (grid_y[p] + offset[b, ho, wo, g, p, 1]) * scale
                    grad_offset[b, ho, wo, g, p, 0] = 0
                    grad_offset[b, ho, wo, g, p, 1] = 0
                    grad_mask[b, ho, wo, g, p] = 0
                    if not (loc_x > -1 and loc_y > -1 and loc_x < width and loc_y < height):
                        continue
                    iy, ix, fx, fy, v00, v01, v10, v11 = _corners(loc_x, loc_y, height, width, one)
                    m = weights[p]
                    gy = one - fy
                    gx = one - fx
                    w00 = gy * gx * v00
                    w01 = gy * fx * v01
                    w10 = fy * gx * v10
                    w11 = fy * fx * v11
                    mw00, mw01, mw10, mw11 = m * w00, m * w01, m * w10, m * w11
                    y0, y1 = _clamp(iy, height), _clamp(iy + 1, height)
                    x0, x1 = _clamp(ix, width), _clamp(ix + 1, width)
                    a00, a01, a10, a11 = x[b, y0, x0, g], x[b, y0, x1, g], x[b, y1, x0, g], x[b, y1, x1, g]
                    g00, g01 = grad_x[b, y0, x0, g], grad_x[b, y0, x1, g]
                    g10, g11 = grad_x[b, y1, x0, g], grad_x[b, y1, x1, g]
                    d00 = one - one
                    d01 = d00
                    d10 = d00
                    d11 = d00
                    for c in range(channels):
                        d00 += a00[c] * go[c]
                        d01 += a01[c] * go[c]
                        d10 += a10[c] * go[c]
                        d11 += a11[c] * go[c]
                    for c in range(channels):
                        g00[c] += mw00 * go[c]
                        g01[c] += mw01 * go[c]
                        g10[c] += mw10 * go[c]
                        g11[c] += mw11 * go[c]
                    d00 *= v00
                    d01 *= v01
                    d10 *= v10
                    d11 *= v11
                    grad_mask[b, ho, wo, g, p] = w00 * d00 + w01 * d01 + w10 * d10 + w11 * d11
                    ms = m * scale
                    grad_offset[b, ho, wo, g, p, 0] = (gy * (d01 - d00) + fy * (d11 - d10)) * ms
                    grad_offset[b, ho, wo, g, p, 1] = (gx * (d10 - d00) + fx * (d11 - d01)) * ms
                if softmax:
                    _softmax_backward(probs, grad_mask[b, ho, wo, g])


@numba.njit(parallel=True, cache=True, nogil=True)
def _backward(grad_out, x, offset, mask, grid_x, grid_y, base_x, base_y, scale, one, softmax, by_batch,
              grad_x_copies, grad_offset, grad_mask):
    """Backward; ``grad_x_copies`` ``(copies, N, H, W, G, C)``, zeroed.

    ``by_batch``: task ``t`` owns batch element ``t`` and writes copy 0 (the only one); otherwise
    task ``t`` owns a block of output rows and writes copy ``t``.
    """
    n, height_out = x.shape[0], offset.shape[1]
    rows = n * height_out
    tasks = n if by_batch else grad_x_copies.shape[0]
    for parallel_task in numba.prange(tasks):
        task = np.int64(parallel_task)  # prange's index may be unsigned: keep the arithmetic in int64
        if by_batch:
            first, last, copy = task * height_out, (task + 1) * height_out, 0
        else:
            first, last, copy = task * rows // tasks, (task + 1) * rows // tasks, task
        _backward_rows(first, last, grad_out, x, offset, mask, grid_x, grid_y, base_x, base_y, scale, one, softmax,
                       grad_x_copies[copy], grad_offset, grad_mask)


class _Prepared(NamedTuple):
    """The kernels' inputs: arrays in the shapes of the module docstring, then the constants."""

    dtype: torch.dtype
    arrays: tuple  # x, offset, mask (NumPy views of contiguous tensors in the compute dtype)
    constants: tuple  # grid_x, grid_y, base_x, base_y, scale, one


@functools.lru_cache(maxsize=256)
def _constants(geometry: Geometry, height_out: int, width_out: int, dtype: torch.dtype) -> tuple:
    """``(grid_x, grid_y, base_x, base_y, scale, one)`` for the kernels, in ``dtype``."""
    g = geometry
    grid_x, grid_y = kernel_grid(g.kernel_h, g.kernel_w, g.dilation_h, g.dilation_w, g.remove_center, dtype=dtype)
    half_h = (g.dilation_h * (g.kernel_h - 1)) // 2
    half_w = (g.dilation_w * (g.kernel_w - 1)) // 2
    # As reference.sampling_locations: window centres in the compute dtype.
    base_y = torch.arange(height_out, dtype=dtype) * g.stride_h + (half_h - g.pad_h)
    base_x = torch.arange(width_out, dtype=dtype) * g.stride_w + (half_w - g.pad_w)
    scalar = as_array(grid_x).dtype.type
    return (as_array(grid_x), as_array(grid_y), as_array(base_x), as_array(base_y), scalar(g.offset_scale),
            scalar(1))


def _kernel_array(tensor: torch.Tensor, dtype: torch.dtype, shape: tuple) -> np.ndarray:
    """``tensor`` as a contiguous NumPy array of ``dtype`` and ``shape``, a view when it already is one
    (the small calls of a batch-1 InternImage pay for every tensor operation here, ~1 us each)."""
    if tensor.dtype != dtype:
        tensor = tensor.to(dtype)
    return as_array(tensor.contiguous()).reshape(shape)


def _prepare(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, geometry: Geometry) -> _Prepared:
    g = geometry
    dtype = compute_dtype(x.dtype)
    n, height, width, _ = x.shape
    _, height_out, width_out, _ = offset.shape
    points = mask.shape[3] // g.group
    arrays = (_kernel_array(x, dtype, (n, height, width, g.group, g.group_channels)),
              _kernel_array(offset, dtype, (n, height_out, width_out, g.group, points, 2)),
              _kernel_array(mask, dtype, (n, height_out, width_out, g.group, points)))
    return _Prepared(dtype, arrays, _constants(g, height_out, width_out, dtype))


def dcnv3_forward(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, geometry: Geometry,
                  softmax: bool = False) -> torch.Tensor:
    """Forward (no autograd): ``(N, H, W, G*C)`` -> ``(N, H_out, W_out, G*C)`` in x's dtype.

    ``softmax``: ``mask`` holds logits, normalised over the points of each group by the kernel.
    """
    prep = _prepare(x, offset, mask, geometry)
    n, height_out, width_out = offset.shape[:3]
    out = torch.empty((n, height_out, width_out, x.shape[3]), dtype=prep.dtype)
    launch(_forward, *prep.arrays, *prep.constants, softmax, as_array(out).reshape(prep.arrays[1].shape[:4] + (-1,)),
           work=_work(prep))
    return out if out.dtype == x.dtype else out.to(x.dtype)


def _work(prep: _Prepared) -> int:
    """Multiply-adds of a forward: four corners per sample and channel."""
    return 4 * prep.arrays[2].size * prep.arrays[0].shape[-1]


def _backward_copies(n: int, x_bytes: int, work: int) -> Tuple[bool, int]:
    """``(by_batch, copies of grad_x)`` for the backward's ``grad_x`` ownership with :func:`threads` threads."""
    workers = threads(work)
    if n >= workers and (n % workers == 0 or n >= 4 * workers):
        return True, 1
    return False, max(1, min(workers, MAX_BACKWARD_COPY_BYTES // max(1, x_bytes)))


def dcnv3_backward(grad_out: torch.Tensor, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                   geometry: Geometry, softmax: bool = False) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(grad_x, grad_offset, grad_mask)``, each in the dtype of its input (``softmax``: as
    :func:`dcnv3_forward`; ``grad_mask`` is then that of the logits)."""
    prep = _prepare(x, offset, mask, geometry)
    x_array, offset_array, mask_array = prep.arrays
    grad = as_array(grad_out.to(prep.dtype).contiguous()).reshape(offset_array.shape[:4] + (-1,))
    work = 2 * _work(prep)
    by_batch, copies = _backward_copies(x.shape[0], x_array.nbytes, work)
    grad_x = torch.zeros((copies,) + tuple(x.shape), dtype=prep.dtype)
    grad_offset = torch.empty(offset.shape, dtype=prep.dtype)
    grad_mask = torch.empty(mask.shape, dtype=prep.dtype)
    launch(_backward, grad, *prep.arrays, *prep.constants, softmax, by_batch,
           as_array(grad_x).reshape((copies,) + x_array.shape), as_array(grad_offset).reshape(offset_array.shape),
           as_array(grad_mask).reshape(mask_array.shape), work=work)
    grad_x = grad_x[0] if copies == 1 else grad_x.sum(0)
    return grad_x.to(x.dtype), grad_offset.to(offset.dtype), grad_mask.to(mask.dtype)
