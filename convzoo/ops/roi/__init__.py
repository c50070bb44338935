"""RoI operators: ``roi_align``, ``ps_roi_align``, ``roi_pool``, ``ps_roi_pool`` (torchvision),
``deform_roi_pool``, ``modulated_deform_roi_pool`` (mmcv) and ``deform_ps_roi_pool`` (the DCN
paper).

Semantics are those of torchvision, mmcv and the DCN paper's CUDA kernel; :mod:`.reference`
documents each rule. The torchvision operators take torchvision's argument names (``input``,
``boxes``, ``output_size``, ``spatial_scale``, ``sampling_ratio``, ``aligned``). Every operator
takes a keyword-only ``impl="auto" | "reference"``:

* ``"reference"``: the plain PyTorch code of :mod:`.reference`, differentiated by autograd
  (traceable by ``torch.jit.trace``/``torch.onnx``; the adaptive sampling grid of
  ``sampling_ratio <= 0`` is then fixed at trace time);
* ``"auto"``: the ``convzoo::<name>`` custom op (one node for ``torch.compile`` and
  ``torch.export``) with a hand-written backward. On CPU tensors the bilinear pools
  (``roi_align``, ``ps_roi_align``, ``deform_roi_pool``, ``deform_ps_roi_pool``) sum their
  samples with the row-gather engine of :mod:`convzoo.ops._bilinear_rows` (Numba, one loop per
  output bin over channel-contiguous rows; its transpose for the input gradient); ``ps_roi_pool``
  and ``roi_pool`` run their own Numba kernels (:mod:`.cpu`). Without Numba, or on other
  devices, the same code runs on PyTorch gathers.

Adaptive sampling (``sampling_ratio <= 0``) of a huge box is bounded: only the samples that
can read the map are visited, which is exact (the others read zero but still count in the
mean), so a box of 1e9 pixels costs what a box the size of the map does.

There is no Triton kernel for these operators; ``impl="triton"`` is refused with a
``ValueError``.

Gradients flow to ``input``, ``offset`` and ``mask``; never to the boxes.
"""
import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._checks import (check_bool, check_float, check_impl, check_int, check_positive_float, check_same, check_tensor, pair,
                       script_unsupported)
from .._numba import kernels
from . import reference
from .reference import AlignGeometry, DeformPSGeometry, PoolGeometry

__all__ = [
    "roi_align",
    "ps_roi_align",
    "roi_pool",
    "ps_roi_pool",
    "deform_roi_pool",
    "modulated_deform_roi_pool",
    "deform_ps_roi_pool",
]

Boxes = Union[Tensor, Sequence[Tensor]]


# --------------------------------------------------------------------------------------
# Argument checks
# --------------------------------------------------------------------------------------
def _check_roi_impl(impl: str, op_name: str) -> str:
    check_impl(impl)
    if impl == "triton":
        raise ValueError(
            f"{op_name}: impl='triton' is not available for the RoI operators (they have no Triton kernel); "
            "use impl='auto' or impl='reference'"
        )
    return impl


def _boxes_to_rois(name: str, boxes: Boxes, input: Tensor) -> Tensor:
    """Turn ``boxes`` (Tensor[K, 5] or a list of Tensor[L, 4], one per image) into Tensor[K, 5]."""
    if isinstance(boxes, (list, tuple)):
        if len(boxes) != input.shape[0]:
            raise ValueError(
                f"{name} given as a list must hold one Tensor[L, 4] per image ({input.shape[0]}), got {len(boxes)}"
            )
        parts = []
        for i, per_image in enumerate(boxes):
            check_tensor(f"{name}[{i}]", per_image, ndim=2)
            if per_image.shape[1] != 4:
                raise ValueError(f"{name}[{i}] must have shape (L, 4), got {tuple(per_image.shape)}")
            if per_image.device != input.device:
                raise ValueError(f"{name}[{i}] must be on the device of input ({input.device}), got {per_image.device}")
            index = torch.full((per_image.shape[0], 1), i, dtype=per_image.dtype, device=per_image.device)
            parts.append(torch.cat([index, per_image], dim=1))
        if not parts:
            return input.new_zeros(0, 5)
        return torch.cat(parts).to(input.dtype)
    check_tensor(name, boxes, ndim=2)
    if boxes.shape[1] != 5:
        raise ValueError(f"{name} must have shape (K, 5) as (batch_index, x1, y1, x2, y2), got {tuple(boxes.shape)}")
    if boxes.device != input.device:
        raise ValueError(f"{name} must be on the device of input ({input.device}), got {boxes.device}")
    if not torch.compiler.is_compiling() and boxes.shape[0]:
        batch_index = boxes[:, 0]
        if not bool(((batch_index == batch_index.round()) & (batch_index >= 0) & (batch_index < input.shape[0])).all()):
            raise ValueError(
                f"{name}[:, 0] must hold integer batch indices in [0, {input.shape[0]}), "
                f"got values {batch_index.unique().tolist()[:8]}"
            )
    return boxes.to(input.dtype)


def _check_input(input: Tensor) -> Tensor:
    check_tensor("input", input, ndim=4)
    if input.shape[2] == 0 or input.shape[3] == 0:
        raise ValueError(f"input must have a non-empty spatial size, got shape {tuple(input.shape)}")
    return input


def _check_common(
    op_name: str, impl: str, input: Tensor, boxes_name: str, boxes: Boxes, output_size, spatial_scale
) -> Tuple[Tensor, Tuple[int, int], float]:
    """Checks shared by the RoI operators; returns ``(rois Tensor[K, 5], (ph, pw), spatial_scale)``."""
    _check_roi_impl(impl, op_name)
    _check_input(input)
    rois = _boxes_to_rois(boxes_name, boxes, input)
    pooled = pair("output_size", output_size, minimum=1)
    return rois, pooled, check_positive_float("spatial_scale", spatial_scale)


