"""RoI pooling modules.

torchvision's modules (``forward(input, boxes)``, boxes a Tensor[K, 5] or a list of
Tensor[L, 4]): :class:`RoIAlign`, :class:`RoIPool`, :class:`PSRoIAlign`, :class:`PSRoIPool` and
:class:`MultiScaleRoIAlign` (the FPN level mapper of detection heads).

mmcv's modules, with mmcv's names for mmcv's semantics:

* :class:`DeformRoIPool`: ``forward(input, rois, offset=None)``, offsets passed in.
* :class:`DeformRoIPoolPack`: learns the offsets with ``offset_fc`` from a first pooling
  without offsets: ``forward(input, rois)``.
* :class:`ModulatedDeformRoIPool`: ``forward(input, rois, offset, mask)``, offsets and mask
  passed in; output ``deform_roi_pool(...) * mask``.
* :class:`ModulatedDeformRoIPoolPack`: learns offsets (``offset_fc``) and a sigmoid mask
  (``mask_fc``): ``forward(input, rois)``.

The DCN paper's deformable position-sensitive pooling: :class:`DeformPSRoIPool` (offsets passed
in, or none for plain PS pooling with the same sampling) and :class:`DeformPSRoIPoolPack`
(offsets learned by ``offset_fc`` from a first, non-deformed pooling; mmdetection v1's
``DeformRoIPoolingPack``).

A pack holds its plain pool (composition: ``pack.pool``) and keeps mmcv's parameter names. The
last layer of every offset/mask predictor is zero-initialised, so a fresh pack starts as plain
RoI pooling (mask 0.5 for the modulated one), as in mmcv.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch import Tensor

from .. import ops
from ..ops._checks import check_bool, check_int, check_positive_float, pair

__all__ = [
    "RoIAlign",
    "RoIPool",
    "PSRoIAlign",
    "PSRoIPool",
    "MultiScaleRoIAlign",
    "DeformRoIPool",
    "DeformRoIPoolPack",
    "ModulatedDeformRoIPool",
    "ModulatedDeformRoIPoolPack",
    "DeformPSRoIPool",
    "DeformPSRoIPoolPack",
]

Boxes = Union[Tensor, Sequence[Tensor]]


def _fc_stack(in_features: int, hidden: int, out_features: int, hidden_layers: int, device, dtype) -> nn.Sequential:
    """``Linear, ReLU`` x ``hidden_layers`` then a final ``Linear`` (mmcv's offset_fc layout)."""
    layers = []
    features = in_features
    for _ in range(hidden_layers):
        layers += [nn.Linear(features, hidden, device=device, dtype=dtype), nn.ReLU(inplace=True)]
        features = hidden
    layers.append(nn.Linear(features, out_features, device=device, dtype=dtype))
    return nn.Sequential(*layers)


def _reset_fc_stack(stack: nn.Sequential) -> None:
    """Default init for every Linear, zeros for the last one."""
    linears = [m for m in stack if isinstance(m, nn.Linear)]
    for linear in linears:
        linear.reset_parameters()
    nn.init.zeros_(linears[-1].weight)
    nn.init.zeros_(linears[-1].bias)


def _check_channels(input: Tensor, expected: int, what: str) -> None:
    if input.dim() != 4 or input.shape[1] != expected:
        raise ValueError(f"input must have shape (N, {expected}, H, W) ({what}), got {tuple(input.shape)}")


# --------------------------------------------------------------------------------------
# torchvision's modules
# --------------------------------------------------------------------------------------
class RoIAlign(nn.Module):
    """:func:`convzoo.ops.roi_align` as a module (torchvision's ``RoIAlign``).

    Shape:
        input (N, C, H, W), boxes (K, 5) or a list of (L, 4) -> (K, C, ph, pw).
    """

    def __init__(self, output_size: Union[int, Tuple[int, int]], spatial_scale: float, sampling_ratio: int,
                 aligned: bool = False):
        super().__init__()
        self.output_size = pair("output_size", output_size, minimum=1)
        self.spatial_scale = check_positive_float("spatial_scale", spatial_scale)
        self.sampling_ratio = check_int("sampling_ratio", sampling_ratio)
        self.aligned = check_bool("aligned", aligned)
        self.impl = "auto"

    def forward(self, input: Tensor, boxes: Boxes) -> Tensor:
        return ops.roi_align(input, boxes, self.output_size, self.spatial_scale, self.sampling_ratio, self.aligned,
                             impl=self.impl)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}, aligned={self.aligned}")


