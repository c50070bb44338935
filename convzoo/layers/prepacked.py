"""Layers whose eager CPU inference runs oneDNN on a weight packed once, as inductor's freezing does.

- :class:`PrepackedWeight`: the shared part, a mixin for a module with ``weight`` (and ``bias``)
  parameters. It decides when the packed path may run (:meth:`PrepackedWeight._packs_for`) and
  keeps the packed copy (:meth:`PrepackedWeight._packed_weight`), re-packed when the weight
  changes and never copied, pickled or saved.
- :class:`PackedLinear`: ``nn.Linear`` (same parameters, keys and maths) whose eager float32 CPU
  inference runs ``torch.ops.mkldnn._linear_pointwise`` on a pre-packed weight, the bias added
  inside the product.
- :class:`PackedConv2d`: ``nn.Conv2d`` whose eager float32 CPU inference on ``channels_last``
  inputs runs ``torch.ops.mkldnn._convolution_pointwise`` on a weight pre-packed for the input's
  shape. :class:`convzoo.layers.reparam.PointwiseConv2d` (1x1 convs) builds on it.

Why: PyTorch's eager ``F.linear`` (MKL's ``addmm``) and oneDNN's plain conv repack the weight on
every call, and inside a model each weight is read cold once per forward. Packing it once is
what ``torch.compile(..., freezing=True)`` does; these layers do it in eager mode. The cost is
memory: the packed copy is as large as the weight (float32), held while the layer is used for
inference.
"""
from __future__ import annotations

from typing import Hashable, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._checks import plain_cpu_inference

__all__ = ["PrepackedWeight", "PackedLinear", "PackedConv2d"]


def onednn_has(*op_names: str) -> bool:
    """Whether this build has oneDNN on the CPU with all of ``torch.ops.mkldnn.<op_names>``."""
    return torch.backends.mkldnn.is_available() and all(hasattr(torch.ops.mkldnn, name) for name in op_names)


class PrepackedWeight:
    """Mixin: a oneDNN-packed copy of ``self.weight`` for eager float32 CPU inference.

    A subclass sets ``_PACKABLE`` (whether its oneDNN ops exist in this build, checked once at
    import) and implements ``_pack(weight, hint)``. :meth:`_packed_weight` packs on first use and
    again when the weight changes (its version counter moves, as an in-place load or optimizer
    step makes it, or its storage is replaced, as ``.to()`` does) or the packing hint differs.
    """

    _PACKABLE = False
    _packed: Optional[Tuple[Hashable, torch.Tensor]] = None  # (key, packed weight), set on first use

    def __getstate__(self):
        state = self.__dict__.copy()
        state.pop("_packed", None)  # a oneDNN tensor: neither copied nor pickled, re-packed on first use
        return state

    def _packs_for(self, x: torch.Tensor) -> bool:
        """Whether ``x`` may take the packed path: eager float32 CPU inference on plain tensors with
        oneDNN enabled, no gradient to record, not inside ``torch.compile``/``torch.export``/tracing
        or a torch function/dispatch mode, and a non-empty input."""
        return (self._PACKABLE and x.dtype == torch.float32 and self.weight.dtype == torch.float32 and x.numel() > 0
                and torch.backends.mkldnn.enabled and plain_cpu_inference(x, self.weight, self.bias))

    def _packed_weight(self, hint: Hashable) -> torch.Tensor:
        """The weight packed by ``self._pack(weight, hint)``; kept until the weight or ``hint`` changes."""
        weight = self.weight
        key = (hint, weight._version, weight.data_ptr())
        if self._packed is None or self._packed[0] != key:
            self._packed = (key, self._pack(weight.detach(), hint))
        return self._packed[1]

    def _pack(self, weight: torch.Tensor, hint) -> torch.Tensor:
        raise NotImplementedError


class PackedLinear(PrepackedWeight, nn.Linear):
    """``nn.Linear`` (..., in_features) -> (..., out_features) with a pre-packed oneDNN product in eager inference.

    * Eager float32 CPU inference (no gradient to record, plain tensors, oneDNN enabled):
      ``torch.ops.mkldnn._linear_pointwise`` on the weight packed once into oneDNN's layout,
      bias added inside the product. The packed copy is as large as the weight.
    * Everything else (training, gradients, other dtypes or devices, ``torch.compile`` and
      ``torch.export`` graphs, where inductor's freezing packs the weight itself): ``F.linear``.

    Same parameters and state-dict keys as ``nn.Linear``, so its checkpoints load unchanged.
    Measured on ConvNeXt-T and InternImage-T on a 2-core AVX2 CPU: see benchmarks/RESULTS.md.
    """

    _PACKABLE = onednn_has("_linear_pointwise", "_reorder_linear_weight")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packs_for(x):
            return torch.ops.mkldnn._linear_pointwise(x, self._packed_weight(None), self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)

    def _pack(self, weight: torch.Tensor, hint) -> torch.Tensor:
        return torch.ops.mkldnn._reorder_linear_weight(weight)


class PackedConv2d(PrepackedWeight, nn.Conv2d):
    """``nn.Conv2d`` with a pre-packed oneDNN conv in eager inference on ``channels_last`` inputs.

    * Eager float32 CPU inference (as :class:`PackedLinear`) on a ``channels_last`` input with
      zero padding given as numbers: ``torch.ops.mkldnn._convolution_pointwise`` on the weight
      packed once per input shape (the last shape seen is kept); the output is ``channels_last``.
    * Everything else (NCHW inputs, training, ``torch.compile``/``torch.export`` graphs, where
      inductor's freezing packs the weight itself): ``nn.Conv2d``'s path.

    Same parameters and keys as ``nn.Conv2d``. Why: oneDNN's conv reorders the weight on every
    call; for the strided 2x2/3x3 convs of ConvNeXt's and InternImage's stems and downsampling
    layers that took 1-2 ms of a 0.7 ms conv (a 2-core AVX2 CPU, benchmarks/RESULTS.md).
    Input (N, C_in, H, W) -> (N, C_out, H_out, W_out).
    """

    _PACKABLE = onednn_has("_convolution_pointwise")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._packs_conv(x):
            return self._packed_conv(x)
        return super().forward(x)

    def _packs_conv(self, x: torch.Tensor) -> bool:
        """Whether the packed conv may run: a channels_last 4-d input (not also contiguous), zero
        padding given as numbers, and :meth:`PrepackedWeight._packs_for`."""
        return (x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
                and self.padding_mode == "zeros" and not isinstance(self.padding, str) and self._packs_for(x))

    def _packed_conv(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._convolution_pointwise(x, self._packed_weight(tuple(x.shape)), self.bias,
                                                       list(self.padding), list(self.stride), list(self.dilation),
                                                       self.groups, "none", [], "")

    def _pack(self, weight: torch.Tensor, shape: Tuple[int, ...]) -> torch.Tensor:
        """The weight in oneDNN's blocked format for inputs of ``shape``."""
        return torch._C._nn.mkldnn_reorder_conv2d_weight(weight.to_mkldnn(), list(self.padding), list(self.stride),
                                                         list(self.dilation), self.groups, list(shape))