def _check_position_sensitive_channels(input: Tensor, pooled: Tuple[int, int]) -> None:
    if input.shape[1] % (pooled[0] * pooled[1]):
        raise ValueError(
            f"input channels must be a multiple of output_size[0] * output_size[1] = {pooled[0] * pooled[1]}, "
            f"got {input.shape[1]}"
        )


def _check_bin_tensor(name: str, value: Tensor, input: Tensor, shape: Tuple[int, ...], layout: str) -> Tensor:
    check_tensor(name, value, ndim=len(shape))
    check_same(name, value, "input", input)
    if tuple(value.shape) != shape:
        raise ValueError(f"{name} must have shape {shape} ({layout}), got {tuple(value.shape)}")
    return value


# --------------------------------------------------------------------------------------
# Compute dtype: half types run in float32 inside the kernels
# --------------------------------------------------------------------------------------
def _upcast(t: Optional[Tensor]) -> Optional[Tensor]:
    if t is not None and t.dtype in (torch.float16, torch.bfloat16):
        return t.float()
    return t


def _cpu_kernels(tensor: Tensor):
    """The Numba kernels (:mod:`.cpu`) for CPU tensors; None on other devices or without Numba."""
    return kernels(__name__ + ".cpu") if tensor.device.type == "cpu" else None


def _no_grad(need: bool, like: Tensor, grad: Optional[Tensor]) -> Tensor:
    """A custom op returns tensors only: an empty one stands for "not asked for"."""
    return grad if (need and grad is not None) else like.new_empty(0)


# --------------------------------------------------------------------------------------
# Bilinear pools (roi_align, ps_roi_align, deform_roi_pool): one forward and one backward
# per geometry, behind three custom ops sharing one backward op
# --------------------------------------------------------------------------------------
def _align_forward(input: Tensor, rois: Tensor, offset: Optional[Tensor], geometry: AlignGeometry) -> Tensor:
    """The reference's (clipped) samples, summed by the row-gather engine (Numba on the CPU)."""
    with torch.no_grad():
        out = reference.align_pool(_upcast(input), rois, geometry, _upcast(offset), pool=reference.bilinear_pool_fast)
    return out.to(input.dtype).contiguous()


def _align_backward_rows(grad: Tensor, input: Tensor, rois: Tensor, offset: Optional[Tensor],
                            geometry: AlignGeometry, need_input_grad: bool, need_offset_grad: bool):
    """The reference's (clipped) samples and :func:`reference.bilinear_pool_backward` (the row-gather
    engine); every sample of a bin moves with the bin's corner, by ``gamma * roi size * offset``."""
    work = _upcast(input)
    work_offset = _upcast(offset)
    work_rois = rois.to(work.dtype)
    height, width = input.shape[-2:]
    batch_index, y, x, weight = reference.align_samples(work_rois, height, width, geometry, work_offset)
    bin_group, groups = reference.align_bin_groups(geometry, input.device)
    k, bins = rois.shape[0], geometry.pooled_h * geometry.pooled_w
    grad_input, grad_y, grad_x = reference.bilinear_pool_backward(
        _upcast(grad).reshape(k, grad.shape[1], bins), work, batch_index, bin_group, groups, y, x, weight,
        need_input_grad, need_offset_grad)
    grad_offset = None
    if need_offset_grad:
        bins_of = reference.align_bins(work_rois, geometry, work_offset)
        grad_offset = torch.stack(
            [grad_x.reshape(k, geometry.pooled_h, geometry.pooled_w) * (geometry.gamma * bins_of.roi_w).view(-1, 1, 1),
             grad_y.reshape(k, geometry.pooled_h, geometry.pooled_w) * (geometry.gamma * bins_of.roi_h).view(-1, 1, 1)],
            dim=1).to(offset.dtype)
    return (grad_input.to(input.dtype) if need_input_grad else None), grad_offset


@torch.library.custom_op("convzoo::align_pool_backward", mutates_args=())
def _align_backward_op(
    grad: Tensor, input: Tensor, rois: Tensor, offset: Optional[Tensor], pooled_h: int, pooled_w: int,
    spatial_scale: float, sampling_ratio: int, shift: float, min_size_one: bool, position_sensitive: bool,
    gamma: float, need_input_grad: bool, need_offset_grad: bool,
) -> Tuple[Tensor, Tensor]:
    geometry = AlignGeometry(pooled_h=pooled_h, pooled_w=pooled_w, spatial_scale=spatial_scale,
                             sampling_ratio=sampling_ratio, shift=shift, min_size_one=min_size_one,
                             position_sensitive=position_sensitive, gamma=gamma)
    need_offset_grad = need_offset_grad and offset is not None
    grad_input, grad_offset = _align_backward_rows(grad, input, rois, offset, geometry, need_input_grad,
                                                   need_offset_grad)
    grad_input = None if grad_input is None else grad_input.contiguous()
    return _no_grad(need_input_grad, input, grad_input), _no_grad(need_offset_grad, input, grad_offset)


@_align_backward_op.register_fake
def _(grad, input, rois, offset, pooled_h, pooled_w, spatial_scale, sampling_ratio, shift, min_size_one,
      position_sensitive, gamma, need_input_grad, need_offset_grad):
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format) if need_input_grad else input.new_empty(0)
    grad_offset = torch.empty_like(offset) if (need_offset_grad and offset is not None) else input.new_empty(0)
    return grad_input, grad_offset


