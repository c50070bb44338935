"""Numba kernels of :mod:`convzoo.ops._bilinear_rows` (imported through ``_numba.kernels`` only).

Shapes: ``rows`` ``(R, C)``, ``columns``/``values`` ``(B, E)`` (gather_sum, scatter_add), ``top_left`` ``(S,)``, ``steps`` ``(4,)``, ``weights`` ``(4, S)``,
``grad``/``out`` ``(S, C)``, ``dots`` ``(S, 4)``, ``copies`` ``(T, R', C)``.
"""
from __future__ import annotations

import numpy as np

from ._numba import require_numba

numba = require_numba()


@numba.njit(parallel=True, cache=True, nogil=True)
def sample(rows, top_left, steps, weights, out):
    """``out[s] = sum_k weights[k, s] * rows[top_left[s] + steps[k]]``, parallel over samples."""
    channels = rows.shape[1]
    for s in numba.prange(top_left.shape[0]):
        r = top_left[s]
        a0, a1, a2, a3 = rows[r + steps[0]], rows[r + steps[1]], rows[r + steps[2]], rows[r + steps[3]]
        w0, w1, w2, w3 = weights[0, s], weights[1, s], weights[2, s], weights[3, s]
        o = out[s]
        for c in range(channels):
            o[c] = w0 * a0[c] + w1 * a1[c] + w2 * a2[c] + w3 * a3[c]


@numba.njit(parallel=True, cache=True, nogil=True)
def backward(rows, top_left, steps, weights, grad, dots, copies, row_base, bounds, private):
    """Corner dots and the scatter-add of the rows' gradient.

    Task ``t`` handles samples ``bounds[t]:bounds[t + 1]`` and adds into ``copies[t]`` when
    ``private``, else into ``copies[0]`` (its samples' rows are its own); copy row ``i`` is table
    row ``row_base + i``.
    """
    channels = rows.shape[1]
    for parallel_task in numba.prange(bounds.shape[0] - 1):
        task = np.int64(parallel_task)  # prange's index may be unsigned: keep the arithmetic in int64
        target = copies[task] if private else copies[0]
        for s in range(bounds[task], bounds[task + 1]):
            r = top_left[s]
            a0, a1, a2, a3 = rows[r + steps[0]], rows[r + steps[1]], rows[r + steps[2]], rows[r + steps[3]]
            g0 = target[r + steps[0] - row_base]
            g1 = target[r + steps[1] - row_base]
            g2 = target[r + steps[2] - row_base]
            g3 = target[r + steps[3] - row_base]
            w0, w1, w2, w3 = weights[0, s], weights[1, s], weights[2, s], weights[3, s]
            go = grad[s]
            d0 = go[0] - go[0]
            d1 = d0
            d2 = d0
            d3 = d0
            for c in range(channels):
                d0 += a0[c] * go[c]
                d1 += a1[c] * go[c]
                d2 += a2[c] * go[c]
                d3 += a3[c] * go[c]
            for c in range(channels):
                g0[c] += w0 * go[c]
                g1[c] += w1 * go[c]
                g2[c] += w2 * go[c]
                g3[c] += w3 * go[c]
            dots[s, 0] = d0
            dots[s, 1] = d1
            dots[s, 2] = d2
            dots[s, 3] = d3


@numba.njit(parallel=True, cache=True, nogil=True)
def gather_sum(rows, columns, values, out):
    """``out[r] = sum_e values[r, e] * rows[columns[r, e]]``, one task per output row."""
    channels = rows.shape[1]
    for r in numba.prange(columns.shape[0]):
        o = out[r]
        o[:] = 0
        for e in range(columns.shape[1]):
            w = values[r, e]
            a = rows[columns[r, e]]
            for c in range(channels):
                o[c] += w * a[c]


@numba.njit(parallel=True, cache=True, nogil=True)
def scatter_add(copies, columns, values, grad):
    """``copies[t][columns[r, e]] += values[r, e] * grad[r]``; task ``t`` owns a block of ``r`` and copy ``t``."""
    tasks = copies.shape[0]
    count = columns.shape[0]
    channels = grad.shape[1]
    for parallel_task in numba.prange(tasks):
        task = np.int64(parallel_task)
        target = copies[task]
        for r in range(task * count // tasks, (task + 1) * count // tasks):
            go = grad[r]
            for e in range(columns.shape[1]):
                w = values[r, e]
                g = target[columns[r, e]]
                for c in range(channels):
                    g[c] += w * go[c]
