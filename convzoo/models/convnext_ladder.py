"""ConvNeXt's modernisation ladder: the steps from ResNet-50 to ConvNeXt-T ("A ConvNet for the
2020s", Liu et al., CVPR 2022, Section 2 and Figure 2), one registered model per step.

Every step is the previous step's :class:`LadderCfg` with the fields the paper's step changes
replaced (:data:`STEPS`), so a step cannot change anything else. One model class builds them all:

- stem: ResNet's 7x7 stride-2 conv + norm + act + 3x3 stride-2 max pool, or a 4x4 stride-4
  "patchify" conv + norm + act; at the last step conv + LayerNorm, as ConvNeXt's;
- blocks, three conv units ``conv1``-``conv3`` (each conv [+ norm] [+ act]) on a residual
  branch with layer scale ``gamma`` and stochastic depth:
  ``bottleneck``: 1x1 reduce (out/4), kxk (grouped by ``groups="depthwise"``), 1x1 expand;
  ``inverted``: 1x1 expand (4 out), depthwise kxk, 1x1 reduce;
  ``inverted_dw_first``: depthwise kxk, 1x1 expand (4 out), 1x1 reduce (ConvNeXt's order);
- downsampling: stride 2 on the block's kxk conv with a 1x1 projection shortcut (ResNet), or
  separate LayerNorm + 2x2 stride-2 conv layers between the stages (ConvNeXt);
- ``fewer_acts``: one activation per block, between the two 1x1 convs (none after the sum);
  ``fewer_norms``: one norm per block, after its first conv; ``norm``: "bn" or "ln";
- head: global average pool (+ LayerNorm at the last step) + linear.

A conv carries a bias unless a BatchNorm follows it. Layer scale (``ls_init_value`` 1e-6) is
part of the paper's training recipe (its Appendix A.1), so every step has it. The recipe step
itself (76.1 -> 78.8 %) is a training recipe, not an architecture: see docs/papers.md.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from ..layers.common import DropPath, LayerNorm2d
from ._builder import build_model
from ._convbn import fold_bn_into_conv, linear_drop_path_rates
from .convnext import ClassifierHead, Stage, StagedClassifier
from ._registry import register_model

__all__ = ["LadderCfg", "ConvNeXtLadder", "STEPS", "ladder_configs"]


@dataclasses.dataclass(frozen=True)
class LadderCfg:
    """One step of the ladder; field meanings in the module docstring."""

    depths: Tuple[int, ...] = (3, 4, 6, 3)
    width: int = 64  # ResNet: the bottleneck width of stage 0; inverted blocks: stage 0's channels
    stem: str = "resnet"  # "resnet" | "patchify"
    block: str = "bottleneck"  # "bottleneck" | "inverted" | "inverted_dw_first"
    groups: str = "dense"  # "dense" | "depthwise": the kxk conv of a bottleneck
    kernel_size: int = 3
    act: str = "relu"  # "relu" | "gelu"
    fewer_acts: bool = False
    fewer_norms: bool = False
    norm: str = "bn"  # "bn" | "ln"
    separate_downsample: bool = False
    ls_init_value: float = 1e-6
    drop_rate: float = 0.0  # dropout before the classifier (timm's drop_rate)

    def __post_init__(self):
        choices = dict(stem=("resnet", "patchify"), block=("bottleneck", "inverted", "inverted_dw_first"),
                       groups=("dense", "depthwise"), act=("relu", "gelu"), norm=("bn", "ln"))
        for field, allowed in choices.items():
            if getattr(self, field) not in allowed:
                raise ValueError(f"{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if not self.depths or any(d < 1 for d in self.depths) or self.width < 1:
            raise ValueError(f"depths and width must be positive, got {self.depths}, {self.width}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be an odd positive int, got {self.kernel_size}")
        if self.separate_downsample and self.block == "bottleneck":
            raise ValueError("separate_downsample needs inverted blocks (their input and output widths are equal)")

    def stage_channels(self) -> List[int]:
        """Output channels of each stage: 4x the bottleneck width (ResNet) or the width itself."""
        scale = 4 if self.block == "bottleneck" else 1
        return [scale * self.width * 2 ** i for i in range(len(self.depths))]


# (registered name, the paper's step, what it changes, the paper's Figure 2 figures: ImageNet top-1
# % and GFLOPs where the search tools found them, else None).
STEPS: Tuple[Tuple[str, str, Dict, Optional[float], Optional[float]], ...] = (
    ("convnext_ladder_00_resnet50", "ResNet-50 with the modern training recipe", {}, 78.8, 4.1),
    ("convnext_ladder_01_stage_ratio", "stage ratio (3, 3, 9, 3)", dict(depths=(3, 3, 9, 3)), 79.4, None),
    ("convnext_ladder_02_patchify_stem", "patchify stem (4x4, stride 4)", dict(stem="patchify"), 79.5, None),
    ("convnext_ladder_03_resnextify", "depthwise conv, width 96 (ResNeXt-ify)", dict(groups="depthwise", width=96), 80.5, None),
    ("convnext_ladder_04_inverted_bottleneck", "inverted bottleneck", dict(block="inverted"), 80.6, None),
    ("convnext_ladder_05_dw_up", "depthwise layer moved up", dict(block="inverted_dw_first"), 79.9, None),
    ("convnext_ladder_06_kernel7", "7x7 kernel", dict(kernel_size=7), 80.6, None),
    ("convnext_ladder_07_gelu", "ReLU to GELU", dict(act="gelu"), 80.6, None),
    ("convnext_ladder_08_fewer_acts", "fewer activations", dict(fewer_acts=True), None, None),
    ("convnext_ladder_09_fewer_norms", "fewer norms", dict(fewer_norms=True), 81.4, None),
    ("convnext_ladder_10_bn_to_ln", "BN to LN", dict(norm="ln"), 81.5, None),
    ("convnext_ladder_11_separate_downsample", "separate downsampling layers (= ConvNeXt-T)",
     dict(separate_downsample=True), 82.0, 4.5),
)


def ladder_configs() -> Dict[str, LadderCfg]:
    """Each step's config: the previous one with the step's changes."""
    cfg, out = LadderCfg(), {}
    for name, _, change, _, _ in STEPS:
        cfg = dataclasses.replace(cfg, **change)
        out[name] = cfg
    return out


def _norm(cfg: LadderCfg, channels: int) -> nn.Module:
    return nn.BatchNorm2d(channels) if cfg.norm == "bn" else LayerNorm2d(channels, eps=1e-6)


def _act(cfg: LadderCfg) -> nn.Module:
    return nn.ReLU() if cfg.act == "relu" else nn.GELU()


class ConvUnit(nn.Sequential):
    """conv [+ norm] [+ act], keyed ``0``, ``1``, ``2``; ``reparameterize()`` folds a BatchNorm
    into the conv (a LayerNorm cannot be folded and stays)."""

    def reparameterize(self) -> None:
        if len(self) > 1 and isinstance(self[1], nn.BatchNorm2d):
            fold_bn_into_conv(self, "0", "1")


def _unit(cfg: LadderCfg, c_in: int, c_out: int, k: int, stride: int, groups: int, norm: bool, act: bool,
          padding: Optional[int] = None) -> ConvUnit:
    """conv [+ norm] [+ act]; the conv has a bias unless a BatchNorm follows it; padding k // 2 by default."""
    conv = nn.Conv2d(c_in, c_out, k, stride, padding=k // 2 if padding is None else padding, groups=groups,
                     bias=not (norm and cfg.norm == "bn"))
    layers = [conv] + ([_norm(cfg, c_out)] if norm else []) + ([_act(cfg)] if act else [])
    return ConvUnit(*layers)


