"""RoI operators: ``roi_align``, ``deform_roi_pool``, ``modulated_deform_roi_pool``,
``ps_roi_pool`` and ``deform_ps_roi_pool``.

Semantics are those of torchvision (``roi_align``, ``ps_roi_pool``), mmcv
(``deform_roi_pool``, ``modulated_deform_roi_pool``) and the DCN paper's CUDA kernel
(``deform_ps_roi_pool``); :mod:`.reference` documents each rule. Every operator takes
``impl="auto" | "reference"``:

* ``"reference"``: the plain PyTorch code of :mod:`.reference`, differentiated by autograd
  (traceable by ``torch.jit.trace``/``torch.onnx``; the adaptive sampling grid of
  ``sampling_ratio <= 0`` is then fixed at trace time);
* ``"auto"``: the ``convzoo::<name>`` custom op (one node for ``torch.compile`` and
  ``torch.export``), with a hand-written backward that keeps no per-sample tensors alive.

There is no Triton kernel for these operators; ``impl="triton"`` is refused with a
``ValueError``.

Gradients flow to ``input``, ``offset`` and ``mask``; never to the boxes.
"""
import math
from typing import Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from .._checks import check_float, check_impl, check_int, check_same, check_tensor, pair
from .._numba import kernels
from . import reference

__all__ = ["roi_align", "deform_roi_pool", "modulated_deform_roi_pool", "ps_roi_pool", "deform_ps_roi_pool"]

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


def _check_scale(spatial_scale) -> float:
    if isinstance(spatial_scale, bool) or not isinstance(spatial_scale, (int, float)):
        raise TypeError(f"spatial_scale must be a float, got {spatial_scale!r}")
    if not math.isfinite(spatial_scale) or spatial_scale <= 0:
        raise ValueError(f"spatial_scale must be a finite number > 0, got {spatial_scale!r}")
    return float(spatial_scale)


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


def _single_group(bins: int, device) -> Tensor:
    return torch.zeros(bins, dtype=torch.long, device=device)


# --------------------------------------------------------------------------------------
# Autograd shared by the two offset-taking pools (deform_roi_pool, deform_ps_roi_pool),
# whose inputs are (input, rois, offset or None, *non-tensor arguments)
# --------------------------------------------------------------------------------------
def _fake_input_offset_grads(input: Tensor, offset: Optional[Tensor], need_input_grad: bool,
                             need_offset_grad: bool) -> Tuple[Tensor, Tensor]:
    """Fake kernel's (grad_input, grad_offset): shaped like the inputs, or empty where not needed."""
    grad_input = torch.empty_like(input, memory_format=torch.contiguous_format) if need_input_grad else input.new_empty(0)
    grad_offset = torch.empty_like(offset) if (need_offset_grad and offset is not None) else input.new_empty(0)
    return grad_input, grad_offset


def _save_input_rois_offset(ctx, inputs, output):
    input, rois, offset, *args = inputs
    ctx.has_offset = offset is not None
    ctx.save_for_backward(input, rois, offset)
    ctx.args = args


def _offset_pool_backward(backward_op):
    """Autograd backward calling ``backward_op(grad, input, rois, offset, *args, need_input, need_offset)``."""

    def backward(ctx, grad):
        input, rois, offset = ctx.saved_tensors
        need_input = ctx.needs_input_grad[0]
        need_offset = ctx.has_offset and ctx.needs_input_grad[2]
        no_arg_grads = (None,) * len(ctx.args)
        if not (need_input or need_offset):
            return (None, None, None) + no_arg_grads
        grad_input, grad_offset = backward_op(
            grad, input, rois, offset if ctx.has_offset else None, *ctx.args, need_input, need_offset
        )
        return (grad_input if need_input else None, None, grad_offset if need_offset else None) + no_arg_grads

    return backward


