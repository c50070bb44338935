"""Semantic segmentation: UperNet and Semantic FPN heads on any registered backbone.

- **UperNet** (Xiao et al., "Unified Perceptual Parsing for Scene Understanding", ECCV 2018),
  as RepLKNet, ConvNeXt and InternImage used it for ADE20K: a pyramid pooling module (PSPNet,
  pool scales 1, 2, 3, 6) on the last stage, an FPN over all stages, the FPN levels upsampled
  to the finest one (stride 4) and fused by a 3x3 conv; an optional auxiliary FCN head on the
  third stage (training only, loss weight 0.4). Defaults are the papers' ADE20K settings:
  512 channels, auxiliary head of 256 channels.
- **Semantic FPN** (Kirillov et al., "Panoptic Feature Pyramid Networks", CVPR 2019): an FPN
  (256 channels), then per level 3x3 conv-BN-ReLU + 2x upsampling stages down to the finest
  stride (128 channels), the levels summed; light enough for small backbones.

Models are registered as ``upernet_<backbone>`` and ``semfpn_<backbone>`` for every registered
backbone with ``features_only``. They take (N, in_chans, H, W) and return logits
(N, num_classes, H, W) at the input resolution; in training mode a model with an auxiliary
head returns ``(logits, aux_logits)``. Options: the head's (:class:`SegHeadCfg`) and the
backbone's config fields, both as keyword arguments; ``pretrained_backbone=PATH`` loads a
backbone checkpoint (official layout or convzoo's) into the backbone, ``pretrained=PATH`` a
whole convzoo segmentation model.
"""
from __future__ import annotations

import dataclasses
import math
import os
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.reparam import conv_norm_act
from ._checkpoint import load_checkpoint
from ._features import FeatureExtractor
from ._registry import _ENTRY_POINTS, get_entry_point, register_model

__all__ = ["SegHeadCfg", "UperNetHead", "SemanticFPNHead", "FCNHead", "SegmentationModel",
           "create_segmentation_model", "register_segmentation_models", "adaptive_avg_pool_matrix"]

HEADS = ("upernet", "semfpn")


@dataclasses.dataclass(frozen=True)
class SegHeadCfg:
    """Options of a segmentation head (names prefixed so they never clash with a backbone's).

    ``head_channels``: UperNet's PPM/FPN/fusion width (512) or Semantic FPN's per-level head
    width (128); ``head_fpn_channels``: Semantic FPN's FPN width (256; UperNet uses
    ``head_channels``); ``head_pool_scales``: UperNet's PPM bins; ``head_dropout``: before the
    classifier; ``aux_channels``: width of the auxiliary FCN head (0: none); ``aux_index``: the
    stage it reads (-2: the third of four); ``aux_weight``: its loss weight.
    """

    head_channels: int = 512
    head_fpn_channels: int = 256
    head_pool_scales: Tuple[int, ...] = (1, 2, 3, 6)
    head_dropout: float = 0.1
    aux_channels: int = 256
    aux_index: int = -2
    aux_weight: float = 0.4

    def __post_init__(self):
        if self.head_channels < 1 or self.head_fpn_channels < 1 or self.aux_channels < 0:
            raise ValueError(f"head_channels and head_fpn_channels must be >= 1 and aux_channels >= 0, got "
                             f"{self.head_channels}, {self.head_fpn_channels}, {self.aux_channels}")
        if not self.head_pool_scales or any(s < 1 for s in self.head_pool_scales):
            raise ValueError(f"head_pool_scales must be positive ints, got {self.head_pool_scales}")
        if not 0.0 <= self.head_dropout < 1.0 or self.aux_weight < 0:
            raise ValueError(f"head_dropout must be in [0, 1) and aux_weight >= 0, got {self.head_dropout}, {self.aux_weight}")


_DEFAULTS = {
    "upernet": SegHeadCfg(),
    "semfpn": SegHeadCfg(head_channels=128, head_fpn_channels=256, aux_channels=0),
}


