"""Deformable convolution layers under torchvision's and mmcv's names, with their semantics.

* :class:`DeformConv2d` -- torchvision's module: offsets (and optionally a DCNv2 mask) are given
  to ``forward(input, offset, mask=None)``.
* :class:`ModulatedDeformConv2d` -- mmcv's module: ``forward(x, offset, mask)`` with the mask given.
* :class:`ModulatedDeformConv2dPack` -- mmcv's DCNv2 "pack": predicts its own offsets and mask
  with a ``conv_offset`` convolution, ``forward(x)``.
* :class:`DeformConv2dPack` -- mmcv's DCNv1 "pack": predicts its own offsets, ``forward(x)``.

The modules share their parameters' layout (``weight``, ``bias``, mmcv's and torchvision's names)
through :class:`_DeformConvParameters`, which has no ``forward``; each module composes its own
``forward`` from the functional :func:`convzoo.ops.deform_conv2d` and, for the packs, its own
``conv_offset`` predictor. So every forward keeps the signature its users know, and mmcv
checkpoints (``weight``, ``bias``, ``conv_offset.weight``, ``conv_offset.bias``) load directly.
mmcv's ``DeformConv2d`` (offsets given, no bias) loads into ours built with ``bias=False``.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops import deform_conv2d
from ..ops._checks import pair

__all__ = ["DeformConv2d", "DeformConv2dPack", "ModulatedDeformConv2d", "ModulatedDeformConv2dPack"]


def _check_groups(in_channels: int, out_channels: int, groups: int) -> None:
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(
            f"groups ({groups}) must be >= 1 and divide in_channels ({in_channels}) and out_channels ({out_channels})"
        )


def _check_deform_groups(in_channels: int, deform_groups: int) -> None:
    if deform_groups < 1 or in_channels % deform_groups:
        raise ValueError(f"deform_groups ({deform_groups}) must be >= 1 and divide in_channels ({in_channels})")


class _DeformConvParameters(nn.Module):
    """The parameters and conv arguments every deformable conv layer holds (no ``forward``).

    ``weight`` (out_channels, in_channels // groups, kh, kw) and ``bias`` (out_channels) or None;
    ``impl`` is passed to :func:`convzoo.ops.deform_conv2d` ("auto" | "triton" | "reference").
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride, padding, dilation, groups: int,
                 bias: bool, device, dtype) -> None:
        super().__init__()
        _check_groups(in_channels, out_channels, groups)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair("kernel_size", kernel_size, minimum=1)
        self.stride = pair("stride", stride, minimum=1)
        self.padding = pair("padding", padding, minimum=0)
        self.dilation = pair("dilation", dilation, minimum=1)
        self.groups = groups
        self.impl = "auto"
        factory = dict(device=device, dtype=dtype)
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None

    def _deform_conv(self, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask=mask,
                             impl=self.impl)

    def _conv_offset(self, channels_per_group: int, deform_groups: int, device, dtype) -> nn.Conv2d:
        """mmcv's offset predictor: ``channels_per_group * deform_groups * kh * kw`` outputs (zeroed by
        the layer's ``reset_parameters``)."""
        kh, kw = self.kernel_size
        return nn.Conv2d(self.in_channels, channels_per_group * deform_groups * kh * kw, self.kernel_size,
                         stride=self.stride, padding=self.padding, dilation=self.dilation, bias=True, device=device,
                         dtype=dtype)

    def _mmcv_init(self) -> None:
        """mmcv's DCNv2 initialisation: weight ~ U(-1/sqrt(n), 1/sqrt(n)), n = in_channels*kh*kw; zero bias."""
        bound = 1 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def extra_repr(self) -> str:
        text = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if getattr(self, "deform_groups", 1) != 1:
            text += f", deform_groups={self.deform_groups}"
        if self.bias is None:
            text += ", bias=False"
        return text


