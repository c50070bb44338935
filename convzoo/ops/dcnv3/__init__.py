"""DCNv3: grouped deformable sampling with a per-point mask (InternImage), NHWC.

Definition (that of InternImage's CUDA kernel ``dcnv3_im2col_cuda.cuh``). With
``P = kernel_h * kernel_w - remove_center`` points per group, for output pixel ``(ho, wo)``,
group ``g`` and channel ``c`` of that group::

    out[n, ho, wo, g*C + c] = sum_p mask[n, ho, wo, g*P + p]
                                    * bilinear(x[n, :, :, g*C + c], loc_y[p], loc_x[p])

Point order is x-major: point ``p`` enumerates ``ix`` in ``range(kernel_w)`` (outer) and ``iy``
in ``range(kernel_h)`` (inner), so ``p = ix * kernel_h + iy``; with ``remove_center`` the point
``(ix, iy) == (kernel_w // 2, kernel_h // 2)`` is skipped and the later points move up by one.
With ``mask_softmax=True`` the ``mask`` argument holds logits and ``mask[n, ho, wo, g*P + p]`` above
is their softmax over the ``P`` points of group ``g`` (DCNv3's normalisation, done inside the op).
The offset channels hold ``(x, y)`` pairs: ``offset[..., 2*(g*P + p)]`` is the x offset and
``offset[..., 2*(g*P + p) + 1]`` the y offset of point ``p`` of group ``g``. With
``half_w = (dilation_w * (kernel_w - 1)) // 2`` (likewise ``half_h``)::

    loc_x = wo * stride_w - pad_w + half_w + (ix * dilation_w - half_w + offset_x) * offset_scale
    loc_y = ho * stride_h - pad_h + half_h + (iy * dilation_h - half_h + offset_y) * offset_scale

i.e. the kernel grid is centred on the window's centre ``half`` and ``offset_scale`` scales both
the (dilated) grid and the offset, never the window centre. Pixel ``i`` has its centre at
coordinate ``i``; the input is *not* padded: padding only moves the windows. Bilinear rule: a
sample is read only when ``-1 < loc_y < H`` and ``-1 < loc_x < W`` (NaN/inf fail this, so
non-finite offsets contribute zero), each of its four corners outside the input reads zero.
``H_out = (H + 2*pad_h - (dilation_h*(kernel_h-1) + 1)) // stride_h + 1`` (likewise ``W_out``).

InternImage's pure-PyTorch ``dcnv3_core_pytorch`` differs from this in two ways that are its
bugs, not the contract: it pads W by ``pad_h`` and H by ``pad_w``, and it ignores the stride
when building its reference points (InternImage issue 258).

Compared with torchvision's ``deform_conv2d`` (``(dy, dx)`` pairs, kernel positions row-major
``k = iy * kernel_w + ix``, offsets channel-first), DCNv3 with ``offset_scale == 1`` samples
exactly where torchvision samples for a depthwise all-ones weight with ``offset_groups=group``;
:func:`dcnv3_offsets_to_torchvision` and :func:`torchvision_offsets_to_dcnv3` convert the layouts
(also for ``offset_scale != 1`` and ``remove_center``).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from .._checks import (autocast_to_widest, check_bool, check_float, check_impl, check_int, check_same, check_tensor,
                       plain_cpu_eager, plain_cpu_inference, script_unsupported, use_triton)
from .._numba import kernels
from . import reference
from .reference import Geometry

__all__ = ["dcnv3", "dcnv3_offsets_to_torchvision", "torchvision_offsets_to_dcnv3"]


def _num_points(kernel_h: int, kernel_w: int, remove_center: bool) -> int:
    points = kernel_h * kernel_w - int(remove_center)
    if points < 1:
        raise ValueError(f"remove_center needs a kernel with more than one point, got {kernel_h}x{kernel_w}")
    return points


# ----------------------------------------------------------------------------------------------
# torch.library registration: one node for torch.compile / torch.export.


def _cpu_kernels(x: torch.Tensor):
    """The Numba kernel module for CPU tensors, None on other devices or without Numba."""
    return kernels(__name__ + ".cpu") if x.device.type == "cpu" else None


def _run_forward(x, offset, mask, geometry: Geometry, mask_softmax: bool, triton_path: bool) -> torch.Tensor:
    if x.shape[0] == 0 or offset.numel() == 0:
        return x.new_zeros((x.shape[0], offset.shape[1], offset.shape[2], geometry.group * geometry.group_channels))
    cpu = None if triton_path else _cpu_kernels(x)
    if cpu is not None:
        return cpu.dcnv3_forward(x, offset, mask, geometry, mask_softmax)  # the softmax inside the kernel
    if mask_softmax:
        mask = reference.softmax_points(mask, geometry.group)
    if triton_path:
        from .triton import dcnv3_forward_triton

        return dcnv3_forward_triton(x, offset, mask, *geometry)
    with torch.no_grad():
        return reference.dcnv3_forward(x, offset, mask, *geometry)


@torch.library.custom_op("convzoo::dcnv3", mutates_args=())
def _dcnv3_op(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_h: int, kernel_w: int,
              stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int,
              group: int, group_channels: int, offset_scale: float, remove_center: bool, mask_softmax: bool,
              triton_path: bool) -> torch.Tensor:
    geometry = Geometry(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                        group_channels, offset_scale, remove_center)
    return _run_forward(x, offset, mask, geometry, mask_softmax, triton_path)


@_dcnv3_op.register_fake
def _dcnv3_fake(x, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w,
                group, group_channels, offset_scale, remove_center, mask_softmax, triton_path):
    return x.new_empty((x.shape[0], offset.shape[1], offset.shape[2], group * group_channels))


@torch.library.custom_op("convzoo::dcnv3_backward", mutates_args=())
def _dcnv3_backward_op(grad_out: torch.Tensor, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor,
                       kernel_h: int, kernel_w: int, stride_h: int, stride_w: int, pad_h: int, pad_w: int,
                       dilation_h: int, dilation_w: int, group: int, group_channels: int, offset_scale: float,
                       remove_center: bool, mask_softmax: bool,
                       triton_path: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    geometry = Geometry(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                        group_channels, offset_scale, remove_center)
    if x.shape[0] == 0 or offset.numel() == 0:
        return torch.zeros_like(x), torch.zeros_like(offset), torch.zeros_like(mask)
    cpu = None if triton_path else _cpu_kernels(x)
    if cpu is not None:
        return cpu.dcnv3_backward(grad_out, x, offset, mask, geometry, mask_softmax)
    # Triton and the reference take the normalised mask: the softmax and its backward run around them.
    probs = reference.softmax_points(mask, group) if mask_softmax else mask
    with torch.no_grad():
        if triton_path:
            from .triton import dcnv3_backward_triton

            grad_x, grad_offset, grad_mask = dcnv3_backward_triton(grad_out, x, offset, probs, *geometry)
        else:
            grad_x, grad_offset, grad_mask = reference.dcnv3_backward(grad_out, x, offset, probs, *geometry)
        if mask_softmax:
            grad_mask = reference.softmax_points_backward(probs, grad_mask, group)
    return grad_x, grad_offset, grad_mask


@_dcnv3_backward_op.register_fake
def _dcnv3_backward_fake(grad_out, x, offset, mask, *args):
    return torch.empty_like(x), torch.empty_like(offset), torch.empty_like(mask)


def _setup_context(ctx, inputs, output):
    x, offset, mask = inputs[:3]
    ctx.save_for_backward(x, offset, mask)
    ctx.params = inputs[3:]


def _backward(ctx, grad_out):
    x, offset, mask = ctx.saved_tensors
    grad_x, grad_offset, grad_mask = _dcnv3_backward_op(grad_out.contiguous(), x, offset, mask, *ctx.params)
    return (grad_x, grad_offset, grad_mask) + (None,) * len(ctx.params)


_dcnv3_op.register_autograd(_backward, setup_context=_setup_context)


def _register_flop_formula() -> None:
    from torch.utils.flop_counter import register_flop_formula

    @register_flop_formula(torch.ops.convzoo.dcnv3)
    def _dcnv3_flops(x_shape, offset_shape, mask_shape, *params, out_shape=None, **kwargs) -> int:
        """2 * MACs, with InternImage's count of 5 MACs (4 bilinear + 1 mask) per point and channel."""
        n, height_out, width_out, points_times_group = mask_shape
        channels = x_shape[3]
        group = Geometry(*params[:len(Geometry._fields)]).group
        return 2 * 5 * n * height_out * width_out * (points_times_group // group) * channels


_register_flop_formula()


class _EagerCPU(torch.autograd.Function):
    """Eager CPU autograd straight into the Numba kernels, for plain tensors outside compile/export
    (:func:`plain_cpu_eager`): the custom op's autograd dispatch costs ~0.4 ms a forward+backward,
    as much as the kernels of a 14x14 InternImage layer. Same kernels, same gradients."""

    @staticmethod
    def forward(ctx, x, offset, mask, geometry: Geometry, mask_softmax: bool, cpu):
        ctx.save_for_backward(x, offset, mask)
        ctx.geometry, ctx.mask_softmax, ctx.cpu = geometry, mask_softmax, cpu
        return cpu.dcnv3_forward(x, offset, mask, geometry, mask_softmax)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        x, offset, mask = ctx.saved_tensors
        return ctx.cpu.dcnv3_backward(grad_out, x, offset, mask, ctx.geometry, ctx.mask_softmax) + (None, None, None)


# ----------------------------------------------------------------------------------------------
# Public functions.


@script_unsupported
def dcnv3(x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor, kernel_h: int, kernel_w: int,
          stride_h: int, stride_w: int, pad_h: int, pad_w: int, dilation_h: int, dilation_w: int,
          group: int, group_channels: int, offset_scale: float, remove_center: bool = False, *,
          mask_softmax: bool = False, impl: str = "auto") -> torch.Tensor:
    """DCNv3 core (InternImage): grouped deformable bilinear sampling weighted by a per-point mask.

    See the module docstring for the exact definition (point order, offset order, sampling
    location, border rule).

    Args:
        x (Tensor[N, H, W, group * group_channels]): input, channels last.
        offset (Tensor[N, H_out, W_out, group * P * 2]): ``(x, y)`` offset pairs per group and point,
            ``P = kernel_h * kernel_w - remove_center``.
        mask (Tensor[N, H_out, W_out, group * P]): weight of each point, already normalised
            (DCNv3 applies a softmax over the P points of each group beforehand; DCNv4 does not),
            or, with ``mask_softmax``, the logits of that softmax.
        kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w: window geometry.
        group, group_channels: channel groups (each with its own offsets and mask) and their width.
        offset_scale: scale of the kernel grid and the offsets around the window centre.
        remove_center: drop the centre point of the kernel (``P = kernel_h * kernel_w - 1``).
        mask_softmax: ``mask`` holds logits: sample with ``softmax`` of each group's ``P`` of them,
            gradients included (the CPU kernels compute it on the fly; equal to DCNv3's
            ``F.softmax`` over the points followed by this operator, one call instead of two).
        impl: ``"auto"`` (Triton on CUDA tensors, the fast CPU path otherwise), ``"triton"`` or
            ``"reference"`` (plain PyTorch with autograd, traceable by torch.onnx/torch.jit).

    Returns:
        Tensor[N, H_out, W_out, group * group_channels], the dtype of ``x``.

    Example:
        >>> x = torch.randn(2, 8, 8, 32)
        >>> offset = torch.zeros(2, 8, 8, 4 * 9 * 2)
        >>> mask = torch.full((2, 8, 8, 4 * 9), 1 / 9)
        >>> dcnv3(x, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, 4, 8, 1.0).shape
        torch.Size([2, 8, 8, 32])
    """
    check_impl(impl)
    check_tensor("x", x, ndim=4)
    check_tensor("offset", offset, ndim=4)
    check_tensor("mask", mask, ndim=4)
    out_dtype = x.dtype  # under autocast the sampling runs in the widest dtype given, the output keeps x's
    x, offset, mask = autocast_to_widest(x, offset, mask)
    check_same("offset", offset, "x", x)
    check_same("mask", mask, "x", x)
    kernel_h = check_int("kernel_h", kernel_h, 1)
    kernel_w = check_int("kernel_w", kernel_w, 1)
    stride_h = check_int("stride_h", stride_h, 1)
    stride_w = check_int("stride_w", stride_w, 1)
    pad_h = check_int("pad_h", pad_h, 0)
    pad_w = check_int("pad_w", pad_w, 0)
    dilation_h = check_int("dilation_h", dilation_h, 1)
    dilation_w = check_int("dilation_w", dilation_w, 1)
    group = check_int("group", group, 1)
    group_channels = check_int("group_channels", group_channels, 1)
    offset_scale = check_float("offset_scale", offset_scale)
    remove_center = check_bool("remove_center", remove_center)
    mask_softmax = check_bool("mask_softmax", mask_softmax)
    points = _num_points(kernel_h, kernel_w, remove_center)

    n, height, width, channels = x.shape
    if channels != group * group_channels:
        raise ValueError(f"x must have group * group_channels = {group * group_channels} channels (last dim), "
                         f"got shape {tuple(x.shape)}")
    height_out, width_out = reference.output_size(height, width, kernel_h, kernel_w, stride_h, stride_w,
                                                  pad_h, pad_w, dilation_h, dilation_w)
    if height_out < 1 or width_out < 1:
        raise ValueError(f"x of spatial size {height}x{width} is too small for a {kernel_h}x{kernel_w} kernel "
                         f"with padding ({pad_h}, {pad_w}) and dilation ({dilation_h}, {dilation_w})")
    expected_offset = (n, height_out, width_out, group * points * 2)
    if tuple(offset.shape) != expected_offset:
        raise ValueError(f"offset must have shape {expected_offset} (N, H_out, W_out, group * P * 2), "
                         f"got {tuple(offset.shape)}")
    expected_mask = (n, height_out, width_out, group * points)
    if tuple(mask.shape) != expected_mask:
        raise ValueError(f"mask must have shape {expected_mask} (N, H_out, W_out, group * P), got {tuple(mask.shape)}")

    geometry = Geometry(kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h, dilation_w, group,
                        group_channels, offset_scale, remove_center)
    if impl == "reference":
        if mask_softmax:
            mask = reference.softmax_points(mask, group)
        return reference.dcnv3_forward(x, offset, mask, *geometry).to(out_dtype)
    if impl == "triton" and x.dtype == torch.float64:
        raise TypeError("impl='triton' supports x of dtype float16, bfloat16 or float32, got float64")
    # float64 (gradcheck) always takes the exact CPU/reference path.
    triton_path = x.dtype != torch.float64 and use_triton("dcnv3", impl, x, offset, mask)
    if not triton_path and plain_cpu_inference(x, offset, mask):
        # Eager CPU inference: the custom op's dispatch would cost as much as a small call's kernel.
        out = _run_forward(x, offset, mask, geometry, mask_softmax, triton_path=False)
        return out if out.dtype == out_dtype else out.to(out_dtype)
    if not triton_path and x.shape[0] > 0 and plain_cpu_eager(x, offset, mask):
        cpu = _cpu_kernels(x)  # None without Numba: then the custom op runs the reference
        if cpu is not None:
            return _EagerCPU.apply(x, offset, mask, geometry, mask_softmax, cpu).to(out_dtype)
    return _dcnv3_op(x.contiguous(), offset.contiguous(), mask.contiguous(), *geometry, mask_softmax,
                     triton_path).to(out_dtype)


def _tv_shift(kernel_h: int, kernel_w: int, dilation_h: int, dilation_w: int, offset_scale: float,
              remove_center: bool, like: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per DCNv3 point, ``torchvision offset - offset_scale * dcnv3 offset`` for x and y, each ``(P,)``."""
    grid_x, grid_y = reference.kernel_grid(kernel_h, kernel_w, dilation_h, dilation_w, remove_center,
                                           like.device, like.dtype)
    return grid_x * (offset_scale - 1), grid_y * (offset_scale - 1)


def _tv_positions(kernel_h: int, kernel_w: int, remove_center: bool, device) -> torch.Tensor:
    """Row-major torchvision kernel position ``iy * kernel_w + ix`` of each DCNv3 point, ``(P,)``."""
    ix = torch.arange(kernel_w, device=device).repeat_interleave(kernel_h)
    iy = torch.arange(kernel_h, device=device).repeat(kernel_w)
    if remove_center:
        keep = (ix != kernel_w // 2) | (iy != kernel_h // 2)
        ix, iy = ix[keep], iy[keep]
    return iy * kernel_w + ix


def _check_converter_args(kernel_h, kernel_w, group, dilation_h, dilation_w, offset_scale, remove_center):
    check_int("kernel_h", kernel_h, 1)
    check_int("kernel_w", kernel_w, 1)
    check_int("group", group, 1)
    check_int("dilation_h", dilation_h, 1)
    check_int("dilation_w", dilation_w, 1)
    scale = check_float("offset_scale", offset_scale)
    if scale == 0:
        raise ValueError("offset_scale must be non-zero, got 0.0")
    remove_center = check_bool("remove_center", remove_center)
    return _num_points(kernel_h, kernel_w, remove_center), scale, remove_center


def dcnv3_offsets_to_torchvision(offset: torch.Tensor, mask: torch.Tensor, kernel_h: int, kernel_w: int,
                                 group: int, dilation_h: int = 1, dilation_w: int = 1, offset_scale: float = 1.0,
                                 remove_center: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Convert DCNv3 offsets and mask to torchvision's ``deform_conv2d`` layout.

    ``dcnv3(x, offset, mask, ...)`` equals ``deform_conv2d(x_nchw, tv_offset, ones(C, 1, kh, kw),
    stride, padding, dilation, mask=tv_mask)`` (a depthwise all-ones weight, ``offset_groups=group``),
    permuted back to NHWC. Exact for any ``offset_scale``; removed centre points get offset 0, mask 0.

    Args:
        offset (Tensor[N, H_out, W_out, group * P * 2]): DCNv3 ``(x, y)`` pairs, x-major points.
        mask (Tensor[N, H_out, W_out, group * P]): DCNv3 mask.

    Returns:
        ``(tv_offset, tv_mask)``: Tensor[N, group * kh * kw * 2, H_out, W_out] holding ``(dy, dx)``
        pairs at row-major kernel positions ``iy * kernel_w + ix``, and Tensor[N, group * kh * kw, H_out, W_out].
    """
    points, scale, remove_center = _check_converter_args(kernel_h, kernel_w, group, dilation_h, dilation_w,
                                                         offset_scale, remove_center)
    check_tensor("offset", offset, ndim=4)
    check_tensor("mask", mask, ndim=4)
    n, height_out, width_out, _ = offset.shape
    if offset.shape[3] != group * points * 2 or tuple(mask.shape) != (n, height_out, width_out, group * points):
        raise ValueError(f"offset and mask must have shapes (N, H_out, W_out, {group * points * 2}) and "
                         f"(N, H_out, W_out, {group * points}), got {tuple(offset.shape)} and {tuple(mask.shape)}")
    off = offset.reshape(n, height_out, width_out, group, points, 2)
    shift_x, shift_y = _tv_shift(kernel_h, kernel_w, dilation_h, dilation_w, scale, remove_center, offset)
    dy = off[..., 1] * scale + shift_y
    dx = off[..., 0] * scale + shift_x
    kernel_points = kernel_h * kernel_w
    positions = _tv_positions(kernel_h, kernel_w, remove_center, offset.device)
    tv_offset = offset.new_zeros(n, height_out, width_out, group, kernel_points, 2)
    tv_offset[..., positions, :] = torch.stack((dy, dx), -1)
    tv_mask = mask.new_zeros(n, height_out, width_out, group, kernel_points)
    tv_mask[..., positions] = mask.reshape(n, height_out, width_out, group, points)
    tv_offset = tv_offset.reshape(n, height_out, width_out, -1).permute(0, 3, 1, 2).contiguous()
    tv_mask = tv_mask.reshape(n, height_out, width_out, -1).permute(0, 3, 1, 2).contiguous()
    return tv_offset, tv_mask


def torchvision_offsets_to_dcnv3(offset: torch.Tensor, mask: Optional[torch.Tensor], kernel_h: int, kernel_w: int,
                                 group: int, dilation_h: int = 1, dilation_w: int = 1, offset_scale: float = 1.0,
                                 remove_center: bool = False) -> Tuple[torch.Tensor, torch.Tensor]:
    """Convert torchvision ``deform_conv2d`` offsets and mask to DCNv3's layout (inverse of
    :func:`dcnv3_offsets_to_torchvision`).

    Args:
        offset (Tensor[N, group * kh * kw * 2, H_out, W_out]): ``(dy, dx)`` pairs, row-major positions.
        mask (Tensor[N, group * kh * kw, H_out, W_out] or None): ``None`` (DCNv1) gives an all-ones mask.

    Returns:
        ``(offset, mask)``: Tensor[N, H_out, W_out, group * P * 2] of ``(x, y)`` pairs in x-major
        point order, and Tensor[N, H_out, W_out, group * P]. With ``remove_center`` the centre
        position is dropped (lossless only when its torchvision mask is zero).
    """
    points, scale, remove_center = _check_converter_args(kernel_h, kernel_w, group, dilation_h, dilation_w,
                                                         offset_scale, remove_center)
    check_tensor("offset", offset, ndim=4)
    n, _, height_out, width_out = offset.shape
    kernel_points = kernel_h * kernel_w
    if offset.shape[1] != group * kernel_points * 2:
        raise ValueError(f"offset must have group * kernel_h * kernel_w * 2 = {group * kernel_points * 2} channels, "
                         f"got shape {tuple(offset.shape)}")
    if mask is None:
        mask = offset.new_ones(n, group * kernel_points, height_out, width_out)
    check_tensor("mask", mask, ndim=4)
    if tuple(mask.shape) != (n, group * kernel_points, height_out, width_out):
        raise ValueError(f"mask must have shape {(n, group * kernel_points, height_out, width_out)}, "
                         f"got {tuple(mask.shape)}")
    positions = _tv_positions(kernel_h, kernel_w, remove_center, offset.device)
    tv_off = offset.permute(0, 2, 3, 1).reshape(n, height_out, width_out, group, kernel_points, 2)[..., positions, :]
    shift_x, shift_y = _tv_shift(kernel_h, kernel_w, dilation_h, dilation_w, scale, remove_center, offset)
    off_x = (tv_off[..., 1] - shift_x) / scale
    off_y = (tv_off[..., 0] - shift_y) / scale
    dcn_offset = torch.stack((off_x, off_y), -1).reshape(n, height_out, width_out, group * points * 2)
    dcn_mask = mask.permute(0, 2, 3, 1).reshape(n, height_out, width_out, group, kernel_points)[..., positions]
    return dcn_offset, dcn_mask.reshape(n, height_out, width_out, group * points)
