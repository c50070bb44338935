"""Deformable RoI pooling modules.

* :class:`DeformRoIPool`: mmcv's ``DeformRoIPool`` (offsets passed in).
* :class:`DeformRoIPoolPack`: mmcv's ``DeformRoIPoolPack``: learns the offsets with
  ``offset_fc`` from a first pooling without offsets.
* :class:`ModulatedDeformRoIPool`: mmcv's ``ModulatedDeformRoIPoolPack``: learns offsets
  (``offset_fc``) and a sigmoid mask (``mask_fc``); output ``deform_roi_pool(...) * mask``.
* :class:`DeformPSRoIPool`: deformable position-sensitive RoI pooling of the DCN paper
  (offsets passed in, or none for plain PS pooling with the same sampling).
* :class:`DeformPSRoIPoolPack`: the same with offsets learned by ``offset_fc`` from a first,
  non-deformed pooling (mmdetection v1's ``DeformRoIPoolingPack``).

The last layer of every offset/mask predictor is zero-initialised, so a fresh pack starts
as plain RoI pooling (mask 0.5 for the modulated one), as in mmcv.
"""
from __future__ import annotations

from typing import Optional, Tuple, Union

import torch.nn as nn
from torch import Tensor

from .. import ops
from ..ops._checks import pair

__all__ = ["DeformRoIPool", "DeformRoIPoolPack", "ModulatedDeformRoIPool", "DeformPSRoIPool", "DeformPSRoIPoolPack"]


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


class DeformRoIPool(nn.Module):
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

    def _pool(self, input: Tensor, rois: Tensor, offset: Optional[Tensor]) -> Tensor:
        return ops.deform_roi_pool(
            input, rois, offset, self.output_size, self.spatial_scale, self.sampling_ratio, self.gamma, impl=self.impl
        )

    def forward(self, input: Tensor, rois: Tensor, offset: Optional[Tensor] = None) -> Tensor:
        return self._pool(input, rois, offset)

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}"
        )


class DeformRoIPoolPack(DeformRoIPool):
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
        super().__init__(output_size, spatial_scale, sampling_ratio, gamma)
        self.output_channels = int(output_channels)
        self.deform_fc_channels = int(deform_fc_channels)
        bins = self.output_size[0] * self.output_size[1]
        self.offset_fc = _fc_stack(bins * self.output_channels, self.deform_fc_channels, bins * 2, 2, device, dtype)
        _reset_fc_stack(self.offset_fc)

    def reset_parameters(self) -> None:
        _reset_fc_stack(self.offset_fc)

    def _predict_offset(self, pooled: Tensor) -> Tensor:
        return self.offset_fc(pooled.flatten(1)).view(pooled.shape[0], 2, *self.output_size)

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        _check_channels(input, self.output_channels, "output_channels")
        pooled = self._pool(input, rois, None)
        return self._pool(input, rois, self._predict_offset(pooled))

    def extra_repr(self) -> str:
        return (
            f"output_size={self.output_size}, output_channels={self.output_channels}, "
            f"deform_fc_channels={self.deform_fc_channels}, spatial_scale={self.spatial_scale}, "
            f"sampling_ratio={self.sampling_ratio}, gamma={self.gamma}"
        )


class ModulatedDeformRoIPool(DeformRoIPoolPack):
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

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        _check_channels(input, self.output_channels, "output_channels")
        pooled = self._pool(input, rois, None)
        offset = self._predict_offset(pooled)
        mask = self.mask_fc(pooled.flatten(1)).view(pooled.shape[0], 1, *self.output_size)
        return ops.modulated_deform_roi_pool(
            input, rois, offset, mask, self.output_size, self.spatial_scale, self.sampling_ratio, self.gamma,
            impl=self.impl,
        )


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

    def _pool(self, input: Tensor, rois: Tensor, offset: Optional[Tensor]) -> Tensor:
        return ops.deform_ps_roi_pool(
            input, rois, offset, self.output_dim, self.group_size, self.pooled_size, self.part_size,
            self.sample_per_part, self.trans_std, self.spatial_scale, no_trans=offset is None, impl=self.impl,
        )

    def forward(self, input: Tensor, rois: Tensor, offset: Optional[Tensor] = None) -> Tensor:
        return self._pool(input, rois, offset)

    def extra_repr(self) -> str:
        return (
            f"output_dim={self.output_dim}, pooled_size={self.pooled_size}, group_size={self.group_size}, "
            f"part_size={self.part_size}, sample_per_part={self.sample_per_part}, trans_std={self.trans_std}, "
            f"spatial_scale={self.spatial_scale}"
        )


class DeformPSRoIPoolPack(DeformPSRoIPool):
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
        super().__init__(output_dim, pooled_size, group_size, part_size, sample_per_part, trans_std, spatial_scale)
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

    def forward(self, input: Tensor, rois: Tensor) -> Tensor:  # type: ignore[override]
        _check_channels(input, self.output_dim * self.group_size**2, "output_dim * group_size**2")
        pooled = self._pool(input, rois, None)
        offset = self.offset_fc(pooled.flatten(1)).view(pooled.shape[0], 2, self.part_size, self.part_size)
        return self._pool(input, rois, offset)

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", deform_fc_channels={self.deform_fc_channels}, num_offset_fcs={self.num_offset_fcs}"
        )
