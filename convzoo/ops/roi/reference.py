"""RoI operators in plain, vectorised PyTorch: the CPU path and the test oracle.

Every bilinear RoI operator here (``roi_align``, ``ps_roi_align``, ``deform_roi_pool``,
``deform_ps_roi_pool``) is written in two steps:

1. *where to sample*: per RoI, per output bin and per sampling point, a coordinate
   ``(y, x)`` on the feature map and a weight (``1/count`` for a sample that counts, ``0``
   for one that does not), computed with ordinary differentiable tensor ops;
2. :func:`bilinear_pool`: the weighted sum of the bilinearly interpolated feature values
   at those points (a gather of the four neighbours of each point, O(samples) tensor ops,
   never a loop over RoIs or bins).

:func:`bilinear_pool` is differentiable by autograd (``impl="reference"``). The custom ops
in ``__init__.py`` use :func:`bilinear_pool_fast` and :func:`bilinear_pool_backward`: the
same sum as one gather of the 4 * S weighted feature rows of each output bin (Numba, one loop
per bin: :mod:`convzoo.ops._bilinear_rows`; position-sensitive poolings read the NCHW input in
Numba tasks that own channels, :func:`convzoo.ops.roi.cpu.grouped_gather`), its transpose (a
race-free scatter-add) for the input gradient, and ``<grad, d value / d point>`` per bin for the point gradients (all samples
of a bin move together), which the caller chains to the offsets analytically.
``ps_roi_pool`` sums integer bins through a summed-area table; ``roi_pool`` takes the maximum
of each integer bin, one RoI at a time.

The RoIAlign-type samples are clipped to those that can read the map (:func:`align_samples`),
which is exact and bounds the work of a huge box by the size of the map.

Coordinates live in the feature map's pixel-index frame (pixel ``i`` has centre ``i``).
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _bilinear_rows
from .._numba import kernels

__all__ = [
    "round_half_away",
    "bilinear_pool",
    "bilinear_pool_fast",
    "bilinear_pool_backward",
    "AlignGeometry",
    "AlignBins",
    "DeformPSGeometry",
    "PoolGeometry",
    "align_bins",
    "align_samples",
    "align_pool",
    "deform_ps_roi_pool_samples",
    "roi_align",
    "ps_roi_align",
    "deform_roi_pool",
    "modulated_deform_roi_pool",
    "ps_roi_pool",
    "ps_roi_pool_backward",
    "roi_pool",
    "roi_pool_argmax",
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
    per_group = channels // (coord_sets * groups)
    out_rows = k * coord_sets * bins
    if n * per_group == 0 or samples == 0:
        return input.new_zeros(k, coord_sets * per_group, bins)
    columns, corner_w, sample_w, _ = _sample_entries(batch_index, bin_group, groups, height, width, y, x, weight)
    entries = (out_rows, 4 * samples)
    values = (corner_w * sample_w.unsqueeze(-1)).reshape(entries)
    grouped = _grouped_kernels(input, groups)
    if grouped is not None:
        return grouped.grouped_gather(input, columns.reshape(entries), values, batch_index, bin_group, groups,
                                      coord_sets)
    out = _bilinear_rows.gather_sum(_feature_rows(input, coord_sets, groups), columns.reshape(entries), values)
    return out.reshape(k, coord_sets, bins, per_group).permute(0, 1, 3, 2).reshape(k, coord_sets * per_group, bins)


def _grouped_kernels(input: Tensor, groups: int):
    """The Numba kernels whose tasks own channel groups (:func:`convzoo.ops.roi.cpu.grouped_gather`)
    for a position-sensitive pooling (``groups > 1``: each input channel feeds few bins) of a CPU
    tensor; else None. They read the NCHW input in place: no feature table is built."""
    if groups > 1 and input.device.type == "cpu":
        return kernels(__package__ + ".cpu")
    return None


# Above this many columns the shared engine's per-thread copies of the table beat column
# ownership (measured: roi_align, 256 columns, 107 vs 198 ms).
NARROW_ROWS = 32


def _scatter_rows(grad_rows: Tensor, columns: Tensor, values: Tensor, grad: Tensor) -> None:
    """``grad_rows[columns[r, e]] += values[r, e] * grad[r]`` in place: narrow tables (position-
    sensitive pooling) on CPU tensors with Numba through :func:`convzoo.ops.roi.cpu.scatter_rows`
    (threads own columns: no per-thread copies of the table), others through the shared engine's
    :func:`convzoo.ops._bilinear_rows.scatter_add`."""
    narrow = grad_rows.device.type == "cpu" and grad.shape[1] <= NARROW_ROWS
    cpu = kernels(__package__ + ".cpu") if narrow else None
    if cpu is None:
        _bilinear_rows.scatter_add(grad_rows, columns, values, grad)
    else:
        cpu.scatter_rows(grad_rows, columns, values, grad)


def _grad_rows(grad_out: Tensor, coord_sets: int, per_group: int, bins: int) -> Tensor:
    """``grad_out`` (K, Q*Cq, P) as rows (K*Q*P, Cq), one per output bin."""
    k = grad_out.shape[0]
    return grad_out.reshape(k, coord_sets, per_group, bins).permute(0, 1, 3, 2).reshape(-1, per_group)


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
    per_group = channels // (coord_sets * groups)
    out_rows = k * coord_sets * bins
    grad_input = None
    grad_y = y.new_zeros(y.shape[:-1]) if need_point_grad else None
    grad_x = x.new_zeros(x.shape[:-1]) if need_point_grad else None
    if out_rows == 0 or samples == 0 or n * per_group == 0:
        return (torch.zeros_like(input) if need_input_grad else None), grad_y, grad_x
    columns, corner_w, sample_w, (ly, lx, hy, hx) = _sample_entries(
        batch_index, bin_group, groups, height, width, y, x, weight
    )
    grouped = _grouped_kernels(input, groups)
    g_rows = None
    if need_input_grad:
        values = (corner_w * sample_w.unsqueeze(-1)).reshape(out_rows, -1)
        if grouped is not None:
            grad_input = grouped.grouped_scatter(grad_out.reshape(k, coord_sets * per_group, bins),
                                                 columns.reshape(out_rows, -1), values, batch_index, bin_group,
                                                 groups, coord_sets, input.shape)
        else:
            g_rows = _grad_rows(grad_out, coord_sets, per_group, bins)
            grad_rows = input.new_zeros(n * coord_sets * groups * height * width, per_group)
            _scatter_rows(grad_rows, columns.reshape(out_rows, -1), values, g_rows)
            grad_input = _rows_to_input(grad_rows, input.shape, coord_sets, groups)
    if need_point_grad:
        rows = _feature_rows(input, coord_sets, groups)
        if g_rows is None:
            g_rows = _grad_rows(grad_out, coord_sets, per_group, bins)
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

# The adaptive grid (``ceil(roi size / bins)`` samples per axis) is capped here, far above any
# real box, so that the sample indices of absurd boxes stay exact in int64 and float64.
MAX_GRID = 2**40


class AlignGeometry(NamedTuple):
    """Where a bilinear RoI pooling (``roi_align``, ``ps_roi_align``, ``deform_roi_pool``) samples.

    Attributes:
        pooled_h, pooled_w: output bins per RoI.
        spatial_scale: feature pixels per image pixel.
        sampling_ratio: samples per bin and axis; ``<= 0`` takes ``ceil(roi size / bins)``.
        shift: subtracted from the scaled box corners (0.5: pixel centres at integer + 0.5).
        min_size_one: widen RoIs smaller than one pixel to one pixel (torchvision's roi_align
            without ``aligned``).
        position_sensitive: output channel ``c`` of bin ``(i, j)`` reads input channel
            ``(c*ph + i)*pw + j`` (``ps_roi_align``); otherwise channel ``c``.
        gamma: scale of the per-bin offsets (``deform_roi_pool``).
    """

    pooled_h: int
    pooled_w: int
    spatial_scale: float
    sampling_ratio: int
    shift: float
    min_size_one: bool
    position_sensitive: bool = False
    gamma: float = 0.0


class AlignBins(NamedTuple):
    """Per-RoI and per-bin quantities of an :class:`AlignGeometry` (the kernels' inputs).

    ``batch_index`` (K,) int64; ``origin_h``, ``origin_w`` (K, ph, pw): the bins' corners
    (offsets included); ``bin_h``, ``bin_w``, ``roi_h``, ``roi_w`` (K,); ``grid_h``, ``grid_w``
    (K,) int64: samples per bin and axis, sample ``t`` at ``origin + (t + 0.5) * bin / grid``.
    """

    batch_index: Tensor
    origin_h: Tensor
    origin_w: Tensor
    bin_h: Tensor
    bin_w: Tensor
    grid_h: Tensor
    grid_w: Tensor
    roi_h: Tensor
    roi_w: Tensor


def _adaptive_grid(size: Tensor, pooled: int, sampling_ratio: int) -> Tensor:
    """Samples per bin along one axis: ``sampling_ratio`` or ``ceil(size / pooled)`` in ``[0, MAX_GRID]``."""
    if sampling_ratio > 0:
        return torch.full(size.shape, sampling_ratio, dtype=torch.long, device=size.device)
    grid = torch.ceil(size.double() / pooled)
    grid = torch.where(torch.isfinite(grid), grid, torch.zeros_like(grid))
    return grid.clamp(0, MAX_GRID).long()


def align_bins(rois: Tensor, geometry: AlignGeometry, offset: Optional[Tensor] = None) -> AlignBins:
    """The bins of ``rois`` (K, 5), in ``rois``' dtype (torchvision's operation order).

    Bin ``(i, j)`` starts at ``(y1*s - shift + i*bin_h, x1*s - shift + j*bin_w)``, plus
    ``gamma * roi_h * offset[:, 1, i, j]`` and ``gamma * roi_w * offset[:, 0, i, j]`` when
    ``offset`` (K, 2, ph, pw) is given.
    """
    g = geometry
    batch_index = rois[:, 0].long()
    start_w = rois[:, 1] * g.spatial_scale - g.shift
    start_h = rois[:, 2] * g.spatial_scale - g.shift
    roi_w = rois[:, 3] * g.spatial_scale - g.shift - start_w
    roi_h = rois[:, 4] * g.spatial_scale - g.shift - start_h
    if g.min_size_one:
        roi_w = roi_w.clamp(min=1.0)
        roi_h = roi_h.clamp(min=1.0)
    bin_w = roi_w / g.pooled_w
    bin_h = roi_h / g.pooled_h
    k = rois.shape[0]
    origin_h = start_h.view(-1, 1, 1).expand(k, g.pooled_h, g.pooled_w)
    origin_w = start_w.view(-1, 1, 1).expand(k, g.pooled_h, g.pooled_w)
    if offset is not None:
        origin_w = origin_w + g.gamma * roi_w.view(-1, 1, 1) * offset[:, 0]
        origin_h = origin_h + g.gamma * roi_h.view(-1, 1, 1) * offset[:, 1]
    bins_h = torch.arange(g.pooled_h, dtype=rois.dtype, device=rois.device)
    bins_w = torch.arange(g.pooled_w, dtype=rois.dtype, device=rois.device)
    origin_h = origin_h + bins_h.view(1, -1, 1) * bin_h.view(-1, 1, 1)
    origin_w = origin_w + bins_w.view(1, 1, -1) * bin_w.view(-1, 1, 1)
    grid_h = _adaptive_grid(roi_h, g.pooled_h, g.sampling_ratio)
    grid_w = _adaptive_grid(roi_w, g.pooled_w, g.sampling_ratio)
    return AlignBins(batch_index, origin_h, origin_w, bin_h, bin_w, grid_h, grid_w, roi_h, roi_w)


def _readable_samples(origin: Tensor, bin_size: Tensor, grid: Tensor, size: int) -> Tuple[Tensor, Tensor]:
    """One axis of every bin's samples, clipped to those that can read the map.

    A sample outside ``[-1, size]`` reads zero, so only the indices ``t`` whose coordinate can
    lie in that band are kept (one spare on each side; the caller tests each point exactly).
    That is exact, and it bounds the samples per bin and axis by about ``2 * (size + 4)`` for
    the adaptive grid (its step is at least half a pixel), however large the box.

    Args:
        origin (Tensor[K, ph, pw]): bin corners along the axis.
        bin_size, grid (Tensor[K]): bin size and samples per bin along the axis.
    Returns:
        ``coord`` (K, ph, pw, n) and ``valid`` (K, ph, pw, n) bool (index inside the grid).
    """
    grid_f = grid.to(torch.float64).view(-1, 1, 1)
    with torch.no_grad():
        o = origin.detach().to(torch.float64)
        step = bin_size.detach().to(torch.float64).view(-1, 1, 1) / grid_f.clamp(min=1)
        a = (-1.0 - o) / step - 0.5
        b = (size - o) / step - 0.5
        lo = torch.floor(torch.minimum(a, b)) - 1
        hi = torch.ceil(torch.maximum(a, b)) + 1
        finite = torch.isfinite(lo) & torch.isfinite(hi)
        lo = torch.where(finite, lo, torch.zeros_like(lo))
        hi = torch.where(finite, hi, torch.full_like(hi, -1.0))
        # a zero step puts every sample on the bin's corner: keep them all (at most the grid)
        flat = (step == 0) & torch.isfinite(o)
        lo = torch.where(flat, torch.zeros_like(lo), lo)
        hi = torch.where(flat, grid_f - 1, hi)
        lo = torch.minimum(lo.clamp(min=0), grid_f).long()
        hi = torch.minimum(hi, grid_f - 1).long()
        count = int((hi - lo + 1).clamp(min=0).max()) if hi.numel() else 0
        t = lo.unsqueeze(-1) + torch.arange(count, device=origin.device)
        valid = t <= hi.unsqueeze(-1)
    frac = (t.to(origin.dtype) + 0.5) * bin_size.view(-1, 1, 1, 1) / grid.clamp(min=1).to(origin.dtype).view(-1, 1, 1, 1)
    return origin.unsqueeze(-1) + frac, valid


def align_samples(rois: Tensor, height: int, width: int, geometry: AlignGeometry,
                  offset: Optional[Tensor] = None) -> RoISamples:
    """RoIAlign sampling points (torchvision / mmcv rule) of ``rois`` (K, 5).

    Each bin of :func:`align_bins` holds ``grid_h x grid_w`` regularly spaced samples at the
    sub-cell centres. A sample outside ``[-1, H] x [-1, W]`` reads zero but still counts; the
    bin value is the sum over its samples divided by ``max(grid_h * grid_w, 1)``. Only the
    samples that can read the map are returned (:func:`_readable_samples`), so a huge box
    costs no more than one the size of the map.
    """
    bins = align_bins(rois, geometry, offset)
    k, pooled_h, pooled_w = bins.origin_h.shape
    y, valid_h = _readable_samples(bins.origin_h, bins.bin_h, bins.grid_h, height)
    x, valid_w = _readable_samples(bins.origin_w, bins.bin_w, bins.grid_w, width)
    n_h, n_w = y.shape[-1], x.shape[-1]
    y = y.unsqueeze(-1)
    x = x.unsqueeze(-2)
    y, x = torch.broadcast_tensors(y, x)
    readable = (y >= -1.0) & (y <= height) & (x >= -1.0) & (x <= width)
    count = (bins.grid_h.double() * bins.grid_w.double()).clamp(min=1).to(rois.dtype).view(-1, 1, 1, 1, 1)
    weight = (readable & valid_h.unsqueeze(-1) & valid_w.unsqueeze(-2)).to(rois.dtype) / count
    shape = (k, 1, pooled_h * pooled_w, n_h * n_w)
    return bins.batch_index, y.reshape(shape), x.reshape(shape), weight.reshape(shape)


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


class DeformPSGeometry(NamedTuple):
    """Where deformable PS RoI pooling samples (the arguments of :func:`convzoo.ops.deform_ps_roi_pool`)."""

    output_dim: int
    group_size: int
    pooled_size: int
    part_size: int
    sample_per_part: int
    trans_std: float
    spatial_scale: float


def deform_ps_roi_pool_samples(rois: Tensor, height: int, width: int, offset: Optional[Tensor],
                               geometry: DeformPSGeometry) -> RoISamples:
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
    pooled_size, part_size, sample_per_part = geometry.pooled_size, geometry.part_size, geometry.sample_per_part
    trans_std, spatial_scale = geometry.trans_std, geometry.spatial_scale
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


def align_bin_groups(geometry: AlignGeometry, device) -> Tuple[Tensor, int]:
    """``(bin_group, groups)`` of :func:`bilinear_pool` for an :class:`AlignGeometry`: every
    bin reads the same channels, or (position-sensitive) bin ``p`` reads group ``p``."""
    bins = geometry.pooled_h * geometry.pooled_w
    if geometry.position_sensitive:
        return torch.arange(bins, device=device), bins
    return torch.zeros(bins, dtype=torch.long, device=device), 1


def align_pool(input: Tensor, rois: Tensor, geometry: AlignGeometry, offset: Optional[Tensor] = None,
               pool=bilinear_pool) -> Tensor:
    """The bilinear RoI pooling of ``geometry`` on ``rois`` (K, 5), optional ``offset``
    (K, 2, ph, pw): (K, C, ph, pw), or (K, C/(ph*pw), ph, pw) when position-sensitive.
    ``pool`` is :func:`bilinear_pool` (autograd) or :func:`bilinear_pool_fast` (the custom ops')."""
    height, width = input.shape[-2:]
    batch_index, y, x, weight = align_samples(rois.to(input.dtype), height, width, geometry, offset)
    bin_group, groups = align_bin_groups(geometry, input.device)
    pooled = pool(input, batch_index, bin_group, groups, y, x, weight)
    return _pool_to_output(pooled, (geometry.pooled_h, geometry.pooled_w))


def roi_align_geometry(output_size: Tuple[int, int], spatial_scale: float, sampling_ratio: int,
                       aligned: bool) -> AlignGeometry:
    """torchvision's ``roi_align``: half-pixel shift only when ``aligned``; without it a RoI
    smaller than one pixel is widened to one pixel."""
    return AlignGeometry(output_size[0], output_size[1], spatial_scale, sampling_ratio,
                         shift=0.5 if aligned else 0.0, min_size_one=not aligned)


def ps_roi_align_geometry(output_size: Tuple[int, int], spatial_scale: float, sampling_ratio: int) -> AlignGeometry:
    """torchvision's ``ps_roi_align``: always the half-pixel shift, no minimum RoI size."""
    return AlignGeometry(output_size[0], output_size[1], spatial_scale, sampling_ratio, shift=0.5,
                         min_size_one=False, position_sensitive=True)


def deform_roi_pool_geometry(output_size: Tuple[int, int], spatial_scale: float, sampling_ratio: int,
                             gamma: float) -> AlignGeometry:
    """mmcv's ``DeformRoIPool``: always the half-pixel shift, no minimum RoI size, bins moved by
    ``gamma * offset * roi size``."""
    return AlignGeometry(output_size[0], output_size[1], spatial_scale, sampling_ratio, shift=0.5,
                         min_size_one=False, gamma=gamma)


def roi_align(input: Tensor, rois: Tensor, output_size: Tuple[int, int], spatial_scale: float = 1.0,
              sampling_ratio: int = -1, aligned: bool = False) -> Tensor:
    """torchvision's ``roi_align`` on ``rois`` (K, 5): (K, C, ph, pw)."""
    return align_pool(input, rois, roi_align_geometry(output_size, spatial_scale, sampling_ratio, aligned))


def ps_roi_align(input: Tensor, rois: Tensor, output_size: Tuple[int, int], spatial_scale: float = 1.0,
                 sampling_ratio: int = -1) -> Tensor:
    """torchvision's ``ps_roi_align`` on ``rois`` (K, 5): (K, C/(ph*pw), ph, pw)."""
    return align_pool(input, rois, ps_roi_align_geometry(output_size, spatial_scale, sampling_ratio))


def deform_roi_pool(input: Tensor, rois: Tensor, offset: Optional[Tensor], output_size: Tuple[int, int],
                    spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1) -> Tensor:
    """mmcv's ``deform_roi_pool`` on ``rois`` (K, 5) and ``offset`` (K, 2, ph, pw) or None."""
    geometry = deform_roi_pool_geometry(output_size, spatial_scale, sampling_ratio, gamma)
    return align_pool(input, rois, geometry, offset)


def modulated_deform_roi_pool(
    input: Tensor, rois: Tensor, offset: Tensor, mask: Tensor, output_size: Tuple[int, int],
    spatial_scale: float = 1.0, sampling_ratio: int = 0, gamma: float = 0.1,
) -> Tensor:
    """``deform_roi_pool(...) * mask`` with ``mask`` (K, 1, ph, pw), as mmcv's
    ModulatedDeformRoIPoolPack computes it."""
    return deform_roi_pool(input, rois, offset, output_size, spatial_scale, sampling_ratio, gamma) * mask


def deform_ps_roi_pool(input: Tensor, rois: Tensor, offset: Optional[Tensor], geometry: DeformPSGeometry,
                       pool=bilinear_pool) -> Tensor:
    """Deformable PS RoI pooling (``offset`` None = no_trans): (K, output_dim, pooled, pooled).
    ``pool`` is :func:`bilinear_pool` (autograd) or :func:`bilinear_pool_fast` (the custom op's)."""
    height, width = input.shape[-2:]
    batch_index, y, x, weight = deform_ps_roi_pool_samples(rois.to(input.dtype), height, width, offset, geometry)
    bin_group = dcn_bin_groups(geometry.pooled_size, geometry.group_size, input.dtype, input.device)
    pooled = pool(input, batch_index, bin_group, geometry.group_size**2, y, x, weight)
    return _pool_to_output(pooled, (geometry.pooled_size, geometry.pooled_size))


class PoolGeometry(NamedTuple):
    """Integer bins of ``ps_roi_pool`` and ``roi_pool``: bins per RoI and the box scale."""

    pooled_h: int
    pooled_w: int
    spatial_scale: float


def _box_corners(rois: Tensor, spatial_scale: float) -> Tuple[Tensor, ...]:
    """``round(coord * s)`` (half away from zero) of the box corners as int64, non-finite -> 0,
    clamped to +-MAX_GRID: ``(batch, start_w, start_h, end_w, end_h)``."""
    corners = round_half_away(rois[:, 1:] * spatial_scale)
    corners = torch.where(torch.isfinite(corners), corners, torch.zeros_like(corners))
    corners = corners.double().clamp(-MAX_GRID, MAX_GRID).long()
    return (rois[:, 0].long(),) + tuple(corners.unbind(1))


def _integer_bins(start: Tensor, size: Tensor, pooled: int, limit: int, dtype) -> Tuple[Tensor, Tensor]:
    """Bin ``i`` spans ``[floor(i*bin), ceil((i+1)*bin))`` from ``start``, ``bin = size / pooled``,
    clipped to ``[0, limit]``: (K, pooled) starts and ends."""
    bin_size = size.to(dtype) / pooled
    steps = torch.arange(pooled, dtype=dtype, device=start.device)
    first = torch.floor(steps.view(1, -1) * bin_size.view(-1, 1)).double()
    end = torch.ceil((steps + 1).view(1, -1) * bin_size.view(-1, 1)).double()
    offset = start.view(-1, 1).double()
    return ((first + offset).clamp(0, limit).long(), (end + offset).clamp(0, limit).long())


def ps_roi_pool_bins(rois: Tensor, height: int, width: int, geometry: PoolGeometry):
    """Integer bin boundaries of torchvision's ps_roi_pool: ``(batch, h0, h1, w0, w1)``.

    Box corners are ``round(coord * s)`` (half away from zero), the RoI at least 1x1; bin
    ``i`` spans ``[floor(i*bin), ceil((i+1)*bin))`` from the RoI's corner, clipped to
    ``[0, H-1]`` (torchvision's forward kernels clip to ``H - 1``, so the last row and
    column of the map are never read: a quirk kept on purpose). ``h0, h1`` are (K, ph, 1),
    ``w0, w1`` (K, 1, pw).
    """
    batch_index, start_w, start_h, end_w, end_h = _box_corners(rois, geometry.spatial_scale)
    h0, h1 = _integer_bins(start_h, (end_h - start_h).clamp(min=1), geometry.pooled_h, height - 1, rois.dtype)
    w0, w1 = _integer_bins(start_w, (end_w - start_w).clamp(min=1), geometry.pooled_w, width - 1, rois.dtype)
    return batch_index, h0.unsqueeze(-1), h1.unsqueeze(-1), w0.unsqueeze(1), w1.unsqueeze(1)


def roi_pool_bins(rois: Tensor, height: int, width: int, geometry: PoolGeometry):
    """Integer bin boundaries of torchvision's roi_pool: ``(batch, h0, h1, w0, w1)``.

    As :func:`ps_roi_pool_bins` but the RoI spans ``end - start + 1`` pixels (at least 1) and
    bins are clipped to ``[0, H]``: the last row and column are read.
    """
    batch_index, start_w, start_h, end_w, end_h = _box_corners(rois, geometry.spatial_scale)
    h0, h1 = _integer_bins(start_h, (end_h - start_h + 1).clamp(min=1), geometry.pooled_h, height, rois.dtype)
    w0, w1 = _integer_bins(start_w, (end_w - start_w + 1).clamp(min=1), geometry.pooled_w, width, rois.dtype)
    return batch_index, h0.unsqueeze(-1), h1.unsqueeze(-1), w0.unsqueeze(1), w1.unsqueeze(1)


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype in (torch.float32, torch.float64) else torch.float32


def _ps_planes(batch_index: Tensor, channels: int, geometry: PoolGeometry, device) -> Tensor:
    """Input plane ``b*C + (c*ph + i)*pw + j`` read by output ``(k, c, i, j)``: (K, C/(ph*pw), ph, pw)."""
    pooled_h, pooled_w = geometry.pooled_h, geometry.pooled_w
    bins = torch.arange(pooled_h * pooled_w, device=device).view(1, 1, pooled_h, pooled_w)
    c_in = torch.arange(channels // (pooled_h * pooled_w), device=device).view(1, -1, 1, 1) * (pooled_h * pooled_w)
    return batch_index.view(-1, 1, 1, 1) * channels + c_in + bins


def ps_roi_pool(input: Tensor, rois: Tensor, geometry: PoolGeometry) -> Tensor:
    """torchvision's ``ps_roi_pool``: (K, C/(ph*pw), ph, pw), the mean of each integer bin of
    the bin's own channel ``(c*ph + i)*pw + j``, through a summed-area table."""
    n, channels, height, width = input.shape
    batch_index, h0, h1, w0, w1 = ps_roi_pool_bins(rois.to(input.dtype), height, width, geometry)
    table = torch.nn.functional.pad(input.to(_accumulation_dtype(input.dtype)), (1, 0, 1, 0))
    table = table.cumsum(2).cumsum(3).reshape(-1)  # (N*C*(H+1)*(W+1),)
    plane = _ps_planes(batch_index, channels, geometry, input.device)
    row = width + 1

    def at(h: Tensor, w: Tensor) -> Tensor:
        return table[(plane * (height + 1) + h.unsqueeze(1)) * row + w.unsqueeze(1)]

    total = at(h1, w1) - at(h0, w1) - at(h1, w0) + at(h0, w0)
    empty = ((h1 <= h0) | (w1 <= w0)).unsqueeze(1)
    area = torch.where(empty, 1, ((h1 - h0) * (w1 - w0)).unsqueeze(1)).to(total.dtype)
    return torch.where(empty, 0, total / area).to(input.dtype)


def ps_roi_pool_backward(grad_out: Tensor, rois: Tensor, input_shape: torch.Size, geometry: PoolGeometry) -> Tensor:
    """Gradient of :func:`ps_roi_pool` with respect to its input (it is linear in it):
    ``grad_out / area`` spread over each bin, through the summed-area table's transpose.

    This is the true adjoint of the forward (``<grad_out, ps_roi_pool(x)> = <result, x>``):
    it spreads over the bins the forward read, clipped to ``H - 1``/``W - 1``. torchvision's
    backward clips to ``H``/``W`` instead, so its input gradient differs for bins that touch
    the last row or column of the map.
    """
    n, channels, height, width = input_shape
    batch_index, h0, h1, w0, w1 = ps_roi_pool_bins(rois.to(grad_out.dtype), height, width, geometry)
    acc = _accumulation_dtype(grad_out.dtype)
    empty = ((h1 <= h0) | (w1 <= w0)).unsqueeze(1)
    area = torch.where(empty, 1, ((h1 - h0) * (w1 - w0)).unsqueeze(1)).to(acc)
    share = torch.where(empty, 0, grad_out.to(acc) / area)  # (K, Cout, ph, pw)
    plane = _ps_planes(batch_index, channels, geometry, grad_out.device)
    row = width + 1
    table_grad = torch.zeros(n * channels * (height + 1) * row, dtype=acc, device=grad_out.device)
    for h, w, sign in ((h1, w1, 1), (h0, w1, -1), (h1, w0, -1), (h0, w0, 1)):
        index = (plane * (height + 1) + h.unsqueeze(1)) * row + w.unsqueeze(1)
        table_grad.index_add_(0, index.reshape(-1), (share * sign).reshape(-1))
    table_grad = table_grad.reshape(n, channels, height + 1, row)
    table_grad = table_grad.flip(2).cumsum(2).flip(2).flip(3).cumsum(3).flip(3)
    return table_grad[:, :, 1:, 1:].to(grad_out.dtype)


# torchvision's roi_pool starts every bin's running maximum at -FLT_MAX (also for float64) and
# keeps the first value strictly above it: NaN and values <= -FLT_MAX never win.
ROI_POOL_FLOOR = -3.4028234663852886e38


def roi_pool_argmax(input: Tensor, rois: Tensor, geometry: PoolGeometry) -> Tuple[Tensor, Tensor]:
    """torchvision's ``roi_pool``: the maximum of each integer bin and where it is.

    Returns ``(out, argmax)``, both (K, C, ph, pw): ``argmax`` is ``y * W + x`` of the first
    maximum in row-major order among the values above :data:`ROI_POOL_FLOOR`, or -1 when
    there is none; then ``out`` is :data:`ROI_POOL_FLOOR` for a non-empty bin and 0 for an
    empty one. One RoI at a time (the bins are clipped to the map, so each costs at most a
    pass over its image).
    """
    n, channels, height, width = input.shape
    batch_index, h0, h1, w0, w1 = roi_pool_bins(rois.to(input.dtype), height, width, geometry)
    pooled_h, pooled_w = geometry.pooled_h, geometry.pooled_w
    k = rois.shape[0]
    rows = torch.arange(height, device=input.device)
    cols = torch.arange(width, device=input.device)
    argmax = torch.full((k, channels, pooled_h, pooled_w), -1, dtype=torch.long, device=input.device)
    with torch.no_grad():
        for r in range(k):
            image = input[batch_index[r]]
            candidates = torch.where(image > ROI_POOL_FLOOR, image, float("-inf"))  # NaN never wins
            in_rows = (rows.view(1, -1) >= h0[r].view(-1, 1)) & (rows.view(1, -1) < h1[r].view(-1, 1))  # (ph, H)
            in_cols = (cols.view(1, -1) >= w0[r].view(-1, 1)) & (cols.view(1, -1) < w1[r].view(-1, 1))  # (pw, W)
            # the first maximum in row-major order: per row the first best column, then the first best row
            per_col = torch.where(in_cols.view(1, 1, pooled_w, width), candidates.unsqueeze(2), float("-inf"))
            row_best, row_arg = per_col.max(-1)  # (C, H, pw)
            per_row = torch.where(in_rows.view(1, pooled_h, height, 1), row_best.unsqueeze(1), float("-inf"))
            best, best_row = per_row.max(2)  # (C, ph, pw)
            best_col = row_arg.unsqueeze(1).expand(-1, pooled_h, -1, -1).gather(2, best_row.unsqueeze(2)).squeeze(2)
            argmax[r] = torch.where(best > float("-inf"), best_row * width + best_col, -1)
    plane = (batch_index.view(-1, 1, 1, 1) * channels + torch.arange(channels, device=input.device).view(1, -1, 1, 1))
    gathered = input.reshape(-1)[(plane * height * width + argmax.clamp(min=0)).reshape(-1)].view(argmax.shape)
    empty = ((h1 <= h0) | (w1 <= w0)).unsqueeze(1)
    fill = torch.where(empty, 0.0, ROI_POOL_FLOOR).to(input.dtype)
    return torch.where(argmax >= 0, gathered, fill), argmax


def roi_pool(input: Tensor, rois: Tensor, geometry: PoolGeometry) -> Tensor:
    """torchvision's ``roi_pool`` on ``rois`` (K, 5): (K, C, ph, pw), differentiable by autograd."""
    return roi_pool_argmax(input, rois, geometry)[0]


def roi_pool_backward(grad_out: Tensor, rois: Tensor, argmax: Tensor, input_shape: torch.Size) -> Tensor:
    """Gradient of :func:`roi_pool` with respect to its input: ``grad_out`` added at each bin's
    ``argmax`` (nothing for -1)."""
    n, channels, height, width = input_shape
    plane = rois[:, 0].long().view(-1, 1, 1, 1) * channels + torch.arange(channels, device=grad_out.device).view(1, -1, 1, 1)
    index = plane * (height * width) + argmax.clamp(min=0)
    values = torch.where(argmax >= 0, grad_out, torch.zeros_like(grad_out))
    grad_input = grad_out.new_zeros(n * channels * height * width)
    grad_input.index_add_(0, index.reshape(-1), values.reshape(-1))
    return grad_input.view(n, channels, height, width)
