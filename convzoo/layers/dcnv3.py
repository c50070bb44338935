"""DCNv3 module (InternImage), with the DCNv4-style variant that uses the mask without softmax.

The structure and parameter names are those of InternImage's ``ops_dcnv3/modules/dcnv3.py``
``DCNv3``, so its checkpoints load unchanged: ``input_proj``, ``dw_conv`` (depthwise conv, then
norm and activation, NCHW in and NHWC out: keys ``dw_conv.0.*`` and ``dw_conv.1.1.*`` for LN,
``dw_conv.1.0.*`` for BN), ``offset``, ``mask``, ``output_proj`` and, with
``center_feature_scale``, ``center_feature_scale_proj_weight``/``_bias``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops import dcnv3
from .prepacked import PackedLinear

__all__ = ["DCNv3"]


class _ToChannelsLast(nn.Module):
    """(N, C, H, W) -> (N, H, W, C)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 2, 3, 1)


class _ToChannelsFirst(nn.Module):
    """(N, H, W, C) -> (N, C, H, W)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(0, 3, 1, 2)


def _norm_nchw_to_nhwc(channels: int, norm_layer: str, factory: dict) -> nn.Sequential:
    """InternImage's ``build_norm_layer(channels, norm_layer, 'channels_first', 'channels_last')``."""
    if norm_layer == "LN":
        return nn.Sequential(_ToChannelsLast(), nn.LayerNorm(channels, eps=1e-6, **factory))
    if norm_layer == "BN":
        return nn.Sequential(nn.BatchNorm2d(channels, **factory), _ToChannelsLast())
    raise ValueError(f"norm_layer must be 'LN' or 'BN', got {norm_layer!r}")


def _activation(act_layer: str) -> nn.Module:
    if act_layer == "GELU":
        return nn.GELU()
    if act_layer == "ReLU":
        return nn.ReLU(inplace=True)
    if act_layer == "SiLU":
        return nn.SiLU(inplace=True)
    raise ValueError(f"act_layer must be 'GELU', 'ReLU' or 'SiLU', got {act_layer!r}")


