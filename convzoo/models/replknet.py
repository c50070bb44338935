"""RepLKNet: "Scaling Up Your Kernels to 31x31: Revisiting Large Kernel Design in CNNs"
(Ding et al., CVPR 2022, https://arxiv.org/abs/2203.06717).

The structure and parameter names follow RepLKNet-pytorch so that its released checkpoints
load: a stem of four conv-BN-ReLU, stages of alternating RepLK blocks (pre-BN, 1x1 conv-BN-ReLU,
re-parameterizable depthwise large kernel, ReLU, 1x1 conv-BN, residual with drop path) and
ConvFFN blocks (pre-BN, 1x1 conv-BN, GELU, 1x1 conv-BN, residual), transitions (1x1 conv-BN-ReLU,
depthwise 3x3 stride-2 conv-BN-ReLU) between stages, then BN, global average pool and a linear
head. The only renamed key is the small branch: ``large_kernel.small_conv`` is
``large_kernel.small_convs.0`` here, because :class:`~convzoo.layers.ReparamLargeKernelConv`
accepts several branches.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers.common import DropPath
from ..layers.reparam import ConvNormAct, ReparamLargeKernelConv, conv_norm_act, fuse_bn_pointwise_conv
from ._builder import build_model
from ._convbn import linear_drop_path_rates, run_blocks
from ._registry import register_model

__all__ = ["RepLKNet", "RepLKNetCfg", "checkpoint_filter_fn"]


@dataclasses.dataclass(frozen=True)
class RepLKNetCfg:
    """A RepLKNet variant: per-stage large kernels, depths (RepLK + ConvFFN pairs) and widths."""

    kernel_sizes: Tuple[int, ...] = (31, 29, 27, 13)
    depths: Tuple[int, ...] = (2, 2, 18, 2)
    channels: Tuple[int, ...] = (128, 256, 512, 1024)
    small_kernel: Optional[int] = 5
    dw_ratio: float = 1.0
    ffn_ratio: float = 4.0
    norm_intermediate_features: bool = False  # a BN on each stage's output for dense heads (XL downstream)
    lk_shortcut: bool = True  # the RepLK blocks' identity shortcut (False: guideline 2's ablation)
    drop_rate: float = 0.0  # dropout before the classifier (timm's drop_rate)

    def __post_init__(self):
        n = len(self.depths)
        if not (len(self.kernel_sizes) == len(self.channels) == n) or n == 0:
            raise ValueError(
                f"kernel_sizes, depths and channels need one entry per stage, got {self.kernel_sizes}, "
                f"{self.depths}, {self.channels}"
            )
        if any(k < 1 or k % 2 == 0 for k in self.kernel_sizes):
            raise ValueError(f"kernel_sizes must be odd positive ints, got {self.kernel_sizes}")
        if self.small_kernel is not None and any(self.small_kernel > k for k in self.kernel_sizes):
            raise ValueError(
                f"small_kernel ({self.small_kernel}) must not exceed any of kernel_sizes {self.kernel_sizes}; "
                "use small_kernel=None for no small branch"
            )
        if any(d < 1 for d in self.depths) or any(c < 1 for c in self.channels):
            raise ValueError(f"depths and channels must be positive, got {self.depths}, {self.channels}")


NormLayer = Callable[[int], nn.Module]


@torch.no_grad()
def _reparameterize_pre_norm_block(block: nn.Module, pre_norm: str, parts: Sequence[nn.Module]) -> None:
    """Reparameterize ``parts`` of ``block``, then fold its pre-BN (attribute ``pre_norm``, which
    feeds only ``block.pw1``, a 1x1 conv) into ``pw1``'s conv and replace it by ``nn.Identity``."""
    for part in parts:
        part.reparameterize()
    norm = getattr(block, pre_norm)
    if isinstance(norm, nn.Identity):
        return
    pw1: ConvNormAct = block.pw1
    pw1.conv = fuse_bn_pointwise_conv(norm, pw1.conv)
    setattr(block, pre_norm, nn.Identity())


