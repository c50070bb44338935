"""RoI operators in plain, vectorised PyTorch: the CPU path and the test oracle.

Every bilinear RoI operator here (``roi_align``, ``deform_roi_pool``, ``deform_ps_roi_pool``)
is written in two steps:

1. *where to sample*: per RoI, per output bin and per sampling point, a coordinate
   ``(y, x)`` on the feature map and a weight (``1/count`` for a sample that counts, ``0``
   for one that does not), computed with ordinary differentiable tensor ops;
2. :func:`bilinear_pool`: the weighted sum of the bilinearly interpolated feature values
   at those points (a gather of the four neighbours of each point, O(samples) tensor ops,
   never a loop over RoIs or bins).

:func:`bilinear_pool` is differentiable by autograd (``impl="reference"``). The custom ops
in ``__init__.py`` use :func:`bilinear_pool_fast` and :func:`bilinear_pool_backward`: the
same sum as one gather of the 4 * S weighted feature rows of each output bin (Numba, one loop
per bin: :mod:`convzoo.ops._bilinear_rows`), its transpose (a race-free scatter-add) for the
input gradient, and ``<grad, d value / d point>`` per bin for the point gradients (all samples
of a bin move together), which the caller chains to the offsets analytically.
``ps_roi_pool`` sums integer bins through a summed-area table.

Coordinates live in the feature map's pixel-index frame (pixel ``i`` has centre ``i``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from .. import _bilinear_rows

__all__ = [
    "round_half_away",
    "bilinear_pool",
    "bilinear_pool_fast",
    "bilinear_pool_backward",
    "roi_align_samples",
    "deform_roi_pool_samples",
    "deform_ps_roi_pool_samples",
    "roi_align",
    "deform_roi_pool",
    "modulated_deform_roi_pool",
    "ps_roi_pool",
    "ps_roi_pool_backward",
    "deform_ps_roi_pool",
]


def round_half_away(value: Tensor) -> Tensor:
    """C's ``round``: halves go away from zero (``torch.round`` rounds them to even)."""
    return torch.sign(value) * torch.floor(value.abs() + 0.5)


# --------------------------------------------------------------------------------------
# Step 2: weighted bilinear pooling at given sampling points
# --------------------------------------------------------------------------------------
def _feature_rows(input: Tensor, coord_sets: int, groups: int) -> Tensor:
    """View ``input`` (N, Q*Cq*G, H, W) as rows (N*Q*G*H*W, Cq), one row per pixel.

    Channel ``(q*Cq + c)*G + g`` lands in row ``((n*Q + q)*G + g)*H*W + y*W + x``, column
    ``c``. With Q = G = 1 and a ``channels_last`` input this is a free view.
    """
    n, channels, height, width = input.shape
    per_group = channels // (coord_sets * groups)
    split = input.reshape(n, coord_sets, per_group, groups, height, width)
    return split.permute(0, 1, 3, 4, 5, 2).reshape(-1, per_group)


def _rows_to_input(rows: Tensor, shape: torch.Size, coord_sets: int, groups: int) -> Tensor:
    """Inverse of :func:`_feature_rows`: rows (N*Q*G*H*W, Cq) -> (N, Q*Cq*G, H, W)."""
    n, channels, height, width = shape
    per_group = channels // (coord_sets * groups)
    split = rows.reshape(n, coord_sets, groups, height, width, per_group)
    return split.permute(0, 1, 5, 2, 3, 4).reshape(n, channels, height, width)


def _row_base(batch_index: Tensor, bin_group: Tensor, coord_sets: int, groups: int, plane: int) -> Tensor:
    """First row of each (RoI, coordinate set, bin) in :func:`_feature_rows`: (K, Q, P)."""
    q = torch.arange(coord_sets, device=batch_index.device)
    image_set = batch_index.view(-1, 1) * coord_sets + q.view(1, -1)  # (K, Q)
    return ((image_set.unsqueeze(-1) * groups) + bin_group.view(1, 1, -1)) * plane


