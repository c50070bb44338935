"""Fused CPU inference steps shared by the transformer-style blocks (InternImage, ConvNeXt).

- ``linear_gelu(x, weight, bias)`` is ``F.gelu(F.linear(x, weight, bias))`` (exact, erf GELU);
- ``linear_add(x, weight, bias, residual)`` is ``residual + F.linear(x, weight, bias)``.

In eager CPU inference on float32 tensors (no gradient to record, no tracing, no dispatch mode)
each is one oneDNN call, the matrix product with its bias and the GELU or the addition applied as
the product's post-op, instead of separate passes over the activations (``addmm`` copying the
bias into the output, the product, then GELU or the residual addition). Everywhere else
(autograd, ``torch.compile``/``torch.export``, other dtypes and devices, FLOP counting) they are
the plain forms, so training and traced graphs are unchanged.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._checks import plain_cpu_inference

__all__ = ["linear_add", "linear_gelu", "linear_then_activation"]


def _onednn_applies(*tensors: Optional[torch.Tensor]) -> bool:
    if not torch.backends.mkldnn.is_available():
        return False
    if any(t is not None and t.dtype != torch.float32 for t in tensors):
        return False
    return plain_cpu_inference(*tensors)


def linear_gelu(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """GELU (exact) of ``F.linear(x, weight, bias)``: (..., in) -> (..., out).

    ``weight`` is (out, in), ``bias`` (out,) or None. Eager float32 CPU inference runs one oneDNN
    matrix product with the GELU fused (module docstring); the result equals the plain form within
    float32 rounding.
    """
    if _onednn_applies(x, weight, bias):
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "none")
    return F.gelu(F.linear(x, weight, bias))


def linear_then_activation(linear: nn.Module, act: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``act(linear(x))``, through :func:`linear_gelu` when the two are a plain ``nn.Linear`` and
    an exact ``nn.GELU`` (a swapped-in module of another type runs as it is)."""
    if type(linear) is nn.Linear and type(act) is nn.GELU and act.approximate == "none":
        return linear_gelu(x, linear.weight, linear.bias)
    return act(linear(x))


def linear_add(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], residual: torch.Tensor) -> torch.Tensor:
    """``residual + F.linear(x, weight, bias)``: (..., in) -> (..., out), ``residual`` of the
    output's shape. Eager float32 CPU inference with a contiguous ``residual`` runs one oneDNN
    matrix product with the addition fused (module docstring)."""
    if (residual.shape == (*x.shape[:-1], weight.shape[0]) and residual.is_contiguous()
            and _onednn_applies(x, weight, bias, residual)):
        return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
    return residual + F.linear(x, weight, bias)
