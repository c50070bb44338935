"""UniRepLKNet: "A Universal Perception Large-Kernel ConvNet for Audio, Video, Point Cloud,
Time-Series and Image Recognition" (Ding et al., CVPR 2024, https://arxiv.org/abs/2311.15599).

Architecture of AILab-CVC/UniRepLKNet: a stem of two 3x3 stride-2 convs (LayerNorm over
channels, GELU between), 3x3 stride-2 conv + LayerNorm downsampling in front of stages 1-3,
and blocks of: depthwise conv (a :class:`~convzoo.layers.DilatedReparamBlock` for kernels >= 7,
a plain 3x3/5x5 one otherwise), BatchNorm, squeeze-and-excitation (C/4, ReLU, sigmoid), then a
channels-last FFN (Linear 4x, GELU, global response norm, Linear without bias), BatchNorm,
layer scale ``gamma`` (1e-6), stochastic depth and the residual. Global average pool, LayerNorm
and a linear head classify.

Parameter names: ``stem.{0,1,3,4}``, ``stages.i.downsample.{0,1}``,
``stages.i.blocks.j.{dwconv,norm,se.fc1,se.fc2,pwconv1,grn,pwconv2,ffn_norm,gamma}``,
``head.norm``/``head.fc``. :func:`checkpoint_filter_fn` maps the official layout
(``downsample_layers``, ``stages.i.j.*``, ``pwconv1.1``, ``act.1``, ``pwconv2.0/2``,
``dwconv.lk_origin``/``origin_bn``/``dil_conv_k{k}_{d}``, ``se.down/up``, ``norm``, ``head``),
in the training form and in the deployed form its ``reparameterize_unireplknet`` writes.
"""
from __future__ import annotations

import dataclasses
import re
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers.common import DropPath, GlobalResponseNorm, LayerNorm2d, SqueezeExcite
from ..layers.reparam import DILATED_BRANCHES, DepthwiseConv2d, DilatedReparamBlock, fuse_conv_bn, is_reparameterized
from ._builder import build_model
from ._convbn import linear_drop_path_rates
from ._registry import register_model
from .convnext import Stage, StagedClassifier

__all__ = ["UniRepLKNet", "UniRepLKNetCfg", "UniRepLKNetBlock", "checkpoint_filter_fn", "default_kernel_sizes"]


def default_kernel_sizes(depths: Sequence[int]) -> Tuple[Tuple[int, ...], ...]:
    """The official per-block kernel sizes for the official depths (A/F/P, N, T, S/B/L/XL)."""
    depths = tuple(depths)
    if depths == (2, 2, 6, 2):
        third = (13,) * 6
    elif depths == (2, 2, 8, 2):
        third = (13,) * 8
    elif depths == (3, 3, 18, 3):
        third = (13, 3) * 9
    elif depths == (3, 3, 27, 3):
        third = (13, 3, 3) * 9
    else:
        raise ValueError(
            f"UniRepLKNet has default kernel sizes only for depths (2, 2, 6, 2), (2, 2, 8, 2), (3, 3, 18, 3) "
            f"and (3, 3, 27, 3), got {depths}; pass kernel_sizes (one tuple per stage, one size per block)"
        )
    return ((3,) * depths[0], (13,) * depths[1], third, (13,) * depths[3])


