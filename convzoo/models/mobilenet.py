"""MobileNet V1, V2 and V3.

- MobileNetV1 (Howard et al., 2017, "MobileNets: Efficient Convolutional Neural Networks for
  Mobile Vision Applications"): a 3x3 stride-2 stem and 13 depthwise-separable blocks
  (3x3 depthwise -> BN -> ReLU6 -> 1x1 -> BN -> ReLU6), width 1.0. torchvision has no
  MobileNetV1; the layout and parameter names are timm's ``mobilenetv1_100``
  (``conv_stem, bn1, blocks.<stage>.<block>.{conv_dw, bn1, conv_pw, bn2}, classifier``), so
  its state dicts load unchanged.
- MobileNetV2 (Sandler et al., 2018, "MobileNetV2: Inverted Residuals and Linear
  Bottlenecks"): inverted residuals with ReLU6 and a linear 1x1 projection.
- MobileNetV3 Large/Small (Howard et al., 2019, "Searching for MobileNetV3"): inverted
  residuals with squeeze-and-excitation (hard-sigmoid gate), h-swish, BatchNorm eps 1e-3.

V2 and V3 have torchvision's layout and parameter names (``features.<i>...``,
``classifier.<i>``), so torchvision state dicts load unchanged. timm's MobileNetV3 layout
(``conv_stem``, ``bn1``, ``blocks.<stage>.<block>.{conv_pw, bn1, conv_dw, bn2, se.conv_reduce,
se.conv_expand, conv_pwl, bn3}`` or a first depthwise-separable block's ``conv_dw, bn1, se,
conv_pw, bn2``, the last stage's ``conv, bn1``, then ``conv_head`` (a biased 1x1 conv on the
pooled features: our ``classifier.0``) and ``classifier``) is mapped by
:func:`checkpoint_filter_fn`. The architectures are the same (hard-swish stem, ReLU in the
first stages, hard-sigmoid SE on the expanded width / 4 rounded to 8, 1280/1024 hidden head
units); timm's BatchNorms use eps 1e-5 where torchvision's use 1e-3: build with
``bn_eps=1e-5`` to reproduce timm's outputs exactly.

Every model exposes four stages at strides 4, 8, 16 and 32: the last block at each of those
strides, the stride-32 one ending with the final 1x1 conv (the map ``forward_features``
returns).
"""
from __future__ import annotations

import dataclasses
import logging
import math
from functools import partial
from typing import Dict, List, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers import DropPath, SqueezeExcite, make_divisible
from ._builder import build_model
from ._convbn import (
    Conv2dNormActivation, SequentialBackbone, fold_bn_into_conv, linear_drop_path_rates, run_blocks, stage_outputs,
    stages_of,
)
from ._registry import register_model

_logger = logging.getLogger(__name__)

__all__ = [
    "MobileNetV1",
    "MobileNetV1Cfg",
    "MobileNetV2",
    "MobileNetV2Cfg",
    "MobileNetV3",
    "MobileNetV3Cfg",
    "checkpoint_filter_fn",
]


def _reparameterize_children(module: nn.Module) -> None:
    for child in module.children():
        if callable(getattr(child, "reparameterize", None)):
            child.reparameterize()


# --------------------------------------------------------------------------------------------
# MobileNetV1
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MobileNetV1Cfg:
    """MobileNetV1: ``width_mult`` scales every width (rounded to multiples of 8);
    ``drop_rate`` is the dropout before the classifier (timm's default 0)."""

    width_mult: float = 1.0
    drop_rate: float = 0.0


# (output channels, blocks, stride of the first block) per stage, as timm's arch_def
# ``dsa_r1_k3_s1_c64, dsa_r2_k3_s2_c128, dsa_r2_k3_s2_c256, dsa_r6_k3_s2_c512, dsa_r2_k3_s2_c1024``.
_V1_STAGES = ((64, 1, 1), (128, 2, 2), (256, 2, 2), (512, 6, 2), (1024, 2, 2))