class DCNv3(nn.Module):
    """DCNv3 (Wang et al., InternImage, CVPR 2023) on NHWC features.

    ``input_proj`` projects the input; a depthwise conv + norm + activation of the input predicts,
    per output pixel, ``group * P * 2`` offsets (``offset``) and ``group * P`` mask logits
    (``mask``), normalised by a softmax over the P points of each group (``softmax=True``,
    DCNv3, applied inside :func:`convzoo.ops.dcnv3` via ``mask_softmax``) or used as they are
    (``softmax=False``, DCNv4); :func:`convzoo.ops.dcnv3` samples the
    projected features; ``output_proj`` mixes the channels.

    With ``stride > 1`` (which InternImage's module does not support) the offsets, mask and
    centre-feature scale are taken at the centre pixel of each output window, which requires
    ``pad <= dilation * (kernel_size - 1) // 2``.

    Args:
        channels: input and output channels, divisible by ``group``.
        kernel_size: sampling grid is ``kernel_size x kernel_size``.
        dw_kernel_size: kernel of the depthwise conv (defaults to ``kernel_size``).
        stride, pad, dilation: window geometry of the sampling.
        group: offset/mask groups (``group_channels = channels // group``).
        offset_scale: scale of the kernel grid and offsets (see :func:`convzoo.ops.dcnv3`).
        act_layer: ``'GELU'``, ``'ReLU'`` or ``'SiLU'`` after the depthwise conv.
        norm_layer: ``'LN'`` or ``'BN'`` after the depthwise conv.
        center_feature_scale: blend the output with the projected input by a learned sigmoid gate.
        remove_center: drop the centre point of the grid (``P = kernel_size**2 - 1``).
        softmax: softmax over the points of each group (DCNv3); False uses the mask as is (DCNv4).

    Shape:
        input (Tensor[N, H, W, channels]) -> Tensor[N, H_out, W_out, channels].

    Example:
        >>> layer = DCNv3(channels=32, group=4)
        >>> layer(torch.randn(2, 14, 14, 32)).shape
        torch.Size([2, 14, 14, 32])
    """

    def __init__(self, channels: int = 64, kernel_size: int = 3, dw_kernel_size: int | None = None,
                 stride: int = 1, pad: int = 1, dilation: int = 1, group: int = 4, offset_scale: float = 1.0,
                 act_layer: str = "GELU", norm_layer: str = "LN", center_feature_scale: bool = False,
                 remove_center: bool = False, softmax: bool = True, device=None, dtype=None):
        super().__init__()
        factory = dict(device=device, dtype=dtype)
        if group < 1 or channels % group != 0:
            raise ValueError(f"channels must be divisible by group, got channels={channels} and group={group}")
        if remove_center and kernel_size % 2 == 0:
            raise ValueError(f"remove_center needs an odd kernel_size, got {kernel_size}")
        if stride > 1 and pad > dilation * (kernel_size - 1) // 2:
            raise ValueError(f"with stride > 1, pad must be <= dilation * (kernel_size - 1) // 2 = "
                             f"{dilation * (kernel_size - 1) // 2}, got pad={pad}")
        dw_kernel_size = dw_kernel_size if dw_kernel_size is not None else kernel_size
        self.channels = channels
        self.kernel_size = kernel_size
        self.dw_kernel_size = dw_kernel_size
        self.stride = stride
        self.pad = pad
        self.dilation = dilation
        self.group = group
        self.group_channels = channels // group
        self.offset_scale = offset_scale
        self.center_feature_scale = center_feature_scale
        self.remove_center = int(remove_center)
        self.softmax = softmax
        self.impl = "auto"
        points = kernel_size * kernel_size - self.remove_center

        self.dw_conv = nn.Sequential(
            nn.Conv2d(channels, channels, dw_kernel_size, stride=1, padding=(dw_kernel_size - 1) // 2,
                      groups=channels, **factory),
            _norm_nchw_to_nhwc(channels, norm_layer, factory),
            _activation(act_layer),
        )
        self.offset = PackedLinear(channels, group * points * 2, **factory)
        self.mask = PackedLinear(channels, group * points, **factory)
        self.input_proj = PackedLinear(channels, channels, **factory)
        self.output_proj = PackedLinear(channels, channels, **factory)
        if center_feature_scale:
            self.center_feature_scale_proj_weight = nn.Parameter(torch.zeros(group, channels, **factory))
            self.center_feature_scale_proj_bias = nn.Parameter(torch.zeros(group, **factory))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """InternImage's initialisation: zero offset/mask projections (so sampling starts on the
        regular grid with uniform weights), Xavier-uniform input/output projections with zero bias,
        PyTorch's defaults for the depthwise conv and norm, a zero centre-feature gate."""
        for module in self.dw_conv.modules():
            if module is not self.dw_conv and hasattr(module, "reset_parameters"):
                module.reset_parameters()
        nn.init.zeros_(self.offset.weight)
        nn.init.zeros_(self.offset.bias)
        nn.init.zeros_(self.mask.weight)
        nn.init.zeros_(self.mask.bias)
        nn.init.xavier_uniform_(self.input_proj.weight)
        nn.init.zeros_(self.input_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)
        if self.center_feature_scale:
            nn.init.zeros_(self.center_feature_scale_proj_weight)
            nn.init.zeros_(self.center_feature_scale_proj_bias)

    def _at_window_centres(self, t: torch.Tensor, height_out: int, width_out: int) -> torch.Tensor:
        """(N, H, W, K) -> (N, H_out, W_out, K): the pixel at the centre of each output window."""
        if self.stride == 1 and t.shape[1] == height_out and t.shape[2] == width_out:
            return t
        start = self.dilation * (self.kernel_size - 1) // 2 - self.pad
        stop_h = start + (height_out - 1) * self.stride + 1
        stop_w = start + (width_out - 1) * self.stride + 1
        return t[:, start:stop_h:self.stride, start:stop_w:self.stride]

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """(N, H, W, channels) -> (N, H_out, W_out, channels)."""
        if input.dim() != 4 or input.shape[3] != self.channels:
            raise ValueError(f"input must have shape (N, H, W, {self.channels}), got {tuple(input.shape)}")
        height, width = input.shape[1:3]
        span = self.dilation * (self.kernel_size - 1) + 1
        height_out = (height + 2 * self.pad - span) // self.stride + 1
        width_out = (width + 2 * self.pad - span) // self.stride + 1

        x = self.input_proj(input)
        x_proj = x
        features = self.dw_conv(input.permute(0, 3, 1, 2))
        features = self._at_window_centres(features, height_out, width_out)
        offset = self.offset(features)
        mask = self.mask(features)
        mask = mask.to(x.dtype)
        offset = offset.to(x.dtype)

        k = self.kernel_size
        x = dcnv3(x, offset, mask, k, k, self.stride, self.stride, self.pad, self.pad, self.dilation, self.dilation,
                  self.group, self.group_channels, self.offset_scale, bool(self.remove_center),
                  mask_softmax=self.softmax, impl=self.impl)
        if self.center_feature_scale:
            gate = torch.sigmoid(F.linear(features, self.center_feature_scale_proj_weight,
                                          self.center_feature_scale_proj_bias))
            gate = gate.repeat_interleave(self.group_channels, dim=-1)
            x_proj = self._at_window_centres(x_proj, height_out, width_out)
            x = x * (1 - gate) + x_proj * gate
        return self.output_proj(x)

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, kernel_size={self.kernel_size}, stride={self.stride}, pad={self.pad}, "
                f"dilation={self.dilation}, group={self.group}, offset_scale={self.offset_scale}, "
                f"center_feature_scale={self.center_feature_scale}, remove_center={bool(self.remove_center)}, "
                f"softmax={self.softmax}")
