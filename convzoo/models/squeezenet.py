"""SqueezeNet 1.0 and 1.1 (Iandola et al., 2016, "SqueezeNet: AlexNet-level accuracy with 50x
fewer parameters and <0.5MB model size"; 1.1 from the authors' repository).

Fire modules (1x1 squeeze, then parallel 1x1 and 3x3 expands concatenated), max-pools with
``ceil_mode``, and a 1x1-conv classifier (dropout, conv, ReLU, global average pool). The layout
and parameter names are torchvision's (``features.<i>.{squeeze, expand1x1, expand3x3}``,
``classifier.1``), so torchvision state dicts load unchanged. There is no BatchNorm, so
``convzoo.reparameterize`` has nothing to fold.

Stages: SqueezeNet's deepest maps are at stride 16 (three max-pools after a stride-2 conv),
so the four stages it exposes are at strides 2, 4, 8 and 16 (the stem conv, then the last
module before each max-pool, then the last Fire), not 4 to 32 like the other families.
"""
from __future__ import annotations

import dataclasses
from typing import Dict

import torch
import torch.nn as nn

from ._builder import build_model
from ._convbn import SequentialBackbone
from ._registry import register_model

__all__ = ["SqueezeNet", "SqueezeNetCfg", "Fire", "checkpoint_filter_fn"]


@dataclasses.dataclass(frozen=True)
class SqueezeNetCfg:
    """``version`` is "1_0" or "1_1"; ``drop_rate`` is the dropout before the final conv."""

    version: str = "1_0"
    drop_rate: float = 0.5


class Fire(nn.Module):
    """1x1 squeeze conv -> ReLU -> [1x1 expand -> ReLU, 3x3 expand -> ReLU] concatenated.

    Input (N, inplanes, H, W) -> output (N, expand1x1_planes + expand3x3_planes, H, W).
    """

    def __init__(self, inplanes: int, squeeze_planes: int, expand1x1_planes: int, expand3x3_planes: int):
        super().__init__()
        self.squeeze = nn.Conv2d(inplanes, squeeze_planes, kernel_size=1)
        self.squeeze_activation = nn.ReLU(inplace=True)
        self.expand1x1 = nn.Conv2d(squeeze_planes, expand1x1_planes, kernel_size=1)
        self.expand1x1_activation = nn.ReLU(inplace=True)
        self.expand3x3 = nn.Conv2d(squeeze_planes, expand3x3_planes, kernel_size=3, padding=1)
        self.expand3x3_activation = nn.ReLU(inplace=True)
        self.out_channels = expand1x1_planes + expand3x3_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.squeeze_activation(self.squeeze(x))
        return torch.cat([self.expand1x1_activation(self.expand1x1(x)), self.expand3x3_activation(self.expand3x3(x))], 1)


def _pool() -> nn.MaxPool2d:
    return nn.MaxPool2d(kernel_size=3, stride=2, ceil_mode=True)


def _features_1_0(in_chans: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, 96, kernel_size=7, stride=2), nn.ReLU(inplace=True), _pool(),
        Fire(96, 16, 64, 64), Fire(128, 16, 64, 64), Fire(128, 32, 128, 128), _pool(),
        Fire(256, 32, 128, 128), Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), _pool(),
        Fire(512, 64, 256, 256),
    )


def _features_1_1(in_chans: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_chans, 64, kernel_size=3, stride=2), nn.ReLU(inplace=True), _pool(),
        Fire(64, 16, 64, 64), Fire(128, 16, 64, 64), _pool(),
        Fire(128, 32, 128, 128), Fire(256, 32, 128, 128), _pool(),
        Fire(256, 48, 192, 192), Fire(384, 48, 192, 192), Fire(384, 64, 256, 256), Fire(512, 64, 256, 256),
    )


# features builder, (index in ``features``, channels) ending each stage
_VERSIONS = {
    "1_0": (_features_1_0, ((1, 96), (5, 256), (10, 512), (12, 512))),
    "1_1": (_features_1_1, ((1, 64), (4, 128), (7, 256), (12, 512))),
}


class SqueezeNet(SequentialBackbone):
    """SqueezeNet in torchvision's layout: ``features`` and ``classifier = [Dropout, Conv2d
    1x1, ReLU, AdaptiveAvgPool2d]``.

    Input (N, in_chans, H, W) -> logits (N, num_classes); stages at strides 2/4/8/16.
    """

    classifier_name = "classifier.1"

    def __init__(self, cfg: SqueezeNetCfg, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0):
        super().__init__()
        if cfg.version not in _VERSIONS:
            raise ValueError(f"version must be one of {sorted(_VERSIONS)}, got {cfg.version!r}")
        if drop_path_rate > 0:
            raise ValueError(f"SqueezeNet has no residual branches for drop_path_rate={drop_path_rate}; use 0")
        build_features, stages = _VERSIONS[cfg.version]
        self.features = build_features(in_chans)
        self.stage_ends = tuple(end for end, _ in stages)
        self.feature_info = [
            dict(num_chs=chs, reduction=2 ** (i + 1), module=f"features.{end}") for i, (end, chs) in enumerate(stages)
        ]
        self.num_features = 512
        self.classifier = nn.Sequential(
            nn.Dropout(p=cfg.drop_rate), self._final_conv(num_classes), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d((1, 1))
        )
        self._init_weights()

    def _final_conv(self, num_classes: int) -> nn.Module:
        if num_classes <= 0:
            return nn.Identity()
        conv = nn.Conv2d(self.num_features, num_classes, kernel_size=1)
        with torch.no_grad():
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)
        return conv

    @torch.no_grad()
    def _init_weights(self) -> None:
        """torchvision's init: kaiming-uniform convs, zero biases, final conv N(0, 0.01)."""
        for m in self.features.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Logits (N, num_classes) = pool(ReLU(conv1x1(dropout(x)))); ``pre_logits``: pooled (N, 512)."""
        if pre_logits:
            return torch.flatten(self.classifier[3](self.classifier[0](x)), 1)
        return torch.flatten(self.classifier(x), 1)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier[1] = self._final_conv(num_classes)

def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: SqueezeNet) -> Dict[str, torch.Tensor]:
    """torchvision's SqueezeNet layout is the native one: nothing to remap."""
    return state_dict


def _create_squeezenet(cfg: SqueezeNetCfg, pretrained=None, **kwargs) -> SqueezeNet:
    return build_model(SqueezeNet, cfg, checkpoint_filter_fn, pretrained=pretrained, **kwargs)


_TORCHVISION_CFG = dict(interpolation="bilinear")  # torchvision's evaluation: resize 256, centre crop 224, bilinear


@register_model(pretrained_cfg=_TORCHVISION_CFG)
def squeezenet1_0(pretrained=None, **kwargs) -> SqueezeNet:
    """SqueezeNet 1.0 (torchvision layout): 1.25M parameters, 819M MACs at 224x224."""
    return _create_squeezenet(SqueezeNetCfg(version="1_0"), pretrained, **kwargs)


@register_model(pretrained_cfg=_TORCHVISION_CFG)
def squeezenet1_1(pretrained=None, **kwargs) -> SqueezeNet:
    """SqueezeNet 1.1 (torchvision layout): 1.24M parameters, 352M MACs at 224x224."""
    return _create_squeezenet(SqueezeNetCfg(version="1_1"), pretrained, **kwargs)
