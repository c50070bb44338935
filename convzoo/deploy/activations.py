"""Swap a model's exact activations for the hardware-friendly ones of :mod:`convzoo.layers.activations`.

``hardware_friendly(model)`` replaces, in place, every activation module (and every
squeeze-excite ``gate`` function) that has a hardware-friendly counterpart:

=================================  ======================  ======================
exact                              ``style="lut"``         ``style="hard"``
=================================  ======================  ======================
``nn.Sigmoid`` / ``torch.sigmoid`` ``LUTSigmoid``          ``HardSigmoid``
``nn.SiLU``                        ``LUTSiLU``             ``HardSwish``
``nn.LeakyReLU(0.1)``              ``ShiftLeakyReLU``      ``ShiftLeakyReLU``
=================================  ======================  ======================

``"lut"`` approximates the trained function (max errors in
:data:`convzoo.layers.activations.LUT_MAX_ERROR`) and is safe after training; ``"hard"`` swaps
in a different function (errors up to 0.07 / 0.14) and is meant for a model fine-tuned after
the swap. ReLU, ReLU6, h-sigmoid and h-swish are left alone: they already are integer-friendly
(so the MobileNet / SqueezeNet / ShuffleNet / ResNet family has nothing to swap). A LeakyReLU is only
swapped when its slope is within 0.01 of 13/128.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..layers.activations import LUT_MODES, HardSigmoid, HardSwish, LUTSigmoid, LUTSiLU, ShiftLeakyReLU

STYLES = ("lut", "hard")


@dataclasses.dataclass
class SwapReport:
    """What :func:`hardware_friendly` replaced, and how much the output moved on the given inputs."""

    swapped: Dict[str, Tuple[str, str]]  # module path -> (old, new)
    max_abs_change: Optional[float] = None  # max |after - before| of the model output
    max_rel_change: Optional[float] = None  # max_abs_change / max |before|
    top1_agreement: Optional[float] = None  # fraction of inputs whose arg-max class is unchanged


def _replacement(module, style: str, entries: int, mode: str) -> Optional[nn.Module]:
    """The hardware-friendly stand-in for ``module`` (a module or a gate function), or None."""
    if isinstance(module, (HardSigmoid, HardSwish, ShiftLeakyReLU, LUTSigmoid, LUTSiLU)):
        return None
    if isinstance(module, nn.Sigmoid) or module in (torch.sigmoid, F.sigmoid):
        return LUTSigmoid(entries, mode) if style == "lut" else HardSigmoid()
    if isinstance(module, nn.SiLU) or module is F.silu:
        return LUTSiLU(entries, mode) if style == "lut" else HardSwish()
    if isinstance(module, nn.LeakyReLU) and abs(module.negative_slope - ShiftLeakyReLU.slope) <= 0.01:
        return ShiftLeakyReLU()
    return None


def _describe(module) -> str:
    return type(module).__name__ if isinstance(module, nn.Module) else getattr(module, "__name__", repr(module))


def _swap(model: nn.Module, style: str, entries: int, mode: str) -> Dict[str, Tuple[str, str]]:
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    swapped = {}
    for parent_name, parent in list(model.named_modules()):
        for name, child in list(parent.named_children()):
            new = _replacement(child, style, entries, mode)
            if new is not None:
                setattr(parent, name, new.to(device))
                swapped[f"{parent_name}.{name}" if parent_name else name] = (_describe(child), _describe(new))
        gate = parent.__dict__.get("gate")  # squeeze-excite gates held as plain functions
        if callable(gate) and not isinstance(gate, nn.Module):
            new = _replacement(gate, style, entries, mode)
            if new is not None:
                del parent.__dict__["gate"]
                parent.gate = new.to(device)
                swapped[f"{parent_name}.gate" if parent_name else "gate"] = (_describe(gate), _describe(new))
    return swapped


def hardware_friendly(model: nn.Module, inputs: Optional[torch.Tensor] = None, *, style: str = "lut",
                      entries: int = 257, mode: str = "linear") -> SwapReport:
    """Swap ``model``'s exact activations for hardware-friendly ones, in place (table above).

    ``inputs`` (N, C, H, W), optional: the model (in eval mode) is run on them before and after
    the swap and the change of its output is reported. ``entries`` and ``mode`` ("linear" or
    "nearest") configure the LUT activations. The new modules go to the device of the model's
    first parameter; they compute in the dtype of their input.
    """
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    if mode not in LUT_MODES:
        raise ValueError(f"mode must be one of {LUT_MODES}, got {mode!r}")
    if inputs is not None and not isinstance(inputs, torch.Tensor):
        raise TypeError(f"inputs must be a tensor (N, C, H, W) or None, got {type(inputs).__name__}")
    before = None
    if inputs is not None:
        model.eval()
        with torch.no_grad():
            before = model(inputs)
    swapped = _swap(model, style, entries, mode)
    report = SwapReport(swapped=swapped)
    if before is not None:
        with torch.no_grad():
            after = model(inputs)
        change = (after.double() - before.double()).abs()
        report.max_abs_change = float(change.max()) if change.numel() else 0.0
        report.max_rel_change = report.max_abs_change / max(float(before.double().abs().max()), 1e-12)
        if before.dim() == 2:
            report.top1_agreement = float((after.argmax(1) == before.argmax(1)).double().mean())
    return report
