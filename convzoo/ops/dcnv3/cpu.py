"""Fast DCNv3 kernels for the CPU, built on sparse-times-dense matrix products.

Bilinear sampling is a sparse matrix: every (batch, output pixel, group) "bag" reads 4 corners
of each of its P points. With the input zero-padded by one pixel (so that every sampled corner
has a valid row and out-of-image corners read zero), the rows of ``x`` viewed as
``(N*(H+2)*(W+2)*group, group_channels)`` are the dense operand, and

* forward: ``out = A @ rows`` with ``A`` (bags x rows) in CSR, 4P entries per bag holding
  ``mask * bilinear weight``; corner k of a sample is its top-left corner's row plus a fixed
  row offset ``shift_k``;
* grad x: ``A^T @ grad_out`` as four CSR matrices, one per corner, sharing one sort of the
  samples by their top-left row (corner k's matrix is applied to ``grad_rows[shift_k:]``);
* grad offset and grad mask: the dot product of each corner's row with the bag's
  ``grad_out`` (a gather and a ``vecdot``, in chunks of bags), combined with the bilinear
  weights and their derivatives (the CUDA kernel's formulas).

The sparse products run in MKL's sparse BLAS where PyTorch has it (PyTorch's own sparse
kernels elsewhere). The definition is that of :mod:`convzoo.ops.dcnv3`; the reference in
``reference.py`` is the oracle these are tested against.
"""
from __future__ import annotations

import warnings
from typing import NamedTuple, Tuple

import torch
import torch.nn.functional as F

from .reference import sampling_locations


# Below this many samples (N * H_out * W_out * group * P) the dense gather of reference.py is
# faster: creating sparse matrices and starting MKL's threads costs more than the work.
MIN_SAMPLES = 2**15


def worth_it(x: torch.Tensor, mask: torch.Tensor) -> bool:
    """Whether these kernels should run for ``x``/``mask`` (CPU tensors, large enough)."""
    return x.device.type == "cpu" and mask.numel() >= MIN_SAMPLES


