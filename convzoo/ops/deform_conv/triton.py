"""Triton kernels for deformable convolution v1/v2 (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

Forward: a bilinear im2col kernel writes the (modulated) sampled columns ``(P, K*C)`` (P = N*Ho*Wo
output positions, column ``k*C + c``) in the input dtype, computing coordinates and weights in
fp32; one batched matmul per weight group (cuBLAS, tensor cores in fp16/bf16) contracts them with
the weight. Backward: the columns' gradient ``grad @ W`` is one matmul; a second kernel walks the
same sampling points and, looping over channel blocks, reduces the offset and mask gradients and
scatters the input gradient with fp32 atomic adds; the weight gradient is ``columns^T @ grad`` with
the columns recomputed by the forward kernel. Semantics are those of :mod:`.reference`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import reference

BLOCK_P = 32  # output positions per program
BLOCK_C = 32  # channels per block


@triton.jit
def _sampling_point(
    offset_ptr, mask_ptr, p, p_valid, k, g,
    in_h, in_w, out_h, out_w, kernel_w, kernel_size, offset_groups,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    HAS_MASK: tl.constexpr,
):
    """Clamped fractional coordinates, top-left corner, modulation and offset index of BLOCK_P points."""
    out_hw = out_h * out_w
    n = p // out_hw
    within = p - n * out_hw
    oy = within // out_w
    ox = within - oy * out_w
    i = k // kernel_w
    j = k - i * kernel_w
    # offset (N, 2*G*K, Ho, Wo): channel 2*(g*K + k) holds dy, the next one dx.
    offset_index = (n.to(tl.int64) * (2 * offset_groups * kernel_size) + 2 * (g * kernel_size + k)) * out_hw + within
    dy = tl.load(offset_ptr + offset_index, mask=p_valid, other=0.0).to(tl.float32)
    dx = tl.load(offset_ptr + offset_index + out_hw, mask=p_valid, other=0.0).to(tl.float32)
    y = (oy * stride_h - pad_h + i * dilation_h).to(tl.float32) + dy
    x = (ox * stride_w - pad_w + j * dilation_w).to(tl.float32) + dx
    # Non-finite coordinates go outside the image (zero value, zero gradient); clamping to
    # [-2, size + 1] changes neither value nor gradient and keeps the integer casts in range.
    # (NaN fails every comparison; a finite coordinate beyond 1e30 is far outside the image anyway.)
    y = tl.where(tl.abs(y) < 1e30, y, -2.0)
    x = tl.where(tl.abs(x) < 1e30, x, -2.0)
    y = tl.minimum(tl.maximum(y, -2.0), in_h + 1.0)
    x = tl.minimum(tl.maximum(x, -2.0), in_w + 1.0)
    y_floor = tl.floor(y)
    x_floor = tl.floor(x)
    y0 = y_floor.to(tl.int32)
    x0 = x_floor.to(tl.int32)
    if HAS_MASK:
        mask_index = (n.to(tl.int64) * (offset_groups * kernel_size) + g * kernel_size + k) * out_hw + within
        modulation = tl.load(mask_ptr + mask_index, mask=p_valid, other=0.0).to(tl.float32)
    else:
        modulation = tl.full(y.shape, 1.0, tl.float32)
    return n, y - y_floor, x - x_floor, y0, x0, modulation, offset_index


@triton.jit(do_not_specialize=["positions"])   # positions = N * Ho * Wo: a new batch compiles nothing
def _im2col_kernel(
    x_ptr,  # (N, H, W, C) input, channels last, contiguous
    offset_ptr,  # (N, 2*G*K, Ho, Wo) contiguous
    mask_ptr,  # (N, G*K, Ho, Wo) contiguous (unused without a mask)
    columns_ptr,  # (P, K*C) output, column k*C + c
    positions, channels, group_channels,
    in_h, in_w, out_h, out_w, kernel_w, kernel_size, offset_groups,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    HAS_MASK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_kg = tl.program_id(1)
    pid_c = tl.program_id(2)
    k = pid_kg // offset_groups
    g = pid_kg - k * offset_groups
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_valid = p < positions
    n, frac_y, frac_x, y0, x0, modulation, _ = _sampling_point(
        offset_ptr, mask_ptr, p, p_valid, k, g, in_h, in_w, out_h, out_w, kernel_w, kernel_size, offset_groups,
        stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, HAS_MASK,
    )
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    c_valid = c < group_channels
    channel = g * group_channels + c
    image = n.to(tl.int64) * in_h * in_w * channels
    total = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
    for corner in tl.static_range(4):
        below = corner // 2  # 0: row y0, 1: row y0 + 1
        right = corner % 2  # 0: column x0, 1: column x0 + 1
        cy = y0 + below
        cx = x0 + right
        weight_y = below * frac_y + (1 - below) * (1.0 - frac_y)
        weight_x = right * frac_x + (1 - right) * (1.0 - frac_x)
        inside = p_valid & (cy >= 0) & (cy < in_h) & (cx >= 0) & (cx < in_w)
        pixel = image + (cy * in_w + cx).to(tl.int64) * channels
        values = tl.load(
            x_ptr + pixel[:, None] + channel[None, :], mask=inside[:, None] & c_valid[None, :], other=0.0
        ).to(tl.float32)
        total += (weight_y * weight_x * modulation)[:, None] * values
    row = p.to(tl.int64) * (kernel_size * channels) + k * channels
    tl.store(
        columns_ptr + row[:, None] + channel[None, :],
        total.to(columns_ptr.dtype.element_ty),
        mask=p_valid[:, None] & c_valid[None, :],
    )


@triton.jit(do_not_specialize=["positions"])
def _col2im_kernel(
    x_ptr,  # (N, H, W, C) input, channels last, contiguous
    offset_ptr,  # (N, 2*G*K, Ho, Wo) contiguous
    mask_ptr,  # (N, G*K, Ho, Wo) contiguous (unused without a mask)
    grad_columns_ptr,  # (P, K*C) gradient of the modulated columns
    grad_x_ptr,  # (N, H, W, C) fp32, accumulated with atomics
    grad_offset_ptr,  # (N, 2*G*K, Ho, Wo) fp32
    grad_mask_ptr,  # (N, G*K, Ho, Wo) fp32 (unused without a mask)
    positions, channels, group_channels,
    in_h, in_w, out_h, out_w, kernel_w, kernel_size, offset_groups,
    stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
    HAS_MASK: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_kg = tl.program_id(1)
    k = pid_kg // offset_groups
    g = pid_kg - k * offset_groups
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    p_valid = p < positions
    n, frac_y, frac_x, y0, x0, modulation, offset_index = _sampling_point(
        offset_ptr, mask_ptr, p, p_valid, k, g, in_h, in_w, out_h, out_w, kernel_w, kernel_size, offset_groups,
        stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, HAS_MASK,
    )
    image = n.to(tl.int64) * in_h * in_w * channels
    row = p.to(tl.int64) * (kernel_size * channels) + k * channels
    grad_y = tl.zeros((BLOCK_P,), dtype=tl.float32)
    grad_x = tl.zeros((BLOCK_P,), dtype=tl.float32)
    grad_modulation = tl.zeros((BLOCK_P,), dtype=tl.float32)
    for c0 in range(0, group_channels, BLOCK_C):
        c = c0 + tl.arange(0, BLOCK_C)
        c_valid = c < group_channels
        channel = g * group_channels + c
        both_valid = p_valid[:, None] & c_valid[None, :]
        grad_columns = tl.load(grad_columns_ptr + row[:, None] + channel[None, :], mask=both_valid, other=0.0).to(tl.float32)
        grad_sample = grad_columns * modulation[:, None]
        sampled = tl.zeros((BLOCK_P, BLOCK_C), dtype=tl.float32)
        for corner in tl.static_range(4):
            below = corner // 2
            right = corner % 2
            cy = y0 + below
            cx = x0 + right
            weight_y = below * frac_y + (1 - below) * (1.0 - frac_y)
            weight_x = right * frac_x + (1 - right) * (1.0 - frac_x)
            slope_y = (2 * below - 1) * weight_x  # d(weight_y * weight_x) / dy
            slope_x = (2 * right - 1) * weight_y
            inside = p_valid & (cy >= 0) & (cy < in_h) & (cx >= 0) & (cx < in_w)
            corner_mask = inside[:, None] & c_valid[None, :]
            pixel = image + (cy * in_w + cx).to(tl.int64) * channels
            address = pixel[:, None] + channel[None, :]
            values = tl.load(x_ptr + address, mask=corner_mask, other=0.0).to(tl.float32)
            dots = tl.sum(grad_sample * values, axis=1)
            grad_y += slope_y * dots
            grad_x += slope_x * dots
            if HAS_MASK:
                sampled += (weight_y * weight_x)[:, None] * values
            tl.atomic_add(grad_x_ptr + address, (weight_y * weight_x)[:, None] * grad_sample, mask=corner_mask)
        if HAS_MASK:
            grad_modulation += tl.sum(grad_columns * sampled, axis=1)
    tl.store(grad_offset_ptr + offset_index, grad_y, mask=p_valid)
    tl.store(grad_offset_ptr + offset_index + out_h * out_w, grad_x, mask=p_valid)
    if HAS_MASK:
        out_hw = out_h * out_w
        within = p - n * out_hw
        mask_index = (n.to(tl.int64) * (offset_groups * kernel_size) + g * kernel_size + k) * out_hw + within
        tl.store(grad_mask_ptr + mask_index, grad_modulation, mask=p_valid)


def _launch_arguments(x, offset, weight, conv: reference.Conv):
    """The geometry, the number of output positions and the kernels' size arguments (in their order)."""
    g = reference.Geometry.of(x.shape, weight.shape, offset.shape, conv)
    positions = g.batch * g.out_h * g.out_w
    sizes = (
        positions, g.in_channels, g.in_channels // g.offset_groups,
        g.in_h, g.in_w, g.out_h, g.out_w, g.kernel_w, g.kernel_size, g.offset_groups,
        conv.stride_h, conv.stride_w, conv.pad_h, conv.pad_w, conv.dilation_h, conv.dilation_w,
    )
    return g, positions, sizes