class PSRoIAlign(nn.Module):
    """:func:`convzoo.ops.ps_roi_align` as a module (torchvision's ``PSRoIAlign``).

    Shape:
        input (N, C_out*ph*pw, H, W), boxes (K, 5) or a list of (L, 4) -> (K, C_out, ph, pw).
    """

    def __init__(self, output_size: Union[int, Tuple[int, int]], spatial_scale: float, sampling_ratio: int):
        super().__init__()
        self.output_size = pair("output_size", output_size, minimum=1)
        self.spatial_scale = check_positive_float("spatial_scale", spatial_scale)
        self.sampling_ratio = check_int("sampling_ratio", sampling_ratio)
        self.impl = "auto"

    def forward(self, input: Tensor, boxes: Boxes) -> Tensor:
        return ops.ps_roi_align(input, boxes, self.output_size, self.spatial_scale, self.sampling_ratio,
                                impl=self.impl)

    def extra_repr(self) -> str:
        return (f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
                f"sampling_ratio={self.sampling_ratio}")


class RoIPool(nn.Module):
    """:func:`convzoo.ops.roi_pool` as a module (torchvision's ``RoIPool``).

    Shape:
        input (N, C, H, W), boxes (K, 5) or a list of (L, 4) -> (K, C, ph, pw).
    """

    def __init__(self, output_size: Union[int, Tuple[int, int]], spatial_scale: float):
        super().__init__()
        self.output_size = pair("output_size", output_size, minimum=1)
        self.spatial_scale = check_positive_float("spatial_scale", spatial_scale)
        self.impl = "auto"

    def forward(self, input: Tensor, boxes: Boxes) -> Tensor:
        return ops.roi_pool(input, boxes, self.output_size, self.spatial_scale, impl=self.impl)

    def extra_repr(self) -> str:
        return f"output_size={self.output_size}, spatial_scale={self.spatial_scale}"


class PSRoIPool(RoIPool):
    """:func:`convzoo.ops.ps_roi_pool` as a module (torchvision's ``PSRoIPool``).

    Shape:
        input (N, C_out*ph*pw, H, W), boxes (K, 5) or a list of (L, 4) -> (K, C_out, ph, pw).
    """

    def forward(self, input: Tensor, boxes: Boxes) -> Tensor:
        return ops.ps_roi_pool(input, boxes, self.output_size, self.spatial_scale, impl=self.impl)


