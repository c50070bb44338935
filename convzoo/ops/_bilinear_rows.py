"""Bilinear sampling of a table of rows: the CPU engine of ``deform_conv2d`` and the RoI operators.

The operator reads, for every sample ``s``, the four corners of a bilinear cell in a table of
``rows`` (the zero-padded input laid out as ``(num_rows, channels)``): corner ``k`` is row
``top_left[s] + steps[k]``, weighted by ``weights[k][s]``. Out-of-image corners read rows of
zeros (the caller pads the input). Three operations, each in Numba (``_bilinear_rows_numba.py``)
or, without Numba, in plain PyTorch gathers:

* :func:`sample`: ``out[s] = sum_k weights[k][s] * rows[top_left[s] + steps[k]]``;
* :func:`backward`: the corners' dot products with each sample's upstream gradient (for the
  gradients of the coordinates and of the mask), and the gradient of the rows, a scatter-add of
  ``weights[k][s] * grad[s]``. Samples are split among the threads at ``segment`` boundaries
  (a segment's samples read rows of its own ``segment_rows`` only, e.g. one batch element), so
  that no two threads add into the same row; with fewer segments than threads, each thread
  adds into its own zeroed copy of the rows the samples can reach, summed afterwards.

The RoI operators read ``E`` entries (4 corners x samples) per output bin at arbitrary rows:
:func:`gather_sum` (one loop per output bin) and :func:`scatter_add` (each thread adds into its
own copy of the table, or the only one with one thread).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ._numba import as_array, kernels, launch, threads

_KERNELS = __name__ + "_numba"


def _corner_rows(top_left: torch.Tensor, steps: Sequence[int]) -> torch.Tensor:
    return torch.stack([top_left + step for step in steps])  # (4, S)


def _numba_arguments(rows, top_left, steps, weights):
    index = torch.tensor(list(steps), dtype=torch.int64)
    return (as_array(rows), as_array(top_left.to(torch.int64).contiguous()), as_array(index),
            as_array(torch.stack(list(weights)).to(rows.dtype).contiguous()))


def sample(rows: torch.Tensor, top_left: torch.Tensor, steps: Sequence[int],
           weights: Sequence[torch.Tensor]) -> torch.Tensor:
    """The samples ``(S, channels)``.

    Args:
        rows: ``(num_rows, channels)`` table, contiguous.
        top_left: ``(S,)`` top-left corner row of every sample.
        steps: the row distance from the top-left corner to corners 0..3.
        weights: four ``(S,)`` tensors, the weight of corner k of every sample.
    """
    numba_kernels = kernels(_KERNELS) if rows.device.type == "cpu" else None
    if numba_kernels is None:
        values = rows.index_select(0, _corner_rows(top_left, steps).reshape(-1)).view(4, -1, rows.shape[1])
        return (values * torch.stack(list(weights)).unsqueeze(-1)).sum(0)
    out = rows.new_empty((top_left.numel(), rows.shape[1]))
    launch(numba_kernels.sample, *_numba_arguments(rows, top_left, steps, weights), as_array(out),
           work=4 * out.numel())
    return out


def backward(rows: torch.Tensor, top_left: torch.Tensor, steps: Sequence[int], weights: Sequence[torch.Tensor],
             grad: torch.Tensor, grad_rows: torch.Tensor, segment: int, segment_rows: int,
             first_sample: int = 0) -> torch.Tensor:
    """Add the rows' gradient into ``grad_rows`` (in place) and return the corner dots ``(S, 4)``.

    Args:
        rows, top_left, steps, weights: as for :func:`sample`.
        grad: ``(S, channels)`` upstream gradient of the samples.
        grad_rows: ``(num_rows, channels)`` accumulator, contiguous.
        segment, segment_rows: samples and table rows per segment: sample ``s`` (``s = 0`` is
            sample ``first_sample`` of the whole operation) reads rows of segment
            ``(first_sample + s) // segment`` only.
    """
    numba_kernels = kernels(_KERNELS) if rows.device.type == "cpu" else None
    if numba_kernels is None:
        corner_rows = _corner_rows(top_left, steps)
        values = rows.index_select(0, corner_rows.reshape(-1)).view(4, -1, rows.shape[1])
        for k in range(4):
            grad_rows.index_add_(0, corner_rows[k], grad * weights[k].unsqueeze(-1))
        return (values * grad).sum(-1).t()
    count = top_left.numel()
    dots = rows.new_empty((count, 4))
    if count == 0:
        return dots
    work = 8 * grad.numel()
    workers = threads(work)
    first = first_sample // segment
    last = (first_sample + count - 1) // segment + 1
    segments = last - first
    if segments >= workers:
        # Tasks own whole segments and add into grad_rows directly.
        bounds = torch.tensor([min(count, max(0, (first + t * segments // workers) * segment - first_sample))
                               for t in range(workers)] + [count])
        copies = grad_rows[first * segment_rows: last * segment_rows].unsqueeze(0)
        launch(numba_kernels.backward, *_numba_arguments(rows, top_left, steps, weights), as_array(grad.contiguous()),
               as_array(dots), as_array(copies), first * segment_rows, as_array(bounds), False, work=work)
        return dots
    bounds = torch.tensor([t * count // workers for t in range(workers + 1)])
    copies = grad_rows.new_zeros((workers, (last - first) * segment_rows, grad_rows.shape[1]))
    launch(numba_kernels.backward, *_numba_arguments(rows, top_left, steps, weights), as_array(grad.contiguous()),
           as_array(dots), as_array(copies), first * segment_rows, as_array(bounds), True, work=work)
    grad_rows[first * segment_rows: last * segment_rows] += copies.sum(0)
    return dots


def gather_sum(rows: torch.Tensor, columns: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``out[r] = sum_e values[r, e] * rows[columns[r, e]]``: ``(R, channels)``.

    Args:
        rows: ``(num_rows, channels)`` table.
        columns: ``(R, E)`` row indices (int64).
        values: ``(R, E)`` weights.
    """
    numba_kernels = kernels(_KERNELS) if rows.device.type == "cpu" else None
    if numba_kernels is None:
        gathered = rows.index_select(0, columns.reshape(-1)).view(columns.shape[0], columns.shape[1], -1)
        return torch.bmm(values.to(rows.dtype).unsqueeze(1), gathered).squeeze(1)
    rows = rows.contiguous()
    out = rows.new_empty((columns.shape[0], rows.shape[1]))
    launch(numba_kernels.gather_sum, as_array(rows), as_array(columns.to(torch.int64).contiguous()),
           as_array(values.to(rows.dtype).contiguous()), as_array(out), work=values.numel() * rows.shape[1])
    return out


def scatter_add(grad_rows: torch.Tensor, columns: torch.Tensor, values: torch.Tensor, grad: torch.Tensor) -> None:
    """``grad_rows[columns[r, e]] += values[r, e] * grad[r]`` in place (the transpose of :func:`gather_sum`)."""
    numba_kernels = kernels(_KERNELS) if grad_rows.device.type == "cpu" else None
    if numba_kernels is None:
        spread = values.to(grad.dtype).unsqueeze(-1) * grad.unsqueeze(1)
        grad_rows.index_add_(0, columns.reshape(-1), spread.reshape(-1, grad.shape[1]))
        return
    work = values.numel() * grad.shape[1]
    workers = threads(work)
    copies = grad_rows.unsqueeze(0) if workers == 1 else grad_rows.new_zeros((workers,) + tuple(grad_rows.shape))
    launch(numba_kernels.scatter_add, as_array(copies), as_array(columns.to(torch.int64).contiguous()),
           as_array(values.to(grad.dtype).contiguous()), as_array(grad.contiguous()), work=work)
    if workers > 1:
        grad_rows += copies.sum(0)
