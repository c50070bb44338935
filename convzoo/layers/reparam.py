"""Structural re-parameterization: folding BatchNorm into convs and merging parallel branches.

# PLACEHOLDER (skeleton) for ReparamLargeKernelConv: replaced by the RepLKNet work.
"""
from __future__ import annotations

import torch
import torch.nn as nn


@torch.no_grad()
def fuse_conv_bn(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> nn.Conv2d:
    """Return a new ``nn.Conv2d`` equal (in eval mode) to ``bn(conv(x))``.

    ``conv.weight`` is (O, I/groups, kh, kw); ``bn`` normalises the O output channels.
    """
    if not isinstance(conv, nn.Conv2d) or not isinstance(bn, nn.BatchNorm2d):
        raise TypeError(f"fuse_conv_bn expects (nn.Conv2d, nn.BatchNorm2d), got ({type(conv).__name__}, {type(bn).__name__})")
    if bn.num_features != conv.out_channels:
        raise ValueError(f"bn.num_features ({bn.num_features}) must equal conv.out_channels ({conv.out_channels})")
    if bn.running_var is None:
        raise ValueError("bn must track running statistics to be folded")
    std = (bn.running_var + bn.eps).sqrt()
    gamma = bn.weight if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    conv_bias = conv.bias if conv.bias is not None else torch.zeros_like(std)
    fused = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
        conv.dilation, conv.groups, bias=True, padding_mode=conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype,
    )
    fused.weight.copy_(conv.weight * scale.reshape(-1, 1, 1, 1))
    fused.bias.copy_(beta + (conv_bias - bn.running_mean) * scale)
    return fused


def reparameterize(model: nn.Module) -> nn.Module:
    """Turn ``model`` into its inference form in place, put it in eval mode and return it.

    Walks the modules top-down and calls ``reparameterize()`` on each one that has it; the
    descendants of a module that did so are left to it (it may replace them).
    """
    model.eval()
    handled = []
    for name, module in list(model.named_modules()):
        if any(name == h or name.startswith(h + ".") for h in handled if h) or "" in handled:
            continue
        if callable(getattr(module, "reparameterize", None)):
            module.reparameterize()
            handled.append(name)
    model.is_reparameterized = True
    return model.eval()


def ReparamLargeKernelConv(*args, **kwargs):
    raise NotImplementedError("ReparamLargeKernelConv is being written")
