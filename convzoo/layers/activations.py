"""Hardware-friendly activations of the lightweight-CNN literature.

Each module states its maximum error against the exact function it stands for; the tests check
these bounds on a dense grid (and, for the integer form, exhaustively on int8).

- :class:`HardSigmoid` ``relu6(x + 3) / 6`` and :class:`HardSwish` ``x * relu6(x + 3) / 6``
  (MobileNetV3): exact to that definition (the same numbers as ``F.hardsigmoid`` /
  ``F.hardswish``). As stand-ins for the smooth functions they are *different* functions:
  max |HardSigmoid - sigmoid| = 0.0692 (at |x| = 1.32), max |HardSwish - SiLU| = 0.1423 (at
  |x| = 3), which is why a network is trained with them rather than switched after training.
- :class:`ShiftLeakyReLU`: leaky ReLU with slope 13/128 = 0.1015625 ~ 0.1, so that integer
  hardware computes the negative side as ``(x * 13) >> 7``. On floating-point tensors it is
  exact to slope 13/128 (max |ShiftLeakyReLU - LeakyReLU(0.1)| = |x| / 640 for x < 0, 1.6 %
  of the value). On int8/int16/int32 tensors it computes ``(x * 13) >> 7`` in int32 (an
  arithmetic shift, i.e. a floor): it is below the float form by less than one unit,
  ``0 <= x * 13 / 128 - ((x * 13) >> 7) < 1``, and returns the input's dtype.
- :class:`LUTSigmoid` / :class:`LUTSiLU`: sigmoid from a table of ``entries`` values of
  sigmoid on the uniform grid over [-8, 8] (step h = 16 / (entries - 1)), read with nearest or
  linear interpolation; outside [-8, 8] sigmoid saturates to exactly 0 / 1. LUTSiLU is
  ``x * LUTSigmoid(x)``. With the default 257 entries (h = 1/16), max error vs the exact
  function over all x (:data:`LUT_MAX_ERROR`): sigmoid linear 3.4e-4 (the saturation step
  1 - sigmoid(8) at |x| = 8; 4.7e-5 inside), nearest 7.8e-3; SiLU linear 2.7e-3 (8 times that
  step at |x| = 8; 7.9e-5 inside), nearest 7.1e-3. For other table sizes, inside [-8, 8]:
  linear h^2 / 8 * max|sigmoid''| = h^2 * 0.0120, nearest h / 2 * max|sigmoid'| = h / 8.

The table is read with two (linear) or one (nearest) indexing operations, which ONNX
exporters write as ``Gather``; the tables are non-persistent buffers (rebuilt from
``entries``, never stored in checkpoints).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LUT_RANGE = 8.0
LUT_MODES = ("linear", "nearest")
SHIFT_SLOPE_NUMERATOR, SHIFT_SLOPE_SHIFT = 13, 7  # slope 13 / 2**7
INTEGER_DTYPES = (torch.int8, torch.int16, torch.int32)

# Measured max |approximation - exact| with the default 257-entry table (see the module docstring).
LUT_MAX_ERROR = {
    ("sigmoid", "linear"): 3.4e-4,
    ("sigmoid", "nearest"): 7.9e-3,
    ("silu", "linear"): 2.7e-3,
    ("silu", "nearest"): 7.1e-3,
}
HARD_MAX_ERROR = {"sigmoid": 0.0692, "silu": 0.1423}  # max |hard - smooth|, over all x


class HardSigmoid(nn.Module):
    """``relu6(x + 3) / 6`` on any shape (MobileNetV3's h-sigmoid)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardsigmoid(x)


class HardSwish(nn.Module):
    """``x * relu6(x + 3) / 6`` on any shape (MobileNetV3's h-swish)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardswish(x)


class ShiftLeakyReLU(nn.Module):
    """Leaky ReLU with slope 13/128; ``(x * 13) >> 7`` on the negative side of integer tensors.

    Float input (any shape): ``where(x >= 0, x, x * 13 / 128)``, exact. Integer input
    (int8/int16/int32, any shape): the same with ``(x * 13) >> 7`` computed in int32, returned
    in the input's dtype (the result never overflows it: |(x * 13) >> 7| <= |x|).
    """

    slope = SHIFT_SLOPE_NUMERATOR / 2 ** SHIFT_SLOPE_SHIFT

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype in INTEGER_DTYPES:
            wide = x.to(torch.int32)
            negative = torch.bitwise_right_shift(wide * SHIFT_SLOPE_NUMERATOR, SHIFT_SLOPE_SHIFT)
            return torch.where(wide >= 0, wide, negative).to(x.dtype)
        if not x.is_floating_point():
            raise TypeError(f"ShiftLeakyReLU takes a floating-point or int8/int16/int32 tensor, got {x.dtype}")
        return torch.where(x >= 0, x, x * self.slope)

    def extra_repr(self) -> str:
        return f"slope={SHIFT_SLOPE_NUMERATOR}/{2 ** SHIFT_SLOPE_SHIFT}"


def sigmoid_table(entries: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sigmoid on ``entries`` uniformly spaced points of [-8, 8], endpoints included: (entries,)."""
    if not isinstance(entries, int) or entries < 2:
        raise ValueError(f"entries must be an integer >= 2, got {entries!r}")
    grid = torch.linspace(-LUT_RANGE, LUT_RANGE, entries, dtype=torch.float64)
    return torch.sigmoid(grid).to(dtype)


def _read(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` for a 1-D table, written as index_select (ONNX Gather, not GatherND)."""
    return table.index_select(0, index.reshape(-1)).reshape(index.shape)


def lut_sigmoid(x: torch.Tensor, table: torch.Tensor, mode: str = "linear") -> torch.Tensor:
    """sigmoid of ``x`` (any shape, floating point) read from ``table`` (:func:`sigmoid_table`).

    Inside [-8, 8] the table is read at the nearest grid point or interpolated linearly between
    the two neighbours; outside, the result is exactly 0 (x < -8) or 1 (x > 8).
    """
    if mode not in LUT_MODES:
        raise ValueError(f"mode must be one of {LUT_MODES}, got {mode!r}")
    steps = table.numel() - 1
    position = (x.clamp(-LUT_RANGE, LUT_RANGE) + LUT_RANGE) * (steps / (2 * LUT_RANGE))  # in [0, steps]
    table = table.to(x.dtype)
    if mode == "nearest":
        value = _read(table, torch.round(position).long())
    else:
        low = torch.floor(position).clamp(max=steps - 1)
        index = low.long()
        left = _read(table, index)
        value = left + (position - low) * (_read(table, index + 1) - left)
    value = torch.where(x > LUT_RANGE, torch.ones_like(value), value)
    return torch.where(x < -LUT_RANGE, torch.zeros_like(value), value)


class _LUTActivation(nn.Module):
    def __init__(self, entries: int = 257, mode: str = "linear"):
        super().__init__()
        if mode not in LUT_MODES:
            raise ValueError(f"mode must be one of {LUT_MODES}, got {mode!r}")
        self.entries, self.mode = entries, mode
        self.register_buffer("table", sigmoid_table(entries), persistent=False)

    def extra_repr(self) -> str:
        return f"entries={self.entries}, mode={self.mode!r}, range=[-{LUT_RANGE:g}, {LUT_RANGE:g}]"


class LUTSigmoid(_LUTActivation):
    """sigmoid from a table over [-8, 8] (``entries`` points, ``mode`` linear or nearest),
    saturating to 0 / 1 outside; any shape, floating point. See :data:`LUT_MAX_ERROR`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lut_sigmoid(x, self.table, self.mode)


class LUTSiLU(_LUTActivation):
    """``x * LUTSigmoid(x)``; any shape, floating point. See :data:`LUT_MAX_ERROR`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * lut_sigmoid(x, self.table, self.mode)