def _align_backward(ctx, grad):
    """Autograd backward of the three bilinear pools (inputs ``input, rois[, offset], ...``)."""
    input, rois, offset = ctx.saved_tensors
    need_input = ctx.needs_input_grad[0]
    need_offset = ctx.has_offset and ctx.needs_input_grad[2]
    grads = [None] * ctx.num_inputs
    if need_input or need_offset:
        g = ctx.geometry
        grad_input, grad_offset = _align_backward_op(
            grad, input, rois, offset if ctx.has_offset else None, g.pooled_h, g.pooled_w, g.spatial_scale,
            g.sampling_ratio, g.shift, g.min_size_one, g.position_sensitive, g.gamma, need_input, need_offset)
        grads[0] = grad_input if need_input else None
        if need_offset:
            grads[2] = grad_offset
    return tuple(grads)


def _align_setup(geometry_of, has_offset: bool):
    """setup_context saving ``input, rois, offset`` and the geometry ``geometry_of(inputs)``."""

    def setup(ctx, inputs, output):
        input, rois = inputs[:2]
        offset = inputs[2] if has_offset else None
        ctx.has_offset = offset is not None
        ctx.save_for_backward(input, rois, offset)
        ctx.geometry = geometry_of(inputs)
        ctx.num_inputs = len(inputs)

    return setup