def _columns(x_last, offset, mask, geometry, positions, sizes) -> torch.Tensor:
    """Modulated sampled columns (P, K*C) in the input dtype."""
    columns = torch.empty(positions, geometry.kernel_size * geometry.in_channels, dtype=x_last.dtype, device=x_last.device)
    group_channels = geometry.in_channels // geometry.offset_groups
    grid = (triton.cdiv(positions, BLOCK_P), geometry.kernel_size * geometry.offset_groups, triton.cdiv(group_channels, BLOCK_C))
    _im2col_kernel[grid](
        x_last, offset, mask if mask is not None else offset, columns, *sizes,
        HAS_MASK=mask is not None, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
    )
    return columns


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 2, 3, 1).contiguous()


def deform_conv2d_forward(
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    mask: Optional[torch.Tensor],
    conv: reference.Conv,
) -> torch.Tensor:
    """Same contract as :func:`.reference.deform_conv2d_forward`."""
    geometry, positions, sizes = _launch_arguments(x, offset, weight, conv)
    out_shape = (geometry.batch, geometry.out_channels, geometry.out_h, geometry.out_w)
    if positions == 0:
        return x.new_zeros(out_shape)
    mask = mask.contiguous() if mask is not None else None
    columns = _columns(_channels_last(x), offset.contiguous(), mask, geometry, positions, sizes)
    kernel_size = geometry.kernel_size
    weights = reference.weight_matrix(weight, geometry.weight_groups)
    out = reference.contract(columns.view(positions, kernel_size, -1), weights, kernel_size)
    if bias is not None:
        out = out + bias
    out = out.view(geometry.batch, geometry.out_h, geometry.out_w, geometry.out_channels)
    return out.permute(0, 3, 1, 2).contiguous()