class MultiScaleRoIAlign(nn.Module):
    """RoIAlign over the levels of a feature pyramid (torchvision's ``MultiScaleRoIAlign``).

    Each level's scale is inferred from its size against the largest image,
    ``2 ** round(log2(feature size / image size))``. A box of area ``A`` goes to level
    ``floor(canonical_level + log2(sqrt(A) / canonical_scale + 1e-6))`` (FPN paper, eq. 1),
    clamped to the levels given; with one level every box uses it. Pooling is
    :func:`convzoo.ops.roi_align` with ``aligned=False``, as in torchvision.

    Args:
        featmap_names (list of str): the keys of the feature maps to pool from, finest first.
        output_size (int or (int, int)): ``(ph, pw)``.
        sampling_ratio (int): as in :func:`convzoo.ops.roi_align`.
        canonical_scale (int), canonical_level (int): the FPN mapping's constants.

    Shape:
        x: dict of (N, C, H_l, W_l); boxes: list of N (L_n, 4) in image coordinates;
        image_shapes: list of N ``(height, width)`` -> (sum L_n, C, ph, pw).
    """

    def __init__(self, featmap_names: List[str], output_size: Union[int, Tuple[int, int]], sampling_ratio: int, *,
                 canonical_scale: int = 224, canonical_level: int = 4):
        super().__init__()
        if isinstance(featmap_names, str) or not all(isinstance(n, str) for n in featmap_names) or not featmap_names:
            raise TypeError(f"featmap_names must be a non-empty list of str, got {featmap_names!r}")
        self.featmap_names = list(featmap_names)
        self.output_size = pair("output_size", output_size, minimum=1)
        self.sampling_ratio = check_int("sampling_ratio", sampling_ratio)
        self.canonical_scale = check_int("canonical_scale", canonical_scale, minimum=1)
        self.canonical_level = check_int("canonical_level", canonical_level)
        self.impl = "auto"

    @staticmethod
    def infer_scale(feature: Tensor, original_size: Tuple[int, int]) -> float:
        """``2 ** round(log2(size / original))``, the same along both axes."""
        scales = [2.0 ** round(math.log2(s / o)) for s, o in zip(feature.shape[-2:], original_size)]
        if scales[0] != scales[1]:
            raise ValueError(f"feature map of size {tuple(feature.shape[-2:])} has different scales along its axes "
                             f"for images of size {tuple(original_size)}: {scales}")
        return scales[0]

    def map_levels(self, boxes: List[Tensor], levels: Tuple[float, float]) -> Tensor:
        """The pyramid level (0 = finest) of every box: (sum L_n,) int64."""
        k_min, k_max = levels
        concat = torch.cat(list(boxes))
        area = (concat[:, 2] - concat[:, 0]) * (concat[:, 3] - concat[:, 1])
        target = torch.floor(self.canonical_level + torch.log2(torch.sqrt(area) / self.canonical_scale + 1e-6))
        return (target.clamp(min=k_min, max=k_max) - k_min).to(torch.int64)

    def forward(self, x: Dict[str, Tensor], boxes: List[Tensor], image_shapes: List[Tuple[int, int]]) -> Tensor:
        features = [value for key, value in x.items() if key in self.featmap_names]
        if not features:
            raise ValueError(f"x holds none of featmap_names {self.featmap_names}; its keys are {list(x)}")
        if not isinstance(boxes, (list, tuple)):
            raise TypeError(f"boxes must be a list of Tensor[L, 4], one per image, got {type(boxes).__name__}")
        original = tuple(max(sizes) for sizes in zip(*image_shapes))
        scales = [self.infer_scale(feature, original) for feature in features]
        if len(features) == 1:
            return ops.roi_align(features[0], list(boxes), self.output_size, scales[0], self.sampling_ratio,
                                 impl=self.impl)
        levels = self.map_levels(boxes, (-math.log2(scales[0]), -math.log2(scales[-1])))
        rois = torch.cat([torch.cat([torch.full((len(b), 1), i, dtype=b.dtype, device=b.device), b], dim=1)
                          for i, b in enumerate(boxes)])
        first = features[0]
        result = first.new_zeros((rois.shape[0], first.shape[1]) + self.output_size)
        for level, (feature, scale) in enumerate(zip(features, scales)):
            index = torch.nonzero(levels == level).squeeze(1)
            pooled = ops.roi_align(feature, rois[index], self.output_size, scale, self.sampling_ratio,
                                   impl=self.impl)
            result = result.index_copy(0, index, pooled.to(result.dtype))
        return result

    def extra_repr(self) -> str:
        return (f"featmap_names={self.featmap_names}, output_size={self.output_size}, "
                f"sampling_ratio={self.sampling_ratio}")


# --------------------------------------------------------------------------------------
# mmcv's modules
# --------------------------------------------------------------------------------------
class _DeformRoIPoolBase(nn.Module):
    """The arguments of mmcv's deformable RoI poolings (no forward of its own)."""

    def __init__(
        self,
        output_size: Union[int, Tuple[int, int]],
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
    ):
        super().__init__()
        self.output_size = pair("output_size", output_size, minimum=1)
        self.spatial_scale = float(spatial_scale)
        self.sampling_ratio = int(sampling_ratio)
        self.gamma = float(gamma)
        self.impl = "auto"

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}"
        )


class DeformRoIPool(_DeformRoIPoolBase):
    """Deformable RoI pooling with given offsets (mmcv's ``DeformRoIPool``).

    Args:
        output_size (int or (int, int)): ``(ph, pw)``.
        spatial_scale (float): feature pixels per image pixel.
        sampling_ratio (int): samples per bin and axis; ``<= 0`` adaptive.
        gamma (float): offset scale.

    Shape:
        input (N, C, H, W), rois (K, 5) ``(batch_index, x1, y1, x2, y2)``, offset (K, 2, ph, pw)
        or None -> (K, C, ph, pw).
    """

    def forward(self, input: Tensor, rois: Tensor, offset: Optional[Tensor] = None) -> Tensor:
        return ops.deform_roi_pool(input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio,
                                   self.gamma, impl=self.impl)


class _Pack(nn.Module):
    """A module that holds its plain pooling as ``self.pool`` (composition) and forwards ``impl``."""

    pool: nn.Module

    @property
    def impl(self) -> str:
        return self.pool.impl

    @impl.setter
    def impl(self, value: str) -> None:
        self.pool.impl = value