@dataclasses.dataclass(frozen=True)
class UniRepLKNetCfg:
    """A UniRepLKNet variant: blocks and widths per stage and each block's depthwise kernel size
    (``None``: the official default for ``depths``)."""

    depths: Tuple[int, ...] = (3, 3, 27, 3)
    dims: Tuple[int, ...] = (96, 192, 384, 768)
    kernel_sizes: Optional[Tuple[Tuple[int, ...], ...]] = None
    ffn_ratio: float = 4.0
    ls_init_value: float = 1e-6
    head_init_scale: float = 1.0
    drop_rate: float = 0.0  # dropout before the classifier (timm's drop_rate)

    def __post_init__(self):
        if len(self.depths) != len(self.dims) or not self.depths:
            raise ValueError(f"depths and dims need one entry per stage, got {self.depths} and {self.dims}")
        if any(d < 1 for d in self.depths) or any(c < 4 for c in self.dims):
            raise ValueError(f"depths must be positive and dims at least 4 (the SE block uses C/4), got {self.depths}, {self.dims}")
        if self.kernel_sizes is None:
            return
        sizes = tuple(tuple(int(k) for k in stage) for stage in self.kernel_sizes)
        object.__setattr__(self, "kernel_sizes", sizes)
        if tuple(len(s) for s in sizes) != tuple(self.depths):
            raise ValueError(f"kernel_sizes needs one size per block of each stage (depths {self.depths}), got {sizes}")
        allowed = {3, 5} | {k for k in DILATED_BRANCHES if k >= 7}
        bad = sorted({k for s in sizes for k in s} - allowed)
        if bad:
            raise ValueError(f"kernel_sizes may hold {sorted(allowed)}, got {bad}")

    def block_kernel_sizes(self) -> Tuple[Tuple[int, ...], ...]:
        return self.kernel_sizes if self.kernel_sizes is not None else default_kernel_sizes(self.depths)