def adaptive_avg_pool_matrix(size_in: int, size_out: int, device=None, dtype=None) -> torch.Tensor:
    """(size_out, size_in) averaging matrix of ``adaptive_avg_pool`` along one axis.

    Bin i averages inputs ``floor(i * n / s)`` to ``ceil((i + 1) * n / s)`` (PyTorch's bins), so
    ``P_h @ x @ P_w.T`` equals ``F.adaptive_avg_pool2d(x, (s_h, s_w))`` and exports to ONNX as
    two MatMuls for any sizes (ONNX has no adaptive pooling).
    """
    matrix = torch.zeros(size_out, size_in, device=device, dtype=dtype)
    for i in range(size_out):
        start, end = (i * size_in) // size_out, -((-(i + 1) * size_in) // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def _adaptive_avg_pool(x: torch.Tensor, size: int) -> torch.Tensor:
    # plain ints: an exported graph holds the matrices as constants of the traced input size
    ph = adaptive_avg_pool_matrix(int(x.shape[-2]), size, x.device, x.dtype)
    pw = adaptive_avg_pool_matrix(int(x.shape[-1]), size, x.device, x.dtype)
    return torch.matmul(torch.matmul(ph, x), pw.t())


def _resize(x: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class PyramidPooling(nn.Module):
    """PSPNet's pyramid pooling: (N, C, h, w) -> (N, channels, h, w).

    The input and, for each scale s, its s x s average pooling through a 1x1 conv-BN-ReLU
    upsampled back, concatenated and fused by a 3x3 conv-BN-ReLU.
    """

    def __init__(self, in_channels: int, channels: int, scales: Sequence[int]):
        super().__init__()
        self.scales = tuple(scales)
        self.stages = nn.ModuleList(conv_norm_act(in_channels, channels, 1, act=True) for _ in self.scales)
        self.bottleneck = conv_norm_act(in_channels + len(self.scales) * channels, channels, 3, act=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [x]
        for scale, stage in zip(self.scales, self.stages):
            outs.append(_resize(stage(_adaptive_avg_pool(x, scale)), x.shape[-2:]))
        return self.bottleneck(torch.cat(outs, dim=1))


class UperNetHead(nn.Module):
    """UperNet decode head: feature maps of strides s_0 <= ... <= s_L -> (N, channels, H/s_0, W/s_0)."""

    def __init__(self, in_channels: Sequence[int], cfg: SegHeadCfg):
        super().__init__()
        ch = cfg.head_channels
        self.ppm = PyramidPooling(in_channels[-1], ch, cfg.head_pool_scales)
        self.lateral_convs = nn.ModuleList(conv_norm_act(c, ch, 1, act=True) for c in in_channels[:-1])
        self.fpn_convs = nn.ModuleList(conv_norm_act(ch, ch, 3, act=True) for _ in in_channels[:-1])
        self.fpn_bottleneck = conv_norm_act(len(in_channels) * ch, ch, 3, act=True)
        self.out_channels = ch

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)] + [self.ppm(features[-1])]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        outs = [conv(lat) for conv, lat in zip(self.fpn_convs, laterals[:-1])] + [laterals[-1]]
        size = outs[0].shape[-2:]
        return self.fpn_bottleneck(torch.cat([outs[0]] + [_resize(o, size) for o in outs[1:]], dim=1))


class SemanticFPNHead(nn.Module):
    """Semantic FPN: feature maps of strides s_0 <= ... <= s_L -> (N, head_channels, H/s_0, W/s_0).

    FPN (1x1 laterals, top-down sum, 3x3 outputs); level i then passes
    ``max(1, log2(s_i / s_0))`` stages of 3x3 conv-BN-ReLU, each but the level-0 one followed by
    2x bilinear upsampling (the last to the level-0 size exactly); the levels are summed.
    """

    def __init__(self, in_channels: Sequence[int], reductions: Sequence[int], cfg: SegHeadCfg):
        super().__init__()
        fpn, ch = cfg.head_fpn_channels, cfg.head_channels
        self.lateral_convs = nn.ModuleList(conv_norm_act(c, fpn, 1, act=True) for c in in_channels)
        self.fpn_convs = nn.ModuleList(conv_norm_act(fpn, fpn, 3, act=True) for _ in in_channels)
        self.scale_heads = nn.ModuleList()
        for reduction in reductions:
            ups = int(round(math.log2(reduction / reductions[0])))
            convs = [conv_norm_act(fpn if k == 0 else ch, ch, 3, act=True) for k in range(max(1, ups))]
            self.scale_heads.append(nn.ModuleList(convs))
        self.out_channels = ch

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        laterals = [conv(f) for conv, f in zip(self.lateral_convs, features)]
        for i in range(len(laterals) - 1, 0, -1):
            laterals[i - 1] = laterals[i - 1] + _resize(laterals[i], laterals[i - 1].shape[-2:])
        size = features[0].shape[-2:]
        out = None
        for level, (conv, lat, convs) in enumerate(zip(self.fpn_convs, laterals, self.scale_heads)):
            x = conv(lat)
            for k, stage in enumerate(convs):
                x = stage(x)
                if level > 0:
                    last = k == len(convs) - 1
                    x = _resize(x, size) if last else _resize(x, (x.shape[-2] * 2, x.shape[-1] * 2))
            out = x if out is None else out + x
        return out


