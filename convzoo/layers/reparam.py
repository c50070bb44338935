"""Structural re-parameterization: folding BatchNorm into convs and merging parallel branches.

- :class:`DepthwiseConv2d`: an ``nn.Conv2d`` with ``groups == channels`` that runs through
  :func:`convzoo.ops.dwconv2d` (same parameter names, so ``nn.Conv2d`` checkpoints load).
- :class:`PointwiseConv2d`: an ``nn.Conv2d`` 1x1 with fast paths for channels_last inputs
  (a pre-packed oneDNN conv in eager inference, one matrix product in training).
- :class:`ConvNormAct`: conv -> norm -> optional activation, named ``conv``/``bn``/``nonlinear``
  like RepLKNet-pytorch's ``conv_bn``/``conv_bn_relu``; ``reparameterize()`` folds the norm.
- :class:`ReparamLargeKernelConv`: RepLKNet's depthwise large kernel with parallel small
  (optionally dilated) kernels, each followed by BatchNorm; ``reparameterize()`` merges them all
  into one depthwise conv with bias.
- :func:`fuse_conv_bn` (a BatchNorm after a conv) and :func:`fuse_bn_pointwise_conv` (a
  BatchNorm before a 1x1 conv); :func:`reparameterize`, which walks a model, and
  :func:`is_reparameterized`, which reads a module's form from its structure (the form is never
  stored as a separate flag, so it cannot disagree with the weights).
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Type

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import ops
from .prepacked import PackedConv2d


class DepthwiseConv2d(nn.Conv2d):
    """Depthwise conv (``groups == in_channels == out_channels``) computed by :func:`convzoo.ops.dwconv2d`.

    Input (N, C, H, W) -> output (N, C, H_out, W_out); ``weight`` is (C, 1, kh, kw). ``padding``
    defaults to ``dilation * (kernel_size // 2)`` ("same" size for odd kernels at stride 1).
    ``self.impl`` is passed to the op ("auto" | "triton" | "reference").
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int | Tuple[int, int],
        stride: int | Tuple[int, int] = 1,
        padding: Optional[int | Tuple[int, int]] = None,
        dilation: int | Tuple[int, int] = 1,
        bias: bool = True,
        device=None,
        dtype=None,
    ):
        if padding is None:
            ks = (kernel_size, kernel_size) if isinstance(kernel_size, int) else tuple(kernel_size)
            dil = (dilation, dilation) if isinstance(dilation, int) else tuple(dilation)
            padding = (dil[0] * (ks[0] // 2), dil[1] * (ks[1] // 2))
        super().__init__(
            channels, channels, kernel_size, stride=stride, padding=padding, dilation=dilation,
            groups=channels, bias=bias, device=device, dtype=dtype,
        )
        self.impl = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dwconv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, impl=self.impl)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", impl={self.impl!r}"


class PointwiseConv2d(PackedConv2d):
    """1x1 conv (stride 1, no padding, one group) with fast paths for ``channels_last`` inputs.

    * Eager CPU inference in float32 (no gradient to record, plain tensors): oneDNN's 1x1 conv
      with the weight pre-packed once into oneDNN's blocked format and kept (for the last input
      shape seen; re-packed when the weight changes), as
      :class:`convzoo.layers.prepacked.PackedConv2d` does. This is what inductor's freezing does in
      compiled graphs. The packed copy doubles the memory of the layer's weight.
    * Other channels_last inputs (training): one ``F.linear`` over the (N, H, W, C) view, whose
      result is already the channels_last output.
    * NCHW inputs, and graphs traced by ``torch.compile``/``torch.export`` (where inductor's
      freezing pre-packs the conv's weight itself): ``nn.Conv2d``'s path.

    Why: oneDNN's plain 1x1 conv reorders the weight on every call, and a matrix product repacks
    it on every call too; at batch 1 on small maps that costs as much as the product. Measured on
    RepLKNet-31B on a 2-core AVX2 CPU: the plain conv ran its 1x1 convs at 10-35 GFLOP/s (~200 of
    the model's ~270 ms at 128x128); matrix products took the model to ~180 ms, the pre-packed
    conv to ~150 ms (the [16, 1024] x [1024, 4096] product of the 4x4 stage: 11 ms vs 3 ms).
    Same parameters and keys as ``nn.Conv2d``.

    Input (N, C_in, H, W) -> (N, C_out, H, W), in the input's memory format.
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True, device=None, dtype=None):
        super().__init__(in_channels, out_channels, 1, bias=bias, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packs_conv(x):
            return self._packed_conv(x)
        if (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
                and not torch.compiler.is_compiling()):
            return F.linear(x.permute(0, 2, 3, 1), self.weight.flatten(1), self.bias).permute(0, 3, 1, 2)
        return nn.Conv2d.forward(self, x)


def _norm_scale_shift(bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """(s, t) per channel with eval-mode ``bn(x) == x * s + t``."""
    std = (bn.running_var + bn.eps).sqrt()
    scale = bn.weight / std if bn.weight is not None else 1 / std
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    return scale, beta - bn.running_mean * scale


def _fused_weight_bias(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tuple[torch.Tensor, torch.Tensor]:
    """The (weight, bias) of one conv equal in eval mode to ``bn(conv(x))``."""
    scale, shift = _norm_scale_shift(bn)
    weight = conv.weight * scale.reshape(-1, 1, 1, 1)
    bias = shift + conv.bias * scale if conv.bias is not None else shift
    return weight, bias


def _check_conv_bn(conv, bn) -> None:
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.modules.batchnorm._BatchNorm):
        raise TypeError(f"fuse_conv_bn expects (nn.Conv2d, nn.BatchNorm2d), got ({type(conv).__name__}, {type(bn).__name__})")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn.num_features ({bn.num_features}) must equal conv.out_channels ({conv.out_channels})")
    if bn.running_var is None:
        raise ValueError("bn must track running statistics to be folded")


def _empty_like_conv(conv: nn.Conv2d) -> nn.Conv2d:
    """A new conv of ``conv``'s class and geometry, with a bias (a DepthwiseConv2d keeps its impl)."""
    kw = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    if isinstance(conv, DepthwiseConv2d):
        out = DepthwiseConv2d(conv.in_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation, bias=True, **kw)
        out.impl = conv.impl
        return out
    if isinstance(conv, PointwiseConv2d):
        return PointwiseConv2d(conv.in_channels, conv.out_channels, bias=True, **kw)
    cls = PackedConv2d if isinstance(conv, PackedConv2d) else nn.Conv2d
    return cls(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode, **kw,
    )


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return a new conv (of ``conv``'s class, with a bias) equal in eval mode to ``bn(conv(x))``.

    ``conv.weight`` is (O, I/groups, kh, kw); ``bn`` normalises the O output channels with its
    running statistics.
    """
    _check_conv_bn(conv, bn)
    weight, bias = _fused_weight_bias(conv, bn)
    fused = _empty_like_conv(conv)
    fused.weight.copy_(weight)
    fused.bias.copy_(bias)
    return fused


def _check_norm_pointwise(bn, conv) -> None:
    if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not isinstance(conv, nn.Conv2d):
        raise TypeError(f"fuse_bn_pointwise_conv expects (nn.BatchNorm2d, nn.Conv2d), got ({type(bn).__name__}, "
                        f"{type(conv).__name__})")
    if tuple(conv.kernel_size) != (1, 1) or tuple(conv.padding) != (0, 0) or conv.groups != 1:
        raise ValueError(f"conv must be a 1x1 conv without padding and with one group (a BatchNorm before a wider, "
                         f"padded or grouped conv cannot be folded exactly), got kernel_size={tuple(conv.kernel_size)}, "
                         f"padding={conv.padding}, groups={conv.groups}")
    if bn.num_features != conv.in_channels:
        raise ValueError(f"bn.num_features ({bn.num_features}) must equal conv.in_channels ({conv.in_channels})")
    if bn.running_var is None:
        raise ValueError("bn must track running statistics to be folded")


@torch.no_grad()
def fuse_bn_pointwise_conv(bn: nn.BatchNorm2d, conv: nn.Conv2d) -> nn.Conv2d:
    """Return a new conv (of ``conv``'s class, with a bias) equal in eval mode to ``conv(bn(x))``.

    The BatchNorm comes *before* the conv (RepLKNet's pre-BN): eval-mode ``bn`` is ``x * s + t``
    per input channel, so a 1x1 conv (no padding, one group, any stride) takes ``W * s`` over its
    input channels and ``b + W @ t``.
    ``conv.weight`` is (O, I, 1, 1); ``bn`` normalises the I input channels.
    """
    _check_norm_pointwise(bn, conv)
    scale, shift = _norm_scale_shift(bn)
    fused = _empty_like_conv(conv)
    weight = conv.weight.flatten(1)
    fused.weight.copy_((weight * scale).reshape(conv.weight.shape))
    fused.bias.copy_(weight @ shift + (conv.bias if conv.bias is not None else 0))
    return fused


class ConvNormAct(nn.Sequential):
    """``conv`` -> ``bn`` -> optional ``nonlinear``: RepLKNet-pytorch's ``conv_bn``/``conv_bn_relu``.

    ``reparameterize()`` folds ``bn`` into ``conv`` (which gains a bias) and replaces ``bn``
    with ``nn.Identity``, in place.
    """

    def __init__(self, conv: nn.Conv2d, bn: nn.Module, act: Optional[nn.Module] = None):
        super().__init__()
        self.conv = conv
        self.bn = bn
        if act is not None:
            self.nonlinear = act

    @torch.no_grad()
    def reparameterize(self) -> None:
        if isinstance(self.bn, nn.Identity):
            return
        self.conv = fuse_conv_bn(self.conv, self.bn)
        self.bn = nn.Identity()


def conv_norm_act(
    in_channels: int,
    out_channels: int,
    kernel_size: int,
    stride: int = 1,
    groups: int = 1,
    act: bool = False,
    norm_layer: Type[nn.Module] = nn.BatchNorm2d,
    device=None,
    dtype=None,
) -> ConvNormAct:
    """Bias-free conv with padding ``kernel_size // 2`` (depthwise ones through ``dwconv2d``, 1x1 ones
    :class:`PointwiseConv2d`), a norm, optionally ReLU."""
    kw = dict(device=device, dtype=dtype)
    if groups == in_channels == out_channels and groups > 1:
        conv = DepthwiseConv2d(in_channels, kernel_size, stride, kernel_size // 2, bias=False, **kw)
    elif kernel_size == 1 and stride == 1 and groups == 1:
        conv = PointwiseConv2d(in_channels, out_channels, bias=False, **kw)
    else:
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, kernel_size // 2, groups=groups, bias=False, **kw)
    return ConvNormAct(conv, norm_layer(out_channels, **kw), nn.ReLU() if act else None)


def _check_odd_kernel(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < 1 or value % 2 == 0:
        raise ValueError(f"{name} must be a positive odd int (the branches are centred), got {value}")
    return value


class ReparamLargeKernelConv(nn.Module):
    """Depthwise large-kernel conv + BN with parallel small-kernel conv + BN branches (RepLKNet).

    Training form: ``lkb_origin`` (conv ``kernel_size`` + BN) plus one branch per entry of
    ``small_kernels`` in ``small_convs`` (conv k, dilation d + BN), all depthwise through
    :func:`convzoo.ops.dwconv2d`, all with the same stride and centred ("same" padding), their
    outputs summed. A dilated k x k branch equals a sparse kernel of size d*(k-1)+1, which must
    not exceed ``kernel_size``. RepLKNet-pytorch's single ``small_conv`` maps to
    ``small_convs.0``.

    ``reparameterize()`` merges every branch and BN into ``lkb_reparam``, one depthwise
    ``kernel_size`` conv with bias (RepLKNet-pytorch's name), in place.

    Args:
        channels: C of the (N, C, H, W) input and output.
        kernel_size: odd size of the large kernel.
        small_kernels: odd sizes of the parallel branches (empty: no branch).
        stride: stride of every branch.
        small_dilations: dilation of each small branch (default 1 each).
        norm_layer: the BatchNorm-like norm after each conv (running statistics are folded).
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int,
        small_kernels: Sequence[int] = (5,),
        stride: int = 1,
        small_dilations: Optional[Sequence[int]] = None,
        norm_layer: Type[nn.Module] = nn.BatchNorm2d,
        device=None,
        dtype=None,
    ):
        super().__init__()
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        _check_odd_kernel("kernel_size", kernel_size)
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"stride must be a positive int, got {stride!r}")
        small_kernels = tuple(small_kernels) if small_kernels is not None else ()
        for k in small_kernels:
            _check_odd_kernel("small_kernels", k)
        if small_dilations is None:
            small_dilations = (1,) * len(small_kernels)
        small_dilations = tuple(small_dilations)
        if len(small_dilations) != len(small_kernels):
            raise ValueError(
                f"small_dilations must have one entry per small kernel ({len(small_kernels)}), got {small_dilations}"
            )
        for k, d in zip(small_kernels, small_dilations):
            if isinstance(d, bool) or not isinstance(d, int) or d < 1:
                raise ValueError(f"small_dilations must hold positive ints, got {small_dilations}")
            if d * (k - 1) + 1 > kernel_size:
                raise ValueError(
                    f"small kernel {k} with dilation {d} spans {d * (k - 1) + 1} pixels, larger than kernel_size "
                    f"{kernel_size}; a branch cannot be larger than the main kernel"
                )
        kw = dict(device=device, dtype=dtype)
        self._impl = "auto"
        self.channels = channels
        self.kernel_size = kernel_size
        self.stride = stride
        self.small_kernels = small_kernels
        self.small_dilations = small_dilations
        self.lkb_origin = ConvNormAct(DepthwiseConv2d(channels, kernel_size, stride, bias=False, **kw), norm_layer(channels, **kw))
        self.small_convs = nn.ModuleList(
            ConvNormAct(DepthwiseConv2d(channels, k, stride, dilation=d, bias=False, **kw), norm_layer(channels, **kw))
            for k, d in zip(small_kernels, small_dilations)
        )
        self.lkb_reparam: Optional[DepthwiseConv2d] = None

    @property
    def impl(self) -> str:
        """The ``impl`` passed to ``dwconv2d``; setting it sets it on the conv of every branch."""
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        self._impl = value
        for conv in self.modules():
            if isinstance(conv, DepthwiseConv2d):
                conv.impl = value

    def reset_parameters(self) -> None:
        """Re-initialise every conv and norm (running statistics included) of the current form."""
        for module in self.modules():
            if module is not self and callable(getattr(module, "reset_parameters", None)):
                module.reset_parameters()

    @property
    def is_reparameterized(self) -> bool:
        """Whether the branches are merged into ``lkb_reparam`` (read-only: ``reparameterize()`` merges)."""
        return self.lkb_reparam is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, C, H_out, W_out)."""
        if self.lkb_reparam is not None:
            return self.lkb_reparam(x)
        out = self.lkb_origin(x)
        for branch in self.small_convs:
            out = out + branch(x)
        return out

    @torch.no_grad()
    def equivalent_kernel_bias(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The (C, 1, K, K) kernel and (C,) bias of the single conv equal to all branches in eval mode."""
        if self.lkb_reparam is not None:
            return self.lkb_reparam.weight.detach().clone(), self.lkb_reparam.bias.detach().clone()
        kernel, bias = _fused_weight_bias(self.lkb_origin.conv, self.lkb_origin.bn)
        size = self.kernel_size
        for branch, k, d in zip(self.small_convs, self.small_kernels, self.small_dilations):
            small_k, small_b = _fused_weight_bias(branch.conv, branch.bn)
            span = d * (k - 1) + 1
            start = (size - span) // 2
            kernel[:, :, start:start + span:d, start:start + span:d] += small_k
            bias = bias + small_b
        return kernel, bias

    @torch.no_grad()
    def reparameterize(self) -> None:
        """Merge every branch and BN into ``lkb_reparam`` (one depthwise conv with bias), in place."""
        if self.lkb_reparam is not None:
            return
        kernel, bias = self.equivalent_kernel_bias()
        merged = _empty_like_conv(self.lkb_origin.conv)
        if isinstance(merged, DepthwiseConv2d):
            merged.impl = self.impl
        merged.weight.copy_(kernel)
        merged.bias.copy_(bias)
        del self.lkb_origin
        del self.small_convs
        self.lkb_reparam = merged

    def extra_repr(self) -> str:
        s = f"{self.channels}, kernel_size={self.kernel_size}, small_kernels={self.small_kernels}, stride={self.stride}"
        if any(d != 1 for d in self.small_dilations):
            s += f", small_dilations={self.small_dilations}"
        if self.lkb_reparam is not None:
            s += ", reparameterized=True"
        return s


# UniRepLKNet's default branches per large kernel: (kernel sizes, dilations), each branch
# spanning d * (k - 1) + 1 <= kernel_size pixels.
DILATED_BRANCHES = {
    17: ((5, 9, 3, 3, 3), (1, 2, 4, 5, 7)),
    15: ((5, 7, 3, 3, 3), (1, 2, 3, 5, 7)),
    13: ((5, 7, 3, 3, 3), (1, 2, 3, 4, 5)),
    11: ((5, 5, 3, 3, 3), (1, 2, 3, 4, 5)),
    9: ((5, 5, 3, 3), (1, 2, 3, 4)),
    7: ((5, 3, 3), (1, 2, 3)),
    5: ((3, 3), (1, 2)),
}


class DilatedReparamBlock(ReparamLargeKernelConv):
    """UniRepLKNet's Dilated Reparam Block (Ding et al., CVPR 2024, https://arxiv.org/abs/2311.15599).

    A depthwise ``kernel_size`` conv + BN with parallel dilated depthwise small convs + BN (the
    branches of :data:`DILATED_BRANCHES`, e.g. k=13: kernels 5, 7, 3, 3, 3 with dilations
    1, 2, 3, 4, 5), summed; a :class:`ReparamLargeKernelConv` whose ``reparameterize()``
    scatters each dilated kernel into the large one. (N, C, H, W) -> (N, C, H, W), stride 1.
    UniRepLKNet's ``lk_origin``/``origin_bn``/``dil_conv_k{k}_{d}``/``dil_bn_k{k}_{d}`` are
    ``lkb_origin.conv``/``lkb_origin.bn``/``small_convs.i.conv``/``small_convs.i.bn`` here.
    """

    def __init__(self, channels: int, kernel_size: int, norm_layer: Type[nn.Module] = nn.BatchNorm2d, device=None, dtype=None):
        if kernel_size not in DILATED_BRANCHES:
            raise ValueError(
                f"kernel_size must be one of {sorted(DILATED_BRANCHES)} (UniRepLKNet's dilated branch settings), got {kernel_size!r}"
            )
        kernels, dilations = DILATED_BRANCHES[kernel_size]
        super().__init__(
            channels, kernel_size, small_kernels=kernels, small_dilations=dilations, norm_layer=norm_layer,
            device=device, dtype=dtype,
        )


def _is_reparameterizable(module: nn.Module) -> bool:
    return callable(getattr(module, "reparameterize", None))


def _part_is_merged(part: nn.Module) -> bool:
    """The form of one re-parameterizable part: its own ``is_reparameterized`` property when its
    class declares one (a structure the rule below cannot see, such as a folded layer scale),
    else whether no BatchNorm is left in it (every fold in convzoo replaces the norm)."""
    declared = getattr(type(part), "is_reparameterized", None)
    if isinstance(declared, property):
        return bool(part.is_reparameterized)
    return not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in part.modules())


def is_reparameterized(module: nn.Module) -> bool:
    """Whether ``module`` is in its inference form: every part of it that has a
    ``reparameterize()`` method is merged. A module without such a part is trivially in it."""
    return all(_part_is_merged(m) for m in module.modules() if _is_reparameterizable(m))


def reparameterize(model: nn.Module) -> nn.Module:
    """Turn ``model`` into its inference form in place, put it in eval mode and return it.

    Walks the modules top-down and calls ``reparameterize()`` on each one that has it; the
    descendants of a module that did so are left to it (it may replace them). Calling it again,
    or on a single layer, is allowed and changes nothing more; :func:`is_reparameterized` then
    holds.
    """
    model.eval()
    handled = []
    for name, module in list(model.named_modules()):
        if "" in handled or any(name == h or name.startswith(h + ".") for h in handled):
            continue
        if _is_reparameterizable(module):
            module.reparameterize()
            handled.append(name)
    return model.eval()
