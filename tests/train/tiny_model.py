"""A tiny registered-on-demand model for the training/CLI tests (no dependency on the zoo).

Stem, one re-parameterizable block (3x3 conv + BN in parallel with 1x1 conv + BN, folded into
a single 3x3 conv by ``reparameterize()``), one residual block, a linear head.
``norm="group"`` replaces BatchNorm with GroupNorm (no batch statistics: a single process
with batch 2B computes exactly what two processes with batch B do).
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn
import torch.nn.functional as F

from convzoo.layers.reparam import fuse_conv_bn
from convzoo.models import build_model

NAME = "tiny_test_net"


@dataclasses.dataclass(frozen=True)
class TinyConfig:
    width: int = 8
    norm: str = "batch"


class RepBlock(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv3 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(channels)
        self.conv1 = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.fused = None

    def forward(self, x):
        if self.fused is not None:
            return F.relu(self.fused(x))
        return F.relu(self.bn3(self.conv3(x)) + self.bn1(self.conv1(x)))

    def reparameterize(self):
        big, small = fuse_conv_bn(self.conv3, self.bn3), fuse_conv_bn(self.conv1, self.bn1)
        with torch.no_grad():
            big.weight += F.pad(small.weight, (1, 1, 1, 1))
            big.bias += small.bias
        self.fused = big
        del self.conv3, self.bn3, self.conv1, self.bn1


class TinyNet(nn.Module):
    classifier_name = "head"

    def __init__(self, cfg: TinyConfig, num_classes: int, in_chans: int, drop_path_rate: float):
        super().__init__()
        width = cfg.width
        self.stem = nn.Conv2d(in_chans, width, 4, stride=4)
        self.rep = RepBlock(width) if cfg.norm == "batch" else nn.Identity()
        self.mix = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.GroupNorm(1, width), nn.GELU(),
                                 nn.Dropout(drop_path_rate))
        self.head = nn.Linear(width, num_classes)
        self.feature_info = [dict(num_chs=width, reduction=4, module="mix")]
        self.grad_checkpointing = False

    def forward_features(self, x):
        x = self.rep(self.stem(x))
        return x + self.mix(x)

    def forward_head(self, x):
        return self.head(x.mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x, indices):
        return [self.forward_features(x)]

    def reset_classifier(self, num_classes: int):
        self.head = nn.Linear(self.head.in_features, num_classes)

    def set_grad_checkpointing(self, enable: bool = True):
        self.grad_checkpointing = enable


def tiny_test_net(pretrained=None, **kwargs):
    return build_model(TinyNet, TinyConfig(), pretrained=pretrained, **kwargs)
