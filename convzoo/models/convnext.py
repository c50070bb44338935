"""ConvNeXt: "A ConvNet for the 2020s" (Liu et al., CVPR 2022, https://arxiv.org/abs/2201.03545).

Architecture of facebookresearch/ConvNeXt: a 4x4 stride-4 patchify stem with LayerNorm, stages
of blocks (7x7 depthwise conv, LayerNorm over channels with eps 1e-6, Linear 4x, GELU, Linear,
layer scale ``gamma`` initialised to 1e-6, stochastic depth, residual), LayerNorm + 2x2 stride-2
conv downsampling in front of stages 1-3, then global average pool, LayerNorm and a linear head.

Parameter names follow timm's layout (``stem.0/1``, ``stages.i.downsample.0/1``,
``stages.i.blocks.j.conv_dw/norm/mlp.fc1/mlp.fc2/gamma``, ``head.norm``, ``head.fc``); the
official layout (``downsample_layers``, ``stages.i.j.dwconv/pwconv1/pwconv2``, ``norm``,
``head``) is mapped by :func:`checkpoint_filter_fn`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.common import DropPath, LayerNorm2d
from ..layers.prepacked import PackedConv2d, PackedLinear
from ..layers.reparam import DepthwiseConv2d
from ._builder import build_model
from ._convbn import linear_drop_path_rates, run_blocks
from ._registry import register_model

__all__ = ["ConvNeXt", "ConvNeXtCfg", "StagedClassifier", "Stage", "ClassifierHead", "checkpoint_filter_fn"]


@dataclasses.dataclass(frozen=True)
class ConvNeXtCfg:
    """A ConvNeXt variant: blocks and widths per stage, depthwise kernel size and layer-scale init.

    ``output_stride`` (32, 16 or 8): below 32, the last stages keep their resolution and dilate
    their depthwise convs instead (for dense prediction), as timm's ConvNeXt does; the weights
    are the same, so a classification checkpoint loads.
    """

    depths: Tuple[int, ...] = (3, 3, 9, 3)
    dims: Tuple[int, ...] = (96, 192, 384, 768)
    kernel_size: int = 7
    mlp_ratio: float = 4.0
    ls_init_value: float = 1e-6
    head_init_scale: float = 1.0
    drop_rate: float = 0.0  # dropout before the classifier (timm's drop_rate)
    output_stride: int = 32

    def __post_init__(self):
        if len(self.depths) != len(self.dims) or not self.depths:
            raise ValueError(f"depths and dims need one entry per stage, got {self.depths} and {self.dims}")
        if self.output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {self.output_stride!r}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd positive int, got {self.kernel_size}")
        if any(d < 1 for d in self.depths) or any(c < 1 for c in self.dims):
            raise ValueError(f"depths and dims must be positive, got {self.depths}, {self.dims}")


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 on (..., C); the linears pre-pack their weights for eager CPU inference
    (:class:`convzoo.layers.prepacked.PackedLinear`)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = PackedLinear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = PackedLinear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class ConvNeXtBlock(nn.Module):
    """x + drop_path(gamma * mlp(norm(conv_dw(x)))) on (N, C, H, W); norm and mlp run channels last."""

    def __init__(self, dim: int, kernel_size: int, mlp_ratio: float, ls_init_value: float, drop_path: float,
                 dilation: int = 1):
        super().__init__()
        self.conv_dw = DepthwiseConv2d(dim, kernel_size, dilation=dilation, bias=True)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(mlp_ratio * dim))
        self.gamma = nn.Parameter(torch.full((dim,), float(ls_init_value))) if ls_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    @property
    def is_reparameterized(self) -> bool:
        """Whether the layer scale is folded (or absent)."""
        return self.gamma is None

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Fold the layer scale ``gamma`` into ``mlp.fc2`` (exact), in place."""
        if self.gamma is None:
            return
        self.mlp.fc2.weight.mul_(self.gamma[:, None])
        self.mlp.fc2.bias.mul_(self.gamma)
        self.gamma = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv_dw(x).permute(0, 2, 3, 1)
        y = self.mlp(self.norm(y))
        if self.gamma is not None:
            y = y * self.gamma
        return x + self.drop_path(y.permute(0, 3, 1, 2))


class Stage(nn.Module):
    """``downsample`` (a module, or ``nn.Identity``) then ``blocks``, with optional gradient
    checkpointing of each block; shared by the ConvNeXt-style families."""

    def __init__(self, downsample: nn.Module, blocks: Sequence[nn.Module]):
        super().__init__()
        self.downsample = downsample
        self.blocks = nn.Sequential(*blocks)
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.blocks, self.downsample(x), self.grad_checkpointing)


