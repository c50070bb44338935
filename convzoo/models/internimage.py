"""InternImage T/S/B (Wang et al., 2023, "InternImage: Exploring Large-Scale Vision Foundation
Models with Deformable Convolutions"), as OpenGVLab/InternImage's
``classification/models/intern_image.py`` builds them.

- Stem: 3x3 stride-2 conv (C/2) -> LayerNorm -> GELU -> 3x3 stride-2 conv (C) -> LayerNorm.
- Four levels of ``InternImageLayer`` blocks on NHWC maps: DCNv3 (:class:`convzoo.layers.DCNv3`)
  and an MLP (ratio 4, GELU), each a residual branch with stochastic depth, in pre-norm or
  post-norm form, with optional layer scale (``gamma1``/``gamma2``) and ``res_post_norm``.
  A level ends with a LayerNorm (absent in post-norm models, unless ``center_feature_scale``)
  and, except the last, a 3x3 stride-2 conv + LayerNorm doubling the channels.
- Head: 1x1 conv to 1.5x the channels (no bias) -> BatchNorm -> GELU -> global average pool
  -> Linear. ``convzoo.reparameterize`` folds that BatchNorm into its conv (the only one).

Every LayerNorm has eps 1e-6. The official configs: T = 64 channels, depths 4-4-18-4,
groups 4-8-16-32, pre-norm; S = 80 channels, 4-4-21-4, groups 5-10-20-40, layer scale 1e-5,
post-norm; B = 112 channels, 4-4-21-4, groups 7-14-28-56, layer scale 1e-5, post-norm; all
offset_scale 1.0 and mlp_ratio 4 (their training drop-path rates 0.1/0.4/0.5 are the
caller's ``drop_path_rate``).

Names: the official code wraps each norm in an ``nn.Sequential`` with permutes
(``norm1.0.weight``, ``patch_embed.norm1.1.weight``, ``conv_head.1.0.weight``); here the
norms are plain modules (``norm1.weight``, ...). :func:`checkpoint_filter_fn` maps the
official keys onto ours. The four stages for ``features_only`` are the level outputs before
downsampling (after the level norm), as NCHW maps at strides 4/8/16/32.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers import DCNv3, DropPath, to_channels_first, to_channels_last
from ..layers.prepacked import PackedConv2d, PackedLinear
from ._builder import build_model
from ._convbn import fold_bn_into_conv, linear_drop_path_rates, run_blocks
from ._registry import register_model

__all__ = ["InternImage", "InternImageCfg", "InternImageLayer", "checkpoint_filter_fn"]

_LN_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class InternImageCfg:
    """An InternImage variant (the official ``MODEL.INTERN_IMAGE`` options)."""

    channels: int = 64
    depths: Tuple[int, ...] = (4, 4, 18, 4)
    groups: Tuple[int, ...] = (4, 8, 16, 32)
    mlp_ratio: float = 4.0
    layer_scale: Optional[float] = None
    offset_scale: float = 1.0
    post_norm: bool = False
    res_post_norm: bool = False
    center_feature_scale: bool = False
    dw_kernel_size: Optional[int] = None
    remove_center: bool = False
    cls_scale: float = 1.5
    mlp_drop_rate: float = 0.0  # dropout after the stem and in the MLPs (the official code's drop_rate)
    drop_rate: float = 0.0  # dropout before the classifier (timm's drop_rate)


def _layer_norm(chs: int) -> nn.LayerNorm:
    return nn.LayerNorm(chs, eps=_LN_EPS)


class StemLayer(nn.Module):
    """(N, in_chans, H, W) -> (N, H/4, W/4, out_chs): two 3x3 stride-2 convs with LayerNorm
    (over channels) after each, GELU between."""

    def __init__(self, in_chans: int = 3, out_chs: int = 64):
        super().__init__()
        self.conv1 = PackedConv2d(in_chans, out_chs // 2, kernel_size=3, stride=2, padding=1)
        self.norm1 = _layer_norm(out_chs // 2)
        self.act = nn.GELU()
        self.conv2 = PackedConv2d(out_chs // 2, out_chs, kernel_size=3, stride=2, padding=1)
        self.norm2 = _layer_norm(out_chs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = to_channels_first(self.norm1(to_channels_last(self.conv1(x))))
        x = self.conv2(self.act(x))
        return self.norm2(to_channels_last(x))


class DownsampleLayer(nn.Module):
    """(N, H, W, C) -> (N, H/2, W/2, 2C): 3x3 stride-2 conv (no bias) -> LayerNorm."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = PackedConv2d(channels, 2 * channels, kernel_size=3, stride=2, padding=1, bias=False)
        self.norm = _layer_norm(2 * channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(to_channels_last(self.conv(to_channels_first(x))))


class MLPLayer(nn.Module):
    """(..., C) -> (..., C): Linear -> GELU -> dropout -> Linear -> dropout (the linears pre-pack their
    weights for eager CPU inference: :class:`convzoo.layers.prepacked.PackedLinear`)."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = PackedLinear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = PackedLinear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class InternImageLayer(nn.Module):
    """One InternImage block on (N, H, W, C): a DCNv3 branch and an MLP branch.

    pre-norm:      x + dp(g1 * dcn(norm1(x))),           then x + dp(g2 * mlp(norm2(x)))
    post-norm:     x + dp(g1 * norm1(dcn(x))),           then x + dp(g2 * norm2(mlp(x)))
    res_post_norm: x + dp(res_post_norm1(dcn(norm1(x)))), then the same for the MLP
    (``g1``/``g2`` only with layer scale; as in the official code, ``res_post_norm`` has no
    effect when layer scale is on).
    """

    def __init__(self, channels: int, groups: int, cfg: InternImageCfg, drop_path: float = 0.0):
        super().__init__()
        self.post_norm = cfg.post_norm
        self.res_post_norm = cfg.res_post_norm
        self.norm1 = _layer_norm(channels)
        self.dcn = DCNv3(
            channels=channels,
            kernel_size=3,
            dw_kernel_size=cfg.dw_kernel_size,
            stride=1,
            pad=1,
            dilation=1,
            group=groups,
            offset_scale=cfg.offset_scale,
            act_layer="GELU",
            norm_layer="LN",
            center_feature_scale=cfg.center_feature_scale,
            remove_center=cfg.remove_center,
        )
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = _layer_norm(channels)
        self.mlp = MLPLayer(channels, int(channels * cfg.mlp_ratio), cfg.mlp_drop_rate)
        self.layer_scale = cfg.layer_scale is not None
        if self.layer_scale:
            self.gamma1 = nn.Parameter(torch.full((channels,), float(cfg.layer_scale)))
            self.gamma2 = nn.Parameter(torch.full((channels,), float(cfg.layer_scale)))
        if cfg.res_post_norm:
            self.res_post_norm1 = _layer_norm(channels)
            self.res_post_norm2 = _layer_norm(channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.post_norm:
            dcn_out = self.norm1(self.dcn(x))
        elif self.res_post_norm and not self.layer_scale:
            dcn_out = self.res_post_norm1(self.dcn(self.norm1(x)))
        else:
            dcn_out = self.dcn(self.norm1(x))
        x = x + self.drop_path(self.gamma1 * dcn_out if self.layer_scale else dcn_out)
        if self.post_norm:
            mlp_out = self.norm2(self.mlp(x))
        elif self.res_post_norm and not self.layer_scale:
            mlp_out = self.res_post_norm2(self.mlp(self.norm2(x)))
        else:
            mlp_out = self.mlp(self.norm2(x))
        return x + self.drop_path(self.gamma2 * mlp_out if self.layer_scale else mlp_out)


class InternImageBlock(nn.Module):
    """A level: ``depth`` layers, the level norm, then (except the last level) a downsample.

    ``forward`` maps (N, H, W, C) to the level output before downsampling (N, H, W, C) and the
    input of the next level (N, H/2, W/2, 2C) (or the same map for the last level).
    """

    def __init__(self, channels: int, depth: int, groups: int, cfg: InternImageCfg, drop_paths: Sequence[float], downsample: bool):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList(InternImageLayer(channels, groups, cfg, drop_paths[i]) for i in range(depth))
        self.norm = _layer_norm(channels) if (not cfg.post_norm or cfg.center_feature_scale) else nn.Identity()
        self.downsample = DownsampleLayer(channels) if downsample else None

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        x = self.norm(run_blocks(self.blocks, x, self.grad_checkpointing))
        return x, (self.downsample(x) if self.downsample is not None else x)


class ConvHead(nn.Sequential):
    """(N, C, h, w) -> (N, out_chs, h, w): 1x1 conv (no bias) -> BatchNorm -> GELU, keyed 0/1/2."""

    def __init__(self, in_chs: int, out_chs: int):
        super().__init__(nn.Conv2d(in_chs, out_chs, kernel_size=1, bias=False), nn.BatchNorm2d(out_chs), nn.GELU())

    def reparameterize(self) -> None:
        """Fold the BatchNorm into the conv (exact in eval mode)."""
        fold_bn_into_conv(self, "0", "1")


class InternImage(nn.Module):
    """InternImage classification model.

    Input (N, in_chans, H, W) -> logits (N, num_classes). Stage maps (NCHW): C, 2C, 4C, 8C
    channels at strides 4, 8, 16, 32 (C = ``cfg.channels``).
    """

    classifier_name = "head"

    def __init__(self, cfg: InternImageCfg, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0):
        super().__init__()
        num_levels = len(cfg.depths)
        if num_levels != 4 or len(cfg.groups) != 4:
            raise ValueError(f"depths and groups must have 4 entries, got {cfg.depths} and {cfg.groups}")
        for i, group in enumerate(cfg.groups):
            if (cfg.channels * 2**i) % group:
                raise ValueError(f"level {i} has {cfg.channels * 2**i} channels, not divisible by groups[{i}]={group}")
        self.patch_embed = StemLayer(in_chans, cfg.channels)
        self.pos_drop = nn.Dropout(cfg.mlp_drop_rate)
        rates = linear_drop_path_rates(drop_path_rate, sum(cfg.depths))
        self.levels = nn.ModuleList()
        self.feature_info = []
        for i in range(num_levels):
            chs = cfg.channels * 2**i
            level_rates = rates[sum(cfg.depths[:i]):sum(cfg.depths[:i + 1])]
            self.levels.append(InternImageBlock(chs, cfg.depths[i], cfg.groups[i], cfg, level_rates, i < num_levels - 1))
            self.feature_info.append(dict(num_chs=chs, reduction=4 * 2**i, module=f"levels.{i}"))
        self.num_levels = num_levels
        stage_chs = cfg.channels * 2 ** (num_levels - 1)
        self.num_features = int(stage_chs * cfg.cls_scale)
        self.conv_head = ConvHead(stage_chs, self.num_features)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.apply(_init_weights)
        for m in self.modules():
            if isinstance(m, DCNv3):
                m.reset_parameters()
        # Every conv here reads an NHWC map (a channels_last-strided NCHW view): with its weight in
        # channels_last too, oneDNN runs it without reordering the weight on each call (the 3x3
        # downsampling weights: ~5 ms per InternImage-T forward at batch 1 on a 2-core CPU), and the
        # stem's first conv also returns channels_last, so its LayerNorm reads it without a copy.
        # Loading a checkpoint copies into these tensors and keeps their layout.
        self.to(memory_format=torch.channels_last)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> last level output (N, 8C, H/32, W/32)."""
        x = self.pos_drop(self.patch_embed(x))
        for level in self.levels:
            _, x = level(x)
        return to_channels_first(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """(N, 8C, h, w) -> conv_head -> pooled (N, 12C) if ``pre_logits`` else logits."""
        x = torch.flatten(self.avgpool(self.conv_head(x)), 1)
        return x if pre_logits else self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] = (0, 1, 2, 3)) -> List[torch.Tensor]:
        """Level outputs before downsampling, NCHW (N, C_i, H/stride_i, W/stride_i), in stage order."""
        wanted = {i % self.num_levels for i in indices}
        outs = []
        x = self.pos_drop(self.patch_embed(x))
        for i, level in enumerate(self.levels[: max(wanted) + 1]):
            out, x = level(x)
            if i in wanted:
                outs.append(to_channels_first(out))
        return outs

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        if num_classes > 0:
            _init_weights(self.head)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for level in self.levels:
            level.grad_checkpointing = enable


