"""Fused CPU inference steps shared by the transformer-style blocks (InternImage, ConvNeXt).

- ``linear_gelu(x, weight, bias)`` is ``F.gelu(F.linear(x, weight, bias))`` (exact, erf GELU);
- ``linear_add(x, weight, bias, residual)`` is ``residual + F.linear(x, weight, bias)``.

In eager CPU inference on float32 tensors (no gradient to record, no tracing, no dispatch mode)
each is one oneDNN call, the matrix product with its bias and the GELU or the addition applied as
the product's post-op, instead of separate passes over the activations (``addmm`` copying the
bias into the output, the product, then GELU or the residual addition). Everywhere else
(autograd, ``torch.compile``/``torch.export``, other dtypes and devices, FLOP counting) they are
the plain forms, so training and traced graphs are unchanged. A module that carries forward
hooks (or any global module hook is set) always runs through its own ``__call__``, so that tools
that watch modules by hooks (pruning of unused modules, statistics) see every call.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..ops._checks import plain_cpu_inference

__all__ = ["has_forward_hooks", "linear_add", "linear_gelu", "linear_then_activation"]


def has_forward_hooks(*modules: nn.Module) -> bool:
    """Whether a call of any of ``modules`` would run a forward (pre-)hook: then a fused path
    that reads their parameters directly must not replace the call."""
    if nn.modules.module._global_forward_hooks or nn.modules.module._global_forward_pre_hooks:
        return True
    return any(m._forward_hooks or m._forward_pre_hooks for m in modules)


_ONEDNN = torch.backends.mkldnn.is_available()  # whether this PyTorch build has oneDNN


def _onednn_applies(*tensors: Optional[torch.Tensor]) -> bool:
    """Eager CPU inference (:func:`convzoo.ops._checks.plain_cpu_inference`) on float32 tensors."""
    if not plain_cpu_inference(*tensors):
        return False
    return _ONEDNN and all(t is None or t.dtype == torch.float32 for t in tensors)


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
    an exact ``nn.GELU`` without hooks (a swapped-in module of another type runs as it is)."""
    if (type(linear) is nn.Linear and type(act) is nn.GELU and act.approximate == "none"
            and not has_forward_hooks(linear, act)):
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