def _corners(y: Tensor, x: Tensor, height: int, width: int):
    """Clamp points into the image and return the four neighbours and their weights.

    ``y``/``x`` must be finite. Returns ``(offsets, weights, frac)`` where ``offsets`` are four
    ``y*W + x`` indices (low-low, low-high, high-low, high-high), ``weights`` the four
    bilinear weights, and ``frac = (ly, lx)`` the fractional parts (for the backward).
    """
    y = y.clamp(0, height - 1)
    x = x.clamp(0, width - 1)
    y_low = y.floor()
    x_low = x.floor()
    ly = y - y_low
    lx = x - x_low
    hy = 1 - ly
    hx = 1 - lx
    y_low_i = y_low.long()
    x_low_i = x_low.long()
    y_high_i = (y_low_i + 1).clamp(max=height - 1)
    x_high_i = (x_low_i + 1).clamp(max=width - 1)
    offsets = (
        y_low_i * width + x_low_i,
        y_low_i * width + x_high_i,
        y_high_i * width + x_low_i,
        y_high_i * width + x_high_i,
    )
    weights = (hy * hx, hy * lx, ly * hx, ly * lx)
    return offsets, weights, (ly, lx, hy, hx)


def _finite_points(y: Tensor, x: Tensor, weight: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Replace non-finite coordinates by 0 and give those samples weight 0."""
    finite = torch.isfinite(y) & torch.isfinite(x)
    zero = torch.zeros((), dtype=y.dtype, device=y.device)
    return torch.where(finite, y, zero), torch.where(finite, x, zero), torch.where(finite, weight, zero)


def bilinear_pool(
    input: Tensor,
    batch_index: Tensor,
    bin_group: Tensor,
    groups: int,
    y: Tensor,
    x: Tensor,
    weight: Tensor,
) -> Tensor:
    """Weighted sum of bilinear samples, one set of points per RoI, coordinate set and bin.

    Args:
        input (Tensor[N, Q*Cq*G, H, W]): features; channel ``(q*Cq + c)*G + g`` is read by
            coordinate set ``q`` for bins of group ``g``.
        batch_index (Tensor[K], int64): image of each RoI.
        bin_group (Tensor[P], int64): channel group ``g`` in ``[0, groups)`` each bin reads.
        groups (int): G, the number of channel groups (1 unless position-sensitive).
        y, x (Tensor[K, Q, P, S]): sampling points (pixel-index frame). Points are clamped
            into ``[0, H-1] x [0, W-1]``; non-finite points contribute zero.
        weight (Tensor[K, Q, P, S]): weight of each sample (a constant for autograd).

    Returns:
        Tensor[K, Q*Cq, P]: ``out[k, q*Cq + c, p] = sum_s weight * bilinear(input[b_k, ch], y, x)``
        with ``ch = (q*Cq + c)*G + bin_group[p]``.

    Differentiable by autograd with respect to ``input``, ``y`` and ``x``.
    """
    k, coord_sets, bins, samples = y.shape
    n, channels, height, width = input.shape
    rows = _feature_rows(input, coord_sets, groups)
    per_group = rows.shape[1]
    base = _row_base(batch_index, bin_group, coord_sets, groups, height * width).reshape(-1)
    y, x, weight = _finite_points(y, x, weight.detach())
    out = rows.new_zeros(k * coord_sets * bins, per_group)
    for s in range(samples):
        offsets, weights, _ = _corners(y[..., s].reshape(-1), x[..., s].reshape(-1), height, width)
        w_s = weight[..., s].reshape(-1)
        for offset, corner_weight in zip(offsets, weights):
            out.addcmul_(rows.index_select(0, base + offset), (corner_weight * w_s).unsqueeze(1))
    if samples == 0 and rows.requires_grad:
        out = out + rows.narrow(0, 0, 0).sum()  # keep the (all-zero) result in the graph
    return out.reshape(k, coord_sets, bins, per_group).permute(0, 1, 3, 2).reshape(k, coord_sets * per_group, bins)


# The custom op's kernels: the same sum as a gather of 4 * S weighted feature rows per output
# bin (:mod:`convzoo.ops._bilinear_rows`, in Numba: one loop per output bin).
def _sample_entries(
    batch_index: Tensor, bin_group: Tensor, groups: int, height: int, width: int,
    y: Tensor, x: Tensor, weight: Tensor,
):
    """Columns (R, S, 4) of the four neighbours of every sample, their bilinear weights
    (R, S, 4), the sample weights (R, S) (0 for non-finite points) and the fractional parts."""
    k, coord_sets, bins, samples = y.shape
    base = _row_base(batch_index, bin_group, coord_sets, groups, height * width).reshape(-1, 1, 1)
    y, x, weight = _finite_points(y, x, weight)
    offsets, weights, frac = _corners(y.reshape(-1, samples), x.reshape(-1, samples), height, width)
    columns = torch.stack(offsets, dim=-1) + base
    return columns, torch.stack(weights, dim=-1), weight.reshape(-1, samples), frac


def bilinear_pool_fast(
    input: Tensor, batch_index: Tensor, bin_group: Tensor, groups: int, y: Tensor, x: Tensor, weight: Tensor
) -> Tensor:
    """:func:`bilinear_pool` as one gather of weighted feature rows per output bin (no autograd)."""
    k, coord_sets, bins, samples = y.shape
    n, channels, height, width = input.shape
    rows = _feature_rows(input, coord_sets, groups)
    per_group = rows.shape[1]
    out_rows = k * coord_sets * bins
    if rows.shape[0] == 0 or samples == 0:
        out = rows.new_zeros(out_rows, per_group)
    else:
        columns, corner_w, sample_w, _ = _sample_entries(
            batch_index, bin_group, groups, height, width, y, x, weight
        )
        entries = (out_rows, 4 * samples)
        values = (corner_w * sample_w.unsqueeze(-1)).reshape(entries)
        out = _bilinear_rows.gather_sum(rows, columns.reshape(entries), values)
    return out.reshape(k, coord_sets, bins, per_group).permute(0, 1, 3, 2).reshape(k, coord_sets * per_group, bins)


def bilinear_pool_backward(
    grad_out: Tensor,
    input: Tensor,
    batch_index: Tensor,
    bin_group: Tensor,
    groups: int,
    y: Tensor,
    x: Tensor,
    weight: Tensor,
    need_input_grad: bool = True,
    need_point_grad: bool = True,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """Gradients of :func:`bilinear_pool` with respect to ``input``, ``y`` and ``x``.

    ``grad_out`` is (K, Q*Cq, P). Returns ``(grad_input, grad_y, grad_x)`` (``None`` where not
    asked for). The input gradient is the transposed gather (a scatter-add) of ``grad_out``. The
    point gradients are summed over the samples of each bin, (K, Q, P) -- every caller
    moves all samples of a bin together -- as ``<grad_out, sum_samples d(bilinear)/dy>``.
    They follow the clamp: zero for a coordinate outside the map and for non-finite points.
    """
    k, coord_sets, bins, samples = y.shape
    n, channels, height, width = input.shape
    rows = _feature_rows(input, coord_sets, groups)
    per_group = rows.shape[1]
    out_rows = k * coord_sets * bins
    grad_input = torch.zeros_like(input) if need_input_grad else None
    grad_y = y.new_zeros(y.shape[:-1]) if need_point_grad else None
    grad_x = x.new_zeros(x.shape[:-1]) if need_point_grad else None
    if out_rows == 0 or samples == 0 or rows.shape[0] == 0:
        return grad_input, grad_y, grad_x
    g_rows = grad_out.reshape(k, coord_sets, per_group, bins).permute(0, 1, 3, 2).reshape(out_rows, per_group)
    columns, corner_w, sample_w, (ly, lx, hy, hx) = _sample_entries(
        batch_index, bin_group, groups, height, width, y, x, weight
    )
    if need_input_grad:
        values = (corner_w * sample_w.unsqueeze(-1)).reshape(out_rows, -1)
        grad_rows = torch.zeros_like(rows)
        _bilinear_rows.scatter_add(grad_rows, columns.reshape(out_rows, -1), values, g_rows)
        grad_input = _rows_to_input(grad_rows, input.shape, coord_sets, groups)
    if need_point_grad:
        finite = torch.isfinite(y) & torch.isfinite(x)
        y_raw = torch.where(finite, y, -1.0).reshape(out_rows, samples)
        x_raw = torch.where(finite, x, -1.0).reshape(out_rows, samples)
        # the clamp passes no gradient for a coordinate outside the map
        w_y = torch.where((y_raw >= 0) & (y_raw <= height - 1), sample_w, 0).unsqueeze(-1)
        w_x = torch.where((x_raw >= 0) & (x_raw <= width - 1), sample_w, 0).unsqueeze(-1)
        # d(weights)/dy and d(weights)/dx of the four corners (low-low, low-high, high-low, high-high)
        d_dy = torch.stack([-hx, -lx, hx, lx], dim=-1) * w_y
        d_dx = torch.stack([-hy, hy, -ly, ly], dim=-1) * w_x
        # sum over a bin's samples and corners of slope * feature: (2, R, Cq)
        flat_columns = columns.reshape(1, out_rows, -1).expand(2, -1, -1).reshape(2 * out_rows, -1)
        slopes = torch.stack([d_dy, d_dx]).reshape(2 * out_rows, -1)
        slopes = _bilinear_rows.gather_sum(rows, flat_columns, slopes).view(2, out_rows, -1)
        point = (slopes * g_rows).sum(-1)  # (2, R)
        grad_y = point[0].reshape(k, coord_sets, bins)
        grad_x = point[1].reshape(k, coord_sets, bins)
    return grad_input, grad_y, grad_x


# --------------------------------------------------------------------------------------
# Step 1: sampling points
# --------------------------------------------------------------------------------------
RoISamples = Tuple[Tensor, Tensor, Tensor, Tensor]  # batch_index (K,), y, x, weight (K, Q, P, S)


def _adaptive_grid(size: Tensor, pooled: int, sampling_ratio: int) -> Tensor:
    """Samples per bin along one axis: ``sampling_ratio`` or ``ceil(size / pooled)`` (>= 0)."""
    if sampling_ratio > 0:
        return torch.full(size.shape, sampling_ratio, dtype=torch.long, device=size.device)
    grid = torch.ceil(size / pooled)
    grid = torch.where(torch.isfinite(grid), grid, torch.zeros_like(grid))
    return grid.clamp(min=0).long()


def _align_samples(
    rois: Tensor,
    height: int,
    width: int,
    pooled: Tuple[int, int],
    spatial_scale: float,
    sampling_ratio: int,
    shift: float,
    min_size_one: bool,
    offset: Optional[Tensor] = None,
    gamma: float = 0.0,
) -> RoISamples:
    """RoIAlign sampling points (torchvision / mmcv rule), optionally shifted per bin.

    The bin ``(i, j)`` of a RoI starts at ``(y1*s - shift + i*bin_h, x1*s - shift + j*bin_w)``,
    plus ``gamma * roi_h * offset[:, 1, i, j]`` and ``gamma * roi_w * offset[:, 0, i, j]`` when
    ``offset`` (K, 2, ph, pw) is given, and holds ``grid_h x grid_w`` regularly spaced
    samples at the sub-cell centres. A sample outside ``[-1, H] x [-1, W]`` reads zero but
    still counts; the bin value is the sum over its samples divided by
    ``max(grid_h * grid_w, 1)``.
    """
    pooled_h, pooled_w = pooled
    k = rois.shape[0]
    batch_index = rois[:, 0].long()
    start_w = rois[:, 1] * spatial_scale - shift
    start_h = rois[:, 2] * spatial_scale - shift
    roi_w = (rois[:, 3] * spatial_scale - shift) - start_w
    roi_h = (rois[:, 4] * spatial_scale - shift) - start_h
    if min_size_one:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_w = roi_w / pooled_w
    bin_h = roi_h / pooled_h
    grid_h = _adaptive_grid(roi_h, pooled_h, sampling_ratio)
    grid_w = _adaptive_grid(roi_w, pooled_w, sampling_ratio)
    max_h = int(grid_h.max()) if k else 0
    max_w = int(grid_w.max()) if k else 0

    dtype, device = rois.dtype, rois.device
    bins_h = torch.arange(pooled_h, dtype=dtype, device=device)
    bins_w = torch.arange(pooled_w, dtype=dtype, device=device)
    # bin origins (K, ph, pw)
    origin_h = start_h.view(-1, 1, 1).expand(k, pooled_h, pooled_w)
    origin_w = start_w.view(-1, 1, 1).expand(k, pooled_h, pooled_w)
    if offset is not None:
        origin_w = origin_w + gamma * roi_w.view(-1, 1, 1) * offset[:, 0]
        origin_h = origin_h + gamma * roi_h.view(-1, 1, 1) * offset[:, 1]
    origin_h = origin_h + bins_h.view(1, -1, 1) * bin_h.view(-1, 1, 1)
    origin_w = origin_w + bins_w.view(1, 1, -1) * bin_w.view(-1, 1, 1)

    # sub-cell centres (K, 1, 1, gh, 1) and (K, 1, 1, 1, gw)
    steps_h = torch.arange(max_h, dtype=dtype, device=device) + 0.5
    steps_w = torch.arange(max_w, dtype=dtype, device=device) + 0.5
    frac_h = steps_h.view(1, -1) * bin_h.view(-1, 1) / grid_h.clamp(min=1).to(dtype).view(-1, 1)
    frac_w = steps_w.view(1, -1) * bin_w.view(-1, 1) / grid_w.clamp(min=1).to(dtype).view(-1, 1)
    y = origin_h.unsqueeze(-1).unsqueeze(-1) + frac_h.view(k, 1, 1, max_h, 1)
    x = origin_w.unsqueeze(-1).unsqueeze(-1) + frac_w.view(k, 1, 1, 1, max_w)
    y, x = torch.broadcast_tensors(y, x)

    in_grid = (torch.arange(max_h, device=device).view(1, -1, 1) < grid_h.view(-1, 1, 1)) & (
        torch.arange(max_w, device=device).view(1, 1, -1) < grid_w.view(-1, 1, 1)
    )  # (K, gh, gw)
    readable = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
    count = (grid_h * grid_w).clamp(min=1).to(dtype).view(-1, 1, 1, 1, 1)
    weight = (readable & in_grid.view(k, 1, 1, max_h, max_w)).to(dtype) / count
    shape = (k, 1, pooled_h * pooled_w, max_h * max_w)
    return batch_index, y.reshape(shape), x.reshape(shape), weight.reshape(shape)


def roi_align_samples(
    rois: Tensor, height: int, width: int, pooled: Tuple[int, int], spatial_scale: float,
    sampling_ratio: int, aligned: bool,
) -> RoISamples:
    """torchvision's RoIAlign points: half-pixel shift only when ``aligned``; without it a
    RoI smaller than one pixel is widened to one pixel."""
    shift = 0.5 if aligned else 0.0
    return _align_samples(rois, height, width, pooled, spatial_scale, sampling_ratio, shift, not aligned)


def deform_roi_pool_samples(
    rois: Tensor, height: int, width: int, pooled: Tuple[int, int], spatial_scale: float,
    sampling_ratio: int, offset: Optional[Tensor], gamma: float,
) -> RoISamples:
    """mmcv's DeformRoIPool points: always the half-pixel shift, no minimum RoI size, bin
    origins moved by ``gamma * offset * roi size``."""
    return _align_samples(rois, height, width, pooled, spatial_scale, sampling_ratio, 0.5, False, offset, gamma)


def _floor_ratio(index: Tensor, numerator: int, denominator: int, multiply_first: bool) -> Tensor:
    """``floor(index * numerator / denominator)`` evaluated in ``index``'s float dtype, in the
    DCN kernel's operation order (it matters where the float result sits just below an integer)."""
    if multiply_first:
        return torch.floor(index * numerator / denominator).long()
    return torch.floor(index / denominator * numerator).long()


def dcn_bin_groups(pooled_size: int, group_size: int, dtype: torch.dtype, device) -> Tensor:
    """Channel group each bin of a DCN position-sensitive pooling reads: (P,) int64."""
    bins = torch.arange(pooled_size, dtype=dtype, device=device)
    g = _floor_ratio(bins, group_size, pooled_size, multiply_first=True).clamp(0, group_size - 1)
    return (g.view(-1, 1) * group_size + g.view(1, -1)).reshape(-1)


def deform_ps_roi_pool_samples(
    rois: Tensor,
    height: int,
    width: int,
    offset: Optional[Tensor],
    pooled_size: int,
    part_size: int,
    sample_per_part: int,
    trans_std: float,
    spatial_scale: float,
) -> RoISamples:
    """Deformable PS RoI pooling points (the DCN paper's CUDA kernel).

    Box corners are rounded (half away from zero) in image coordinates; the RoI spans
    ``round(x1)*s - 0.5`` to ``(round(x2) + 1)*s - 0.5`` (at least 0.1 wide). Bin ``(i, j)``
    starts at ``(i*bin_h, j*bin_w)`` from the RoI's corner, moved by
    ``trans_std * offset * roi size`` where ``offset`` is (K, 2*Q, part, part) with ``(x, y)``
    pairs per coordinate set ``q`` and part cell ``(floor(i/ph*part), floor(j/pw*part))``.
    The ``sample_per_part**2`` samples sit at ``start + (a, b) * bin/sample_per_part`` (the
    bin's corner, not sub-cell centres). Samples outside ``[-0.5, H-0.5] x [-0.5, W-0.5]``
    (or non-finite) are skipped; the bin is the mean of the others (0 when none is left).
    """
    k = rois.shape[0]
    dtype, device = rois.dtype, rois.device
    batch_index = rois[:, 0].long()
    start_w = round_half_away(rois[:, 1]) * spatial_scale - 0.5
    start_h = round_half_away(rois[:, 2]) * spatial_scale - 0.5
    roi_w = ((round_half_away(rois[:, 3]) + 1.0) * spatial_scale - 0.5 - start_w).clamp(min=0.1)
    roi_h = ((round_half_away(rois[:, 4]) + 1.0) * spatial_scale - 0.5 - start_h).clamp(min=0.1)
    bin_w = roi_w / pooled_size
    bin_h = roi_h / pooled_size
    sub_w = bin_w / sample_per_part
    sub_h = bin_h / sample_per_part

    bins = torch.arange(pooled_size, dtype=dtype, device=device)
    # (K, Q, ph, pw) bin starts
    origin_h = (bins.view(1, 1, -1, 1) * bin_h.view(-1, 1, 1, 1) + start_h.view(-1, 1, 1, 1))
    origin_w = (bins.view(1, 1, 1, -1) * bin_w.view(-1, 1, 1, 1) + start_w.view(-1, 1, 1, 1))
    if offset is not None:
        part = _floor_ratio(bins, part_size, pooled_size, multiply_first=False).clamp(0, part_size - 1)
        trans = offset[:, :, part][:, :, :, part] * trans_std  # (K, 2Q, ph, pw)
        origin_w = origin_w + trans[:, 0::2] * roi_w.view(-1, 1, 1, 1)
        origin_h = origin_h + trans[:, 1::2] * roi_h.view(-1, 1, 1, 1)
    origin_h, origin_w = torch.broadcast_tensors(origin_h, origin_w)
    coord_sets = origin_h.shape[1]

    steps = torch.arange(sample_per_part, dtype=dtype, device=device)
    y = origin_h.unsqueeze(-1).unsqueeze(-1) + (steps.view(1, -1) * sub_h.view(-1, 1)).view(k, 1, 1, 1, sample_per_part, 1)
    x = origin_w.unsqueeze(-1).unsqueeze(-1) + (steps.view(1, -1) * sub_w.view(-1, 1)).view(k, 1, 1, 1, 1, sample_per_part)
    y, x = torch.broadcast_tensors(y, x)
    shape = (k, coord_sets, pooled_size * pooled_size, sample_per_part * sample_per_part)
    y = y.reshape(shape)
    x = x.reshape(shape)
    inside = (y >= -0.5) & (y <= height - 0.5) & (x >= -0.5) & (x <= width - 0.5)  # NaN -> False
    count = inside.sum(-1, keepdim=True).clamp(min=1).to(dtype)
    weight = inside.to(dtype) / count
    return batch_index, y, x, weight


# --------------------------------------------------------------------------------------
# The operators (autograd through plain PyTorch)
# --------------------------------------------------------------------------------------
def _pool_to_output(pooled: Tensor, pooled_hw: Tuple[int, int]) -> Tensor:
    return pooled.reshape(pooled.shape[0], pooled.shape[1], pooled_hw[0], pooled_hw[1])


def _single_group(device) -> Tensor:
    return torch.zeros(1, dtype=torch.long, device=device)


def roi_align(
    input: Tensor, rois: Tensor, output_size: Tuple[int, int], spatial_scale: float = 1.0,
    sampling_ratio: int = -1, aligned: bool = False, pool=bilinear_pool,
) -> Tensor:
    """torchvision's ``roi_align`` on ``rois`` (K, 5): (K, C, ph, pw). ``pool`` is
    :func:`bilinear_pool` (autograd) or :func:`bilinear_pool_fast` (the custom op's kernel)."""
    height, width = input.shape[-2:]
    batch_index, y, x, weight = roi_align_samples(
        rois.to(input.dtype), height, width, output_size, spatial_scale, sampling_ratio, aligned
    )
    bin_group = _single_group(input.device).expand(y.shape[2])
    return _pool_to_output(pool(input, batch_index, bin_group, 1, y, x, weight), output_size)


def deform_roi_pool(
    input: Tensor, rois: Tensor, offset: Optional[Tensor], output_size: Tuple[int, int],
    spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1, pool=bilinear_pool,
) -> Tensor:
    """mmcv's ``deform_roi_pool`` on ``rois`` (K, 5) and ``offset`` (K, 2, ph, pw) or None."""
    height, width = input.shape[-2:]
    batch_index, y, x, weight = deform_roi_pool_samples(
        rois.to(input.dtype), height, width, output_size, spatial_scale, sampling_ratio, offset, gamma
    )
    bin_group = _single_group(input.device).expand(y.shape[2])
    return _pool_to_output(pool(input, batch_index, bin_group, 1, y, x, weight), output_size)


def modulated_deform_roi_pool(
    input: Tensor, rois: Tensor, offset: Tensor, mask: Tensor, output_size: Tuple[int, int],
    spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1,
) -> Tensor:
    """``deform_roi_pool(...) * mask`` with ``mask`` (K, 1, ph, pw), as mmcv's
    ModulatedDeformRoIPoolPack computes it."""
    return deform_roi_pool(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma) * mask


def deform_ps_roi_pool(
    input: Tensor, rois: Tensor, offset: Optional[Tensor], output_dim: int, group_size: int,
    pooled_size: int, part_size: int, sample_per_part: int, trans_std: float, spatial_scale: float,
    pool=bilinear_pool,
) -> Tensor:
    """Deformable PS RoI pooling (``offset`` None = no_trans): (K, output_dim, pooled, pooled)."""
    height, width = input.shape[-2:]
    batch_index, y, x, weight = deform_ps_roi_pool_samples(
        rois.to(input.dtype), height, width, offset, pooled_size, part_size, sample_per_part, trans_std, spatial_scale
    )
    bin_group = dcn_bin_groups(pooled_size, group_size, input.dtype, input.device)
    pooled = pool(input, batch_index, bin_group, group_size * group_size, y, x, weight)
    return _pool_to_output(pooled, (pooled_size, pooled_size))


def ps_roi_pool_bins(rois: Tensor, height: int, width: int, pooled: Tuple[int, int], spatial_scale: float):
    """Integer bin boundaries of torchvision's ps_roi_pool: ``(batch, h0, h1, w0, w1)``.

    Box corners are ``round(coord * s)`` (half away from zero), the RoI at least 1x1; bin
    ``i`` spans ``[floor(i*bin), ceil((i+1)*bin))`` from the RoI's corner, clipped to
    ``[0, H-1]`` (torchvision's forward kernels clip to ``H - 1``, so the last row and
    column of the map are never read: a quirk kept on purpose). ``h0, h1`` are (K, ph, 1),
    ``w0, w1`` (K, 1, pw).
    """
    pooled_h, pooled_w = pooled
    dtype, device = rois.dtype, rois.device
    batch_index = rois[:, 0].long()
    corners = round_half_away(rois[:, 1:] * spatial_scale)
    corners = torch.where(torch.isfinite(corners), corners, torch.zeros_like(corners)).long()
    start_w, start_h, end_w, end_h = corners.unbind(1)
    bin_h = (end_h - start_h).clamp(min=1).to(dtype) / pooled_h
    bin_w = (end_w - start_w).clamp(min=1).to(dtype) / pooled_w
    steps_h = torch.arange(pooled_h, dtype=dtype, device=device)
    steps_w = torch.arange(pooled_w, dtype=dtype, device=device)
    h0 = torch.floor(steps_h.view(1, -1) * bin_h.view(-1, 1)).long() + start_h.view(-1, 1)
    h1 = torch.ceil((steps_h + 1).view(1, -1) * bin_h.view(-1, 1)).long() + start_h.view(-1, 1)
    w0 = torch.floor(steps_w.view(1, -1) * bin_w.view(-1, 1)).long() + start_w.view(-1, 1)
    w1 = torch.ceil((steps_w + 1).view(1, -1) * bin_w.view(-1, 1)).long() + start_w.view(-1, 1)
    h0, h1 = (v.clamp(0, height - 1).unsqueeze(-1) for v in (h0, h1))
    w0, w1 = (v.clamp(0, width - 1).unsqueeze(1) for v in (w0, w1))
    return batch_index, h0, h1, w0, w1


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def ps_roi_pool(input: Tensor, rois: Tensor, output_size: Tuple[int, int], spatial_scale: float = 1.0) -> Tensor:
    """torchvision's ``ps_roi_pool``: (K, C/(ph*pw), ph, pw), the mean of each integer bin of
    the bin's own channel ``(c*ph + i)*pw + j``, through a summed-area table."""
    n, channels, height, width = input.shape
    pooled_h, pooled_w = output_size
    channels_out = channels // (pooled_h * pooled_w)
    batch_index, h0, h1, w0, w1 = ps_roi_pool_bins(rois.to(input.dtype), height, width, output_size, spatial_scale)
    table = torch.nn.functional.pad(input.to(_accumulation_dtype(input.dtype)), (1, 0, 1, 0))
    table = table.cumsum(2).cumsum(3).reshape(-1)  # (N*C*(H+1)*(W+1),)
    bins = torch.arange(pooled_h * pooled_w, device=input.device).view(1, 1, pooled_h, pooled_w)
    c_in = torch.arange(channels_out, device=input.device).view(1, -1, 1, 1) * (pooled_h * pooled_w) + bins
    plane = batch_index.view(-1, 1, 1, 1) * channels + c_in  # (K, Cout, ph, pw)
    row = width + 1

    def at(h: Tensor, w: Tensor) -> Tensor:
        return table[(plane * (height + 1) + h.unsqueeze(1)) * row + w.unsqueeze(1)]

    total = at(h1, w1) - at(h0, w1) - at(h1, w0) + at(h0, w0)
    empty = ((h1 <= h0) | (w1 <= w0)).unsqueeze(1)
    area = torch.where(empty, 1, ((h1 - h0) * (w1 - w0)).unsqueeze(1)).to(total.dtype)
    return torch.where(empty, 0, total / area).to(input.dtype)


def ps_roi_pool_backward(
    grad_out: Tensor, rois: Tensor, input_shape: torch.Size, output_size: Tuple[int, int], spatial_scale: float
) -> Tensor:
    """Gradient of :func:`ps_roi_pool` with respect to its input (it is linear in it):
    ``grad_out / area`` spread over each bin, through the summed-area table's transpose."""
    n, channels, height, width = input_shape
    pooled_h, pooled_w = output_size
    channels_out = channels // (pooled_h * pooled_w)
    batch_index, h0, h1, w0, w1 = ps_roi_pool_bins(rois.to(grad_out.dtype), height, width, output_size, spatial_scale)
    acc = _accumulation_dtype(grad_out.dtype)
    empty = ((h1 <= h0) | (w1 <= w0)).unsqueeze(1)
    area = torch.where(empty, 1, ((h1 - h0) * (w1 - w0)).unsqueeze(1)).to(acc)
    share = torch.where(empty, 0, grad_out.to(acc) / area)  # (K, Cout, ph, pw)
    bins = torch.arange(pooled_h * pooled_w, device=grad_out.device).view(1, 1, pooled_h, pooled_w)
    c_in = torch.arange(channels_out, device=grad_out.device).view(1, -1, 1, 1) * (pooled_h * pooled_w) + bins
    plane = batch_index.view(-1, 1, 1, 1) * channels + c_in
    row = width + 1
    table_grad = torch.zeros(n * channels * (height + 1) * row, dtype=acc, device=grad_out.device)
    for h, w, sign in ((h1, w1, 1), (h0, w1, -1), (h1, w0, -1), (h0, w0, 1)):
        index = (plane * (height + 1) + h.unsqueeze(1)) * row + w.unsqueeze(1)
        table_grad.index_add_(0, index.reshape(-1), (share * sign).reshape(-1))
    table_grad = table_grad.reshape(n, channels, height + 1, row)
    table_grad = table_grad.flip(2).cumsum(2).flip(2).flip(3).cumsum(3).flip(3)
    return table_grad[:, :, 1:, 1:].to(grad_out.dtype)