class DeformConv2d(_DeformConvParameters):
    """Deformable convolution v1, or v2 with a mask (torchvision's ``DeformConv2d``): offsets (and
    optionally a mask) are given to :meth:`forward`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``.

    Shapes:
        forward(input (N, in_channels, H, W), offset (N, 2*G*kh*kw, Ho, Wo), mask (N, G*kh*kw, Ho, Wo) or None)
        -> (N, out_channels, Ho, Wo), where G (offset groups) is read from the offset's channels.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, device=None, dtype=None) -> None:
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation (as torchvision's ``DeformConv2d``)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return self._deform_conv(input, offset, mask)


class ModulatedDeformConv2d(_DeformConvParameters):
    """Deformable convolution v2 with offsets and mask given (mmcv's ``ModulatedDeformConv2d``).

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``.
        deform_groups: offset groups ``G``; the offsets and mask must have ``2*G*kh*kw`` and
            ``G*kh*kw`` channels.

    Initialisation and parameter names (``weight``, ``bias``) are mmcv's.

    Shapes:
        forward(x (N, in_channels, H, W), offset (N, 2*G*kh*kw, Ho, Wo), mask (N, G*kh*kw, Ho, Wo))
        -> (N, out_channels, Ho, Wo).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deform_groups: int = 1, bias: bool = True, device=None, dtype=None) -> None:
        _check_deform_groups(in_channels, deform_groups)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device, dtype)
        self.deform_groups = deform_groups
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv's initialisation (see :meth:`_DeformConvParameters._mmcv_init`)."""
        self._mmcv_init()

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"mask must be a torch.Tensor (mmcv's ModulatedDeformConv2d takes one), got "
                            f"{type(mask).__name__}; use DeformConv2d for offsets without a mask")
        points = self.deform_groups * self.kernel_size[0] * self.kernel_size[1]
        if offset.dim() == 4 and offset.shape[1] != 2 * points:
            raise ValueError(f"offset must have 2 * deform_groups * kh * kw = {2 * points} channels "
                             f"(deform_groups={self.deform_groups}), got shape {tuple(offset.shape)}")
        return self._deform_conv(x, offset, mask)


class ModulatedDeformConv2dPack(_DeformConvParameters):
    """Deformable convolution v2 that predicts its own offsets and mask (mmcv's ``ModulatedDeformConv2dPack``,
    registered there as "DCNv2").

    A zero-initialised ``conv_offset`` (an ``nn.Conv2d`` with the layer's kernel size, stride,
    padding and dilation) predicts ``3 * deform_groups * kh * kw`` channels: the first two thirds are
    the offsets in the layout of :func:`convzoo.ops.deform_conv2d` and the last third the mask logits,
    passed through a sigmoid. At initialisation the offsets are zero and the mask is 0.5, so the
    layer computes ``0.5 * conv2d(x, weight) + bias``. Parameter names (``weight``, ``bias``,
    ``conv_offset.weight``, ``conv_offset.bias``) and initialisation are mmcv's, so DCNv2
    checkpoints load directly.

    Shapes:
        forward(x (N, in_channels, H, W)) -> (N, out_channels, Ho, Wo).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deform_groups: int = 1, bias: bool = True, device=None, dtype=None) -> None:
        _check_deform_groups(in_channels, deform_groups)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device, dtype)
        self.deform_groups = deform_groups
        self.conv_offset = self._conv_offset(3, deform_groups, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv's initialisation: the conv's as :class:`ModulatedDeformConv2d`, ``conv_offset`` zero."""
        self._mmcv_init()
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def offset_and_mask(self, x: torch.Tensor):
        """Predicted offsets (N, 2*G*kh*kw, Ho, Wo) and sigmoid mask (N, G*kh*kw, Ho, Wo)."""
        predicted = self.conv_offset(x)
        split = 2 * predicted.shape[1] // 3
        return predicted[:, :split], torch.sigmoid(predicted[:, split:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        offset, mask = self.offset_and_mask(x)
        return self._deform_conv(x, offset, mask)


class DeformConv2dPack(_DeformConvParameters):
    """Deformable convolution v1 that predicts its own offsets (mmcv's ``DeformConv2dPack``,
    registered there as "DCN").

    A zero-initialised ``conv_offset`` predicts ``2 * deform_groups * kh * kw`` offset channels in the
    layout of :func:`convzoo.ops.deform_conv2d`; at initialisation the layer is a plain convolution.
    Parameter names (``weight``, ``conv_offset.weight``, ``conv_offset.bias``; ``bias`` only with
    ``bias=True``, which mmcv does not offer) and initialisation (Kaiming-uniform for ReLU) are mmcv's.

    Shapes:
        forward(x (N, in_channels, H, W)) -> (N, out_channels, Ho, Wo).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deform_groups: int = 1, bias: bool = False, device=None, dtype=None) -> None:
        _check_deform_groups(in_channels, deform_groups)
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device, dtype)
        self.deform_groups = deform_groups
        self.conv_offset = self._conv_offset(2, deform_groups, device, dtype)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv's initialisation: Kaiming-uniform (ReLU gain) weight, zero bias and ``conv_offset``."""
        nn.init.kaiming_uniform_(self.weight, nonlinearity="relu")
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._deform_conv(x, self.conv_offset(x), None)
