"""Small building blocks shared by the model families: drop path, LayerNorm over channels,
squeeze-and-excitation, channel rounding and NCHW/NHWC permutes."""
from __future__ import annotations

from typing import Callable, Optional, Type

import torch
import torch.nn as nn
import torch.nn.functional as F


def make_divisible(value: float, divisor: int = 8, min_value: Optional[int] = None, round_limit: float = 0.9) -> int:
    """Round ``value`` to the nearest multiple of ``divisor`` (MobileNet's rule: never drop below 90%)."""
    min_value = min_value or divisor
    new_value = max(min_value, int(value + divisor / 2) // divisor * divisor)
    if new_value < round_limit * value:
        new_value += divisor
    return new_value


def to_channels_last(x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, H, W, C)."""
    return x.permute(0, 2, 3, 1)


def to_channels_first(x: torch.Tensor) -> torch.Tensor:
    """(N, H, W, C) -> (N, C, H, W)."""
    return x.permute(0, 3, 1, 2)


def drop_path(x: torch.Tensor, drop_prob: float, training: bool) -> torch.Tensor:
    """Stochastic depth: zero whole samples of the residual branch ``x`` (any shape (N, ...))."""
    if drop_prob == 0.0 or not training:
        return x
    keep_prob = 1.0 - drop_prob
    shape = (x.shape[0],) + (1,) * (x.dim() - 1)
    keep = x.new_empty(shape).bernoulli_(keep_prob)
    return x * keep / keep_prob


class DropPath(nn.Module):
    """Stochastic depth per sample (Huang et al., 2016) on a residual branch."""

    def __init__(self, drop_prob: float = 0.0):
        super().__init__()
        if not 0.0 <= drop_prob < 1.0:
            raise ValueError(f"drop_prob must be in [0, 1), got {drop_prob}")
        self.drop_prob = float(drop_prob)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return drop_path(x, self.drop_prob, self.training)

    def extra_repr(self) -> str:
        return f"drop_prob={self.drop_prob}"


class LayerNorm2d(nn.LayerNorm):
    """LayerNorm over the channels of an (N, C, H, W) tensor (ConvNeXt's ``channels_first`` norm)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_contiguous(memory_format=torch.channels_last):
            y = F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias, self.eps)
            return y.permute(0, 3, 1, 2)
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        y = (x - mean) * torch.rsqrt(var + self.eps)
        if self.weight is not None:
            y = y * self.weight[:, None, None] + self.bias[:, None, None]
        return y


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation on (N, C, H, W): global pool, 1x1 reduce, act, 1x1 expand, gate."""

    def __init__(
        self,
        channels: int,
        rd_channels: int,
        act_layer: Type[nn.Module] = nn.ReLU,
        gate_layer: Callable[[torch.Tensor], torch.Tensor] = torch.sigmoid,
    ):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, bias=True)
        self.act = act_layer(inplace=True) if act_layer in (nn.ReLU, nn.ReLU6, nn.Hardswish) else act_layer()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, bias=True)
        self.gate = gate_layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.fc2(self.act(self.fc1(x.mean((2, 3), keepdim=True))))
        return x * self.gate(scale)


class GlobalResponseNorm(nn.Module):
    """Global response normalisation (ConvNeXt V2, https://arxiv.org/abs/2301.00808) on (N, H, W, C).

    ``x * (1 + gamma * n) + beta`` with ``n = ||x||_2 over (H, W)`` divided by its mean over the
    channels (+1e-6); ``gamma`` and ``beta`` are (1, 1, 1, C) and start at zero (the identity).
    ``beta`` may be ``None`` (UniRepLKNet folds it into the next linear layer when deploying).
    """

    def __init__(self, dim: int, bias: bool = True):
        super().__init__()
        self.gamma = nn.Parameter(torch.zeros(1, 1, 1, dim))
        self.beta = nn.Parameter(torch.zeros(1, 1, 1, dim)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gx = torch.linalg.vector_norm(x, ord=2, dim=(1, 2), keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        out = (self.gamma * nx + 1) * x
        return out if self.beta is None else out + self.beta