def deform_conv2d_backward(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    offset: torch.Tensor,
    weight: torch.Tensor,
    mask: Optional[torch.Tensor],
    conv: reference.Conv,
):
    """Same contract as :func:`.reference.deform_conv2d_backward`."""
    g, positions, sizes = _launch_arguments(x, offset, weight, conv)
    kernel_size, weight_groups = g.kernel_size, g.weight_groups
    grad_bias = grad_out.float().sum((0, 2, 3))
    if positions == 0:
        grad_mask = torch.zeros_like(mask) if mask is not None else None
        return torch.zeros_like(x), torch.zeros_like(offset), grad_mask, torch.zeros_like(weight), grad_bias
    x_last = _channels_last(x)
    offset = offset.contiguous()
    mask = mask.contiguous() if mask is not None else None
    columns = _columns(x_last, offset, mask, g, positions, sizes)
    grad_positions = grad_out.permute(0, 2, 3, 1).reshape(positions, g.out_channels).to(x.dtype)
    grouped_grad = grad_positions.view(positions, weight_groups, -1).transpose(0, 1)  # (wg, P, O/wg)
    grouped_columns = reference.columns_by_weight_group(columns.view(positions, kernel_size, -1), kernel_size, weight_groups)
    weights = reference.weight_matrix(weight, weight_groups)
    grad_weights = torch.bmm(grouped_columns.transpose(1, 2), grouped_grad)  # (wg, K*C/wg, O/wg)
    grad_columns = reference.columns_from_weight_groups(torch.bmm(grouped_grad, weights.transpose(1, 2)), kernel_size)
    grad_columns = grad_columns.reshape(positions, kernel_size * g.in_channels)
    del columns, grouped_columns

    grad_x_last = torch.zeros(x_last.shape, dtype=torch.float32, device=x.device)
    grad_offset = torch.empty(offset.shape, dtype=torch.float32, device=x.device)
    grad_mask = torch.empty(mask.shape, dtype=torch.float32, device=x.device) if mask is not None else None
    grid = (triton.cdiv(positions, BLOCK_P), kernel_size * g.offset_groups)
    _col2im_kernel[grid](
        x_last, offset, mask if mask is not None else offset, grad_columns,
        grad_x_last, grad_offset, grad_mask if grad_mask is not None else grad_offset, *sizes,
        HAS_MASK=mask is not None, BLOCK_P=BLOCK_P, BLOCK_C=BLOCK_C,
    )
    grad_x = grad_x_last.permute(0, 3, 1, 2).to(x.dtype).contiguous()
    out_channels, group_channels, kernel_h, kernel_w = weight.shape
    grad_weight = grad_weights.view(weight_groups, kernel_size, group_channels, out_channels // weight_groups)
    grad_weight = grad_weight.permute(0, 3, 2, 1).reshape(weight.shape)
    if grad_mask is not None:
        grad_mask = grad_mask.to(mask.dtype)
    grad_weight = grad_weight.to(weight.dtype).contiguous()
    return grad_x, grad_offset.to(offset.dtype), grad_mask, grad_weight, grad_bias.to(weight.dtype)