class UniRepLKNetBlock(nn.Module):
    """x + drop_path(gamma * ffn_norm(FFN(se(norm(dwconv(x)))))) on (N, C, H, W).

    The FFN runs channels last: pwconv1 (C -> hidden), GELU, GRN, pwconv2 (hidden -> C, no bias).
    """

    def __init__(self, dim: int, kernel_size: int, ffn_ratio: float, ls_init_value: float, drop_path: float):
        super().__init__()
        if kernel_size >= 7:
            self.dwconv = DilatedReparamBlock(dim, kernel_size)
        else:
            self.dwconv = DepthwiseConv2d(dim, kernel_size, bias=False)
        self.norm = nn.BatchNorm2d(dim)
        self.se = SqueezeExcite(dim, dim // 4)
        hidden = int(ffn_ratio * dim)
        self.pwconv1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.grn = GlobalResponseNorm(hidden)
        self.pwconv2 = nn.Linear(hidden, dim, bias=False)
        self.ffn_norm = nn.BatchNorm2d(dim)
        self.gamma = nn.Parameter(torch.full((dim,), float(ls_init_value))) if ls_init_value > 0 else None
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.se(self.norm(self.dwconv(x))).permute(0, 2, 3, 1)
        y = self.pwconv2(self.grn(self.act(self.pwconv1(y))))
        y = self.ffn_norm(y.permute(0, 3, 1, 2))
        if self.gamma is not None:
            y = y * self.gamma.view(1, -1, 1, 1)
        return x + self.drop_path(y)

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge the dilated branches and fold ``norm`` into ``dwconv``; fold GRN's ``beta``,
        ``ffn_norm`` and ``gamma`` into ``pwconv2`` (which gains a bias). Exact in eval mode, in place."""
        if isinstance(self.norm, nn.BatchNorm2d):
            if isinstance(self.dwconv, DilatedReparamBlock):
                self.dwconv.reparameterize()
                self.dwconv.lkb_reparam = fuse_conv_bn(self.dwconv.lkb_reparam, self.norm)
            else:
                self.dwconv = fuse_conv_bn(self.dwconv, self.norm)
            self.norm = nn.Identity()
        if not isinstance(self.ffn_norm, nn.BatchNorm2d):
            return
        linear = self.pwconv2
        bias = linear.bias if linear.bias is not None else linear.weight.new_zeros(linear.out_features)
        if self.grn.beta is not None:
            bias = bias + linear.weight @ self.grn.beta.reshape(-1)
            self.grn.beta = None
        bn = self.ffn_norm
        scale = bn.weight / (bn.running_var + bn.eps).sqrt()
        weight = linear.weight * scale[:, None]
        bias = bn.bias + (bias - bn.running_mean) * scale
        if self.gamma is not None:
            weight, bias = weight * self.gamma[:, None], bias * self.gamma
            self.gamma = None
        fused = nn.Linear(linear.in_features, linear.out_features, device=weight.device, dtype=weight.dtype)
        fused.weight.copy_(weight)
        fused.bias.copy_(bias)
        self.pwconv2 = fused
        self.ffn_norm = nn.Identity()


class UniRepLKNet(StagedClassifier):
    """UniRepLKNet classifier: (N, in_chans, H, W) -> (N, num_classes); stage strides 4, 8, 16, 32."""

    def __init__(self, cfg: UniRepLKNetCfg, num_classes: int = 1000, in_chans: int = 3, drop_path_rate: float = 0.0):
        super().__init__()
        d0 = cfg.dims[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, d0 // 2, 3, stride=2, padding=1), LayerNorm2d(d0 // 2, eps=1e-6), nn.GELU(),
            nn.Conv2d(d0 // 2, d0, 3, stride=2, padding=1), LayerNorm2d(d0, eps=1e-6),
        )
        rates = linear_drop_path_rates(drop_path_rate, sum(cfg.depths))
        self.stages = nn.ModuleList()
        self.feature_info = []
        start = 0
        for i, (sizes, dim) in enumerate(zip(cfg.block_kernel_sizes(), cfg.dims)):
            in_dim = cfg.dims[max(i - 1, 0)]
            down = nn.Sequential(nn.Conv2d(in_dim, dim, 3, stride=2, padding=1), LayerNorm2d(dim, eps=1e-6)) if i else nn.Identity()
            self.stages.append(Stage(down, [UniRepLKNetBlock(dim, k, cfg.ffn_ratio, cfg.ls_init_value, rates[start + j])
                                            for j, k in enumerate(sizes)]))
            start += len(sizes)
            self.feature_info.append(dict(num_chs=dim, reduction=4 * 2 ** i, module=f"stages.{i}"))
        self._init_head_and_weights(cfg.dims[-1], num_classes, cfg.head_init_scale, cfg.drop_rate)

    def checkpoint_form(self, state_dict) -> List[str]:
        """``[""]`` (the whole model) when ``state_dict`` is an official file in the deployed form
        (written after ``reparameterize_unireplknet()``: ``pwconv2.0.bias`` keys, no BatchNorms in
        the blocks): the loader re-parameterizes the model before it reads such a file."""
        return [""] if _is_deployed_official(state_dict) and not is_reparameterized(self) else []


_BLOCK_RENAMES = (
    ("se.down.", "se.fc1."), ("se.up.", "se.fc2."), ("pwconv1.1.", "pwconv1."), ("act.1.", "grn."),
    ("pwconv2.0.", "pwconv2."), ("pwconv2.2.", "ffn_norm."),
    ("dwconv.origin_bn.", "dwconv.lkb_origin.bn."),
)


def _official_block_key(rest: str, block: nn.Module, deployed: bool) -> str:
    """One key inside an official block (``stages.i.j.<rest>``) -> ours."""
    for old, new in _BLOCK_RENAMES:
        if rest.startswith(old):
            return new + rest[len(old):]
    if rest.startswith("dwconv.lk_origin."):
        return ("dwconv.lkb_reparam." if deployed else "dwconv.lkb_origin.conv.") + rest[len("dwconv.lk_origin."):]
    m = re.match(r"dwconv\.dil_(conv|bn)_k(\d+)_(\d+)\.(.*)", rest)
    if m and isinstance(block.dwconv, DilatedReparamBlock):
        pairs = list(zip(block.dwconv.small_kernels, block.dwconv.small_dilations))
        pair = (int(m.group(2)), int(m.group(3)))
        if pair in pairs:
            part = "conv" if m.group(1) == "conv" else "bn"
            return f"dwconv.small_convs.{pairs.index(pair)}.{part}.{m.group(4)}"
    return rest


def _official_key_to_native(key: str, model: nn.Module, deployed: bool) -> str:
    m = re.match(r"downsample_layers\.0\.(\d+)\.(.*)", key)
    if m:
        return f"stem.{m.group(1)}.{m.group(2)}"
    m = re.match(r"downsample_layers\.(\d+)\.([01])\.(.*)", key)
    if m:
        return f"stages.{m.group(1)}.downsample.{m.group(2)}.{m.group(3)}"
    m = re.match(r"stages\.(\d+)\.(\d+)\.(.*)", key)
    if m:
        i, j = int(m.group(1)), int(m.group(2))
        blocks = model.stages[i].blocks if i < len(model.stages) else []
        if j < len(blocks):
            return f"stages.{i}.blocks.{j}.{_official_block_key(m.group(3), blocks[j], deployed)}"
        return key
    if key.startswith("norm."):
        return "head." + key
    if key.startswith("head."):
        return "head.fc." + key[len("head."):]
    return key


def _is_deployed_official(state_dict) -> bool:
    return any(k.endswith(".pwconv2.0.bias") for k in state_dict)


def checkpoint_filter_fn(state_dict, model: nn.Module):
    """Map an AILab-CVC/UniRepLKNet state dict (``{'model': ...}`` unwrapped) onto ``model``.

    ``model`` is not changed: a deployed official file needs ``model`` in its deployed form,
    which :meth:`UniRepLKNet.checkpoint_form` asks the loader for. Native state dicts are
    returned as they are.
    """
    if not any(k.startswith("downsample_layers.") for k in state_dict):
        return state_dict
    deployed = _is_deployed_official(state_dict)
    return {_official_key_to_native(k, model, deployed): v for k, v in state_dict.items()}


def _create_unireplknet(cfg: UniRepLKNetCfg, pretrained=None, **kwargs) -> UniRepLKNet:
    return build_model(UniRepLKNet, cfg, checkpoint_filter_fn, pretrained=pretrained, **kwargs)


_AFP, _N, _T, _SBLXL = (2, 2, 6, 2), (2, 2, 8, 2), (3, 3, 18, 3), (3, 3, 27, 3)


# B/L/XL are released ImageNet-22K-pretrained and fine-tuned at 384, evaluated by warping to 384 x 384.
_AT_384 = dict(input_size=(3, 384, 384), crop_pct=1.0, crop_mode="squash")


@register_model
def unireplknet_a(pretrained=None, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-A: 4.4M params, 0.6G MACs at 224."""
    return _create_unireplknet(UniRepLKNetCfg(depths=_AFP, dims=(40, 80, 160, 320)), pretrained, **kwargs)


@register_model
def unireplknet_f(pretrained=None, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-F: 6.2M params, 0.9G MACs at 224."""
    return _create_unireplknet(UniRepLKNetCfg(depths=_AFP, dims=(48, 96, 192, 384)), pretrained, **kwargs)


@register_model
def unireplknet_p(pretrained=None, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-P: 10.7M params, 1.6G MACs at 224."""
    return _create_unireplknet(UniRepLKNetCfg(depths=_AFP, dims=(64, 128, 256, 512)), pretrained, **kwargs)


@register_model
def unireplknet_n(pretrained=None, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-N: 18.3M params, 2.8G MACs at 224."""
    return _create_unireplknet(UniRepLKNetCfg(depths=_N, dims=(80, 160, 320, 640)), pretrained, **kwargs)


@register_model
def unireplknet_t(pretrained=None, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-T: 31M params, 4.9G MACs at 224."""
    return _create_unireplknet(UniRepLKNetCfg(depths=_T, dims=(80, 160, 320, 640)), pretrained, **kwargs)


@register_model
def unireplknet_s(pretrained=None, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-S: 56M params, 9.1G MACs at 224."""
    return _create_unireplknet(UniRepLKNetCfg(depths=_SBLXL, dims=(96, 192, 384, 768)), pretrained, **kwargs)


@register_model(pretrained_cfg=_AT_384)
def unireplknet_b(pretrained=None, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-B: 98M params, 47.2G MACs at 384."""
    return _create_unireplknet(UniRepLKNetCfg(depths=_SBLXL, dims=(128, 256, 512, 1024)), pretrained, **kwargs)


@register_model(pretrained_cfg=_AT_384)
def unireplknet_l(pretrained=None, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-L: 218M params, 105.4G MACs at 384."""
    return _create_unireplknet(UniRepLKNetCfg(depths=_SBLXL, dims=(192, 384, 768, 1536)), pretrained, **kwargs)


@register_model(pretrained_cfg=_AT_384)
def unireplknet_xl(pretrained=None, **kwargs) -> UniRepLKNet:
    """UniRepLKNet-XL: 386M params, 187G MACs at 384."""
    return _create_unireplknet(UniRepLKNetCfg(depths=_SBLXL, dims=(256, 512, 1024, 2048)), pretrained, **kwargs)