class LadderBlock(nn.Module):
    """One residual block of a ladder step: (N, c_in, H, W) -> (N, c_out, H/stride, W/stride)."""

    def __init__(self, cfg: LadderCfg, c_in: int, c_out: int, stride: int, drop_path: float):
        super().__init__()
        k = cfg.kernel_size
        norms = (True, not cfg.fewer_norms, not cfg.fewer_norms)
        if cfg.block == "bottleneck":
            mid = c_out // 4
            shapes = [(c_in, mid, 1, 1, 1), (mid, mid, k, stride, mid if cfg.groups == "depthwise" else 1), (mid, c_out, 1, 1, 1)]
            acts = (not cfg.fewer_acts, True, False)
        elif cfg.block == "inverted":
            hidden = 4 * c_out
            shapes = [(c_in, hidden, 1, 1, 1), (hidden, hidden, k, stride, hidden), (hidden, c_out, 1, 1, 1)]
            acts = (True, not cfg.fewer_acts, False)
        else:
            hidden = 4 * c_out
            shapes = [(c_in, c_in, k, stride, c_in), (c_in, hidden, 1, 1, 1), (hidden, c_out, 1, 1, 1)]
            acts = (not cfg.fewer_acts, True, False)
        self.conv1, self.conv2, self.conv3 = (
            _unit(cfg, ci, co, kk, s, g, n, a) for (ci, co, kk, s, g), n, a in zip(shapes, norms, acts)
        )
        self.gamma = nn.Parameter(torch.full((c_out,), float(cfg.ls_init_value))) if cfg.ls_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = _unit(cfg, c_in, c_out, 1, stride, 1, norm=True, act=False)
        else:
            self.shortcut = nn.Identity()
        self.act_out = nn.Identity() if cfg.fewer_acts else _act(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv3(self.conv2(self.conv1(x)))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return self.act_out(self.shortcut(x) + self.drop_path(y))


class ConvNeXtLadder(StagedClassifier):
    """One step of the ladder as a classifier: (N, in_chans, H, W) -> (N, num_classes); strides 4-32."""

    def __init__(self, cfg: LadderCfg, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0):
        super().__init__()
        dims = cfg.stage_channels()
        stem_out = cfg.width
        if cfg.separate_downsample:
            self.stem = nn.Sequential(nn.Conv2d(in_chans, stem_out, 4, stride=4), _norm(cfg, stem_out))
        elif cfg.stem == "patchify":
            self.stem = _unit(cfg, in_chans, stem_out, 4, 4, 1, norm=True, act=True, padding=0)
        else:
            self.stem = _unit(cfg, in_chans, stem_out, 7, 2, 1, norm=True, act=True)
            self.stem.append(nn.MaxPool2d(3, stride=2, padding=1))
        rates = linear_drop_path_rates(drop_path_rate, sum(cfg.depths))
        self.stages = nn.ModuleList()
        self.feature_info = []
        c_in, start = stem_out, 0
        for i, (depth, dim) in enumerate(zip(cfg.depths, dims)):
            down = nn.Identity()
            if cfg.separate_downsample and i > 0:
                down = nn.Sequential(_norm(cfg, c_in), nn.Conv2d(c_in, dim, 2, stride=2))
                c_in = dim
            blocks = []
            for j in range(depth):
                stride = 2 if (i > 0 and j == 0 and not cfg.separate_downsample) else 1
                blocks.append(LadderBlock(cfg, c_in if j == 0 else dim, dim, stride, rates[start + j]))
            self.stages.append(Stage(down, blocks))
            c_in, start = dim, start + depth
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self.num_features = dims[-1]
        self.head = ClassifierHead(self.num_features, num_classes, norm=cfg.separate_downsample, drop_rate=cfg.drop_rate)
        self.apply(_init_weights)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
    elif isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
    if isinstance(module, (nn.Conv2d, nn.Linear)) and module.bias is not None:
        nn.init.zeros_(module.bias)


def _paper_figures(top1: Optional[float], gflops: Optional[float]) -> str:
    """The figures ``convzoo list`` shows beside ours; 'n/f': not found with the search tools."""
    return f"{'n/f' if gflops is None else f'{gflops}G'}, top-1 {'n/f' if top1 is None else f'{top1}%'}"


def _register(name: str, cfg: LadderCfg, step: str, paper: str) -> None:
    def entry(pretrained=None, **kwargs) -> ConvNeXtLadder:
        return build_model(ConvNeXtLadder, cfg, None, pretrained=pretrained, **kwargs)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"ConvNeXt ladder step: {step}."
    entry.paper_figures = paper
    register_model(entry)


for (_name, _step, _, _top1, _gflops), _cfg in zip(STEPS, ladder_configs().values()):
    _register(_name, _cfg, _step, _paper_figures(_top1, _gflops))