# --------------------------------------------------------------------------------------
# convzoo::roi_align
# --------------------------------------------------------------------------------------
@torch.library.custom_op("convzoo::roi_align", mutates_args=())
def _roi_align_op(
    input: Tensor, rois: Tensor, pooled_h: int, pooled_w: int, spatial_scale: float, sampling_ratio: int, aligned: bool
) -> Tensor:
    with torch.no_grad():
        out = reference.roi_align(
            _upcast(input), rois, (pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned,
            pool=reference.bilinear_pool_fast,
        )
    return out.to(input.dtype).contiguous()


@_roi_align_op.register_fake
def _(input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned):
    return input.new_empty(rois.shape[0], input.shape[1], pooled_h, pooled_w)


@torch.library.custom_op("convzoo::roi_align_backward", mutates_args=())
def _roi_align_backward_op(
    grad: Tensor, input: Tensor, rois: Tensor, pooled_h: int, pooled_w: int, spatial_scale: float,
    sampling_ratio: int, aligned: bool,
) -> Tensor:
    work = _upcast(input)
    height, width = input.shape[-2:]
    batch_index, y, x, weight = reference.roi_align_samples(
        rois.to(work.dtype), height, width, (pooled_h, pooled_w), spatial_scale, sampling_ratio, aligned
    )
    grad_input, _, _ = reference.bilinear_pool_backward(
        _upcast(grad).reshape(rois.shape[0], input.shape[1], pooled_h * pooled_w), work, batch_index,
        _single_group(y.shape[2], input.device), 1, y, x, weight, need_input_grad=True, need_point_grad=False,
    )
    return grad_input.to(input.dtype).contiguous()


@_roi_align_backward_op.register_fake
def _(grad, input, rois, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned):
    return torch.empty_like(input, memory_format=torch.contiguous_format)


def _roi_align_setup(ctx, inputs, output):
    input, rois, *args = inputs
    ctx.save_for_backward(input, rois)
    ctx.args = args


def _roi_align_backward(ctx, grad):
    input, rois = ctx.saved_tensors
    grad_input = _roi_align_backward_op(grad, input, rois, *ctx.args) if ctx.needs_input_grad[0] else None
    return grad_input, None, None, None, None, None, None


_roi_align_op.register_autograd(_roi_align_backward, setup_context=_roi_align_setup)


# --------------------------------------------------------------------------------------
# convzoo::deform_roi_pool
# --------------------------------------------------------------------------------------
@torch.library.custom_op("convzoo::deform_roi_pool", mutates_args=())
def _deform_roi_pool_op(
    input: Tensor, rois: Tensor, offset: Optional[Tensor], pooled_h: int, pooled_w: int, spatial_scale: float,
    sampling_ratio: int, gamma: float,
) -> Tensor:
    with torch.no_grad():
        out = reference.deform_roi_pool(
            _upcast(input), rois, _upcast(offset), (pooled_h, pooled_w), spatial_scale, sampling_ratio, gamma,
            pool=reference.bilinear_pool_fast,
        )
    return out.to(input.dtype).contiguous()


@_deform_roi_pool_op.register_fake
def _(input, rois, offset, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma):
    return input.new_empty(rois.shape[0], input.shape[1], pooled_h, pooled_w)


@torch.library.custom_op("convzoo::deform_roi_pool_backward", mutates_args=())
def _deform_roi_pool_backward_op(
    grad: Tensor, input: Tensor, rois: Tensor, offset: Optional[Tensor], pooled_h: int, pooled_w: int,
    spatial_scale: float, sampling_ratio: int, gamma: float, need_input_grad: bool, need_offset_grad: bool,
) -> Tuple[Tensor, Tensor]:
    work = _upcast(input)
    work_offset = _upcast(offset)
    height, width = input.shape[-2:]
    work_rois = rois.to(work.dtype)
    batch_index, y, x, weight = reference.deform_roi_pool_samples(
        work_rois, height, width, (pooled_h, pooled_w), spatial_scale, sampling_ratio, work_offset, gamma
    )
    need_offset_grad = need_offset_grad and offset is not None
    grad_input, grad_y, grad_x = reference.bilinear_pool_backward(
        _upcast(grad).reshape(rois.shape[0], input.shape[1], pooled_h * pooled_w), work, batch_index,
        _single_group(y.shape[2], input.device), 1, y, x, weight, need_input_grad, need_offset_grad,
    )
    if need_offset_grad:
        # the bin origin moves by gamma * roi size * offset; every sample of the bin moves with it
        roi_w = (work_rois[:, 3] * spatial_scale - 0.5) - (work_rois[:, 1] * spatial_scale - 0.5)
        roi_h = (work_rois[:, 4] * spatial_scale - 0.5) - (work_rois[:, 2] * spatial_scale - 0.5)
        grad_offset = torch.stack(
            [grad_x.squeeze(1) * (gamma * roi_w).view(-1, 1), grad_y.squeeze(1) * (gamma * roi_h).view(-1, 1)],
            dim=1,
        ).reshape(offset.shape).to(offset.dtype)
    else:
        grad_offset = input.new_empty(0)
    grad_input = grad_input.to(input.dtype).contiguous() if need_input_grad else input.new_empty(0)
    return grad_input, grad_offset


@_deform_roi_pool_backward_op.register_fake
def _(grad, input, rois, offset, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma, need_input_grad, need_offset_grad):
    return _fake_input_offset_grads(input, offset, need_input_grad, need_offset_grad)


_deform_roi_pool_op.register_autograd(
    _offset_pool_backward(_deform_roi_pool_backward_op), setup_context=_save_input_rois_offset
)


# --------------------------------------------------------------------------------------
# convzoo::ps_roi_pool
# --------------------------------------------------------------------------------------
def _cpu_kernels(tensor: Tensor):
    """The Numba ps_roi_pool kernels for CPU tensors; None on other devices or without Numba."""
    return kernels(__name__ + ".cpu") if tensor.device.type == "cpu" else None


@torch.library.custom_op("convzoo::ps_roi_pool", mutates_args=())
def _ps_roi_pool_op(input: Tensor, rois: Tensor, pooled_h: int, pooled_w: int, spatial_scale: float) -> Tensor:
    cpu = _cpu_kernels(input)
    if cpu is not None:
        return cpu.ps_roi_pool(input, rois, (pooled_h, pooled_w), spatial_scale)
    with torch.no_grad():
        return reference.ps_roi_pool(input, rois, (pooled_h, pooled_w), spatial_scale)


@_ps_roi_pool_op.register_fake
def _(input, rois, pooled_h, pooled_w, spatial_scale):
    return input.new_empty(rois.shape[0], input.shape[1] // (pooled_h * pooled_w), pooled_h, pooled_w)


@torch.library.custom_op("convzoo::ps_roi_pool_backward", mutates_args=())
def _ps_roi_pool_backward_op(
    grad: Tensor, rois: Tensor, batch: int, channels: int, height: int, width: int, pooled_h: int, pooled_w: int,
    spatial_scale: float,
) -> Tensor:
    shape = torch.Size((batch, channels, height, width))
    cpu = _cpu_kernels(grad)
    if cpu is not None:
        return cpu.ps_roi_pool_backward(grad, rois, shape, (pooled_h, pooled_w), spatial_scale)
    return reference.ps_roi_pool_backward(grad, rois, shape, (pooled_h, pooled_w), spatial_scale)


@_ps_roi_pool_backward_op.register_fake
def _(grad, rois, batch, channels, height, width, pooled_h, pooled_w, spatial_scale):
    return grad.new_empty(batch, channels, height, width)


def _ps_roi_pool_setup(ctx, inputs, output):
    input, rois, *args = inputs
    ctx.save_for_backward(rois)
    ctx.input_shape = tuple(input.shape)
    ctx.args = args


def _ps_roi_pool_backward(ctx, grad):
    (rois,) = ctx.saved_tensors
    grad_input = _ps_roi_pool_backward_op(grad, rois, *ctx.input_shape, *ctx.args) if ctx.needs_input_grad[0] else None
    return grad_input, None, None, None, None


_ps_roi_pool_op.register_autograd(_ps_roi_pool_backward, setup_context=_ps_roi_pool_setup)


# --------------------------------------------------------------------------------------
# convzoo::deform_ps_roi_pool
# --------------------------------------------------------------------------------------
@torch.library.custom_op("convzoo::deform_ps_roi_pool", mutates_args=())
def _deform_ps_roi_pool_op(
    input: Tensor, rois: Tensor, offset: Optional[Tensor], output_dim: int, group_size: int, pooled_size: int,
    part_size: int, sample_per_part: int, trans_std: float, spatial_scale: float,
) -> Tensor:
    with torch.no_grad():
        out = reference.deform_ps_roi_pool(
            _upcast(input), rois, _upcast(offset), output_dim, group_size, pooled_size, part_size, sample_per_part,
            trans_std, spatial_scale, pool=reference.bilinear_pool_fast,
        )
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
    work = _upcast(input)
    work_offset = _upcast(offset)
    height, width = input.shape[-2:]
    work_rois = rois.to(work.dtype)
    batch_index, y, x, weight = reference.deform_ps_roi_pool_samples(
        work_rois, height, width, work_offset, pooled_size, part_size, sample_per_part, trans_std, spatial_scale
    )
    bin_group = reference.dcn_bin_groups(pooled_size, group_size, work.dtype, input.device)
    need_offset_grad = need_offset_grad and offset is not None
    grad_input, grad_y, grad_x = reference.bilinear_pool_backward(
        _upcast(grad).reshape(rois.shape[0], output_dim, pooled_size * pooled_size), work, batch_index, bin_group, group_size * group_size,
        y, x, weight, need_input_grad, need_offset_grad,
    )
    if need_offset_grad:
        grad_offset = _deform_ps_offset_grad(grad_y, grad_x, work_rois, work_offset, pooled_size, part_size,
                                             trans_std, spatial_scale).to(offset.dtype)
    else:
        grad_offset = input.new_empty(0)
    grad_input = grad_input.to(input.dtype).contiguous() if need_input_grad else input.new_empty(0)
    return grad_input, grad_offset


def _deform_ps_offset_grad(grad_y, grad_x, rois, offset, pooled_size, part_size, trans_std, spatial_scale):
    """Chain the per-bin point gradients (K, Q, P) to ``offset`` (K, 2Q, part, part): each bin's
    samples move by ``trans_std * roi size * offset[part cell of the bin]``."""
    start_w = reference.round_half_away(rois[:, 1]) * spatial_scale - 0.5
    start_h = reference.round_half_away(rois[:, 2]) * spatial_scale - 0.5
    roi_w = ((reference.round_half_away(rois[:, 3]) + 1.0) * spatial_scale - 0.5 - start_w).clamp(min=0.1)
    roi_h = ((reference.round_half_away(rois[:, 4]) + 1.0) * spatial_scale - 0.5 - start_h).clamp(min=0.1)
    k, coord_sets = grad_x.shape[:2]
    bins = torch.arange(pooled_size, dtype=rois.dtype, device=rois.device)
    part = torch.floor(bins / pooled_size * part_size).long().clamp(0, part_size - 1)
    cell = (part.view(-1, 1) * part_size + part.view(1, -1)).reshape(-1)  # part cell of each bin
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
    return _fake_input_offset_grads(input, offset, need_input_grad, need_offset_grad)


_deform_ps_roi_pool_op.register_autograd(
    _offset_pool_backward(_deform_ps_roi_pool_backward_op), setup_context=_save_input_rois_offset
)


# --------------------------------------------------------------------------------------
# FLOP formulas (2 * multiply-adds, the FlopCounterMode convention)
# --------------------------------------------------------------------------------------
def _register_flop_formulas() -> None:
    from torch.utils.flop_counter import register_flop_formula

    def bilinear_flops(out_shape, samples: int) -> int:
        # each sample: 4 neighbours, one multiply-add each, per output element
        return 2 * 4 * samples * math.prod(out_shape)

    @register_flop_formula(torch.ops.convzoo.roi_align)
    def _(input_shape, rois_shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, aligned, *, out_shape=None, **kw):
        # adaptive grids (sampling_ratio <= 0) depend on the boxes: counted as 2x2 samples
        return bilinear_flops(out_shape, sampling_ratio**2 if sampling_ratio > 0 else 4)

    @register_flop_formula(torch.ops.convzoo.deform_roi_pool)
    def _(input_shape, rois_shape, offset_shape, pooled_h, pooled_w, spatial_scale, sampling_ratio, gamma, *,
          out_shape=None, **kw):
        return bilinear_flops(out_shape, sampling_ratio**2 if sampling_ratio > 0 else 4)

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
    _check_roi_impl(impl, "roi_align")
    _check_input(input)
    rois = _boxes_to_rois("boxes", boxes, input)
    pooled = pair("output_size", output_size, minimum=1)
    spatial_scale = _check_scale(spatial_scale)
    sampling_ratio = check_int("sampling_ratio", sampling_ratio)
    if not isinstance(aligned, bool):
        raise TypeError(f"aligned must be a bool, got {aligned!r}")
    if impl == "reference":
        return reference.roi_align(input, rois, pooled, spatial_scale, sampling_ratio, aligned)
    return _roi_align_op(input, rois, pooled[0], pooled[1], spatial_scale, sampling_ratio, aligned)


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
    _check_roi_impl(impl, "deform_roi_pool")
    _check_input(input)
    rois = _boxes_to_rois("rois", rois, input)
    pooled = pair("output_size", output_size, minimum=1)
    if offset is not None:
        _check_bin_tensor("offset", offset, input, (rois.shape[0], 2) + pooled, "K, 2, ph, pw")
    spatial_scale = _check_scale(spatial_scale)
    sampling_ratio = check_int("sampling_ratio", sampling_ratio)
    gamma = check_float("gamma", gamma)
    if impl == "reference":
        return reference.deform_roi_pool(input, rois, offset, pooled, spatial_scale, sampling_ratio, gamma)
    return _deform_roi_pool_op(input, rois, offset, pooled[0], pooled[1], spatial_scale, sampling_ratio, gamma)


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

    Args:
        input (Tensor[N, C_out*ph*pw, H, W]): position-sensitive score maps.
        boxes (Tensor[K, 5] or list of Tensor[L, 4]): as in :func:`roi_align`.
        output_size (int or (int, int)): ``(ph, pw)``.
        spatial_scale (float): feature pixels per image pixel.
        impl (str): ``"auto"`` or ``"reference"``.

    Returns:
        Tensor[K, C_out, ph, pw].
    """
    _check_roi_impl(impl, "ps_roi_pool")
    _check_input(input)
    rois = _boxes_to_rois("boxes", boxes, input)
    pooled = pair("output_size", output_size, minimum=1)
    if input.shape[1] % (pooled[0] * pooled[1]):
        raise ValueError(
            f"input channels must be a multiple of output_size[0] * output_size[1] = {pooled[0] * pooled[1]}, "
            f"got {input.shape[1]}"
        )
    spatial_scale = _check_scale(spatial_scale)
    if impl == "reference":
        return reference.ps_roi_pool(input, rois, pooled, spatial_scale)
    return _ps_roi_pool_op(input, rois, pooled[0], pooled[1], spatial_scale)


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
    spatial_scale = _check_scale(spatial_scale)
    if not isinstance(no_trans, bool):
        raise TypeError(f"no_trans must be a bool, got {no_trans!r}")
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
    args = (output_dim, group_size, pooled_size, part_size, sample_per_part, trans_std, spatial_scale)
    if impl == "reference":
        return reference.deform_ps_roi_pool(input, rois_t, offset, *args)
    return _deform_ps_roi_pool_op(input, rois_t, offset, *args)
