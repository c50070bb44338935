"""Deformable convolution layers (v1 with given offsets, v2 "pack" predicting its own offsets and mask)."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..ops import deform_conv2d
from ..ops._checks import pair

__all__ = ["DeformConv2d", "ModulatedDeformConv2d"]


def _check_groups(in_channels: int, out_channels: int, groups: int, name: str = "groups") -> None:
    if groups < 1 or in_channels % groups or out_channels % groups:
        raise ValueError(
            f"{name} ({groups}) must be >= 1 and divide in_channels ({in_channels}) and out_channels ({out_channels})"
        )


class DeformConv2d(nn.Module):
    """Deformable convolution v1 (torchvision's ``DeformConv2d``): offsets (and optionally a mask)
    are given to :meth:`forward`.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias: as ``nn.Conv2d``.

    Shapes:
        forward(x (N, in_channels, H, W), offset (N, 2*G*kh*kw, Ho, Wo), mask (N, G*kh*kw, Ho, Wo) or None)
        -> (N, out_channels, Ho, Wo), where G (offset groups) is read from the offset's channels.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        _check_groups(in_channels, out_channels, groups)
        factory = dict(device=device, dtype=dtype)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = pair("kernel_size", kernel_size, minimum=1)
        self.stride = pair("stride", stride, minimum=1)
        self.padding = pair("padding", padding, minimum=0)
        self.dilation = pair("dilation", dilation, minimum=1)
        self.groups = groups
        self.impl = "auto"
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(out_channels, **factory)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation (as torchvision's ``DeformConv2d``)."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        return deform_conv2d(
            x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask=mask, impl=self.impl
        )

    def extra_repr(self) -> str:
        text = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        )
        if self.padding != (0, 0):
            text += f", padding={self.padding}"
        if self.dilation != (1, 1):
            text += f", dilation={self.dilation}"
        if self.groups != 1:
            text += f", groups={self.groups}"
        if self.bias is None:
            text += ", bias=False"
        return text


class ModulatedDeformConv2d(DeformConv2d):
    """Deformable convolution v2 that predicts its own offsets and mask (mmcv's ``ModulatedDeformConv2dPack``).

    A zero-initialised ``conv_offset`` (an ``nn.Conv2d`` with the layer's kernel size, stride,
    padding and dilation) predicts ``3 * deform_groups * kh * kw`` channels: the first two thirds are
    the offsets in the layout of :func:`convzoo.ops.deform_conv2d` and the last third the mask logits,
    passed through a sigmoid. At initialisation the offsets are zero and the mask is 0.5, so the
    layer computes ``0.5 * conv2d(x, weight) + bias``. Parameter names (``weight``, ``bias``,
    ``conv_offset.weight``, ``conv_offset.bias``) match mmcv, so DCNv2 checkpoints load directly.

    Shapes:
        forward(x (N, in_channels, H, W)) -> (N, out_channels, Ho, Wo).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        deform_groups: int = 1,
        bias: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        if deform_groups < 1 or in_channels % deform_groups:
            raise ValueError(f"deform_groups ({deform_groups}) must be >= 1 and divide in_channels ({in_channels})")
        self.deform_groups = deform_groups
        super().__init__(
            in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, device=device, dtype=dtype
        )
        kh, kw = self.kernel_size
        self.conv_offset = nn.Conv2d(
            in_channels,
            3 * deform_groups * kh * kw,
            kernel_size=self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=True,
            device=device,
            dtype=dtype,
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """mmcv's initialisation: weight ~ U(-1/sqrt(n), 1/sqrt(n)), n = in_channels*kh*kw; zero bias and conv_offset."""
        fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
        bound = 1 / math.sqrt(fan_in)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        if hasattr(self, "conv_offset"):
            nn.init.zeros_(self.conv_offset.weight)
            nn.init.zeros_(self.conv_offset.bias)

    def offset_and_mask(self, x: torch.Tensor):
        """Predicted offsets (N, 2*G*kh*kw, Ho, Wo) and sigmoid mask (N, G*kh*kw, Ho, Wo)."""
        predicted = self.conv_offset(x)
        split = 2 * predicted.shape[1] // 3
        return predicted[:, :split], torch.sigmoid(predicted[:, split:])

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        offset, mask = self.offset_and_mask(x)
        return deform_conv2d(
            x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation, mask=mask, impl=self.impl
        )

    def extra_repr(self) -> str:
        text = super().extra_repr()
        if self.deform_groups != 1:
            text += f", deform_groups={self.deform_groups}"
        return text
