"""Triton kernels for DCNv3 (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).

One program handles ``BLOCK_Q`` output pixels of one group and all its channels (a channel
block ``BLOCK_C``, the next power of two of ``group_channels``, masked), looping over the P
points.  The tile (``TILE = BLOCK_Q * BLOCK_C`` values) and the warps are autotuned among
configs that keep every value in registers on sm_90; the autotuning key holds the layer's sizes,
never the batch.  (``tests/ops/hopper_compile.py`` showed the first design, the points unrolled
at compile time in 2048-value tiles on 4 warps, spilling up to 4.6 KB per thread.)  The forward
accumulates in fp32.  The backward recomputes the samples, writes the offset and mask gradients
of its pixels directly (each is owned by one program) and adds the input gradient into an fp32
buffer with atomic adds. Definition: :mod:`convzoo.ops.dcnv3`.
"""
from __future__ import annotations

from typing import Tuple

import torch
import triton
import triton.language as tl

from .._triton_tuning import time_ms, tuning_configs

#: (values per tile, warps) tried by the autotuner: the default first, the most values per thread
#: last.  All keep every value in registers on sm_90 at group_channels 16, 24 and 32.
FORWARD_TILES = [(1024, 8), (512, 4), (2048, 8)]
BACKWARD_TILES = [(512, 8), (1024, 8)]
AUTOTUNE_KEY = ["height", "width", "height_out", "width_out", "group", "group_channels", "KERNEL_H", "KERNEL_W"]