class FCNHead(nn.Module):
    """Auxiliary head: (N, C, h, w) -> (N, num_classes, h, w) by 3x3 conv-BN-ReLU, dropout, 1x1 conv."""

    def __init__(self, in_channels: int, channels: int, num_classes: int, dropout: float):
        super().__init__()
        self.conv = conv_norm_act(in_channels, channels, 3, act=True)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.conv(x)))


class SegmentationModel(nn.Module):
    """A backbone's ``features_only`` maps, a decode head, a 1x1 classifier, bilinear upsampling.

    ``forward(x)`` (N, in_chans, H, W) -> logits (N, num_classes, H, W); in training mode with
    an auxiliary head, ``(logits, aux_logits)`` (both at H, W).
    """

    classifier_name = ("classifier", "aux_head.classifier")

    def __init__(self, backbone: FeatureExtractor, head: str, cfg: SegHeadCfg, num_classes: int):
        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 for a segmentation model, got {num_classes}")
        channels, reductions = backbone.channels(), backbone.reductions()
        if any(b < a for a, b in zip(reductions, reductions[1:])):  # equal ones: a dilated backbone (output_stride)
            raise ValueError(f"the backbone's stages must have non-decreasing strides, got {reductions}")
        self.backbone = backbone
        self.decode_head = (UperNetHead(channels, cfg) if head == "upernet"
                            else SemanticFPNHead(channels, reductions, cfg))
        self.dropout = nn.Dropout2d(cfg.head_dropout)
        self.classifier = nn.Conv2d(self.decode_head.out_channels, num_classes, 1)
        self.aux_head = None
        if cfg.aux_channels > 0:
            if not -len(channels) <= cfg.aux_index < len(channels):
                raise ValueError(f"aux_index {cfg.aux_index} names no stage of the {len(channels)} the backbone has")
            self.aux_head = FCNHead(channels[cfg.aux_index], cfg.aux_channels, num_classes, cfg.head_dropout)
        self.aux_index = cfg.aux_index
        self.aux_weight = cfg.aux_weight
        self.num_classes = num_classes
        self.feature_info = backbone.feature_info

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> the decode head's fused map (N, C, H/s_0, W/s_0), the last
        feature map before the classifier (what the ERF analysis differentiates)."""
        return self.decode_head(self.backbone(x))

    def forward(self, x: torch.Tensor):
        size = x.shape[-2:]
        features = self.backbone(x)
        logits = _resize(self.classifier(self.dropout(self.decode_head(features))), size)
        if self.training and self.aux_head is not None:
            return logits, _resize(self.aux_head(features[self.aux_index]), size)
        return logits

    def loss(self, outputs, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
        """Cross-entropy of ``outputs`` (``forward``'s) against ``target`` (N, H, W) class ids,
        plus ``aux_weight`` times the auxiliary head's; pixels at ``ignore_index`` do not count."""
        if isinstance(outputs, tuple):
            main, aux = outputs
            return (F.cross_entropy(main.float(), target, ignore_index=ignore_index)
                    + self.aux_weight * F.cross_entropy(aux.float(), target, ignore_index=ignore_index))
        return F.cross_entropy(outputs.float(), target, ignore_index=ignore_index)


# -------------------------------------------------------------------------------------------
# building and registration
# -------------------------------------------------------------------------------------------

def _prune_unused(backbone: FeatureExtractor, in_chans: int) -> None:
    """Replace the backbone modules that ``features_only`` never runs (a classifier's final
    norm, a pre-logits conv) by ``nn.Identity``, so that every parameter gets a gradient (and
    DDP needs no unused-parameter search). Found by running a small input once."""
    called = set()
    handles = [m.register_forward_pre_hook(lambda module, _: called.add(id(module))) for m in backbone.modules()]
    was_training = backbone.training
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(torch.zeros(1, in_chans, 64, 64))
    finally:
        for handle in handles:
            handle.remove()
        backbone.train(was_training)
    used = {id(m) for m in backbone.modules() if id(m) in called or any(id(s) in called for s in m.modules())}
    pruned: List[str] = []
    for name, module in backbone.named_modules():
        if not name or id(module) in used or any(name.startswith(p + ".") for p in pruned):
            continue
        if any(True for _ in module.parameters()):
            parent_name, _, child = name.rpartition(".")
            setattr(backbone.get_submodule(parent_name) if parent_name else backbone, child, nn.Identity())
            pruned.append(name)


def create_segmentation_model(
    head: str,
    backbone: str,
    pretrained: Optional[str | os.PathLike] = None,
    pretrained_backbone: Optional[str | os.PathLike] = None,
    num_classes: int = 150,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    out_indices: Optional[Sequence[int]] = None,
    **options,
) -> SegmentationModel:
    """``head`` ("upernet" or "semfpn") on the registered ``backbone``.

    ``options`` are fields of :class:`SegHeadCfg` and of the backbone's config; an unknown one
    is a ``TypeError`` listing both. ``out_indices``: the backbone stages the head reads (all).
    """
    if head not in HEADS:
        raise ValueError(f"head must be one of {', '.join(HEADS)}, got {head!r}")
    head_fields = {f.name for f in dataclasses.fields(SegHeadCfg)}
    head_options = {k: v for k, v in options.items() if k in head_fields}
    backbone_options = {k: v for k, v in options.items() if k not in head_fields}
    entry = get_entry_point(backbone)
    try:
        classifier = entry(pretrained=pretrained_backbone, num_classes=0, in_chans=in_chans,
                           drop_path_rate=drop_path_rate, **backbone_options)
    except TypeError as err:
        raise TypeError(f"{err}; the {head} head's options are {', '.join(sorted(head_fields))}") from None
    indices = tuple(range(len(classifier.feature_info))) if out_indices is None else tuple(out_indices)
    features = FeatureExtractor(classifier, indices)
    head_cfg = dataclasses.replace(_DEFAULTS[head], **head_options)
    _prune_unused(features, in_chans)
    model = SegmentationModel(features, head, head_cfg, num_classes)
    backbone_cfg = features.model.cfg
    model.cfg = _merged_config(head_cfg, backbone_cfg)
    model.in_chans = in_chans
    model.backbone_name = backbone
    model.checkpoint_filter_fn = None
    if pretrained is not None:
        load_checkpoint(model, pretrained)
    return model


def _merged_config(head_cfg: SegHeadCfg, backbone_cfg) -> object:
    """One frozen dataclass holding the head's and the backbone's fields (for convzoo files,
    whose metadata stores ``cfg`` flat, and for :func:`convzoo.models.load_model`)."""
    fields = [(f.name, f.type, dataclasses.field(default=getattr(cfg, f.name)))
              for cfg in (head_cfg, backbone_cfg) for f in dataclasses.fields(cfg)]
    cls = dataclasses.make_dataclass("SegmentationCfg", fields, frozen=True)
    return cls()


def _entry_point(head: str, backbone: str):
    def entry(pretrained=None, **kwargs) -> SegmentationModel:
        return create_segmentation_model(head, backbone, pretrained=pretrained, **kwargs)

    entry.__name__ = f"{head}_{backbone}"
    entry.__doc__ = f"{'UperNet' if head == 'upernet' else 'Semantic FPN'} on {backbone}'s features_only maps."
    return entry


def register_segmentation_models(backbones: Optional[Sequence[str]] = None) -> List[str]:
    """Register ``upernet_<b>`` and ``semfpn_<b>`` for each backbone ``b`` (default: every
    registered model that is not itself a segmentation model); returns the new names."""
    if backbones is None:
        backbones = [n for n in sorted(_ENTRY_POINTS) if not n.startswith(tuple(h + "_" for h in HEADS))]
    names = []
    for backbone in backbones:
        for head in HEADS:
            name = f"{head}_{backbone}"
            if name not in _ENTRY_POINTS:
                register_model(_entry_point(head, backbone))
                names.append(name)
    return names