class _SamePaddedConv2d(nn.Conv2d):
    """A stride-1 conv whose output has its input's size: the ``dilation * (kernel_size - 1)``
    padding rows/columns split with the extra one on the bottom/right (PyTorch's and timm's
    "same"), padded explicitly so that even kernels need no copy inside the conv."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        (kh, kw), (dh, dw) = self.kernel_size, self.dilation
        ph, pw = dh * (kh - 1), dw * (kw - 1)
        return super().forward(F.pad(x, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)))


class ConvNeXtStage(Stage):
    """Optional downsampling (LayerNorm2d + 2x2 conv) then ``depth`` blocks.

    ``dilations`` (the previous stage's, this stage's): (1, 1) downsamples with stride 2; a
    stage that keeps the resolution (``output_stride``) has a stride-1 2x2 conv dilated by the
    previous stage's dilation with "same" padding (one more row and column on the bottom and
    right for dilation 1) and blocks dilated by its own.
    """

    def __init__(self, in_dim: int, dim: int, depth: int, downsample: bool, drop_paths: Sequence[float], cfg: ConvNeXtCfg,
                 dilations: Tuple[int, int] = (1, 1)):
        if not downsample:
            down = nn.Identity()
        elif dilations[1] == 1:
            down = nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), PackedConv2d(in_dim, dim, 2, stride=2))
        else:
            down = nn.Sequential(LayerNorm2d(in_dim, eps=1e-6), _SamePaddedConv2d(in_dim, dim, 2, dilation=dilations[0]))
        super().__init__(down, [
            ConvNeXtBlock(dim, cfg.kernel_size, cfg.mlp_ratio, cfg.ls_init_value, drop_paths[j], dilations[1])
            for j in range(depth)
        ])


class ClassifierHead(nn.Module):
    """Global average pool -> LayerNorm (``nn.Identity`` without ``norm``) -> dropout
    (``drop_rate``) -> Linear: (N, C, H, W) -> (N, num_classes)."""

    def __init__(self, dim: int, num_classes: int, norm: bool = True, drop_rate: float = 0.0):
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6) if norm else nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(dim, num_classes) if num_classes > 0 else nn.Identity()

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.norm(x.mean((2, 3)))
        return x if pre_logits else self.fc(self.drop(x))


class StagedClassifier(nn.Module):
    """What the ConvNeXt-style classifiers share: ``stem``, ``stages`` (:class:`Stage`), a
    :class:`ClassifierHead` ``head`` and ``num_features``; the stem's input is made channels-last."""

    classifier_name = "head.fc"

    def _init_head_and_weights(self, num_features: int, num_classes: int, head_init_scale: float = 1.0,
                               drop_rate: float = 0.0) -> None:
        """The head on ``num_features`` channels (dropout ``drop_rate`` before the classifier),
        truncated-normal init of every conv and linear, the classifier scaled by
        ``head_init_scale`` (the official ConvNeXt init)."""
        self.num_features = num_features
        self.head = ClassifierHead(num_features, num_classes, drop_rate=drop_rate)
        self.apply(_init_weights)
        if isinstance(self.head.fc, nn.Linear):
            with torch.no_grad():
                self.head.fc.weight.mul_(head_init_scale)
                self.head.fc.bias.mul_(head_init_scale)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        if num_classes > 0:
            fc = nn.Linear(self.num_features, num_classes, device=self.stem[0].weight.device)
            _init_weights(fc)
            self.head.fc = fc
        else:
            self.head.fc = nn.Identity()

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last throughout: dwconv2d's fast CPU layout, and the blocks' permutes to
        # (N, H, W, C) for the norm and the MLP become free views.
        return self.stem(x.contiguous(memory_format=torch.channels_last))

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] = (0, 1, 2, 3)) -> List[torch.Tensor]:
        """The (N, dims[i], H/4/2^i, W/4/2^i) outputs of the stages in ``indices``, in that order."""
        wanted = sorted({i % len(self.stages) for i in indices})
        outs = {}
        x = self._stem(x)
        for i, stage in enumerate(self.stages[: wanted[-1] + 1]):
            x = stage(x)
            outs[i] = x
        return [outs[i % len(self.stages)] for i in indices]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, dims[-1], H/32, W/32)."""
        x = self._stem(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


class ConvNeXt(StagedClassifier):
    """ConvNeXt classifier: (N, in_chans, H, W) -> (N, num_classes); stage strides 4, 8, 16, 32
    (capped at ``cfg.output_stride``)."""

    def __init__(self, cfg: ConvNeXtCfg, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0):
        super().__init__()
        self.stem = nn.Sequential(PackedConv2d(in_chans, cfg.dims[0], 4, stride=4), LayerNorm2d(cfg.dims[0], eps=1e-6))
        rates = linear_drop_path_rates(drop_path_rate, sum(cfg.depths))
        self.stages = nn.ModuleList()
        self.feature_info = []
        start, reduction, dilation = 0, 4, 1
        for i, (depth, dim) in enumerate(zip(cfg.depths, cfg.dims)):
            in_dim = cfg.dims[max(i - 1, 0)]
            previous = dilation
            if i > 0 and reduction * 2 > cfg.output_stride:  # keep the resolution, dilate instead
                dilation *= 2
            elif i > 0:
                reduction *= 2
            self.stages.append(ConvNeXtStage(in_dim, dim, depth, i > 0, rates[start:start + depth], cfg, (previous, dilation)))
            start += depth
            self.feature_info.append(dict(num_chs=dim, reduction=reduction, module=f"stages.{i}"))
        self._init_head_and_weights(cfg.dims[-1], num_classes, cfg.head_init_scale, cfg.drop_rate)


def _init_weights(module: nn.Module) -> None:
    """Truncated normal (std 0.02) weights and zero biases for convs and linears, as the official code."""
    if isinstance(module, (nn.Conv2d, nn.Linear)):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


def _official_key_to_native(key: str) -> str:
    """One facebookresearch/ConvNeXt key -> ours (timm's layout)."""
    m = re.match(r"downsample_layers\.0\.([01])\.(.*)", key)
    if m:
        return f"stem.{m.group(1)}.{m.group(2)}"
    m = re.match(r"downsample_layers\.(\d+)\.([01])\.(.*)", key)
    if m:
        return f"stages.{m.group(1)}.downsample.{m.group(2)}.{m.group(3)}"
    m = re.match(r"stages\.(\d+)\.(\d+)\.(.*)", key)
    if m:
        rest = m.group(3).replace("dwconv.", "conv_dw.").replace("pwconv1.", "mlp.fc1.").replace("pwconv2.", "mlp.fc2.")
        return f"stages.{m.group(1)}.blocks.{m.group(2)}.{rest}"
    if key.startswith("norm."):
        return "head." + key
    if key.startswith("head."):
        return "head.fc." + key[len("head."):]
    return key


def checkpoint_filter_fn(state_dict, model: nn.Module):
    """Map a facebookresearch/ConvNeXt state dict (``{'model': ...}`` unwrapped) onto ours.

    timm's layout is ours and is returned as it is.
    """
    if not any(k.startswith("downsample_layers.") for k in state_dict):
        return state_dict
    return {_official_key_to_native(k): v for k, v in state_dict.items()}


def _create_convnext(cfg: ConvNeXtCfg, pretrained=None, **kwargs) -> ConvNeXt:
    return build_model(ConvNeXt, cfg, checkpoint_filter_fn, pretrained=pretrained, **kwargs)


@register_model
def convnext_tiny(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-T: 28.6M params, 4.5G MACs at 224."""
    return _create_convnext(ConvNeXtCfg(depths=(3, 3, 9, 3), dims=(96, 192, 384, 768)), pretrained, **kwargs)


@register_model
def convnext_small(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-S: 50M params, 8.7G MACs at 224."""
    return _create_convnext(ConvNeXtCfg(depths=(3, 3, 27, 3), dims=(96, 192, 384, 768)), pretrained, **kwargs)


@register_model
def convnext_base(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-B: 89M params, 15.4G MACs at 224."""
    return _create_convnext(ConvNeXtCfg(depths=(3, 3, 27, 3), dims=(128, 256, 512, 1024)), pretrained, **kwargs)


@register_model
def convnext_large(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-L: 198M params, 34.4G MACs at 224."""
    return _create_convnext(ConvNeXtCfg(depths=(3, 3, 27, 3), dims=(192, 384, 768, 1536)), pretrained, **kwargs)


@register_model
def convnext_xlarge(pretrained=None, **kwargs) -> ConvNeXt:
    """ConvNeXt-XL: 350M params, 60.9G MACs at 224."""
    return _create_convnext(ConvNeXtCfg(depths=(3, 3, 27, 3), dims=(256, 512, 1024, 2048)), pretrained, **kwargs)
