"""Bilinear sampling as a sparse matrix: the CPU kernels of ``deform_conv2d`` and ``dcnv3``.

Both operators read, for every sample, the four corners of a bilinear cell in a table of
``rows`` (the zero-padded input laid out as ``(num_rows, channels)``) and mix them with
weights. With the samples grouped into *bags* of ``P`` that are summed together (DCNv3 sums
its P points; deformable conv keeps each sample apart, ``P = 1``), that is the matrix product
``A @ rows`` with ``A`` of shape ``(bags, num_rows)`` holding ``4 P`` entries per row: corner
``k`` of a sample is row ``top_left + steps[k]`` of the table. Then

* sampling (forward, :func:`sample`): ``A @ rows`` -- one CSR times dense product;
* the corners' dot products with the bags' upstream gradient (for the gradients of the
  coordinates and of the mask): ``grad_bags @ rows.T`` sampled at the entries of ``A`` -- one
  sampled dense-dense product;
* the gradient of ``rows``: ``A.T @ grad_bags`` -- the samples sorted once by their top-left
  row, then one CSR product per corner.

The products run in MKL's sparse BLAS where PyTorch has it (PyTorch's own sparse kernels
elsewhere). Every sample's four corner rows must exist in the table; out-of-image corners read
rows of zeros (the callers pad the input) or have weight zero.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Sequence, Tuple

import torch
import torch.nn.functional as F


def _consume_beta_warning() -> None:
    """PyTorch warns once per process that sparse CSR is beta; take that warning here, silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        torch.sparse_csr_tensor(torch.tensor([0, 0]), torch.tensor([], dtype=torch.int64), torch.tensor([]),
                                size=(1, 1), check_invariants=False)


_consume_beta_warning()


def _autocast_off(device_type: str):
    """Autocast disabled for ``device_type`` (the sparse kernels have no bfloat16/float16 versions)."""
    if device_type in ("cpu", "cuda") and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def index_dtype(*sizes: int) -> torch.dtype:
    """int32 when every index and entry count fits, int64 otherwise."""
    return torch.int32 if max(sizes) < 2**31 - 1 else torch.int64


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def sampling_matrix(top_left: torch.Tensor, steps: Sequence[int], weights: Sequence[torch.Tensor],
                    num_rows: int) -> torch.Tensor:
    """The sampling matrix ``A`` in CSR, ``(bags, num_rows)``, entries laid out (bag, corner, point).

    Args:
        top_left: ``(bags, P)`` top-left corner row of every sample (int32 or int64).
        steps: the row distance from the top-left corner to corners 0..3.
        weights: four ``(bags, P)`` tensors, the weight of corner k of every sample.
        num_rows: rows of the table.
    """
    bags, points = top_left.shape
    shifts = torch.tensor(list(steps), device=top_left.device, dtype=top_left.dtype).view(1, 4, 1)
    columns = (top_left.view(bags, 1, points) + shifts).view(-1)
    values = torch.stack([w.reshape(bags, points) for w in weights], 1).view(-1)
    crow = torch.arange(0, values.numel() + 1, 4 * points, device=top_left.device, dtype=top_left.dtype)
    return _csr(crow, columns, values, (bags, num_rows))


def sample(matrix: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``matrix @ rows``: the sampled bags, ``(bags, channels)``, in ``rows``' dtype."""
    with _autocast_off(rows.device.type):
        return matrix @ rows


def corner_dots(matrix: torch.Tensor, grad_bags: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``<rows[corner row], grad_bags[bag]>`` at every entry of ``matrix``: ``(bags, 4, P)``.

    ``matrix`` comes from :func:`sampling_matrix` (only its pattern is read); ``grad_bags`` is
    ``(bags, channels)``, ``rows`` ``(num_rows, channels)``.
    """
    bags, num_rows = matrix.shape
    per_bag = matrix.values().numel() // max(1, bags)
    if num_rows < per_bag:
        # PyTorch's sampled_addmm refuses more entries than the dense matrix has: pad with zero rows.
        rows = F.pad(rows, (0, 0, 0, per_bag - num_rows))
    # A zero-valued copy of the pattern: sampled_addmm still reads the input's values at beta=0
    # (0 * NaN would leak into the result).
    pattern = _csr(matrix.crow_indices(), matrix.col_indices(), torch.zeros_like(matrix.values()),
                   (bags, rows.shape[0]))
    with _autocast_off(rows.device.type):
        dots = torch.sparse.sampled_addmm(pattern, grad_bags, rows.t(), beta=0.0).values()
    return dots.view(bags, 4, per_bag // 4)


def add_transposed_product(grad_rows: torch.Tensor, top_left: torch.Tensor, steps: Sequence[int],
                           weights: Sequence[torch.Tensor], grad_bags: torch.Tensor) -> None:
    """``grad_rows += A.T @ grad_bags`` for the ``A`` of :func:`sampling_matrix`, in place.

    Args:
        grad_rows: ``(num_rows, channels)`` accumulator.
        top_left, steps, weights: as for :func:`sampling_matrix` (``(bags, P)`` each).
        grad_bags: ``(bags, channels)``.
    """
    num_rows = grad_rows.shape[0]
    bags, points = top_left.shape
    dtype = top_left.dtype
    top_left_sorted, order = torch.sort(top_left.reshape(-1), stable=True)
    crow = F.pad(torch.bincount(top_left_sorted, minlength=num_rows).cumsum(0), (1, 0)).to(dtype)
    bag_of_sample = torch.div(order, points, rounding_mode="floor").to(dtype)
    for step, weight in zip(steps, weights):
        weight = weight.reshape(-1).index_select(0, order)
        corner_grad = grad_rows[step:]
        corner_grad += sample(_csr(crow[: corner_grad.shape[0] + 1], bag_of_sample, weight,
                                   (corner_grad.shape[0], bags)), grad_bags)