class DepthwiseSeparableConv(nn.Module):
    """3x3 depthwise conv -> BN -> ReLU6 -> 1x1 conv -> BN -> ReLU6, no residual.

    Input (N, in_chs, H, W) -> output (N, out_chs, H / stride, W / stride).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1):
        super().__init__()
        self.conv_dw = nn.Conv2d(in_chs, in_chs, 3, stride, 1, groups=in_chs, bias=False)
        self.bn1 = nn.BatchNorm2d(in_chs)
        self.act1 = nn.ReLU6(inplace=True)
        self.conv_pw = nn.Conv2d(in_chs, out_chs, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_chs)
        self.act2 = nn.ReLU6(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv_dw(x)))
        return self.act2(self.bn2(self.conv_pw(x)))

    def reparameterize(self) -> None:
        fold_bn_into_conv(self, "conv_dw", "bn1")
        fold_bn_into_conv(self, "conv_pw", "bn2")


class MobileNetV1(nn.Module):
    """MobileNetV1 in timm's ``mobilenetv1_100`` layout.

    Input (N, in_chans, H, W) -> logits (N, num_classes). Stages ``blocks.1..blocks.4`` give
    128/256/512/1024 channels at strides 4/8/16/32 (``blocks.0`` is at stride 2).
    """

    classifier_name = "classifier"

    def __init__(self, cfg: MobileNetV1Cfg, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0):
        super().__init__()
        if drop_path_rate > 0:
            raise ValueError(f"MobileNetV1 has no residual branches for drop_path_rate={drop_path_rate}; use 0")
        self.grad_checkpointing = False
        self.drop_rate = cfg.drop_rate
        stem_chs = make_divisible(32 * cfg.width_mult)
        self.conv_stem = nn.Conv2d(in_chans, stem_chs, 3, 2, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_chs)
        self.act1 = nn.ReLU6(inplace=True)
        stages, in_chs, reduction = [], stem_chs, 2
        self.feature_info = []
        for i, (chs, depth, stride) in enumerate(_V1_STAGES):
            out_chs = make_divisible(chs * cfg.width_mult)
            blocks = [DepthwiseSeparableConv(in_chs, out_chs, stride)]
            blocks += [DepthwiseSeparableConv(out_chs, out_chs) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_chs, reduction = out_chs, reduction * stride
            if i > 0:
                self.feature_info.append(dict(num_chs=out_chs, reduction=reduction, module=f"blocks.{i}"))
        self.blocks = nn.Sequential(*stages)
        self.num_features = in_chs
        self.classifier = nn.Linear(in_chs, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights_goog)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, 1024, H/32, W/32)."""
        x = self.act1(self.bn1(self.conv_stem(x)))
        return run_blocks(self.blocks, x, self.grad_checkpointing)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.mean((2, 3))
        x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] = (0, 1, 2, 3)) -> List[torch.Tensor]:
        """Stage outputs (N, C_i, H/stride_i, W/stride_i) for stage ``indices``, in stage order."""
        x = self.act1(self.bn1(self.conv_stem(x)))
        return stage_outputs(stages_of(self.blocks, (1, 2, 3, 4)), x, indices, self.grad_checkpointing)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reparameterize(self) -> None:
        """Fold every BatchNorm into the conv before it."""
        fold_bn_into_conv(self, "conv_stem", "bn1")
        for stage in self.blocks:
            _reparameterize_children(stage)


@torch.no_grad()
def _init_weights_goog(m: nn.Module) -> None:
    """timm's EfficientNet/MobileNet init: conv N(0, sqrt(2 / fan_out)), linear U(+-1/sqrt(out))."""
    if isinstance(m, nn.Conv2d):
        fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
        m.weight.normal_(0, math.sqrt(2.0 / fan_out))
        if m.bias is not None:
            m.bias.zero_()
    elif isinstance(m, nn.BatchNorm2d):
        m.weight.fill_(1.0)
        m.bias.zero_()
    elif isinstance(m, nn.Linear):
        bound = 1.0 / math.sqrt(m.weight.size(0))
        m.weight.uniform_(-bound, bound)
        m.bias.zero_()


# --------------------------------------------------------------------------------------------
# MobileNetV2
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MobileNetV2Cfg:
    """MobileNetV2: width multiplier (channels rounded to ``round_nearest``) and classifier dropout."""

    width_mult: float = 1.0
    round_nearest: int = 8
    drop_rate: float = 0.2


# (expansion t, output channels c, repeats n, stride s) as in the paper's Table 2 / torchvision.
_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))