class DeformRoIPoolPack(_Pack):
    """Deformable RoI pooling that predicts its offsets (mmcv's ``DeformRoIPoolPack``).

    A first pooling without offsets, flattened, goes through ``offset_fc`` (Linear-ReLU-
    Linear-ReLU-Linear, last layer zero-initialised) to give (K, 2, ph, pw) offsets for the
    second pooling.

    Args:
        output_size, spatial_scale, sampling_ratio, gamma: as in :class:`DeformRoIPool`.
        output_channels (int): channels C of the input.
        deform_fc_channels (int): width of the hidden fc layers.

    Shape:
        input (N, C, H, W), rois (K, 5) -> (K, C, ph, pw).
    """

    def __init__(
        self,
        output_size: Union[int, Tuple[int, int]],
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.pool = DeformRoIPool(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_size = self.pool.output_size
        self.output_channels = int(output_channels)
        self.deform_fc_channels = int(deform_fc_channels)
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = _fc_stack(bins * self.output_channels, self.deform_fc_channels, bins * 2, 2, device, dtype)
        _reset_fc_stack(self.offset_fc)

    def reset_parameters(self) -> None:
        _reset_fc_stack(self.offset_fc)

    def _predict_offset(self, pooled: Tensor) -> Tensor:
        return self.offset_fc(pooled.flatten(1)).view(pooled.shape[0], 2, *self.output_size)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        _check_channels(input, self.output_channels, "output_channels")
        pooled = self.pool(input, rois)
        return self.pool(input, rois, self._predict_offset(pooled))

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, output_channels={self.output_channels}, "
            f"deform_fc_channels={self.deform_fc_channels}, spatial_scale={self.pool.spatial_scale}, "
            f"sampling_ratio={self.pool.sampling_ratio}, gamma={self.pool.gamma}"
        )


class ModulatedDeformRoIPool(_DeformRoIPoolBase):
    """Modulated deformable RoI pooling (DCNv2) with given offsets and mask:
    ``deform_roi_pool(input, rois, offset) * mask`` (:func:`convzoo.ops.modulated_deform_roi_pool`).

    Args:
        output_size, spatial_scale, sampling_ratio, gamma: as in :class:`DeformRoIPool`.

    Shape:
        input (N, C, H, W), rois (K, 5), offset (K, 2, ph, pw), mask (K, 1, ph, pw) -> (K, C, ph, pw).
    """

    def forward(self, input: Tensor, rois: Tensor, offset: Tensor, mask: Tensor) -> Tensor:
        return ops.modulated_deform_roi_pool(input, rois, offset, mask, self.output_size, self.spatial_scale,
                                             self.sampling_ratio, self.gamma, impl=self.impl)


class ModulatedDeformRoIPoolPack(DeformRoIPoolPack):
    """Modulated deformable RoI pooling (DCNv2) with learned offsets and mask, mmcv's
    ``ModulatedDeformRoIPoolPack`` (same parameter names: ``offset_fc``, ``mask_fc``).

    ``mask_fc`` is Linear-ReLU-Linear-Sigmoid with its last Linear zero-initialised; the
    output is ``deform_roi_pool(input, rois, offset) * mask``.

    Args:
        output_size (int or (int, int)): ``(ph, pw)``.
        output_channels (int): channels C of the input.
        deform_fc_channels (int): width of the hidden fc layers.
        spatial_scale, sampling_ratio, gamma: as in :class:`DeformRoIPool`.

    Shape:
        input (N, C, H, W), rois (K, 5) -> (K, C, ph, pw).
    """

    def __init__(
        self,
        output_size: Union[int, Tuple[int, int]],
        output_channels: int,
        deform_fc_channels: int = 1024,
        spatial_scale: float = 1.0,
        sampling_ratio: int = 0,
        gamma: float = 0.1,
        device=None,
        dtype=None,
    ):
        super().__init__(
            output_size, output_channels, deform_fc_channels, spatial_scale, sampling_ratio, gamma, device, dtype
        )
        bins = self.output_size[0] * self.output_size[1]
        mask_head = _fc_stack(bins * self.output_channels, self.deform_fc_channels, bins, 1, device, dtype)
        self.mask_fc = nn.Sequential(*mask_head, nn.Sigmoid())
        _reset_fc_stack(self.mask_fc)

    def reset_parameters(self) -> None:
        _reset_fc_stack(self.offset_fc)
        _reset_fc_stack(self.mask_fc)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        _check_channels(input, self.output_channels, "output_channels")
        pooled = self.pool(input, rois)
        offset = self._predict_offset(pooled)
        mask = self.mask_fc(pooled.flatten(1)).view(pooled.shape[0], 1, *self.output_size)
        return self.pool(input, rois, offset) * mask


class DeformPSRoIPool(nn.Module):
    """Deformable position-sensitive RoI pooling (DCN paper, R-FCN head) with given offsets.

    Args:
        output_dim (int): output channels (classes, or 4*classes for box regression).
        pooled_size (int): bins per side.
        group_size (int or None): position-sensitive grid G; None means ``pooled_size``
            (R-FCN). The input has ``output_dim * G**2`` channels.
        part_size (int or None): offset grid; None means ``pooled_size``.
        sample_per_part (int): samples per bin and axis.
        trans_std (float): offset scale.
        spatial_scale (float): feature pixels per image pixel.

    Shape:
        input (N, output_dim*G**2, H, W), rois (K, 5), offset (K, 2*Q, part, part) or None
        (plain PS RoI pooling) -> (K, output_dim, pooled_size, pooled_size).
    """

    def __init__(
        self,
        output_dim: int,
        pooled_size: int,
        group_size: Optional[int] = None,
        part_size: Optional[int] = None,
        sample_per_part: int = 4,
        trans_std: float = 0.1,
        spatial_scale: float = 1.0,
    ):
        super().__init__()
        self.output_dim = int(output_dim)
        self.pooled_size = int(pooled_size)
        self.group_size = self.pooled_size if group_size is None else int(group_size)
        self.part_size = self.pooled_size if part_size is None else int(part_size)
        self.sample_per_part = int(sample_per_part)
        self.trans_std = float(trans_std)
        self.spatial_scale = float(spatial_scale)
        self.impl = "auto"

    def forward(self, input: Tensor, rois: Tensor, offset: Optional[Tensor] = None) -> Tensor:
        return ops.deform_ps_roi_pool(
            input, rois, offset, self.output_dim, self.group_size, self.pooled_size, self.part_size,
            self.sample_per_part, self.trans_std, self.spatial_scale, no_trans=offset is None, impl=self.impl,
        )

    def extra_repr(self) -> str:
        return (
            f"output_dim={self.output_dim}, pooled_size={self.pooled_size}, group_size={self.group_size}, "
            f"part_size={self.part_size}, sample_per_part={self.sample_per_part}, trans_std={self.trans_std}, "
            f"spatial_scale={self.spatial_scale}"
        )


class DeformPSRoIPoolPack(_Pack):
    """:class:`DeformPSRoIPool` that learns its offsets (mmdetection v1's ``DeformRoIPoolingPack``).

    A first pooling without offsets, flattened, goes through ``offset_fc``
    (``num_offset_fcs`` Linear layers with ReLU between them, the last zero-initialised)
    to give (K, 2, part_size, part_size) offsets for the second pooling.

    Args:
        output_dim, pooled_size, group_size, part_size, sample_per_part, trans_std,
        spatial_scale: as in :class:`DeformPSRoIPool`.
        deform_fc_channels (int): width of the hidden fc layers.
        num_offset_fcs (int): number of Linear layers in ``offset_fc`` (>= 1).

    Shape:
        input (N, output_dim*G**2, H, W), rois (K, 5) -> (K, output_dim, pooled_size, pooled_size).
    """

    def __init__(
        self,
        output_dim: int,
        pooled_size: int,
        group_size: Optional[int] = None,
        part_size: Optional[int] = None,
        sample_per_part: int = 4,
        trans_std: float = 0.1,
        spatial_scale: float = 1.0,
        deform_fc_channels: int = 1024,
        num_offset_fcs: int = 3,
        device=None,
        dtype=None,
    ):
        super().__init__()
        self.pool = DeformPSRoIPool(output_dim, pooled_size, group_size, part_size, sample_per_part, trans_std,
                                    spatial_scale)
        self.output_dim, self.pooled_size = self.pool.output_dim, self.pool.pooled_size
        self.group_size, self.part_size = self.pool.group_size, self.pool.part_size
        if num_offset_fcs < 1:
            raise ValueError(f"num_offset_fcs must be >= 1, got {num_offset_fcs}")
        self.deform_fc_channels = int(deform_fc_channels)
        self.num_offset_fcs = int(num_offset_fcs)
        self.offset_fc = _fc_stack(
            self.pooled_size**2 * self.output_dim, self.deform_fc_channels, self.part_size**2 * 2,
            self.num_offset_fcs - 1, device, dtype,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _reset_fc_stack(self.offset_fc)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:
        _check_channels(input, self.output_dim * self.group_size**2, "output_dim * group_size**2")
        pooled = self.pool(input, rois)
        offset = self.offset_fc(pooled.flatten(1)).view(pooled.shape[0], 2, self.part_size, self.part_size)
        return self.pool(input, rois, offset)

    def extra_repr(self) -> str:
        return (
            self.pool.extra_repr()
            + f", deform_fc_channels={self.deform_fc_channels}, num_offset_fcs={self.num_offset_fcs}"
        )