def _consume_beta_warning() -> None:
    """PyTorch warns once per process that sparse CSR is beta; take that warning here, silenced."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        torch.sparse_csr_tensor(torch.tensor([0, 0]), torch.tensor([], dtype=torch.int64), torch.tensor([]),
                                size=(1, 1), check_invariants=False)


_consume_beta_warning()


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


def _samples(offset: torch.Tensor, height: int, width: int, params: tuple, index_dtype: torch.dtype) -> _Samples:
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
    batch = torch.arange(n, device=offset.device, dtype=index_dtype).view(n, 1, 1, 1, 1) * (height + 2)
    groups = torch.arange(group, device=offset.device, dtype=index_dtype).view(1, 1, 1, group, 1)
    top_left = ((batch + y0.to(index_dtype) + 1) * padded_w + x0.to(index_dtype) + 1) * group + groups
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


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


def _padded_rows(x: torch.Tensor, group_channels: int) -> torch.Tensor:
    """(N, H, W, group*C) -> rows (N*(H+2)*(W+2)*group, C) of the input padded by one zero pixel."""
    return F.pad(x, (0, 0, 1, 1, 1, 1)).reshape(-1, group_channels)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _index_dtype(*sizes: int) -> torch.dtype:
    return torch.int32 if max(sizes) < 2**31 - 1 else torch.int64


def _corner_rows(samples: _Samples, bags: int, points: int) -> torch.Tensor:
    """Rows read by every bag, laid out (bag, corner, point): ``(bags * 4 * points,)``."""
    shifts = torch.tensor(samples.shifts, device=samples.top_left.device, dtype=samples.top_left.dtype)
    return (samples.top_left.view(bags, 1, points) + shifts.view(1, 4, 1)).view(-1)


def _bag_pattern(samples: _Samples, values: torch.Tensor, bags: int, points: int, num_rows: int) -> torch.Tensor:
    """The sampling matrix ``(bags, num_rows)`` in CSR: row ``b`` holds its 4 corners x P points."""
    index_dtype = samples.top_left.dtype
    crow = torch.arange(0, values.numel() + 1, 4 * points, device=values.device, dtype=index_dtype)
    return _csr(crow, _corner_rows(samples, bags, points), values, (bags, num_rows))


def _corner_dots(rows: torch.Tensor, samples: _Samples, grad_bags: torch.Tensor, points: int):
    """``<rows[top_left + shift_k], grad_out[bag]>`` for every sample and corner k: four ``(bags, P)`` views.

    One sampled dense-dense product (``grad_bags @ rows.T`` evaluated only where the sampling
    matrix has entries), so no corner row is copied.
    """
    bags = grad_bags.shape[0]
    if rows.shape[0] < 4 * points:
        # PyTorch's sampled_addmm refuses more entries than the dense matrix has: pad with zero rows.
        rows = F.pad(rows, (0, 0, 0, 4 * points - rows.shape[0]))
    pattern = _bag_pattern(samples, rows.new_empty(bags * 4 * points), bags, points, rows.shape[0])
    dots = torch.sparse.sampled_addmm(pattern, grad_bags, rows.t(), beta=0.0).values()
    return dots.view(bags, 4, points).unbind(1)


def dcnv3_forward(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *params) -> torch.Tensor:
    """Forward (no autograd): ``(N, H, W, G*C)`` -> ``(N, H_out, W_out, G*C)``; params as :func:`dcnv3`."""
    group_channels = params[9]
    dtype = _compute_dtype(x.dtype)
    n, height, width, channels = x.shape
    _, height_out, width_out, _ = offset.shape
    rows = _padded_rows(x.to(dtype), group_channels)
    num_samples = mask.numel()
    bags = n * height_out * width_out * channels // group_channels
    points = num_samples // bags
    index_dtype = _index_dtype(rows.shape[0], 4 * num_samples + 1)
    samples = _samples(offset.to(dtype), height, width, params, index_dtype)
    weights = _corner_weights(samples.frac_x, samples.frac_y, mask.to(dtype).reshape(-1) * samples.valid)
    # One CSR row per bag holding its 4 corners x P points, laid out (bag, corner, point).
    values = torch.stack([w.view(bags, points) for w in weights], 1).view(-1)
    out = _bag_pattern(samples, values, bags, points, rows.shape[0]) @ rows
    return out.reshape(n, height_out, width_out, channels).to(x.dtype)


def dcnv3_backward(grad_out: torch.Tensor, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                   *params) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(grad_x, grad_offset, grad_mask)``; params as :func:`dcnv3`."""
    group_channels, offset_scale = params[9], params[10]
    dtype = _compute_dtype(x.dtype)
    n, height, width, channels = x.shape
    rows = _padded_rows(x.to(dtype), group_channels)
    num_rows = rows.shape[0]
    num_samples = mask.numel()
    bags = grad_out.numel() // group_channels
    points = num_samples // bags
    index_dtype = _index_dtype(num_rows + 4 * points, 4 * num_samples + 1)
    samples = _samples(offset.to(dtype), height, width, params, index_dtype)
    grad_bags = grad_out.to(dtype).reshape(bags, group_channels)
    masked = mask.to(dtype).reshape(-1) * samples.valid

    # grad x = A^T @ grad_out, one CSR matrix per corner sharing the rows sorted by top-left corner.
    top_left_sorted, order = torch.sort(samples.top_left, stable=True)
    crow = F.pad(torch.bincount(top_left_sorted, minlength=num_rows).cumsum(0), (1, 0)).to(index_dtype)
    bag_of_sample = torch.div(order, points, rounding_mode="floor").to(index_dtype)
    sorted_weights = _corner_weights(*torch.stack((samples.frac_x, samples.frac_y, masked)).index_select(1, order))
    grad_rows = torch.zeros_like(rows)
    for shift, weight in zip(samples.shifts, sorted_weights):
        corner_grad = grad_rows[shift:]
        corner_grad += _csr(crow[: corner_grad.shape[0] + 1], bag_of_sample, weight,
                            (corner_grad.shape[0], bags)) @ grad_bags
    grad_x = grad_rows.reshape(n, height + 2, width + 2, channels)[:, 1:-1, 1:-1].to(x.dtype).contiguous()

    # <corner value, grad_out> per sample and corner.
    dots = _corner_dots(rows, samples, grad_bags, points)
    d00, d01, d10, d11 = dots
    fx, fy = samples.frac_x.view(bags, points), samples.frac_y.view(bags, points)
    row_y0 = d00 + fx * (d01 - d00)
    row_y1 = d10 + fx * (d11 - d10)
    grad_mask = (row_y0 + fy * (row_y1 - row_y0)) * samples.valid.view(bags, points)
    scale = (masked * offset_scale).view(bags, points)
    grad_loc = torch.empty(bags, points, 2, dtype=dtype, device=x.device)
    grad_loc[..., 0] = (d01 - d00 + fy * (d11 - d10 - d01 + d00)) * scale
    grad_loc[..., 1] = (row_y1 - row_y0) * scale
    return grad_x, grad_loc.reshape(offset.shape).to(offset.dtype), grad_mask.reshape(mask.shape).to(mask.dtype)