@torch.library.custom_op("convzoo::roi_align", mutates_args=())
def _roi_align_op(
    input: Tensor, rois: Tensor, pooled_h: int, pooled_w: int, spatial_scale: float, sampling_ratio: int, aligned: bool
) -> Tensor:
    geometry = reference.roi_align_geometry((pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned)
    return _align_forward(input, rois, None, geometry)


@_roi_align_op.register_fake
def _(input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned):
    return input.new_empty(rois.shape[0], input.shape[1], pooled_h, pooled_w)


def _roi_align_geometry(inputs) -> AlignGeometry:
    input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned = inputs
    return reference.roi_align_geometry((pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned)


_roi_align_op.register_autograd(_align_backward, setup_context=_align_setup(_roi_align_geometry, False))


@torch.library.custom_op("convzoo::ps_roi_align", mutates_args=())
def _ps_roi_align_op(
    input: Tensor, rois: Tensor, pooled_h: int, pooled_w: int, spatial_scale: float, sampling_ratio: int
) -> Tensor:
    geometry = reference.ps_roi_align_geometry((pooled_h, pooled_w), spatial_scale, sampling_ratio)
    return _align_forward(input, rois, None, geometry)


@_ps_roi_align_op.register_fake
def _(input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio):
    return input.new_empty(rois.shape[0], input.shape[1] // (pooled_h * pooled_w), pooled_h, pooled_w)


def _ps_roi_align_geometry(inputs) -> AlignGeometry:
    input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio = inputs
    return reference.ps_roi_align_geometry((pooled_h, pooled_w), spatial_scale, sampling_ratio)


_ps_roi_align_op.register_autograd(_align_backward, setup_context=_align_setup(_ps_roi_align_geometry, False))


@torch.library.custom_op("convzoo::deform_roi_pool", mutates_args=())
def _deform_roi_pool_op(
    input: Tensor, rois: Tensor, offset: Optional[Tensor], pooled_h: int, pooled_w: int, spatial_scale: float,
    sampling_ratio: int, gamma: float,
) -> Tensor:
    geometry = reference.deform_roi_pool_geometry((pooled_h, pooled_w), spatial_scale, sampling_ratio, gamma)
    return _align_forward(input, rois, offset, geometry)


@_deform_roi_pool_op.register_fake
def _(input, rois, offset, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma):
    return input.new_empty(rois.shape[0], input.shape[1], pooled_h, pooled_w)


def _deform_roi_pool_geometry(inputs) -> AlignGeometry:
    input, rois, offset, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma = inputs
    return reference.deform_roi_pool_geometry((pooled_h, pooled_w), spatial_scale, sampling_ratio, gamma)


_deform_roi_pool_op.register_autograd(_align_backward, setup_context=_align_setup(_deform_roi_pool_geometry, True))


# --------------------------------------------------------------------------------------
# convzoo::ps_roi_pool
# --------------------------------------------------------------------------------------
@torch.library.custom_op("convzoo::ps_roi_pool", mutates_args=())
def _ps_roi_pool_op(input: Tensor, rois: Tensor, pooled_h: int, pooled_w: int, spatial_scale: float) -> Tensor:
    geometry = PoolGeometry(pooled_h=pooled_h, pooled_w=pooled_w, spatial_scale=spatial_scale)
    cpu = _cpu_kernels(input)
    if cpu is not None:
        return cpu.ps_roi_pool(input, rois, geometry)
    with torch.no_grad():
        return reference.ps_roi_pool(input, rois, geometry)


@_ps_roi_pool_op.register_fake
def _(input, rois, pooled_h, pooled_w, spatial_scale):
    return input.new_empty(rois.shape[0], input.shape[1] // (pooled_h * pooled_w), pooled_h, pooled_w)


@torch.library.custom_op("convzoo::ps_roi_pool_backward", mutates_args=())
def _ps_roi_pool_backward_op(
    grad: Tensor, rois: Tensor, batch: int, channels: int, height: int, width: int, pooled_h: int, pooled_w: int,
    spatial_scale: float,
) -> Tensor:
    shape = torch.Size((batch, channels, height, width))
    geometry = PoolGeometry(pooled_h=pooled_h, pooled_w=pooled_w, spatial_scale=spatial_scale)
    cpu = _cpu_kernels(grad)
    if cpu is not None:
        return cpu.ps_roi_pool_backward(grad, rois, shape, geometry)
    return reference.ps_roi_pool_backward(grad, rois, shape, geometry)


@_ps_roi_pool_backward_op.register_fake
def _(grad, rois, batch, channels, height, width, pooled_h, pooled_w, spatial_scale):
    return grad.new_empty(batch, channels, height, width)


def _ps_roi_pool_setup(ctx, inputs, output):
    input, rois, pooled_h, pooled_w, spatial_scale = inputs
    ctx.save_for_backward(rois)
    ctx.input_shape = tuple(input.shape)
    ctx.geometry = PoolGeometry(pooled_h=pooled_h, pooled_w=pooled_w, spatial_scale=spatial_scale)


def _ps_roi_pool_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    if not ctx.needs_input_grad[0]:
        return None, None, None, None, None
    batch, channels, height, width = ctx.input_shape
    g = ctx.geometry
    grad_input = _ps_roi_pool_backward_op(grad, rois, batch, channels, height, width, g.pooled_h, g.pooled_w,
                                          g.spatial_scale)
    return grad_input, None, None, None, None


_ps_roi_pool_op.register_autograd(_ps_roi_pool_backward, setup_context=_ps_roi_pool_setup)


# --------------------------------------------------------------------------------------
# convzoo::roi_pool (returns the argmax too, which its backward reads)
# --------------------------------------------------------------------------------------
@torch.library.custom_op("convzoo::roi_pool", mutates_args=())
def _roi_pool_op(input: Tensor, rois: Tensor, pooled_h: int, pooled_w: int,
                 spatial_scale: float) -> Tuple[Tensor, Tensor]:
    geometry = PoolGeometry(pooled_h=pooled_h, pooled_w=pooled_w, spatial_scale=spatial_scale)
    cpu = _cpu_kernels(input)
    if cpu is not None:
        return cpu.roi_pool(input, rois, geometry, reference.ROI_POOL_FLOOR)
    with torch.no_grad():
        out, argmax = reference.roi_pool_argmax(_upcast(input), rois, geometry)
    return out.to(input.dtype), argmax


@_roi_pool_op.register_fake
def _(input, rois, pooled_h, pooled_w, spatial_scale):
    shape = (rois.shape[0], input.shape[1], pooled_h, pooled_w)
    return input.new_empty(shape), input.new_empty(shape, dtype=torch.int64)


@torch.library.custom_op("convzoo::roi_pool_backward", mutates_args=())
def _roi_pool_backward_op(grad: Tensor, rois: Tensor, argmax: Tensor, batch: int, channels: int, height: int,
                          width: int) -> Tensor:
    shape = torch.Size((batch, channels, height, width))
    cpu = _cpu_kernels(grad)
    if cpu is not None:
        return cpu.roi_pool_backward(grad, rois, argmax, shape)
    return reference.roi_pool_backward(grad, rois, argmax, shape)


@_roi_pool_backward_op.register_fake
def _(grad, rois, argmax, batch, channels, height, width):
    return grad.new_empty(batch, channels, height, width)


def _roi_pool_setup(ctx, inputs, output):
    input, rois = inputs[:2]
    ctx.save_for_backward(rois, output[1])
    ctx.input_shape = tuple(input.shape)


def _roi_pool_backward(ctx, grad, grad_argmax):
    rois, argmax = ctx.saved_tensors
    grad_input = _roi_pool_backward_op(grad, rois, argmax, *ctx.input_shape) if ctx.needs_input_grad[0] else None
    return grad_input, None, None, None, None


_roi_pool_op.register_autograd(_roi_pool_backward, setup_context=_roi_pool_setup)


# --------------------------------------------------------------------------------------
# convzoo::deform_ps_roi_pool (sampled on the row-gather engine of ops/_bilinear_rows.py)
# --------------------------------------------------------------------------------------
def _deform_ps_geometry(output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std,
                        spatial_scale) -> DeformPSGeometry:
    return DeformPSGeometry(output_dim=output_dim, group_size=group_size, pooled_size=pooled_size,
                            part_size=part_size, sample_per_part=sample_per_part, trans_std=trans_std,
                            spatial_scale=spatial_scale)


@torch.library.custom_op("convzoo::deform_ps_roi_pool", mutates_args=())
def _deform_ps_roi_pool_op(
    input: Tensor, rois: Tensor, offset: Optional[Tensor], output_dim: int, group_size: int, pooled_size: int,
    part_size: int, sample_per_part: int, trans_std: float, spatial_scale: float,
) -> Tensor:
    geometry = _deform_ps_geometry(output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std,
                                   spatial_scale)
    with torch.no_grad():
        out = reference.deform_ps_roi_pool(_upcast(input), rois, _upcast(offset), geometry,
                                           pool=reference.bilinear_pool_fast)
    return out.to(input.dtype).contiguous()


@_deform_ps_roi_pool_op.register_fake
def _(input, rois, offset, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, spatial_scale):
    return input.new_empty(rois.shape[0], output_dim, pooled_size, pooled_size)


@torch.library.custom_op("convzoo::deform_ps_roi_pool_backward", mutates_args=())
def _deform_ps_roi_pool_backward_op(
    grad: Tensor, input: Tensor, rois: Tensor, offset: Optional[Tensor], output_dim: int, group_size: int,
    pooled_size: int, part_size: int, sample_per_part: int, trans_std: float, spatial_scale: float,
    need_input_grad: bool, need_offset_grad: bool,
) -> Tuple[Tensor, Tensor]:
    geometry = _deform_ps_geometry(output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std,
                                   spatial_scale)
    work = _upcast(input)
    work_offset = _upcast(offset)
    height, width = input.shape[-2:]
    work_rois = rois.to(work.dtype)
    batch_index, y, x, weight = reference.deform_ps_roi_pool_samples(work_rois, height, width, work_offset, geometry)
    bin_group = reference.dcn_bin_groups(pooled_size, group_size, work.dtype, input.device)
    need_offset_grad = need_offset_grad and offset is not None
    grad_input, grad_y, grad_x = reference.bilinear_pool_backward(
        _upcast(grad).reshape(rois.shape[0], output_dim, pooled_size * pooled_size), work, batch_index, bin_group,
        group_size * group_size, y, x, weight, need_input_grad, need_offset_grad,
    )
    grad_offset = None
    if need_offset_grad:
        grad_offset = _deform_ps_offset_grad(grad_y, grad_x, work_rois, work_offset, geometry).to(offset.dtype)
    grad_input = grad_input.to(input.dtype).contiguous() if need_input_grad else None
    return _no_grad(need_input_grad, input, grad_input), _no_grad(need_offset_grad, input, grad_offset)


def _deform_ps_offset_grad(grad_y, grad_x, rois, offset, geometry: DeformPSGeometry):
    """Chain the per-bin point gradients (K, Q, P) to ``offset`` (K, 2Q, part, part): each bin's
    samples move by ``trans_std * roi size * offset[part cell of the bin]``."""
    scale, pooled_size, part_size = geometry.spatial_scale, geometry.pooled_size, geometry.part_size
    start_w = reference.round_half_away(rois[:, 1]) * scale - 0.5
    start_h = reference.round_half_away(rois[:, 2]) * scale - 0.5
    roi_w = ((reference.round_half_away(rois[:, 3]) + 1.0) * scale - 0.5 - start_w).clamp(min=0.1)
    roi_h = ((reference.round_half_away(rois[:, 4]) + 1.0) * scale - 0.5 - start_h).clamp(min=0.1)
    k, coord_sets = grad_x.shape[:2]
    bins = torch.arange(pooled_size, dtype=rois.dtype, device=rois.device)
    part = torch.floor(bins / pooled_size * part_size).long().clamp(0, part_size - 1)
    cell = (part.view(-1, 1) * part_size + part.view(1, -1)).reshape(-1)  # part cell of each bin
    trans_std = geometry.trans_std
    per_bin = torch.stack(
        [grad_x * (trans_std * roi_w).view(-1, 1, 1), grad_y * (trans_std * roi_h).view(-1, 1, 1)],
        dim=2,
    )  # (K, Q, 2, P)
    grad_offset = per_bin.new_zeros(k, coord_sets, 2, part_size * part_size)
    grad_offset.index_add_(3, cell, per_bin)
    return grad_offset.reshape(offset.shape)


@_deform_ps_roi_pool_backward_op.register_fake
def _(grad, input, rois, offset, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std,
      spatial_scale, need_input_grad, need_offset_grad):
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format) if need_input_grad else input.new_empty(0)
    grad_offset = torch.empty_like(offset) if (need_offset_grad and offset is not None) else input.new_empty(0)
    return grad_input, grad_offset


def _deform_ps_setup(ctx, inputs, output):
    input, rois, offset, output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, scale = inputs
    ctx.has_offset = offset is not None
    ctx.save_for_backward(input, rois, offset)
    ctx.geometry = _deform_ps_geometry(output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std,
                                       scale)


def _deform_ps_backward(ctx, grad):
    input, rois, offset = ctx.saved_tensors
    need_input = ctx.needs_input_grad[0]
    need_offset = ctx.has_offset and ctx.needs_input_grad[2]
    grads = [None] * 10
    if need_input or need_offset:
        g = ctx.geometry
        grad_input, grad_offset = _deform_ps_roi_pool_backward_op(
            grad, input, rois, offset, g.output_dim, g.group_size, g.pooled_size, g.part_size, g.sample_per_part,
            g.trans_std, g.spatial_scale, need_input, need_offset)
        grads[0] = grad_input if need_input else None
        grads[2] = grad_offset if need_offset else None
    return tuple(grads)


_deform_ps_roi_pool_op.register_autograd(_deform_ps_backward, setup_context=_deform_ps_setup)


# --------------------------------------------------------------------------------------
# FLOP formulas (2 * multiply-adds, the FlopCounterMode convention)
# --------------------------------------------------------------------------------------
def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula

    def bilinear_flops(out_shape, samples: int) -> int:
        # each sample: 4 neighbours, one multiply-add each, per output element
        return 2 * 4 * samples * math.prod(out_shape)

    def align_samples(sampling_ratio: int) -> int:
        # adaptive grids (sampling_ratio <= 0) depend on the boxes: counted as 2x2 samples
        return sampling_ratio**2 if sampling_ratio > 0 else 4

    @register_flop_formula(torch.ops.convzoo.roi_align)
    def _(input_shape, rois_shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, *, out_shape=None, **kw):
        return bilinear_flops(out_shape, align_samples(sampling_ratio))

    @register_flop_formula(torch.ops.convzoo.ps_roi_align)
    def _(input_shape, rois_shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, *, out_shape=None, **kw):
        return bilinear_flops(out_shape, align_samples(sampling_ratio))

    @register_flop_formula(torch.ops.convzoo.deform_roi_pool)
    def _(input_shape, rois_shape, offset_shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma, *,
          out_shape=None, **kw):
        return bilinear_flops(out_shape, align_samples(sampling_ratio))

    @register_flop_formula(torch.ops.convzoo.deform_ps_roi_pool)
    def _(input_shape, rois_shape, offset_shape, output_dim, group_size, pooled_size, part_size, sample_per_part,
          trans_std, spatial_scale, *, out_shape=None, **kw):
        return bilinear_flops(out_shape, sample_per_part**2)

    @register_flop_formula(torch.ops.convzoo.ps_roi_pool)
    def _(input_shape, rois_shape, pooled_h, pooled_w, spatial_scale, *, out_shape=None, **kw):
        # summed-area table (2 adds per input element) + 4 reads and a divide per output
        return 2 * math.prod(input_shape) + 4 * math.prod(out_shape)


_register_flop_formulas()


# --------------------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------------------
@script_unsupported
def roi_align(
    input: Tensor,
    boxes: Boxes,
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    aligned: bool = False,
    *,
    impl: str = "auto",
) -> Tensor:
    """RoIAlign (Mask R-CNN, https://arxiv.org/abs/1703.06870), torchvision's semantics.

    Args:
        input (Tensor[N, C, H, W]): features.
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): ``(batch_index, x1, y1, x2, y2)`` rows,
            or one ``(x1, y1, x2, y2)`` tensor per image; image coordinates, cast to the
            input's dtype.
        output_size (int or (int, int)): ``(ph, pw)``.
        spatial_scale (float): feature pixels per image pixel (1/stride).
        sampling_ratio (int): samples per bin along each axis; ``<= 0`` takes
            ``ceil(roi_size / output_size)`` per RoI (adaptive).
        aligned (bool): shift boxes by -0.5 pixel (pixel centres at integer + 0.5). Without
            it RoIs smaller than one pixel are widened to one pixel.
        impl (str): ``"auto"`` (custom op) or ``"reference"`` (plain PyTorch autograd).

    Returns:
        Tensor[K, C, ph, pw]. A sample outside ``[-1, H] x [-1, W]`` reads zero; inside, the
        point is clamped to the map and read bilinearly; each bin is the mean of its samples.

    Example:
        >>> x = torch.randn(1, 8, 16, 16)
        >>> roi_align(x, torch.tensor([[0., 1., 1., 9., 7.]]), 2, aligned=True).shape
        torch.Size([1, 8, 2, 2])
    """
    rois, pooled, spatial_scale = _check_common(
        "roi_align", impl, input, "boxes", boxes, output_size, spatial_scale
    )
    sampling_ratio = check_int("sampling_ratio", sampling_ratio)
    aligned = check_bool("aligned", aligned)
    if impl == "reference":
        return reference.roi_align(input, rois, pooled, spatial_scale, sampling_ratio, aligned)
    return _roi_align_op(input, rois, pooled[0], pooled[1], spatial_scale, sampling_ratio, aligned)


@script_unsupported
def ps_roi_align(
    input: Tensor,
    boxes: Boxes,
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    sampling_ratio: int = -1,
    *,
    impl: str = "auto",
) -> Tensor:
    """Position-sensitive RoIAlign (Light-Head R-CNN, https://arxiv.org/abs/1711.07264),
    torchvision's semantics.

    :func:`roi_align`'s sampling with the half-pixel shift always on and no minimum RoI size;
    output channel ``c`` of bin ``(i, j)`` reads input channel ``(c*ph + i)*pw + j``. A bin
    without samples (an empty box) is 0, where torchvision divides 0 by 0.

    Args:
        input (Tensor[N, C_out*ph*pw, H, W]): position-sensitive score maps.
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): as in :func:`roi_align`.
        output_size (int or (int, int)): ``(ph, pw)``.
        spatial_scale (float): feature pixels per image pixel.
        sampling_ratio (int): samples per bin and axis; ``<= 0`` adaptive.
        impl (str): ``"auto"`` or ``"reference"``.

    Returns:
        Tensor[K, C_out, ph, pw].

    Example:
        >>> x = torch.randn(1, 8, 16, 16)
        >>> ps_roi_align(x, torch.tensor([[0., 1., 1., 9., 7.]]), 2).shape
        torch.Size([1, 2, 2, 2])
    """
    rois, pooled, spatial_scale = _check_common(
        "ps_roi_align", impl, input, "boxes", boxes, output_size, spatial_scale
    )
    _check_position_sensitive_channels(input, pooled)
    sampling_ratio = check_int("sampling_ratio", sampling_ratio)
    if impl == "reference":
        return reference.ps_roi_align(input, rois, pooled, spatial_scale, sampling_ratio)
    return _ps_roi_align_op(input, rois, pooled[0], pooled[1], spatial_scale, sampling_ratio)


@script_unsupported
def roi_pool(
    input: Tensor,
    boxes: Boxes,
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    *,
    impl: str = "auto",
) -> Tensor:
    """RoI max pooling (Fast R-CNN, https://arxiv.org/abs/1504.08083), torchvision's semantics.

    Box corners ``round(coord * spatial_scale)`` (half away from zero), the RoI spanning
    ``end - start + 1`` pixels (at least 1); bin ``i`` covers ``[floor(i*bin), ceil((i+1)*bin))``
    from the RoI's corner, clipped to the map. Each bin is the maximum of its window; an empty
    bin is 0. As in torchvision the running maximum starts at ``-FLT_MAX``: NaN never wins, and
    a non-empty bin whose values are all NaN (or <= -FLT_MAX) gives ``-FLT_MAX``. The gradient
    goes to the first maximum in row-major order.

    Args:
        input (Tensor[N, C, H, W]): features.
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): as in :func:`roi_align`.
        output_size (int or (int, int)): ``(ph, pw)``.
        spatial_scale (float): feature pixels per image pixel.
        impl (str): ``"auto"`` or ``"reference"``.

    Returns:
        Tensor[K, C, ph, pw].

    Example:
        >>> x = torch.randn(1, 8, 16, 16)
        >>> roi_pool(x, torch.tensor([[0., 1., 1., 9., 7.]]), 2).shape
        torch.Size([1, 8, 2, 2])
    """
    rois, pooled, spatial_scale = _check_common(
        "roi_pool", impl, input, "boxes", boxes, output_size, spatial_scale
    )
    if impl == "reference":
        return reference.roi_pool(input, rois, PoolGeometry(pooled[0], pooled[1], spatial_scale))
    return _roi_pool_op(input, rois, pooled[0], pooled[1], spatial_scale)[0]


@script_unsupported
def deform_roi_pool(
    input: Tensor,
    rois: Boxes,
    offset: Optional[Tensor] = None,
    output_size: Union[int, Tuple[int, int]] = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    *,
    impl: str = "auto",
) -> Tensor:
    """Deformable RoI pooling (DCN, https://arxiv.org/abs/1703.06211), mmcv's DeformRoIPool.

    RoIAlign with mmcv's rule (boxes always shifted by -0.5 pixel, no minimum RoI size,
    ``sampling_ratio <= 0`` adaptive) whose bin ``(i, j)`` is moved by
    ``(gamma * roi_w * offset[:, 0, i, j], gamma * roi_h * offset[:, 1, i, j])``.

    Args:
        input (Tensor[N, C, H, W]): features.
        rois (Tensor[K, 5] or list of Tensor[L, 4]): boxes as in :func:`roi_align`.
        offset (Tensor[K, 2, ph, pw] or None): normalised ``(dx, dy)`` bin offsets; None is
            plain (mmcv-aligned) RoIAlign. Non-finite offsets make their samples read zero.
        output_size, spatial_scale, sampling_ratio: as in :func:`roi_align`.
        gamma (float): offset scale.
        impl (str): ``"auto"`` or ``"reference"``.

    Returns:
        Tensor[K, C, ph, pw].

    Note: the offset gradient is the derivative of this forward; mmcv's kernel differs
    for samples in the one-pixel band just outside the map, where it uses the unclamped
    coordinate.
    """
    rois, pooled, spatial_scale = _check_common(
        "deform_roi_pool", impl, input, "rois", rois, output_size, spatial_scale
    )
    if offset is not None:
        _check_bin_tensor("offset", offset, input, (rois.shape[0], 2) + pooled, "K, 2, ph, pw")
    sampling_ratio = check_int("sampling_ratio", sampling_ratio)
    gamma = check_float("gamma", gamma)
    if impl == "reference":
        return reference.deform_roi_pool(input, rois, offset, pooled, spatial_scale, sampling_ratio, gamma)
    return _deform_roi_pool_op(input, rois, offset, pooled[0], pooled[1], spatial_scale, sampling_ratio, gamma)


@script_unsupported
def modulated_deform_roi_pool(
    input: Tensor,
    rois: Boxes,
    offset: Tensor,
    mask: Tensor,
    output_size: Union[int, Tuple[int, int]] = 7,
    spatial_scale: float = 1.0,
    sampling_ratio: int = 0,
    gamma: float = 0.1,
    *,
    impl: str = "auto",
) -> Tensor:
    """Modulated deformable RoI pooling (DCNv2, https://arxiv.org/abs/1811.11168), as mmcv's
    ModulatedDeformRoIPoolPack computes it: ``deform_roi_pool(input, rois, offset, ...) * mask``.

    Args:
        offset (Tensor[K, 2, ph, pw]): as in :func:`deform_roi_pool`.
        mask (Tensor[K, 1, ph, pw]): per-bin modulation (mmcv's pack gives it through a sigmoid).
        other arguments: as in :func:`deform_roi_pool`.

    Returns:
        Tensor[K, C, ph, pw].
    """
    _check_roi_impl(impl, "modulated_deform_roi_pool")
    _check_input(input)
    pooled = pair("output_size", output_size, minimum=1)
    rois_t = _boxes_to_rois("rois", rois, input)
    check_tensor("offset", offset, ndim=4)
    _check_bin_tensor("mask", mask, input, (rois_t.shape[0], 1) + pooled, "K, 1, ph, pw")
    pooled_out = deform_roi_pool(input, rois_t, offset, pooled, spatial_scale, sampling_ratio, gamma, impl=impl)
    return pooled_out * mask


@script_unsupported
def ps_roi_pool(
    input: Tensor,
    boxes: Boxes,
    output_size: Union[int, Tuple[int, int]],
    spatial_scale: float = 1.0,
    *,
    impl: str = "auto",
) -> Tensor:
    """Position-sensitive RoI pooling (R-FCN, https://arxiv.org/abs/1605.06409), torchvision's semantics.

    Average pooling over integer bins: box corners ``round(coord * spatial_scale)`` (half away
    from zero), the RoI at least 1x1, bin ``i`` covering ``[floor(i*bin), ceil((i+1)*bin))``
    clipped to ``[0, H-1]`` (torchvision's forward clips to ``H - 1``, so the last row and
    column are never read; kept). Output channel ``c`` of bin ``(i, j)`` reads input channel
    ``(c*ph + i)*pw + j``; an empty bin is 0.

    The input gradient is the true adjoint of this forward (``<dy, y> = <dx, x>``): it
    spreads ``dy / area`` over the same clipped bins. torchvision's backward clips to ``H``/``W``
    where its forward clips to ``H - 1``/``W - 1``, so for bins touching the last row or column
    its input gradient differs from ours; ours is the derivative of the forward.

    Args:
        input (Tensor[N, C_out*ph*pw, H, W]): position-sensitive score maps.
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): as in :func:`roi_align`.
        output_size (int or (int, int)): ``(ph, pw)``.
        spatial_scale (float): feature pixels per image pixel.
        impl (str): ``"auto"`` or ``"reference"``.

    Returns:
        Tensor[K, C_out, ph, pw].
    """
    rois, pooled, spatial_scale = _check_common(
        "ps_roi_pool", impl, input, "boxes", boxes, output_size, spatial_scale
    )
    _check_position_sensitive_channels(input, pooled)
    if impl == "reference":
        return reference.ps_roi_pool(input, rois, PoolGeometry(pooled[0], pooled[1], spatial_scale))
    return _ps_roi_pool_op(input, rois, pooled[0], pooled[1], spatial_scale)


@script_unsupported
def deform_ps_roi_pool(
    input: Tensor,
    rois: Boxes,
    offset: Optional[Tensor],
    output_dim: int,
    group_size: int,
    pooled_size: int,
    part_size: Optional[int] = None,
    sample_per_part: int = 4,
    trans_std: float = 0.1,
    spatial_scale: float = 1.0,
    no_trans: bool = False,
    *,
    impl: str = "auto",
) -> Tensor:
    """Deformable position-sensitive RoI pooling (DCN, https://arxiv.org/abs/1703.06211).

    The operator of the DCN paper's R-FCN (``DeformablePSROIPooling`` in Deformable-ConvNets,
    ``deform_roi_pooling`` in mmdetection v1), with the same arguments. Each bin averages
    ``sample_per_part**2`` bilinear samples taken from its corner in steps of
    ``bin / sample_per_part``, skipping samples outside ``[-0.5, H-0.5] x [-0.5, W-0.5]``;
    output channel ``c`` of bin ``(i, j)`` reads input channel ``(c*G + gi)*G + gj`` with
    ``G = group_size``, ``gi = floor(i*G/pooled_size)``. Boxes are rounded to whole image
    pixels and span ``round(x1)*s - 0.5`` to ``(round(x2) + 1)*s - 0.5``.

    Args:
        input (Tensor[N, output_dim*group_size**2, H, W]): score maps.
        rois (Tensor[K, 5] or list of Tensor[L, 4]): boxes as in :func:`roi_align`.
        offset (Tensor[K, 2*Q, part_size, part_size] or None): normalised ``(dx, dy)`` per
            part cell for Q coordinate sets ("classes"); output channel ``c`` uses set
            ``c // (output_dim / Q)``. Bin ``(i, j)`` uses part cell
            ``(floor(i/pooled_size*part_size), ...)`` and moves by
            ``trans_std * offset * roi size``. Ignored (may be None) when ``no_trans``.
        output_dim (int): output channels.
        group_size (int): position-sensitive grid size G.
        pooled_size (int): output bins per side.
        part_size (int or None): offset grid size; None means ``pooled_size``.
        sample_per_part (int): samples per bin along each axis.
        trans_std (float): offset scale (0.1 in the paper).
        spatial_scale (float): feature pixels per image pixel.
        no_trans (bool): plain (non-deformable) PS RoI pooling with this sampling rule.
        impl (str): ``"auto"`` or ``"reference"``.

    Returns:
        Tensor[K, output_dim, pooled_size, pooled_size].

    Note: gradients are the exact derivatives of this forward, so a sample clamped to the
    border gets no offset gradient (the original kernel differentiates the unclamped
    interpolation there), and points on whole pixels get the one-sided derivative (the
    original's ``ceil`` gives zero there).
    """
    _check_roi_impl(impl, "deform_ps_roi_pool")
    _check_input(input)
    rois_t = _boxes_to_rois("rois", rois, input)
    output_dim = check_int("output_dim", output_dim, minimum=1)
    group_size = check_int("group_size", group_size, minimum=1)
    pooled_size = check_int("pooled_size", pooled_size, minimum=1)
    part_size = pooled_size if part_size is None else check_int("part_size", part_size, minimum=1)
    sample_per_part = check_int("sample_per_part", sample_per_part, minimum=1)
    trans_std = check_float("trans_std", trans_std)
    spatial_scale = check_positive_float("spatial_scale", spatial_scale)
    no_trans = check_bool("no_trans", no_trans)
    if input.shape[1] != output_dim * group_size * group_size:
        raise ValueError(
            f"input must have output_dim * group_size**2 = {output_dim * group_size * group_size} channels, "
            f"got {input.shape[1]}"
        )
    if no_trans:
        offset = None
    elif offset is None:
        raise ValueError("offset must be a Tensor[K, 2*Q, part_size, part_size] unless no_trans=True, got None")
    else:
        check_tensor("offset", offset, ndim=4)
        check_same("offset", offset, "input", input)
        k = rois_t.shape[0]
        if (
            offset.shape[0] != k
            or offset.shape[1] == 0
            or offset.shape[1] % 2
            or tuple(offset.shape[2:]) != (part_size, part_size)
        ):
            raise ValueError(
                f"offset must have shape ({k}, 2*Q, {part_size}, {part_size}) (K, 2*Q, part_size, part_size), "
                f"got {tuple(offset.shape)}"
            )
        if output_dim % (offset.shape[1] // 2):
            raise ValueError(
                f"output_dim ({output_dim}) must be divisible by the offset's coordinate sets Q = "
                f"offset.shape[1] // 2 = {offset.shape[1] // 2}"
            )
    geometry = _deform_ps_geometry(output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std,
                                   spatial_scale)
    if impl == "reference":
        return reference.deform_ps_roi_pool(input, rois_t, offset, geometry)
    return _deform_ps_roi_pool_op(input, rois_t, offset, output_dim, group_size, pooled_size, part_size,
                                  sample_per_part, trans_std, spatial_scale)