class InvertedResidualV2(nn.Module):
    """[1x1 expand -> BN -> ReLU6] -> 3x3 depthwise -> BN -> ReLU6 -> 1x1 linear -> BN,
    plus the input when the shapes agree (stride 1, in_chs == out_chs).

    torchvision's keys: ``conv.0`` .. ``conv.3`` (``conv.0`` .. ``conv.2`` without expansion).
    Input (N, in_chs, H, W) -> output (N, out_chs, H / stride, W / stride).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: int, drop_path: float = 0.0):
        super().__init__()
        hidden = int(round(in_chs * expand_ratio))
        self.use_res_connect = stride == 1 and in_chs == out_chs
        layers: List[nn.Module] = []
        if expand_ratio != 1:
            layers.append(Conv2dNormActivation(in_chs, hidden, 1, act_layer=nn.ReLU6))
        layers += [
            Conv2dNormActivation(hidden, hidden, 3, stride, groups=hidden, act_layer=nn.ReLU6),
            nn.Conv2d(hidden, out_chs, 1, bias=False),
            nn.BatchNorm2d(out_chs),
        ]
        self.conv = nn.Sequential(*layers)
        self.out_channels = out_chs
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.use_res_connect else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.drop_path(self.conv(x))
        return self.conv(x)

    def reparameterize(self) -> None:
        _reparameterize_children(self.conv)
        last = len(self.conv) - 1
        fold_bn_into_conv(self.conv, str(last - 1), str(last))


class MobileNetV2(SequentialBackbone):
    """MobileNetV2 in torchvision's layout: ``features.0`` (stem) .. ``features.18`` (1x1 to
    1280), ``classifier = [Dropout, Linear]``.

    Input (N, in_chans, H, W) -> logits (N, num_classes). Stages end at ``features.3, .6,
    .13, .18`` (24/32/96/1280 channels at strides 4/8/16/32).
    """

    classifier_name = "classifier.1"

    def __init__(self, cfg: MobileNetV2Cfg, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0):
        super().__init__()
        in_chs = make_divisible(32 * cfg.width_mult, cfg.round_nearest)
        self.num_features = make_divisible(1280 * max(1.0, cfg.width_mult), cfg.round_nearest)
        features: List[nn.Module] = [Conv2dNormActivation(in_chans, in_chs, 3, 2, act_layer=nn.ReLU6)]
        rates = iter(linear_drop_path_rates(drop_path_rate, sum(n for _, _, n, _ in _V2_SETTING)))
        for t, c, n, s in _V2_SETTING:
            out_chs = make_divisible(c * cfg.width_mult, cfg.round_nearest)
            for i in range(n):
                features.append(InvertedResidualV2(in_chs, out_chs, s if i == 0 else 1, t, next(rates)))
                in_chs = out_chs
        features.append(Conv2dNormActivation(in_chs, self.num_features, 1, act_layer=nn.ReLU6))
        self.features = nn.Sequential(*features)
        self.stage_ends = (3, 6, 13, 18)
        self.feature_info = [
            dict(num_chs=self.features[end].out_channels, reduction=4 * 2**i, module=f"features.{end}")
            for i, end in enumerate(self.stage_ends)
        ]
        self.classifier = nn.Sequential(
            nn.Dropout(p=cfg.drop_rate),
            nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity(),
        )
        self.apply(_init_weights_torchvision)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return x if pre_logits else self.classifier(x)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier[1] = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def reparameterize(self) -> None:
        """Fold every BatchNorm into the conv before it."""
        _reparameterize_children(self.features)


@torch.no_grad()
def _init_weights_torchvision(m: nn.Module) -> None:
    """torchvision's MobileNet init: conv kaiming-normal (fan_out), linear N(0, 0.01), zero biases."""
    if isinstance(m, nn.Conv2d):
        nn.init.kaiming_normal_(m.weight, mode="fan_out")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0, 0.01)
        nn.init.zeros_(m.bias)


# --------------------------------------------------------------------------------------------
# MobileNetV3
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class MobileNetV3Cfg:
    """MobileNetV3: ``arch`` is "large" or "small"; width multiplier; classifier dropout;
    BatchNorm eps (torchvision's 1e-3; timm's weights were trained with 1e-5)."""

    arch: str = "large"
    width_mult: float = 1.0
    drop_rate: float = 0.2
    bn_eps: float = 1e-3


