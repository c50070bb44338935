"""ShuffleNet V2 x0.5 / x1.0 / x1.5 / x2.0 (Ma et al., 2018, "ShuffleNet V2: Practical
Guidelines for Efficient CNN Architecture Design").

Units split the channels in two halves (or, when downsampling, feed the input to two
branches), transform one half with 1x1 -> 3x3 depthwise -> 1x1, concatenate, and shuffle the
channels between the two groups. The layout and parameter names are torchvision's
(``conv1, stage2..stage4, conv5, fc``; ``branch1``/``branch2`` sequences), so torchvision
state dicts load unchanged. Like torchvision, the weights keep PyTorch's default init.

Stages at strides 4/8/16/32: ``maxpool`` (after the stride-2 ``conv1``), ``stage2``,
``stage3`` and ``stage4`` followed by the 1x1 ``conv5``.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn

from ._builder import build_model
from ._convbn import Conv2dNormActivation, fold_bn_into_conv, run_blocks, stage_outputs
from ._registry import register_model

__all__ = ["ShuffleNetV2", "ShuffleNetV2Cfg", "InvertedResidual", "channel_shuffle", "checkpoint_filter_fn"]


@dataclasses.dataclass(frozen=True)
class ShuffleNetV2Cfg:
    """Units in stage2..stage4, the output channels of conv1, stage2..stage4 and conv5, and the
    dropout before the classifier (timm's ``drop_rate``)."""

    stages_repeats: Tuple[int, ...] = (4, 8, 4)
    stages_out_channels: Tuple[int, ...] = (24, 116, 232, 464, 1024)
    drop_rate: float = 0.0


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H, W) with channel ``g * (C // groups) + i`` moved to ``i * groups + g``."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _depthwise(chs: int, stride: int) -> nn.Conv2d:
    return nn.Conv2d(chs, chs, 3, stride, 1, groups=chs, bias=False)


class InvertedResidual(nn.Module):
    """ShuffleNet V2 unit (the paper's Fig. 3c for stride 1, 3d for stride 2).

    Input (N, inp, H, W) -> output (N, oup, H / stride, W / stride).
    """

    def __init__(self, inp: int, oup: int, stride: int):
        super().__init__()
        if stride not in (1, 2):
            raise ValueError(f"stride must be 1 or 2, got {stride}")
        branch_chs = oup // 2
        if stride == 1 and inp != 2 * branch_chs:
            raise ValueError(f"a stride-1 unit needs inp == oup (even), got inp={inp}, oup={oup}")
        self.stride = stride
        if stride > 1:
            self.branch1 = nn.Sequential(
                _depthwise(inp, stride), nn.BatchNorm2d(inp),
                nn.Conv2d(inp, branch_chs, 1, bias=False), nn.BatchNorm2d(branch_chs), nn.ReLU(inplace=True),
            )
        else:
            self.branch1 = nn.Sequential()
        self.branch2 = nn.Sequential(
            nn.Conv2d(inp if stride > 1 else branch_chs, branch_chs, 1, bias=False), nn.BatchNorm2d(branch_chs),
            nn.ReLU(inplace=True),
            _depthwise(branch_chs, stride), nn.BatchNorm2d(branch_chs),
            nn.Conv2d(branch_chs, branch_chs, 1, bias=False), nn.BatchNorm2d(branch_chs), nn.ReLU(inplace=True),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:
            x1, x2 = x.chunk(2, dim=1)
            out = torch.cat((x1, self.branch2(x2)), dim=1)
        else:
            out = torch.cat((self.branch1(x), self.branch2(x)), dim=1)
        return channel_shuffle(out, 2)

    def reparameterize(self) -> None:
        """Fold every BatchNorm into the conv before it."""
        if self.stride > 1:
            fold_bn_into_conv(self.branch1, "0", "1")
            fold_bn_into_conv(self.branch1, "2", "3")
        for conv, bn in (("0", "1"), ("3", "4"), ("5", "6")):
            fold_bn_into_conv(self.branch2, conv, bn)


class ShuffleNetV2(nn.Module):
    """ShuffleNet V2 in torchvision's layout.

    Input (N, in_chans, H, W) -> logits (N, num_classes). x1.0: stages of 24/116/232/1024
    channels at strides 4/8/16/32.
    """

    classifier_name = "fc"

    def __init__(self, cfg: ShuffleNetV2Cfg, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0):
        super().__init__()
        if len(cfg.stages_repeats) != 3 or len(cfg.stages_out_channels) != 5:
            raise ValueError(
                f"stages_repeats needs 3 and stages_out_channels 5 entries, got {cfg.stages_repeats} and {cfg.stages_out_channels}"
            )
        if drop_path_rate > 0:
            raise ValueError(f"ShuffleNetV2 has no residual branches for drop_path_rate={drop_path_rate}; use 0")
        self.grad_checkpointing = False
        chs = cfg.stages_out_channels
        self.conv1 = Conv2dNormActivation(in_chans, chs[0], 3, 2)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_chs = chs[0]
        for name, repeats, out_chs in zip(("stage2", "stage3", "stage4"), cfg.stages_repeats, chs[1:4]):
            units = [InvertedResidual(in_chs, out_chs, 2)] + [InvertedResidual(out_chs, out_chs, 1) for _ in range(repeats - 1)]
            setattr(self, name, nn.Sequential(*units))
            in_chs = out_chs
        self.conv5 = Conv2dNormActivation(in_chs, chs[4], 1)
        self.num_features = chs[4]
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.feature_info = [
            dict(num_chs=chs[0], reduction=4, module="maxpool"),
            dict(num_chs=chs[1], reduction=8, module="stage2"),
            dict(num_chs=chs[2], reduction=16, module="stage3"),
            dict(num_chs=chs[4], reduction=32, module="conv5"),
        ]

    def _stages(self) -> List[List[nn.Module]]:
        return [[self.conv1, self.maxpool], list(self.stage2), list(self.stage3), list(self.stage4) + [self.conv5]]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, conv5 channels, H/32, W/32)."""
        for stage in self._stages():
            x = run_blocks(stage, x, self.grad_checkpointing)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        return x if pre_logits else self.fc(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] = (0, 1, 2, 3)) -> List[torch.Tensor]:
        """Stage outputs (N, C_i, H/stride_i, W/stride_i) for stage ``indices``, in stage order."""
        return stage_outputs(self._stages(), x, indices, self.grad_checkpointing)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reparameterize(self) -> None:
        """Fold every BatchNorm into the conv before it."""
        self.conv1.reparameterize()
        for stage in (self.stage2, self.stage3, self.stage4):
            for unit in stage:
                unit.reparameterize()
        self.conv5.reparameterize()


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: ShuffleNetV2) -> Dict[str, torch.Tensor]:
    """torchvision's ShuffleNetV2 layout is the native one: nothing to remap."""
    return state_dict


def _create_shufflenetv2(channels: Tuple[int, ...], pretrained=None, **kwargs) -> ShuffleNetV2:
    cfg = ShuffleNetV2Cfg(stages_repeats=(4, 8, 4), stages_out_channels=channels)
    return build_model(ShuffleNetV2, cfg, checkpoint_filter_fn, pretrained=pretrained, **kwargs)


_TORCHVISION_CFG = dict(interpolation="bilinear")  # torchvision's evaluation: resize 256, centre crop 224, bilinear


@register_model(pretrained_cfg=_TORCHVISION_CFG)
def shufflenetv2_x0_5(pretrained=None, **kwargs) -> ShuffleNetV2:
    """ShuffleNet V2 x0.5 (torchvision layout): 1.37M parameters, 41M MACs at 224x224."""
    return _create_shufflenetv2((24, 48, 96, 192, 1024), pretrained, **kwargs)


@register_model(pretrained_cfg=_TORCHVISION_CFG)
def shufflenetv2_x1_0(pretrained=None, **kwargs) -> ShuffleNetV2:
    """ShuffleNet V2 x1.0 (torchvision layout): 2.3M parameters, 146M MACs at 224x224."""
    return _create_shufflenetv2((24, 116, 232, 464, 1024), pretrained, **kwargs)


@register_model(pretrained_cfg=_TORCHVISION_CFG)
def shufflenetv2_x1_5(pretrained=None, **kwargs) -> ShuffleNetV2:
    """ShuffleNet V2 x1.5 (torchvision layout): 3.5M parameters, 299M MACs at 224x224."""
    return _create_shufflenetv2((24, 176, 352, 704, 1024), pretrained, **kwargs)


@register_model(pretrained_cfg=_TORCHVISION_CFG)
def shufflenetv2_x2_0(pretrained=None, **kwargs) -> ShuffleNetV2:
    """ShuffleNet V2 x2.0 (torchvision layout): 7.4M parameters, 591M MACs at 224x224."""
    return _create_shufflenetv2((24, 244, 488, 976, 2048), pretrained, **kwargs)
