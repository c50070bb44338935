"""Machinery the model families share: the torchvision-style conv-norm-activation sequence,
BatchNorm folding for ``reparameterize()``, running blocks with optional gradient checkpointing
(:func:`run_blocks`, the one place it is written), the outputs of chosen stages
(:func:`stage_outputs`) and the stochastic-depth rates (:func:`linear_drop_path_rates`)."""
from __future__ import annotations

from typing import Callable, Iterable, List, Optional, Sequence, Type

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from ..layers.reparam import fuse_conv_bn


def fold_bn_into_conv(parent: nn.Module, conv_name: str, bn_name: str) -> None:
    """Replace ``parent.<conv_name>`` by the conv with ``parent.<bn_name>`` folded in, and the
    BatchNorm by ``nn.Identity`` (in place; a pair folded before is left as it is)."""
    bn = getattr(parent, bn_name)
    if isinstance(bn, nn.Identity):
        return
    setattr(parent, conv_name, fuse_conv_bn(getattr(parent, conv_name), bn))
    setattr(parent, bn_name, nn.Identity())


class Conv2dNormActivation(nn.Sequential):
    """Conv2d (no bias) -> BatchNorm2d -> activation, keyed ``0``, ``1``, ``2`` like
    torchvision's ``Conv2dNormActivation`` (whose checkpoints load); padding
    ``(kernel_size - 1) // 2 * dilation``. RepLKNet's layout (``conv``/``bn``/``nonlinear``) is
    :class:`convzoo.layers.reparam.ConvNormAct`.

    ``act_layer=None`` leaves the activation out (a linear projection).
    Input (N, in_chs, H, W) -> output (N, out_chs, H / stride, W / stride).
    """

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 3,
        stride: int = 1,
        groups: int = 1,
        dilation: int = 1,
        act_layer: Optional[Type[nn.Module]] = nn.ReLU,
        norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d,
    ):
        padding = (kernel_size - 1) // 2 * dilation
        layers = [
            nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, dilation=dilation, groups=groups, bias=False),
            norm_layer(out_chs),
        ]
        if act_layer is not None:
            layers.append(act_layer(inplace=True))
        super().__init__(*layers)
        self.out_channels = out_chs

    def reparameterize(self) -> None:
        """Fold the BatchNorm into the conv (the conv gains a bias; the norm becomes Identity)."""
        fold_bn_into_conv(self, "0", "1")


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, grad_checkpointing: bool) -> torch.Tensor:
    """Apply ``blocks`` in order; with ``grad_checkpointing`` while gradients are on, each block
    with parameters recomputes its activations in the backward pass instead of storing them
    (parameter-free blocks such as in-place ReLUs and pools run as they are: recomputing an
    in-place op would modify the checkpoint's saved input)."""
    use_checkpoint = grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
    for block in blocks:
        if use_checkpoint and any(True for _ in block.parameters()):
            x = checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


class SequentialBackbone(nn.Module):
    """Plumbing shared by the classification models whose blocks form one ``nn.Sequential``
    ``self.features``, stage ``i`` ending with block ``self.stage_ends[i]``.

    Subclasses build ``features``, ``stage_ends`` and the head (``forward_head``); this gives
    ``forward``, ``forward_features``, ``forward_intermediates`` and gradient checkpointing.
    """

    grad_checkpointing = False

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """(N, in_chans, H, W) -> the last block's output (N, num_features, h, w)."""
        return run_blocks(self.features, x, self.grad_checkpointing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(self, x: torch.Tensor, indices: Sequence[int] = (0, 1, 2, 3)) -> List[torch.Tensor]:
        """Stage outputs (N, C_i, ~H/stride_i, ~W/stride_i) for stage ``indices``, in stage order."""
        return stage_outputs(stages_of(self.features, self.stage_ends), x, indices, self.grad_checkpointing)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable


def linear_drop_path_rates(drop_path_rate: float, num_blocks: int) -> List[float]:
    """Stochastic-depth rates rising linearly from 0 to ``drop_path_rate`` over ``num_blocks``
    (computed in Python so that models can be built on the meta device)."""
    if num_blocks < 2:
        return [0.0] * num_blocks
    return [drop_path_rate * i / (num_blocks - 1) for i in range(num_blocks)]


def stages_of(blocks: nn.Sequential, stage_ends: Sequence[int]) -> List[nn.Sequential]:
    """``blocks`` cut into stages: stage ``i`` ends with ``blocks[stage_ends[i]]`` (the first starts at 0)."""
    starts = [0] + [end + 1 for end in stage_ends[:-1]]
    return [blocks[start:end + 1] for start, end in zip(starts, stage_ends)]


def stage_outputs(
    stages: Sequence[Iterable[nn.Module]],
    x: torch.Tensor,
    indices: Sequence[int],
    grad_checkpointing: bool = False,
) -> List[torch.Tensor]:
    """Run ``stages`` (each an iterable of blocks; :func:`stages_of` cuts a flat sequence) in
    turn and return, in stage order, the outputs of the stages in ``indices`` (negative ones
    count from the end). Stages after the last wanted one are not run."""
    wanted = {i % len(stages) for i in indices}
    outs = []
    for i, stage in enumerate(stages[: max(wanted) + 1]):
        x = run_blocks(stage, x, grad_checkpointing)
        if i in wanted:
            outs.append(x)
    return outs