# (kernel, expanded channels, output channels, squeeze-excite, activation, stride) per block,
# from the paper's Tables 1 and 2 (torchvision's bneck_conf); input channels chain from the stem (16).
_V3_LARGE = (
    (3, 16, 16, False, "RE", 1),
    (3, 64, 24, False, "RE", 2), (3, 72, 24, False, "RE", 1),
    (5, 72, 40, True, "RE", 2), (5, 120, 40, True, "RE", 1), (5, 120, 40, True, "RE", 1),
    (3, 240, 80, False, "HS", 2), (3, 200, 80, False, "HS", 1), (3, 184, 80, False, "HS", 1),
    (3, 184, 80, False, "HS", 1), (3, 480, 112, True, "HS", 1), (3, 672, 112, True, "HS", 1),
    (5, 672, 160, True, "HS", 2), (5, 960, 160, True, "HS", 1), (5, 960, 160, True, "HS", 1),
)
_V3_SMALL = (
    (3, 16, 16, True, "RE", 2),
    (3, 72, 24, False, "RE", 2), (3, 88, 24, False, "RE", 1),
    (5, 96, 40, True, "HS", 2), (5, 240, 40, True, "HS", 1), (5, 240, 40, True, "HS", 1),
    (5, 120, 48, True, "HS", 1), (5, 144, 48, True, "HS", 1),
    (5, 288, 96, True, "HS", 2), (5, 576, 96, True, "HS", 1), (5, 576, 96, True, "HS", 1),
)
# blocks, width of the classifier's hidden layer, indices in ``features`` ending each stage
_V3_ARCHS = {"large": (_V3_LARGE, 1280, (3, 6, 12, 16)), "small": (_V3_SMALL, 1024, (1, 3, 8, 12))}
_V3_ACTS = {"RE": nn.ReLU, "HS": nn.Hardswish}


