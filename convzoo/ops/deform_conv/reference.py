"""Deformable convolution v1/v2 in plain, vectorised PyTorch.

Semantics are those of ``torchvision.ops.deform_conv2d``. For output pixel ``(oy, ox)``, kernel
tap ``(i, j)`` (``k = i * kw + j``) and offset group ``g`` the sampling point is::

    y = oy * stride_h - pad_h + i * dilation_h + offset[n, 2 * (g * K + k), oy, ox]
    x = ox * stride_w - pad_w + j * dilation_w + offset[n, 2 * (g * K + k) + 1, oy, ox]

The input channels of group ``g`` are read there by bilinear interpolation in which each of the
four neighbouring pixels that lies outside the image reads zero (so a point with ``y <= -1``,
``y >= H``, ``x <= -1`` or ``x >= W`` reads zero), multiplied by ``mask[n, g * K + k, oy, ox]``
when a mask is given (DCNv2), and the sampled columns are contracted with the weight of each
weight group. A point with a non-finite coordinate reads zero and gets zero gradient.

Two implementations share the sampling maths:

* :func:`deform_conv2d_reference` -- differentiable by autograd, no chunking: the test oracle and
  the ``impl="reference"`` path (traceable by ``torch.jit.trace`` / ``torch.onnx``).
* :func:`deform_conv2d_forward` / :func:`deform_conv2d_backward` -- the CPU kernels behind the
  custom op: the same sampling by the Numba gather of :mod:`convzoo.ops._bilinear_rows` (im2col
  and col2im), the products in PyTorch's GEMM, processed in chunks of output positions (bounded memory), with a hand-written backward that
  recomputes the columns chunk by chunk instead of keeping them alive.

Both read from a zero-padded NHWC copy of the input: coordinates are clamped to
``[-2, H + 1]`` x ``[-2, W + 1]`` (outside ``(-1, H)`` every neighbour reads zero, so the value and
its gradient do not change) and the padding border of two pixels before and three after makes
every neighbour of a clamped point a real address that holds zero. No validity masks are needed.
Half-precision inputs are computed in float32 and rounded back at the end.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F

from .. import _bilinear_rows
from .._checks import compute_dtype

# Border of zeros around the input: coordinates are clamped to [-PAD_BEFORE, size + PAD_BEFORE - 1],
# whose floor + 1 is at most size + PAD_AFTER - 1.
PAD_BEFORE = 2
PAD_AFTER = 3

# Elements of the sampled-columns matrix held at once by the chunked CPU kernels (16 MiB in
# fp32). Larger chunks mean fewer parallel regions, which matters on a CPU shared with other
# processes; smaller ones stay in cache better on a quiet one.
CHUNK_ELEMENTS = 1 << 22


class Conv(NamedTuple):
    """The convolution arguments of ``deform_conv2d``, by name (as ``torch.nn.Conv2d``'s pairs)."""

    stride_h: int = 1
    stride_w: int = 1
    pad_h: int = 0
    pad_w: int = 0
    dilation_h: int = 1
    dilation_w: int = 1


def output_size(in_h: int, in_w: int, kernel_h: int, kernel_w: int, conv: Conv) -> Tuple[int, int]:
    """Spatial size ``(Ho, Wo)`` of a convolution (floor division, as ``torch.nn.Conv2d``)."""
    out_h = (in_h + 2 * conv.pad_h - conv.dilation_h * (kernel_h - 1) - 1) // conv.stride_h + 1
    out_w = (in_w + 2 * conv.pad_w - conv.dilation_w * (kernel_w - 1) - 1) // conv.stride_w + 1
    return out_h, out_w


def padded_rows(x: torch.Tensor, offset_groups: int) -> torch.Tensor:
    """Zero-pad ``x`` (N, C, H, W) and lay it out as rows of one offset group's channels.

    Returns ``rows`` of shape (N * Hp * Wp * G, C // G) where row ``((n * Hp + yp) * Wp + xp) * G + g``
    holds the channels of group ``g`` at padded pixel ``(yp, xp)`` (``Hp, Wp``: :attr:`Geometry.padded_h`, ``padded_w``).
    """
    n, c, h, w = x.shape
    padded = F.pad(x, (PAD_BEFORE, PAD_AFTER, PAD_BEFORE, PAD_AFTER))
    hp, wp = h + PAD_BEFORE + PAD_AFTER, w + PAD_BEFORE + PAD_AFTER
    return padded.permute(0, 2, 3, 1).reshape(n * hp * wp * offset_groups, c // offset_groups)


def offsets_by_position(offset: torch.Tensor, kernel_size: int, offset_groups: int) -> torch.Tensor:
    """(N, 2*G*K, Ho, Wo) offsets -> (N*Ho*Wo, K, G, 2) holding (dy, dx) per position, tap, group."""
    n, _, out_h, out_w = offset.shape
    by_group = offset.reshape(n, offset_groups, kernel_size, 2, out_h * out_w)
    return by_group.permute(0, 4, 2, 1, 3).reshape(n * out_h * out_w, kernel_size, offset_groups, 2)


def mask_by_position(mask: torch.Tensor, kernel_size: int, offset_groups: int) -> torch.Tensor:
    """(N, G*K, Ho, Wo) mask -> (N*Ho*Wo, K, G)."""
    n, _, out_h, out_w = mask.shape
    by_group = mask.reshape(n, offset_groups, kernel_size, out_h * out_w)
    return by_group.permute(0, 3, 2, 1).reshape(n * out_h * out_w, kernel_size, offset_groups)


def sampling_points(
    positions: torch.Tensor,
    offsets: torch.Tensor,
    geometry: Geometry,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Corner rows and fractional parts of the sampling points of some output positions.

    Args:
        positions (Tensor[P]): flat output positions ``(n * Ho + oy) * Wo + ox`` (int64).
        offsets (Tensor[P, K, G, 2]): (dy, dx) of those positions.
        geometry: sizes and conv arguments.

    Returns:
        ``top_left`` (Tensor[P, K, G], int64): row in :func:`padded_rows` of the top-left neighbour;
        ``frac_y``, ``frac_x`` (Tensor[P, K, G]): fractional parts of the clamped coordinates.
    """
    g, conv = geometry, geometry.conv
    out_hw = g.out_h * g.out_w
    batch_index = torch.div(positions, out_hw, rounding_mode="floor")
    within = positions - batch_index * out_hw
    out_y = torch.div(within, g.out_w, rounding_mode="floor")
    out_x = within - out_y * g.out_w
    dtype = offsets.dtype
    device = offsets.device
    tap_y = torch.arange(g.kernel_h, device=device).repeat_interleave(g.kernel_w) * conv.dilation_h
    tap_x = torch.arange(g.kernel_w, device=device).repeat(g.kernel_h) * conv.dilation_w
    base_y = (out_y * conv.stride_h - conv.pad_h).unsqueeze(1) + tap_y  # (P, K)
    base_x = (out_x * conv.stride_w - conv.pad_w).unsqueeze(1) + tap_x
    y = base_y.to(dtype).unsqueeze(-1) + offsets[..., 0]
    x = base_x.to(dtype).unsqueeze(-1) + offsets[..., 1]
    # A non-finite coordinate is sent outside the image, where it reads zero with zero gradient.
    y = torch.where(torch.isfinite(y), y, torch.full_like(y, -PAD_BEFORE))
    x = torch.where(torch.isfinite(x), x, torch.full_like(x, -PAD_BEFORE))
    y = y.clamp(-PAD_BEFORE, g.in_h + PAD_BEFORE - 1)
    x = x.clamp(-PAD_BEFORE, g.in_w + PAD_BEFORE - 1)
    y_floor = torch.floor(y)
    x_floor = torch.floor(x)
    frac_y = y - y_floor
    frac_x = x - x_floor
    groups = g.offset_groups
    padded_y = y_floor.long() + PAD_BEFORE
    padded_x = x_floor.long() + PAD_BEFORE
    pixel = (batch_index.view(-1, 1, 1) * g.padded_h + padded_y) * g.padded_w + padded_x
    group = torch.arange(groups, device=device)
    top_left = pixel * groups + group
    return top_left, frac_y, frac_x


def corner_steps(geometry: Geometry) -> Tuple[int, int, int, int]:
    """Row distance from the top-left neighbour to the (tl, tr, bl, br) neighbours."""
    groups = geometry.offset_groups
    row = geometry.padded_w * groups
    return 0, groups, row, row + groups


def corner_weights(frac_y: torch.Tensor, frac_x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
    """Bilinear weights of the (tl, tr, bl, br) neighbours."""
    return (
        (1 - frac_y) * (1 - frac_x),
        (1 - frac_y) * frac_x,
        frac_y * (1 - frac_x),
        frac_y * frac_x,
    )


class Geometry(NamedTuple):
    """Every size the kernels need, by name: the shapes' sizes and the convolution arguments."""

    batch: int
    in_channels: int
    in_h: int
    in_w: int
    out_channels: int
    kernel_h: int
    kernel_w: int
    weight_groups: int
    offset_groups: int
    out_h: int
    out_w: int
    conv: Conv

    @classmethod
    def of(cls, x_shape, weight_shape, offset_shape, conv: Conv) -> "Geometry":
        """The geometry of validated arguments: ``x`` (N, C, H, W), ``weight`` (O, C/wg, kh, kw),
        ``offset`` (N, 2*G*kh*kw, Ho, Wo)."""
        n, c, h, w = x_shape
        out_channels, group_channels, kernel_h, kernel_w = weight_shape
        return cls(batch=n, in_channels=c, in_h=h, in_w=w, out_channels=out_channels, kernel_h=kernel_h,
                   kernel_w=kernel_w, weight_groups=c // group_channels,
                   offset_groups=offset_shape[1] // (2 * kernel_h * kernel_w), out_h=offset_shape[2],
                   out_w=offset_shape[3], conv=conv)

    @property
    def kernel_size(self) -> int:
        return self.kernel_h * self.kernel_w

    @property
    def padded_h(self) -> int:
        """Height of the zero-padded input of :func:`padded_rows`."""
        return self.in_h + PAD_BEFORE + PAD_AFTER

    @property
    def padded_w(self) -> int:
        return self.in_w + PAD_BEFORE + PAD_AFTER


def weight_matrix(weight: torch.Tensor, weight_groups: int) -> torch.Tensor:
    """(O, C/wg, kh, kw) -> (wg, K * C/wg, O/wg) matching columns laid out as (tap, channel)."""
    out_channels, group_channels, kernel_h, kernel_w = weight.shape
    per_group = weight.reshape(weight_groups, out_channels // weight_groups, group_channels, kernel_h * kernel_w)
    return per_group.permute(0, 3, 2, 1).reshape(weight_groups, kernel_h * kernel_w * group_channels, -1)


def columns_by_weight_group(columns: torch.Tensor, kernel_size: int, weight_groups: int) -> torch.Tensor:
    """(P, K, C) columns -> (wg, P, K * C/wg) (a view when there is one weight group)."""
    positions, _, channels = columns.shape
    split = columns.reshape(positions, kernel_size, weight_groups, channels // weight_groups)
    return split.permute(2, 0, 1, 3).reshape(weight_groups, positions, kernel_size * channels // weight_groups)


def columns_from_weight_groups(grouped: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Inverse of :func:`columns_by_weight_group`: (wg, P, K * C/wg) -> (P, K, C)."""
    weight_groups, positions, columns = grouped.shape
    split = grouped.reshape(weight_groups, positions, kernel_size, columns // kernel_size)
    return split.permute(1, 2, 0, 3).reshape(positions, kernel_size, weight_groups * columns // kernel_size)


def contract(columns: torch.Tensor, weights: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """(P, K, C) columns x (wg, K*C/wg, O/wg) weight matrices -> (P, O)."""
    grouped = columns_by_weight_group(columns, kernel_size, weights.shape[0])
    out = torch.bmm(grouped, weights)  # (wg, P, O/wg)
    return out.permute(1, 0, 2).reshape(columns.shape[0], weights.shape[0] * weights.shape[2])


def _sample(rows: torch.Tensor, top_left: torch.Tensor, weights, steps) -> torch.Tensor:
    """Bilinear sample: sum over the four neighbours of weight * row. Returns (P, K, G, Cg)."""
    flat = top_left.reshape(-1)
    out = None
    for step, weight in zip(steps, weights):
        values = rows.index_select(0, flat + step).view(*top_left.shape, rows.shape[1])
        term = values * weight.unsqueeze(-1)
        out = term if out is None else out + term
    return out


def deform_conv2d_reference(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor] = None,
    mask: Optional[torch.Tensor] = None,
    conv: Conv = Conv(),
) -> torch.Tensor:
    """Deformable convolution differentiable by autograd (arguments already validated).

    Args:
        x (Tensor[N, C, H, W]), offset (Tensor[N, 2*G*kh*kw, Ho, Wo]), weight (Tensor[O, C/wg, kh, kw]),
        bias (Tensor[O] or None), mask (Tensor[N, G*kh*kw, Ho, Wo] or None), the conv arguments.

    Returns:
        Tensor[N, O, Ho, Wo] in the dtype of ``x``.
    """
    dtype = compute_dtype(x.dtype)
    geometry = Geometry.of(x.shape, weight.shape, offset.shape, conv)
    kernel_size, groups = geometry.kernel_size, geometry.offset_groups
    n, out_h, out_w = geometry.batch, geometry.out_h, geometry.out_w
    rows = padded_rows(x.to(dtype), groups)
    offsets = offsets_by_position(offset.to(dtype), kernel_size, groups)
    positions = torch.arange(n * out_h * out_w, device=x.device)
    top_left, frac_y, frac_x = sampling_points(positions, offsets, geometry)
    weights = corner_weights(frac_y, frac_x)
    if mask is not None:
        modulation = mask_by_position(mask.to(dtype), kernel_size, groups)
        weights = tuple(w * modulation for w in weights)
    columns = _sample(rows, top_left, weights, corner_steps(geometry))
    columns = columns.reshape(positions.shape[0], kernel_size, geometry.in_channels)
    out = contract(columns, weight_matrix(weight.to(dtype), geometry.weight_groups), kernel_size)
    if bias is not None:
        out = out + bias.to(dtype)
    out = out.reshape(n, out_h, out_w, geometry.out_channels).permute(0, 3, 1, 2).contiguous()
    return out.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Chunked CPU kernels with a hand-written backward (the custom op's CPU implementation).
# ---------------------------------------------------------------------------------------------


class _Prepared:
    """Inputs converted to the compute dtype and laid out for the chunked kernels.

    Bilinear sampling is a gather of four weighted rows per sample (:mod:`convzoo.ops._bilinear_rows`),
    one sample per (position, tap, offset group). The column-gradient buffer is allocated once and reused by every chunk
    (fresh allocations of tens of MiB per chunk cost more in page faults than the work).
    """

    def __init__(self, x, offset, weight, mask, conv: Conv, chunk_elements):
        self.dtype = compute_dtype(x.dtype)
        g = Geometry.of(x.shape, weight.shape, offset.shape, conv)
        self.geometry = g
        self.kernel_size, self.groups = g.kernel_size, g.offset_groups
        self.group_channels = g.in_channels // self.groups
        self.positions = g.batch * g.out_h * g.out_w
        self.rows = padded_rows(x.to(self.dtype), self.groups)
        self.offsets = offsets_by_position(offset.to(self.dtype), self.kernel_size, self.groups)
        self.modulation = None if mask is None else mask_by_position(mask.to(self.dtype), self.kernel_size, self.groups)
        self.weights = weight_matrix(weight.to(self.dtype), g.weight_groups)
        self.steps = corner_steps(g)
        columns_per_position = self.kernel_size * g.in_channels
        self.chunk = max(1, min(self.positions, chunk_elements // max(1, columns_per_position)))
        self.buffers = {}

    def chunks(self):
        """``(start, stop)`` ranges of output positions, ``self.chunk`` positions each."""
        for start in range(0, self.positions, self.chunk):
            yield start, min(self.positions, start + self.chunk)

    def buffer(self, name: str, rows: int) -> torch.Tensor:
        """A reusable (rows, Cg) buffer of the compute dtype (its first ``rows`` rows)."""
        if name not in self.buffers:
            self.buffers[name] = self.rows.new_empty((self.chunk * self.kernel_size * self.groups, self.group_channels))
        return self.buffers[name][:rows]

    def points(self, start: int, stop: int):
        """Top-left rows ``(S, 1)``, fractional parts ``(S, 1)`` and modulation of positions [start, stop)."""
        positions = torch.arange(start, stop, device=self.rows.device)
        top_left, frac_y, frac_x = sampling_points(positions, self.offsets[start:stop], self.geometry)
        modulation = None if self.modulation is None else self.modulation[start:stop]
        return top_left.reshape(-1), frac_y.reshape(-1), frac_x.reshape(-1), modulation

    def sampling(self, start: int, stop: int):
        """The ``S = (stop - start) * K * G`` samples of positions [start, stop), each ``(S,)``:
        ``(top_left, frac_y, frac_x, modulation, corner weights, modulated corner weights)``."""
        top_left, frac_y, frac_x, modulation = self.points(start, stop)
        weights = corner_weights(frac_y, frac_x)
        modulated = weights if modulation is None else tuple(w * modulation.reshape(-1) for w in weights)
        return top_left, frac_y, frac_x, modulation, weights, modulated

    def columns(self, start: int, stop: int) -> torch.Tensor:
        """Modulated columns of positions [start, stop) as (S, Cg), S = (stop - start) * K * G."""
        top_left, *_, modulated = self.sampling(start, stop)
        return _bilinear_rows.sample(self.rows, top_left, self.steps, modulated)

    def weight_gradient_and_columns_gradient(self, columns, grad_chunk, grad_weights) -> torch.Tensor:
        """Add columns^T @ grad to ``grad_weights``; return grad @ weight^T as (S, Cg).

        ``columns`` (S, Cg) are the modulated columns of the chunk, ``grad_chunk`` (P, O) its
        upstream gradient, ``grad_weights`` (wg, K*C/wg, O/wg) the accumulator.
        """
        count = grad_chunk.shape[0]
        rows = count * self.kernel_size * self.groups
        if self.weights.shape[0] == 1:
            grad_weights[0].addmm_(columns.view(count, -1).t(), grad_chunk)
            grad_columns = self.buffer("grad_columns", rows)
            torch.matmul(grad_chunk, self.weights[0].t(), out=grad_columns.view(count, -1))
            return grad_columns
        weight_groups = self.weights.shape[0]
        grouped_grad = grad_chunk.reshape(count, weight_groups, -1).transpose(0, 1)  # (wg, P, O/wg)
        grouped_columns = columns_by_weight_group(columns.view(count, self.kernel_size, -1), self.kernel_size, weight_groups)
        grad_weights.baddbmm_(grouped_columns.transpose(1, 2), grouped_grad)
        grad_columns = columns_from_weight_groups(torch.bmm(grouped_grad, self.weights.transpose(1, 2)), self.kernel_size)
        return grad_columns.reshape(rows, -1)

    def contract(self, columns: torch.Tensor, out: torch.Tensor) -> None:
        """out (P, O) = columns (S, Cg) contracted with the weight of every weight group."""
        count = out.shape[0]
        columns = columns.view(count, self.kernel_size, -1)
        if self.weights.shape[0] == 1:
            torch.matmul(columns.view(count, -1), self.weights[0], out=out)
        else:
            out.copy_(contract(columns, self.weights, self.kernel_size))


def deform_conv2d_forward(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    conv: Conv,
    chunk_elements: int = CHUNK_ELEMENTS,
) -> torch.Tensor:
    """Forward of deformable convolution, chunked over output positions; no autograd graph.

    Same arguments and result as :func:`deform_conv2d_reference`; at most about
    ``chunk_elements`` sampled values are held at once.
    """
    prep = _Prepared(x, offset, weight, mask, conv, chunk_elements)
    g = prep.geometry
    out = torch.empty(prep.positions, g.out_channels, dtype=prep.dtype, device=x.device)
    for start, stop in prep.chunks():
        prep.contract(prep.columns(start, stop), out[start:stop])
    if bias is not None:
        out += bias.to(prep.dtype)
    out = out.view(g.batch, g.out_h, g.out_w, g.out_channels).permute(0, 3, 1, 2)
    return out.to(x.dtype).contiguous()


def deform_conv2d_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    mask: Optional[torch.Tensor],
    conv: Conv,
    chunk_elements: int = CHUNK_ELEMENTS,
):
    """Gradients of :func:`deform_conv2d_forward` w.r.t. x, offset, mask, weight and bias.

    The columns are recomputed chunk by chunk from the four neighbours' rows ``v_c``. With ``G``
    the columns' gradient, ``m`` the mask and ``t_c = <G, v_c>`` (dot products over the channels
    of a group), the mask gradient is ``sum_c w_c t_c`` and the
    coordinate gradients are ``m * sum_c (dw_c/dy) t_c`` and ``m * sum_c (dw_c/dx) t_c``; they
    vanish wherever every neighbour reads zero, which covers clamped and non-finite points. The
    input gradient is the scatter-add of ``m * w_c * G`` (race-free: see :mod:`convzoo.ops._bilinear_rows`).

    Returns:
        ``(grad_x, grad_offset, grad_mask or None, grad_weight, grad_bias)``.
    """
    prep = _Prepared(x, offset, weight, mask, conv, chunk_elements)
    g = prep.geometry
    dtype, kernel_size, groups = prep.dtype, prep.kernel_size, prep.groups
    grad_rows = torch.zeros_like(prep.rows)
    grad_offsets = torch.empty(prep.positions * kernel_size * groups, 2, dtype=dtype, device=x.device)
    grad_modulation = None
    if mask is not None:
        grad_modulation = torch.empty(prep.positions * kernel_size * groups, dtype=dtype, device=x.device)
    grad_weights = torch.zeros_like(prep.weights)
    # (P, O) upstream gradient, position-major like the forward's output.
    grad_positions = grad_out.to(dtype).permute(0, 2, 3, 1).reshape(prep.positions, g.out_channels).contiguous()
    grad_bias = grad_positions.sum(0)
    samples_per_position = kernel_size * groups
    for start, stop in prep.chunks():
        top_left, frac_y, frac_x, modulation, weights, modulated = prep.sampling(start, stop)
        columns = _bilinear_rows.sample(prep.rows, top_left, prep.steps, modulated)
        grad_columns = prep.weight_gradient_and_columns_gradient(columns, grad_positions[start:stop], grad_weights)
        # A batch element's samples read its own padded image's rows only.
        dots = _bilinear_rows.backward(prep.rows, top_left, prep.steps, modulated, grad_columns, grad_rows,
                                       segment=g.out_h * g.out_w * samples_per_position,
                                       segment_rows=g.padded_h * g.padded_w * groups,
                                       first_sample=start * samples_per_position)
        tl_dot, tr_dot, bl_dot, br_dot = dots.unbind(1)
        point_range = slice(start * kernel_size * groups, stop * kernel_size * groups)
        along_y = (1 - frac_x) * (bl_dot - tl_dot) + frac_x * (br_dot - tr_dot)
        along_x = (1 - frac_y) * (tr_dot - tl_dot) + frac_y * (br_dot - bl_dot)
        if modulation is not None:
            grad_modulation[point_range] = sum(w * dot for w, dot in zip(weights, dots.unbind(1)))
            along_y = along_y * modulation.reshape(-1)
            along_x = along_x * modulation.reshape(-1)
        grad_offsets[point_range, 0] = along_y
        grad_offsets[point_range, 1] = along_x
    grad_offsets = grad_offsets.view(prep.positions, kernel_size, groups, 2)
    if grad_modulation is not None:
        grad_modulation = grad_modulation.view(prep.positions, kernel_size, groups)
    return _backward_outputs(x, offset, weight, mask, prep, grad_rows, grad_offsets, grad_modulation, grad_weights, grad_bias)


def _backward_outputs(x, offset, weight, mask, prep, grad_rows, grad_offsets, grad_modulation, grad_weights, grad_bias):
    """Lay the gradients of the chunked backward out like the inputs they belong to (contiguous,
    as the backward op's fake kernel promises)."""
    g = prep.geometry
    n, c, h, w = x.shape
    kernel_size, groups = prep.kernel_size, prep.groups
    padded = grad_rows.view(n, g.padded_h, g.padded_w, c).permute(0, 3, 1, 2)
    grad_x = padded[:, :, PAD_BEFORE : PAD_BEFORE + h, PAD_BEFORE : PAD_BEFORE + w]
    grad_x = grad_x.to(x.dtype).contiguous()
    out_hw = g.out_h * g.out_w
    grad_offset = grad_offsets.view(n, out_hw, kernel_size, groups, 2).permute(0, 3, 2, 4, 1)
    grad_offset = grad_offset.reshape(offset.shape).to(offset.dtype).contiguous()
    grad_mask = None
    if mask is not None:
        grad_mask = grad_modulation.view(n, out_hw, kernel_size, groups).permute(0, 3, 2, 1)
        grad_mask = grad_mask.reshape(mask.shape).to(mask.dtype).contiguous()
    wg = g.weight_groups
    out_channels, group_channels, kernel_h, kernel_w = weight.shape
    grad_weight = grad_weights.view(wg, kernel_size, group_channels, out_channels // wg).permute(0, 3, 2, 1)
    grad_weight = grad_weight.reshape(weight.shape).to(weight.dtype).contiguous()
    return grad_x, grad_offset, grad_mask, grad_weight, grad_bias.to(weight.dtype)