class RepLKBlock(nn.Module):
    """x + drop_path(pw2(relu(large_kernel(pw1(prelkb_bn(x)))))) on (N, C, H, W); without
    ``shortcut``, the branch alone (the paper's guideline-2 ablation)."""

    def __init__(self, channels: int, dw_channels: int, kernel_size: int, small_kernel: Optional[int], drop_path: float,
                 shortcut: bool = True, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.shortcut = shortcut
        self.pw1 = conv_norm_act(channels, dw_channels, 1, act=True, norm_layer=norm_layer)
        self.pw2 = conv_norm_act(dw_channels, channels, 1, norm_layer=norm_layer)
        small = () if small_kernel is None else (small_kernel,)
        self.large_kernel = ReparamLargeKernelConv(dw_channels, kernel_size, small_kernels=small, norm_layer=norm_layer)
        self.lk_nonlinear = nn.ReLU()
        self.prelkb_bn = norm_layer(channels)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw2(self.lk_nonlinear(self.large_kernel(self.pw1(self.prelkb_bn(x)))))
        return x + self.drop_path(out) if self.shortcut else out

    def reparameterize(self) -> None:
        """Inference form, in place: the large kernel merged and every BatchNorm folded, the pre-BN
        ``prelkb_bn`` into ``pw1``'s 1x1 conv (which then reads ``x`` directly)."""
        _reparameterize_pre_norm_block(self, "prelkb_bn", (self.pw1, self.large_kernel, self.pw2))


class ConvFFN(nn.Module):
    """x + drop_path(pw2(gelu(pw1(preffn_bn(x))))) on (N, C, H, W)."""

    def __init__(self, channels: int, hidden_channels: int, drop_path: float, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        self.preffn_bn = norm_layer(channels)
        self.pw1 = conv_norm_act(channels, hidden_channels, 1, norm_layer=norm_layer)
        self.pw2 = conv_norm_act(hidden_channels, channels, 1, norm_layer=norm_layer)
        self.nonlinear = nn.GELU()
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.pw2(self.nonlinear(self.pw1(self.preffn_bn(x))))
        return x + self.drop_path(out)

    def reparameterize(self) -> None:
        """Inference form, in place: every BatchNorm folded, the pre-BN ``preffn_bn`` into ``pw1``'s
        1x1 conv."""
        _reparameterize_pre_norm_block(self, "preffn_bn", (self.pw1, self.pw2))


class RepLKNetStage(nn.Module):
    """``depth`` pairs of (RepLKBlock, ConvFFN) at one width; (N, C, H, W) -> same shape.

    ``norm`` (a BN with ``norm_intermediate``, else identity) is applied only to the feature maps
    handed to dense heads, as in the official code, not to the classification path.
    """

    def __init__(self, channels: int, depth: int, kernel_size: int, small_kernel: Optional[int],
                 drop_paths: Sequence[float], dw_ratio: float, ffn_ratio: float, norm_intermediate: bool = False,
                 lk_shortcut: bool = True, norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        blocks = []
        for i in range(depth):
            blocks.append(RepLKBlock(channels, int(channels * dw_ratio), kernel_size, small_kernel, drop_paths[i], lk_shortcut,
                                     norm_layer))
            blocks.append(ConvFFN(channels, int(channels * ffn_ratio), drop_paths[i], norm_layer))
        self.blocks = nn.ModuleList(blocks)
        self.norm = norm_layer(channels) if norm_intermediate else nn.Identity()
        self.grad_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return run_blocks(self.blocks, x, self.grad_checkpointing)


class RepLKNet(nn.Module):
    """RepLKNet classifier: (N, in_chans, H, W) -> (N, num_classes); stage strides 4, 8, 16, 32.

    ``norm_layer`` builds every norm (default ``nn.BatchNorm2d``; ``nn.SyncBatchNorm`` for
    multi-GPU training, where RepLKNet-pytorch flips a global switch)."""

    classifier_name = "head"

    def __init__(self, cfg: RepLKNetCfg, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0,
                 norm_layer: NormLayer = nn.BatchNorm2d):
        super().__init__()
        width = cfg.channels[0]
        norm = dict(norm_layer=norm_layer)
        self.stem = nn.ModuleList([
            conv_norm_act(in_chans, width, 3, stride=2, act=True, **norm),
            conv_norm_act(width, width, 3, groups=width, act=True, **norm),
            conv_norm_act(width, width, 1, act=True, **norm),
            conv_norm_act(width, width, 3, stride=2, groups=width, act=True, **norm),
        ])
        rates = linear_drop_path_rates(drop_path_rate, sum(cfg.depths))
        self.stages = nn.ModuleList()
        self.transitions = nn.ModuleList()
        self.feature_info = []
        start = 0
        for i, depth in enumerate(cfg.depths):
            self.stages.append(RepLKNetStage(
                cfg.channels[i], depth, cfg.kernel_sizes[i], cfg.small_kernel,
                rates[start:start + depth], cfg.dw_ratio, cfg.ffn_ratio, cfg.norm_intermediate_features, cfg.lk_shortcut,
                norm_layer,
            ))
            start += depth
            self.feature_info.append(dict(num_chs=cfg.channels[i], reduction=4 * 2 ** i, module=f"stages.{i}"))
            if i < len(cfg.depths) - 1:
                c_out = cfg.channels[i + 1]
                self.transitions.append(nn.Sequential(
                    conv_norm_act(cfg.channels[i], c_out, 1, act=True, **norm),
                    conv_norm_act(c_out, c_out, 3, stride=2, groups=c_out, act=True, **norm),
                ))
        self.num_features = cfg.channels[-1]
        self.norm = norm_layer(self.num_features)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(cfg.drop_rate)
        self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.grad_checkpointing = False

    def checkpoint_form(self, state_dict) -> List[str]:
        """The large kernels stored merged in ``state_dict`` (official files saved after
        ``structural_reparam()`` hold ``large_kernel.lkb_reparam`` keys): the loader merges
        these modules before it reads the file."""
        return [name for name, module in self.named_modules() if isinstance(module, ReparamLargeKernelConv)
                and not module.is_reparameterized and f"{name}.lkb_reparam.weight" in state_dict]

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def reset_classifier(self, num_classes: int) -> None:
        self.num_classes = num_classes
        device = self.norm.weight.device
        self.head = nn.Linear(self.num_features, num_classes, device=device) if num_classes > 0 else nn.Identity()

    def _stem(self, x: torch.Tensor) -> torch.Tensor:
        # channels_last throughout: the fast layout of dwconv2d's CPU path and of oneDNN's 1x1 convs.
        x = self.stem[0](x.contiguous(memory_format=torch.channels_last))
        return run_blocks(self.stem[1:], x, self.grad_checkpointing)

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] = (0, 1, 2, 3)) -> List[torch.Tensor]:
        """The (N, C_i, H/4/2^i, W/4/2^i) outputs of the stages in ``indices`` (after each stage's
        ``norm``), in that order."""
        wanted = sorted({i % len(self.stages) for i in indices})
        outs = {}
        x = self._stem(x)
        for i, stage in enumerate(self.stages[: wanted[-1] + 1]):
            x = stage(x)
            outs[i] = stage.norm(x)
            if i < wanted[-1]:
                x = self.transitions[i](x)
        return [outs[i % len(self.stages)] for i in indices]

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> (N, channels[-1], H/32, W/32), before the final norm."""
        x = self._stem(x)
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i < len(self.transitions):
                x = self.transitions[i](x)
        return x

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = torch.flatten(self.avgpool(self.norm(x)), 1)
        return x if pre_logits else self.head(self.head_drop(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def merge_large_kernels(model: nn.Module) -> None:
    """Merge only the large-kernel branches (RepLKNet-pytorch's ``structural_reparam``), in place."""
    for module in model.modules():
        if isinstance(module, ReparamLargeKernelConv):
            module.reparameterize()


def checkpoint_filter_fn(state_dict, model: nn.Module):
    """Map a RepLKNet-pytorch state dict onto ``model``; native state dicts are returned as they
    are. ``model`` is not changed (see :meth:`RepLKNet.checkpoint_form` for merged files).
    (Files without BatchNorm's ``num_batches_tracked`` counters are handled by the strict loader.)
    """
    if not any(".small_conv." in k for k in state_dict):
        return state_dict
    return {re.sub(r"\.small_conv\.", ".small_convs.0.", k): v for k, v in state_dict.items()}


def _create_replknet(cfg: RepLKNetCfg, pretrained=None, **kwargs) -> RepLKNet:
    return build_model(RepLKNet, cfg, checkpoint_filter_fn, pretrained=pretrained, **kwargs)


# The official evaluation (datasets.py) warps to 384 x 384 from 384 up and crops 0.875 below.
_AT_384 = dict(input_size=(3, 384, 384), crop_pct=1.0, crop_mode="squash")


@register_model
def replknet_tiny(pretrained=None, **kwargs) -> RepLKNet:
    """A narrow RepLKNet (kernels 13-13-7-5, small kernel 3) for small images and quick runs."""
    cfg = RepLKNetCfg(kernel_sizes=(13, 13, 7, 5), depths=(1, 1, 2, 1), channels=(32, 64, 128, 256), small_kernel=3)
    return _create_replknet(cfg, pretrained, **kwargs)


@register_model
def replknet_31b(pretrained=None, **kwargs) -> RepLKNet:
    """RepLKNet-31B: 79M params, 15.3G MACs at 224."""
    cfg = RepLKNetCfg(channels=(128, 256, 512, 1024))
    return _create_replknet(cfg, pretrained, **kwargs)


@register_model(pretrained_cfg=_AT_384)
def replknet_31l(pretrained=None, **kwargs) -> RepLKNet:
    """RepLKNet-31L: 172M params, 96.0G MACs at 384."""
    cfg = RepLKNetCfg(channels=(192, 384, 768, 1536))
    return _create_replknet(cfg, pretrained, **kwargs)


@register_model(pretrained_cfg=dict(input_size=(3, 320, 320)))
def replknet_xl(pretrained=None, **kwargs) -> RepLKNet:
    """RepLKNet-XL: 335M params, 128.7G MACs at 320 (kernels 27-27-27-13, dw_ratio 1.5, no small kernel)."""
    cfg = RepLKNetCfg(kernel_sizes=(27, 27, 27, 13), channels=(256, 512, 1024, 2048), small_kernel=None, dw_ratio=1.5)
    return _create_replknet(cfg, pretrained, **kwargs)