class InvertedResidualV3(nn.Module):
    """[1x1 expand -> BN -> act] -> kxk depthwise -> BN -> act -> [SE] -> 1x1 linear -> BN,
    plus the input when stride 1 and in_chs == out_chs.

    torchvision's keys: ``block.<i>`` (expand, depthwise, SE with ``fc1``/``fc2``, project).
    Input (N, in_chs, H, W) -> output (N, out_chs, H / stride, W / stride).
    """

    def __init__(
        self,
        in_chs: int,
        kernel_size: int,
        exp_chs: int,
        out_chs: int,
        use_se: bool,
        act_layer: type,
        stride: int,
        norm_layer,
        drop_path: float = 0.0,
    ):
        super().__init__()
        self.use_res_connect = stride == 1 and in_chs == out_chs
        layers: List[nn.Module] = []
        if exp_chs != in_chs:
            layers.append(Conv2dNormActivation(in_chs, exp_chs, 1, act_layer=act_layer, norm_layer=norm_layer))
        layers.append(Conv2dNormActivation(exp_chs, exp_chs, kernel_size, stride, groups=exp_chs, act_layer=act_layer, norm_layer=norm_layer))
        if use_se:
            layers.append(SqueezeExcite(exp_chs, make_divisible(exp_chs // 4, 8), nn.ReLU, F.hardsigmoid))
        layers.append(Conv2dNormActivation(exp_chs, out_chs, 1, act_layer=None, norm_layer=norm_layer))
        self.block = nn.Sequential(*layers)
        self.out_channels = out_chs
        self.drop_path = DropPath(drop_path) if drop_path > 0 and self.use_res_connect else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_res_connect:
            return x + self.drop_path(self.block(x))
        return self.block(x)

    def reparameterize(self) -> None:
        _reparameterize_children(self.block)


class MobileNetV3(SequentialBackbone):
    """MobileNetV3 Large/Small in torchvision's layout: ``features`` (stem, blocks, 1x1 conv to
    960/576), ``classifier = [Linear, Hardswish, Dropout, Linear]``.

    Input (N, in_chans, H, W) -> logits (N, num_classes). Large: stages of 24/40/112/960
    channels, Small: 16/24/48/576, at strides 4/8/16/32.
    """

    classifier_name = "classifier.3"

    def __init__(self, cfg: MobileNetV3Cfg, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0):
        super().__init__()
        if cfg.arch not in _V3_ARCHS:
            raise ValueError(f"arch must be one of {sorted(_V3_ARCHS)}, got {cfg.arch!r}")
        blocks, head_chs, self.stage_ends = _V3_ARCHS[cfg.arch]
        norm_layer = partial(nn.BatchNorm2d, eps=cfg.bn_eps, momentum=0.01)

        def width(chs: int) -> int:
            return make_divisible(chs * cfg.width_mult, 8)

        in_chs = width(16)
        features: List[nn.Module] = [Conv2dNormActivation(in_chans, in_chs, 3, 2, act_layer=nn.Hardswish, norm_layer=norm_layer)]
        rates = linear_drop_path_rates(drop_path_rate, len(blocks))
        for (k, exp, out, se, act, stride), rate in zip(blocks, rates):
            features.append(InvertedResidualV3(in_chs, k, width(exp), width(out), se, _V3_ACTS[act], stride, norm_layer, rate))
            in_chs = width(out)
        last_conv_chs = 6 * in_chs
        features.append(Conv2dNormActivation(in_chs, last_conv_chs, 1, act_layer=nn.Hardswish, norm_layer=norm_layer))
        self.features = nn.Sequential(*features)
        self.feature_info = [
            dict(num_chs=self.features[end].out_channels, reduction=4 * 2**i, module=f"features.{end}")
            for i, end in enumerate(self.stage_ends)
        ]
        self.num_features = width(head_chs)
        self.classifier = nn.Sequential(
            nn.Linear(last_conv_chs, self.num_features),
            nn.Hardswish(inplace=True),
            nn.Dropout(p=cfg.drop_rate, inplace=True),
            nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity(),
        )
        self.apply(_init_weights_torchvision)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Pooled features through the hidden layer; ``pre_logits`` stops before the last Linear."""
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        x = self.classifier[:3](x)
        return x if pre_logits else self.classifier[3](x)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.classifier[3] = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def reparameterize(self) -> None:
        """Fold every BatchNorm into the conv before it."""
        _reparameterize_children(self.features)


# --------------------------------------------------------------------------------------------
# Checkpoints and entry points
# --------------------------------------------------------------------------------------------


def _timm_v3_block_part(block: nn.Module, part: str) -> str:
    """Where a timm block part (``conv_pw``/``bn1``, ``conv_dw``, ``se``, ``conv_pwl``/``bn3``, or
    a depthwise-separable block's ``conv_dw``/``bn1``, ``conv_pw``/``bn2``) sits in our
    :class:`InvertedResidualV3` ``block``: ``block.<i>.<0 conv|1 bn>`` or ``block.<i>.fc1/fc2``."""
    layers = list(block.block)
    convs = [i for i, m in enumerate(layers) if isinstance(m, Conv2dNormActivation)]
    expand, depthwise, project = (convs if len(convs) == 3 else [None] + convs)
    se = next((i for i, m in enumerate(layers) if isinstance(m, SqueezeExcite)), None)
    if expand is None:  # timm's DepthwiseSeparableConv: conv_dw, bn1, se, conv_pw, bn2
        roles = {"conv_dw": (depthwise, "0"), "bn1": (depthwise, "1"), "conv_pw": (project, "0"), "bn2": (project, "1")}
    else:  # timm's InvertedResidual
        roles = {"conv_pw": (expand, "0"), "bn1": (expand, "1"), "conv_dw": (depthwise, "0"), "bn2": (depthwise, "1"),
                 "conv_pwl": (project, "0"), "bn3": (project, "1")}
    roles.update({"se.conv_reduce": (se, "fc1"), "se.conv_expand": (se, "fc2")})
    for name, (index, ours) in roles.items():
        if part.startswith(name + ".") and index is not None:
            return f"block.{index}.{ours}.{part[len(name) + 1:]}"
    return part


def _timm_v3_to_native(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """timm's MobileNetV3 keys -> ours: ``blocks.<s>.<j>`` numbered in order become
    ``features.1...``, the last stage (one conv-BN) the final ``features`` entry, ``conv_head``
    (1x1 conv, bias) the hidden Linear ``classifier.0`` and ``classifier`` the last Linear."""
    blocks = sorted({tuple(int(i) for i in k.split(".")[1:3]) for k in state_dict if k.startswith("blocks.")})
    position = {ids: n + 1 for n, ids in enumerate(blocks)}
    out = {}
    for key, value in state_dict.items():
        if key.startswith(("conv_stem.", "bn1.")):
            stem_part = "0" if key.startswith("conv_stem.") else "1"
            out[f"features.0.{stem_part}.{key.split('.', 1)[1]}"] = value
        elif key.startswith("blocks."):
            _, s, j, part = key.split(".", 3)
            n = position[(int(s), int(j))]
            feature = model.features[n] if n < len(model.features) else None
            if isinstance(feature, InvertedResidualV3):
                out[f"features.{n}.{_timm_v3_block_part(feature, part)}"] = value
            else:  # the final conv-BN-hardswish (timm's ConvBnAct: conv, bn1)
                out[f"features.{n}.{part.replace('conv.', '0.', 1).replace('bn1.', '1.', 1)}"] = value
        elif key.startswith("conv_head."):
            out["classifier.0." + key[len("conv_head."):]] = value.flatten(1) if value.dim() == 4 else value
        elif key.startswith("classifier."):
            out["classifier.3." + key[len("classifier."):]] = value
        else:
            out[key] = value
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: nn.Module) -> Dict[str, torch.Tensor]:
    """torchvision's (V2, V3) and timm's (V1) layouts are the native ones and load unchanged;
    timm's MobileNetV3 layout (``conv_stem``, ``blocks``, ``conv_head``) is mapped onto ours.
    ``model`` is not changed (a timm file on a model with torchvision's BatchNorm eps is
    loaded, with a warning that ``bn_eps=1e-5`` reproduces timm's outputs)."""
    if not (isinstance(model, MobileNetV3) and "conv_stem.weight" in state_dict and "conv_head.weight" in state_dict):
        return state_dict
    eps = {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)}
    if eps and eps != {1e-5}:
        _logger.warning("timm's MobileNetV3 weights were trained with BatchNorm eps 1e-5, this model has %s: "
                        "create it with bn_eps=1e-5 for timm's exact outputs", sorted(eps))
    return _timm_v3_to_native(state_dict, model)


def _create(model_cls, cfg, pretrained=None, **kwargs) -> nn.Module:
    return build_model(model_cls, cfg, checkpoint_filter_fn, pretrained=pretrained, **kwargs)


_TORCHVISION_CFG = dict(interpolation="bilinear")  # torchvision's evaluation: resize 256, centre crop 224, bilinear
# timm's mobilenetv1_100 (torchvision has no MobileNetV1): Inception normalisation, bicubic
_TIMM_V1_CFG = dict(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), interpolation="bicubic")


@register_model(pretrained_cfg=_TIMM_V1_CFG)
def mobilenetv1_100(pretrained=None, **kwargs) -> MobileNetV1:
    """MobileNetV1, width 1.0 (timm layout): 4.2M parameters, 569M MACs at 224x224."""
    return _create(MobileNetV1, MobileNetV1Cfg(), pretrained, **kwargs)


@register_model(pretrained_cfg=_TORCHVISION_CFG)
def mobilenetv2_100(pretrained=None, **kwargs) -> MobileNetV2:
    """MobileNetV2, width 1.0 (torchvision layout): 3.5M parameters, 300M MACs at 224x224."""
    return _create(MobileNetV2, MobileNetV2Cfg(), pretrained, **kwargs)


@register_model(pretrained_cfg=_TORCHVISION_CFG)
def mobilenetv3_large_100(pretrained=None, **kwargs) -> MobileNetV3:
    """MobileNetV3-Large, width 1.0 (torchvision layout): 5.5M parameters, 217M MACs at 224x224."""
    return _create(MobileNetV3, MobileNetV3Cfg(arch="large"), pretrained, **kwargs)


@register_model(pretrained_cfg=_TORCHVISION_CFG)
def mobilenetv3_small_100(pretrained=None, **kwargs) -> MobileNetV3:
    """MobileNetV3-Small, width 1.0 (torchvision layout): 2.5M parameters, 56M MACs at 224x224."""
    return _create(MobileNetV3, MobileNetV3Cfg(arch="small"), pretrained, **kwargs)
