"""ResNet-50 (He et al., 2016, "Deep Residual Learning for Image Recognition") and
ResNet-50-DCNv2 (Zhu et al., 2019, "Deformable ConvNets v2: More Deformable, Better Results").

The layout and parameter names are torchvision's ``resnet50`` (the "v1.5" bottleneck: the
stride sits on the 3x3 conv), so torchvision state dicts load unchanged.

``resnet50_dcnv2`` follows the DCNv2 paper's setting as mmdet/mmcv configure it
(``dcn=dict(type='DCNv2', deform_groups=1), stage_with_dcn=(False, True, True, True)``): the
3x3 conv of every bottleneck in conv3-conv5 (``layer2``-``layer4``) is a modulated
deformable conv (:class:`convzoo.layers.ModulatedDeformConv2dPack`, without bias) whose offsets
and masks come from a zero-initialised 3x3 conv ``conv_offset``. At initialisation the offsets
are 0 and the mask is sigmoid(0) = 0.5 everywhere, so each such conv computes half of a plain
3x3 conv; the BatchNorm that follows absorbs the factor in training mode, so training starts
as a plain ResNet-50. Its other parameter names are torchvision's: a torchvision ResNet-50
checkpoint loads into it with only the ``conv_offset`` keys absent; :func:`checkpoint_filter_fn`
fills exactly those with their zero initialisation and logs that it did (every other key is
still loaded strictly).
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers import DropPath, ModulatedDeformConv2dPack
from ._builder import build_model
from ._convbn import fold_bn_into_conv, linear_drop_path_rates, run_blocks, stage_outputs
from ._registry import register_model

_logger = logging.getLogger(__name__)

__all__ = ["ResNet", "ResNetCfg", "Bottleneck", "checkpoint_filter_fn"]


@dataclasses.dataclass(frozen=True)
class ResNetCfg:
    """A bottleneck ResNet variant.

    Attributes:
        layers: number of bottlenecks in layer1..layer4.
        dcn_stages: per layer, whether its 3x3 convs are modulated deformable convs (DCNv2).
        deform_groups: offset groups of those deformable convs.
        zero_init_residual: start every residual branch at zero (its last BatchNorm's weight 0).
        output_stride: 32, 16 or 8: the stride of the last stage; below 32 the last stage (and,
            for 8, the one before) keeps the resolution with dilated 3x3 convs instead of
            striding (torchvision's ``replace_stride_with_dilation``), for dense prediction.
        drop_rate: dropout before the classifier (timm's ``drop_rate``).
    """

    layers: Tuple[int, ...] = (3, 4, 6, 3)
    dcn_stages: Tuple[bool, ...] = (False, False, False, False)
    deform_groups: int = 1
    zero_init_residual: bool = False
    output_stride: int = 32
    drop_rate: float = 0.0

    def __post_init__(self):
        if self.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride!r}")


@torch.no_grad()
def _fold_bn_into_deform_conv(parent: nn.Module, conv_name: str, bn_name: str) -> None:
    """Fold ``parent.<bn_name>`` into the modulated deformable conv ``parent.<conv_name>``.

    Exact: the modulated deformable conv is linear in its weight and bias, so scaling the
    weight per output channel and shifting the bias reproduces the eval-mode BatchNorm.
    """
    bn = getattr(parent, bn_name)
    if isinstance(bn, nn.Identity):
        return
    dcn = getattr(parent, conv_name)
    scale = bn.weight / (bn.running_var + bn.eps).sqrt()
    old_bias = dcn.bias if dcn.bias is not None else torch.zeros_like(scale)
    new_bias = bn.bias + (old_bias - bn.running_mean) * scale
    dcn.weight.mul_(scale.reshape(-1, 1, 1, 1))
    if dcn.bias is None:
        dcn.bias = nn.Parameter(new_bias.clone())
    else:
        dcn.bias.copy_(new_bias)
    setattr(parent, bn_name, nn.Identity())


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 (stride here; plain or modulated deformable) -> 1x1 expand (x4),
    each followed by BatchNorm, ReLU after the first two and after the residual sum.

    Input (N, inplanes, H, W) -> output (N, 4 * planes, H / stride, W / stride).
    """

    expansion = 4

    def __init__(
        self,
        inplanes: int,
        planes: int,
        stride: int = 1,
        downsample: Optional[nn.Module] = None,
        dcn: bool = False,
        deform_groups: int = 1,
        drop_path: float = 0.0,
        dilation: int = 1,
    ):
        super().__init__()
        width = planes
        out_chs = planes * self.expansion
        self.conv1 = nn.Conv2d(inplanes, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.deformable = dcn
        if dcn:
            self.conv2 = ModulatedDeformConv2dPack(
                width, width, 3, stride=stride, padding=dilation, dilation=dilation, deform_groups=deform_groups, bias=False
            )
        else:
            self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=dilation, dilation=dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_chs, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_chs)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(self.drop_path(out) + shortcut)

    def reparameterize(self) -> None:
        """Fold each BatchNorm into the conv before it (deformable conv included)."""
        fold_bn_into_conv(self, "conv1", "bn1")
        if self.deformable:
            _fold_bn_into_deform_conv(self, "conv2", "bn2")
        else:
            fold_bn_into_conv(self, "conv2", "bn2")
        fold_bn_into_conv(self, "conv3", "bn3")
        if self.downsample is not None:
            fold_bn_into_conv(self.downsample, "0", "1")


class ResNet(nn.Module):
    """Bottleneck ResNet with torchvision's layout: ``conv1, bn1, relu, maxpool,
    layer1..layer4, avgpool, fc``.

    Input (N, in_chans, H, W) -> logits (N, num_classes). The four stages ``layer1..layer4``
    give maps of 256/512/1024/2048 channels at strides 4/8/16/32.
    """

    classifier_name = "fc"

    def __init__(self, cfg: ResNetCfg, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0):
        super().__init__()
        if len(cfg.layers) != 4 or len(cfg.dcn_stages) != 4:
            raise ValueError(f"layers and dcn_stages must have 4 entries, got {cfg.layers} and {cfg.dcn_stages}")
        self.grad_checkpointing = False
        self.conv1 = nn.Conv2d(in_chans, 64, kernel_size=7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(kernel_size=3, stride=2, padding=1)

        drop_rates = linear_drop_path_rates(drop_path_rate, sum(cfg.layers))
        inplanes, reduction, dilation = 64, 4, 1
        self.feature_info = []
        for i, (depth, dcn) in enumerate(zip(cfg.layers, cfg.dcn_stages)):
            planes = 64 * 2**i
            stride = 1 if i == 0 else 2
            previous_dilation = dilation
            if reduction * stride > cfg.output_stride:  # keep the resolution, dilate instead
                dilation, stride = dilation * stride, 1
            reduction *= stride
            rates = drop_rates[sum(cfg.layers[:i]):sum(cfg.layers[:i + 1])]
            layer = self._make_layer(inplanes, planes, depth, stride, dcn, cfg.deform_groups, rates,
                                     (previous_dilation, dilation))
            setattr(self, f"layer{i + 1}", layer)
            inplanes = planes * Bottleneck.expansion
            self.feature_info.append(dict(num_chs=inplanes, reduction=reduction, module=f"layer{i + 1}"))
        self.num_features = inplanes
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights(cfg.zero_init_residual)

    @staticmethod
    def _make_layer(inplanes, planes, depth, stride, dcn, deform_groups, drop_rates, dilations=(1, 1)) -> nn.Sequential:
        """``depth`` bottlenecks; the first has ``dilations[0]`` (the previous stage's), the rest ``dilations[1]``."""
        out_chs = planes * Bottleneck.expansion
        downsample = None
        if stride != 1 or inplanes != out_chs:
            downsample = nn.Sequential(nn.Conv2d(inplanes, out_chs, 1, stride=stride, bias=False), nn.BatchNorm2d(out_chs))
        blocks = [Bottleneck(inplanes, planes, stride, downsample, dcn, deform_groups, drop_rates[0], dilations[0])]
        blocks += [Bottleneck(out_chs, planes, 1, None, dcn, deform_groups, rate, dilations[1]) for rate in drop_rates[1:]]
        return nn.Sequential(*blocks)

    @torch.no_grad()
    def _init_weights(self, zero_init_residual: bool) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, Bottleneck) and m.deformable:
                nn.init.kaiming_normal_(m.conv2.weight, mode="fan_out", nonlinearity="relu")
                nn.init.zeros_(m.conv2.conv_offset.weight)
                nn.init.zeros_(m.conv2.conv_offset.bias)
            if isinstance(m, Bottleneck) and zero_init_residual:
                nn.init.zeros_(m.bn3.weight)

    @property
    def stages(self) -> List[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, 2048, H/32, W/32)."""
        x = self._stem(x)
        for stage in self.stages:
            x = run_blocks(stage, x, self.grad_checkpointing)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(N, 2048, h, w) -> pooled (N, 2048) if ``pre_logits`` else logits (N, num_classes)."""
        x = torch.flatten(self.avgpool(x), 1)
        return x if pre_logits else self.fc(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] = (0, 1, 2, 3)) -> List[torch.Tensor]:
        """The outputs of the stages in ``indices`` (N, C_i, H/stride_i, W/stride_i), in stage order."""
        return stage_outputs(self.stages, self._stem(x), indices, self.grad_checkpointing)

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    def reparameterize(self) -> None:
        """Fold every BatchNorm into the conv before it (in place; eval outputs unchanged)."""
        fold_bn_into_conv(self, "conv1", "bn1")
        for stage in self.stages:
            for block in stage:
                block.reparameterize()


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: ResNet) -> Dict[str, torch.Tensor]:
    """torchvision's ResNet layout is the native one; for a deformable model, a checkpoint
    without any ``conv_offset`` key (a plain torchvision ResNet-50) gets those keys filled
    with the model's zero initialisation, so training starts as the plain ResNet."""
    own = model.state_dict()
    offset_keys = [k for k in own if ".conv_offset." in k]
    if not offset_keys or any(k in state_dict for k in offset_keys):
        return state_dict
    _logger.info(
        "checkpoint has no conv_offset weights (a plain ResNet): %d deformable offset/mask convs keep "
        "their zero initialisation", len(offset_keys) // 2,
    )
    state_dict = dict(state_dict)
    for key in offset_keys:
        state_dict[key] = own[key].detach().clone()
    return state_dict


def _create_resnet(cfg: ResNetCfg, pretrained=None, **kwargs) -> ResNet:
    return build_model(ResNet, cfg, checkpoint_filter_fn, pretrained=pretrained, **kwargs)


_TORCHVISION_CFG = dict(interpolation="bilinear")  # torchvision's evaluation: resize 256, centre crop 224, bilinear


@register_model(pretrained_cfg=_TORCHVISION_CFG)
def resnet50(pretrained=None, **kwargs) -> ResNet:
    """ResNet-50 (torchvision layout): 25.6M parameters, 4.1G MACs at 224x224."""
    return _create_resnet(ResNetCfg(layers=(3, 4, 6, 3)), pretrained, **kwargs)


@register_model(pretrained_cfg=_TORCHVISION_CFG)
def resnet50_dcnv2(pretrained=None, **kwargs) -> ResNet:
    """ResNet-50 with modulated deformable 3x3 convs in every bottleneck of conv3-conv5."""
    cfg = ResNetCfg(layers=(3, 4, 6, 3), dcn_stages=(False, True, True, True))
    return _create_resnet(cfg, pretrained, **kwargs)