def _tuned(tiles, reset_to_zero=None):
    """Autotune over ``tiles``; ``BLOCK_Q`` (pixels per program) follows from the tile and ``BLOCK_C``."""
    configs = tuning_configs([triton.Config({"TILE": tile}, num_warps=warps) for tile, warps in tiles],
                             interpreted=triton.Config({"TILE": 2048}, num_warps=4))

    def decorate(kernel):
        kernel = triton.heuristics({"BLOCK_Q": lambda meta: max(16, meta["TILE"] // meta["BLOCK_C"])})(kernel)
        return triton.autotune(configs, key=AUTOTUNE_KEY, reset_to_zero=reset_to_zero, do_bench=time_ms)(kernel)
    return decorate


@triton.jit
def _sample(x_ptr, image_base, loc_x, loc_y, height, width, row_stride, channel_ptrs, pix_mask, chan_mask):
    """Bilinear corners of one point for a block of pixels: the 4 values (fp32) and what they need."""
    inside = (loc_x > -1.0) & (loc_y > -1.0) & (loc_x < width) & (loc_y < height) & pix_mask
    loc_x = tl.where(inside, loc_x, 0.0)
    loc_y = tl.where(inside, loc_y, 0.0)
    x0f = tl.floor(loc_x)
    y0f = tl.floor(loc_y)
    fx = loc_x - x0f
    fy = loc_y - y0f
    x0 = x0f.to(tl.int32)
    y0 = y0f.to(tl.int32)
    x1 = x0 + 1
    y1 = y0 + 1
    ok_x0 = x0 >= 0
    ok_x1 = x1 < width
    ok_y0 = y0 >= 0
    ok_y1 = y1 < height
    m00 = inside & ok_y0 & ok_x0
    m01 = inside & ok_y0 & ok_x1
    m10 = inside & ok_y1 & ok_x0
    m11 = inside & ok_y1 & ok_x1
    p00 = image_base + (y0.to(tl.int64) * width + x0) * row_stride
    p01 = p00 + row_stride
    p10 = p00 + width * row_stride
    p11 = p10 + row_stride
    cm = chan_mask[None, :]
    v00 = tl.load(x_ptr + p00[:, None] + channel_ptrs[None, :], mask=m00[:, None] & cm, other=0.0).to(tl.float32)
    v01 = tl.load(x_ptr + p01[:, None] + channel_ptrs[None, :], mask=m01[:, None] & cm, other=0.0).to(tl.float32)
    v10 = tl.load(x_ptr + p10[:, None] + channel_ptrs[None, :], mask=m10[:, None] & cm, other=0.0).to(tl.float32)
    v11 = tl.load(x_ptr + p11[:, None] + channel_ptrs[None, :], mask=m11[:, None] & cm, other=0.0).to(tl.float32)
    return (inside, fx, fy, v00, v01, v10, v11, p00, p01, p10, p11, m00, m01, m10, m11)


@triton.jit
def _kernel_window(q, height, width, height_out, width_out, stride_h, stride_w, pad_h, pad_w, dilation_h,
                   dilation_w, row_stride, KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr):
    """For output pixels ``q`` (flat over N, Ho, Wo): the offset of their image in x, the centre
    (x, y) of their sampling window in input coordinates, and the window's half extents (w, h)."""
    wo = q % width_out
    ho = (q // width_out) % height_out
    n = q // (width_out * height_out)
    half_w = (dilation_w * (KERNEL_W - 1)) // 2
    half_h = (dilation_h * (KERNEL_H - 1)) // 2
    centre_x = (wo * stride_w - pad_w + half_w).to(tl.float32)
    centre_y = (ho * stride_h - pad_h + half_h).to(tl.float32)
    return n * height * width * row_stride, centre_x, centre_y, half_w, half_h


@_tuned(FORWARD_TILES)
@triton.jit(do_not_specialize=["num_pixels"])
def _dcnv3_fwd_kernel(
    x_ptr,  # (N, H, W, G*C)
    offset_ptr,  # (N, Ho, Wo, G, P, 2)
    mask_ptr,  # (N, Ho, Wo, G, P)
    out_ptr,  # (N, Ho, Wo, G*C)
    num_pixels, height, width, height_out, width_out, stride_h, stride_w, pad_h, pad_w,
    dilation_h, dilation_w, group, group_channels, offset_scale,
    KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, POINTS: tl.constexpr, SKIP: tl.constexpr,
    TILE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, CHANNEL_ALIGN: tl.constexpr,
):
    group_channels = group_channels // CHANNEL_ALIGN * CHANNEL_ALIGN   # the same value, known aligned
    pid_q = tl.program_id(0)
    g = tl.program_id(1)
    q = (pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    pix_mask = q < num_pixels
    chan_mask = c < group_channels
    row_stride = group * group_channels
    image_base, centre_x, centre_y, half_w, half_h = _kernel_window(
        q, height, width, height_out, width_out, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
        row_stride, KERNEL_H, KERNEL_W)
    channel_ptrs = g * group_channels + c
    sample_base = (q * group + g) * POINTS
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
    for p in range(POINTS):
        # x-major point order, the removed centre (flat index SKIP) jumped over.
        flat = p + (p >= SKIP)
        ix = flat // KERNEL_H
        iy = flat % KERNEL_H
        off_x = tl.load(offset_ptr + (sample_base + p) * 2, mask=pix_mask, other=0.0).to(tl.float32)
        off_y = tl.load(offset_ptr + (sample_base + p) * 2 + 1, mask=pix_mask, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + sample_base + p, mask=pix_mask, other=0.0).to(tl.float32)
        loc_x = centre_x + ((ix * dilation_w - half_w) + off_x) * offset_scale
        loc_y = centre_y + ((iy * dilation_h - half_h) + off_y) * offset_scale
        inside, fx, fy, v00, v01, v10, v11, p00, p01, p10, p11, m00, m01, m10, m11 = _sample(
            x_ptr, image_base, loc_x, loc_y, height, width, row_stride, channel_ptrs, pix_mask, chan_mask)
        top = v00 + fx[:, None] * (v01 - v00)
        bottom = v10 + fx[:, None] * (v11 - v10)
        acc += m[:, None] * (top + fy[:, None] * (bottom - top))
    out_ptrs = out_ptr + (q * row_stride + g * group_channels)[:, None] + c[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=pix_mask[:, None] & chan_mask[None, :])


@_tuned(BACKWARD_TILES, reset_to_zero=["grad_x_ptr"])
@triton.jit(do_not_specialize=["num_pixels"])
def _dcnv3_bwd_kernel(
    x_ptr,  # (N, H, W, G*C)
    offset_ptr,  # (N, Ho, Wo, G, P, 2)
    mask_ptr,  # (N, Ho, Wo, G, P)
    grad_out_ptr,  # (N, Ho, Wo, G*C)
    grad_x_ptr,  # (N, H, W, G*C) fp32, accumulated with atomics
    grad_offset_ptr,  # (N, Ho, Wo, G, P, 2)
    grad_mask_ptr,  # (N, Ho, Wo, G, P)
    num_pixels, height, width, height_out, width_out, stride_h, stride_w, pad_h, pad_w,
    dilation_h, dilation_w, group, group_channels, offset_scale,
    KERNEL_H: tl.constexpr, KERNEL_W: tl.constexpr, POINTS: tl.constexpr, SKIP: tl.constexpr,
    TILE: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_C: tl.constexpr, CHANNEL_ALIGN: tl.constexpr,
):
    group_channels = group_channels // CHANNEL_ALIGN * CHANNEL_ALIGN   # the same value, known aligned
    pid_q = tl.program_id(0)
    g = tl.program_id(1)
    q = (pid_q * BLOCK_Q + tl.arange(0, BLOCK_Q)).to(tl.int64)
    c = tl.arange(0, BLOCK_C)
    pix_mask = q < num_pixels
    chan_mask = c < group_channels
    row_stride = group * group_channels
    image_base, centre_x, centre_y, half_w, half_h = _kernel_window(
        q, height, width, height_out, width_out, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
        row_stride, KERNEL_H, KERNEL_W)
    channel_ptrs = g * group_channels + c
    sample_base = (q * group + g) * POINTS
    tile_mask = pix_mask[:, None] & chan_mask[None, :]
    grad = tl.load(grad_out_ptr + (q * row_stride + g * group_channels)[:, None] + c[None, :],
                   mask=tile_mask, other=0.0).to(tl.float32)
    for p in range(POINTS):
        # x-major point order, the removed centre (flat index SKIP) jumped over.
        flat = p + (p >= SKIP)
        ix = flat // KERNEL_H
        iy = flat % KERNEL_H
        off_x = tl.load(offset_ptr + (sample_base + p) * 2, mask=pix_mask, other=0.0).to(tl.float32)
        off_y = tl.load(offset_ptr + (sample_base + p) * 2 + 1, mask=pix_mask, other=0.0).to(tl.float32)
        m = tl.load(mask_ptr + sample_base + p, mask=pix_mask, other=0.0).to(tl.float32)
        loc_x = centre_x + ((ix * dilation_w - half_w) + off_x) * offset_scale
        loc_y = centre_y + ((iy * dilation_h - half_h) + off_y) * offset_scale
        inside, fx, fy, v00, v01, v10, v11, p00, p01, p10, p11, m00, m01, m10, m11 = _sample(
            x_ptr, image_base, loc_x, loc_y, height, width, row_stride, channel_ptrs, pix_mask, chan_mask)
        d00 = tl.sum(grad * v00, axis=1)
        d01 = tl.sum(grad * v01, axis=1)
        d10 = tl.sum(grad * v10, axis=1)
        d11 = tl.sum(grad * v11, axis=1)
        top = d00 + fx * (d01 - d00)
        bottom = d10 + fx * (d11 - d10)
        grad_m = tl.where(inside, top + fy * (bottom - top), 0.0)
        scale = tl.where(inside, m * offset_scale, 0.0)
        grad_lx = ((1.0 - fy) * (d01 - d00) + fy * (d11 - d10)) * scale
        grad_ly = (bottom - top) * scale
        tl.store(grad_mask_ptr + sample_base + p, grad_m.to(grad_mask_ptr.dtype.element_ty), mask=pix_mask)
        tl.store(grad_offset_ptr + (sample_base + p) * 2, grad_lx.to(grad_offset_ptr.dtype.element_ty),
                 mask=pix_mask)
        tl.store(grad_offset_ptr + (sample_base + p) * 2 + 1,
                 grad_ly.to(grad_offset_ptr.dtype.element_ty), mask=pix_mask)
        wgrad = grad * m[:, None]
        fx2 = fx[:, None]
        fy2 = fy[:, None]
        cm = chan_mask[None, :]
        dst = grad_x_ptr + channel_ptrs[None, :]
        tl.atomic_add(dst + p00[:, None], wgrad * ((1.0 - fy2) * (1.0 - fx2)), mask=m00[:, None] & cm)
        tl.atomic_add(dst + p01[:, None], wgrad * ((1.0 - fy2) * fx2), mask=m01[:, None] & cm)
        tl.atomic_add(dst + p10[:, None], wgrad * (fy2 * (1.0 - fx2)), mask=m10[:, None] & cm)
        tl.atomic_add(dst + p11[:, None], wgrad * (fy2 * fx2), mask=m11[:, None] & cm)


def _channel_alignment(group_channels: int) -> int:
    """The largest power of two (at most 16) dividing ``group_channels``.  The kernels rewrite
    ``group_channels`` as a multiple of it, which tells the compiler that each group's channels
    start aligned and that the channel mask is constant over that many channels: vector loads and
    stores for group_channels 24 or 40 (Triton itself only knows divisibility by 16)."""
    return min(16, group_channels & -group_channels)


def _launch_args(x: torch.Tensor, offset: torch.Tensor, params: tuple):
    kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group, group_channels, \
        offset_scale, remove_center = params
    n, height, width, _ = x.shape
    _, height_out, width_out, _ = offset.shape
    num_pixels = n * height_out * width_out

    def grid(meta):
        return triton.cdiv(num_pixels, meta["BLOCK_Q"]), group

    runtime = (num_pixels, height, width, height_out, width_out, stride_h, stride_w, pad_h, pad_w,
               dilation_h, dilation_w, group, group_channels, float(offset_scale))
    points = kernel_h * kernel_w - int(bool(remove_center))
    # Flat index (ix * kernel_h + iy) of the removed centre point; past the end when none is removed.
    skip = (kernel_w // 2) * kernel_h + kernel_h // 2 if remove_center else kernel_h * kernel_w
    meta = dict(KERNEL_H=kernel_h, KERNEL_W=kernel_w, POINTS=points, SKIP=skip,
                BLOCK_C=triton.next_power_of_2(group_channels), CHANNEL_ALIGN=_channel_alignment(group_channels))
    return grid, runtime, meta


def dcnv3_forward_triton(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, *params) -> torch.Tensor:
    """Forward: ``(N, H, W, G*C)`` -> ``(N, H_out, W_out, G*C)``; params as :func:`convzoo.ops.dcnv3`."""
    x, offset, mask = x.contiguous(), offset.contiguous(), mask.contiguous()
    group, group_channels = params[8], params[9]
    out = torch.empty(x.shape[0], offset.shape[1], offset.shape[2], group * group_channels,
                      dtype=x.dtype, device=x.device)
    grid, runtime, meta = _launch_args(x, offset, params)
    _dcnv3_fwd_kernel[grid](x, offset, mask, out, *runtime, **meta)
    return out


def dcnv3_backward_triton(grad_out: torch.Tensor, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                          *params) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients ``(grad_x, grad_offset, grad_mask)``; the input gradient is accumulated in fp32."""
    grad_out, x = grad_out.contiguous(), x.contiguous()
    offset, mask = offset.contiguous(), mask.contiguous()
    grad_x = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    grad_offset = torch.empty_like(offset)
    grad_mask = torch.empty_like(mask)
    grid, runtime, meta = _launch_args(x, offset, params)
    _dcnv3_bwd_kernel[grid](x, offset, mask, grad_out, grad_x, grad_offset, grad_mask, *runtime, **meta)
    return grad_x.to(x.dtype), grad_offset, grad_mask