@torch.no_grad()
def _init_weights(m: nn.Module) -> None:
    """The official init: Linear truncated-normal (std 0.02) with zero bias, LayerNorm 1/0;
    convs keep PyTorch's default (the DCNv3 layers are reset afterwards)."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


# Official key -> ours: the norms the official code wraps in nn.Sequential with permutes.
_OFFICIAL_TO_NATIVE = (
    (re.compile(r"^patch_embed\.norm([12])\.1\."), r"patch_embed.norm\1."),
    (re.compile(r"^(levels\.\d+\.blocks\.\d+)\.(norm1|norm2|res_post_norm1|res_post_norm2)\.0\."), r"\1.\2."),
    (re.compile(r"^(levels\.\d+)\.norm\.0\."), r"\1.norm."),
    (re.compile(r"^(levels\.\d+)\.downsample\.norm\.1\."), r"\1.downsample.norm."),
    (re.compile(r"^conv_head\.1\.0\."), "conv_head.1."),
)


def official_key_to_native(key: str) -> str:
    """One key of an official InternImage checkpoint in our naming."""
    for pattern, replacement in _OFFICIAL_TO_NATIVE:
        key = pattern.sub(replacement, key)
    return key


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: InternImage) -> Dict[str, torch.Tensor]:
    """Map an official InternImage checkpoint (``{'model': ...}`` already unwrapped) onto our
    names; a checkpoint already in our layout is returned as it is."""
    if "patch_embed.norm1.weight" in state_dict:
        return state_dict
    return {official_key_to_native(k): v for k, v in state_dict.items()}


def _create_internimage(cfg: InternImageCfg, pretrained=None, **kwargs) -> InternImage:
    return build_model(InternImage, cfg, checkpoint_filter_fn, pretrained=pretrained, **kwargs)


@register_model
def internimage_t(pretrained=None, **kwargs) -> InternImage:
    """InternImage-T (internimage_t_1k_224): 30M parameters, 5G MACs at 224x224."""
    cfg = InternImageCfg(channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32))
    return _create_internimage(cfg, pretrained, **kwargs)


@register_model
def internimage_s(pretrained=None, **kwargs) -> InternImage:
    """InternImage-S (internimage_s_1k_224): 50M parameters, 8G MACs at 224x224."""
    cfg = InternImageCfg(channels=80, depths=(4, 4, 21, 4), groups=(5, 10, 20, 40), layer_scale=1e-5, post_norm=True)
    return _create_internimage(cfg, pretrained, **kwargs)


@register_model
def internimage_b(pretrained=None, **kwargs) -> InternImage:
    """InternImage-B (internimage_b_1k_224): 97M parameters, 16G MACs at 224x224."""
    cfg = InternImageCfg(channels=112, depths=(4, 4, 21, 4), groups=(7, 14, 28, 56), layer_scale=1e-5, post_norm=True)
    return _create_internimage(cfg, pretrained, **kwargs)
