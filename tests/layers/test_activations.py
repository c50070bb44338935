"""Hardware-friendly activations against the exact functions, at the documented error bounds."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from convzoo.layers import HardSigmoid, HardSwish, LUTSigmoid, LUTSiLU, ShiftLeakyReLU
from convzoo.layers.activations import HARD_MAX_ERROR, LUT_MAX_ERROR, lut_sigmoid, sigmoid_table

# a dense grid over [-30, 30] that also holds the table's grid points and the saturation edges
GRID = torch.cat([torch.linspace(-30, 30, 600_001, dtype=torch.float64),
                  torch.linspace(-8, 8, 257, dtype=torch.float64),
                  torch.tensor([-8.0, 8.0, -8.0 - 1e-9, 8.0 + 1e-9], dtype=torch.float64)])


def _naive_sigmoid_lut(x: float, entries: int, mode: str) -> float:
    """Independent scalar version: position on the grid, table values from math.exp."""
    import math

    if x > 8:
        return 1.0
    if x < -8:
        return 0.0
    step = 16 / (entries - 1)
    value = lambda i: 1 / (1 + math.exp(-(-8 + i * step)))  # noqa: E731
    position = (x + 8) / step
    if mode == "nearest":
        return value(int(math.floor(position + 0.5)))
    low = min(int(math.floor(position)), entries - 2)
    return value(low) + (position - low) * (value(low + 1) - value(low))


def test_hard_activations_exact_to_definition():
    relu6 = lambda t: t.clamp(0, 6)  # noqa: E731
    torch.testing.assert_close(HardSigmoid()(GRID), relu6(GRID + 3) / 6, rtol=0, atol=1e-15)
    torch.testing.assert_close(HardSwish()(GRID), GRID * relu6(GRID + 3) / 6, rtol=0, atol=1e-14)


def test_hard_activations_error_vs_smooth_functions():
    """The documented distance from sigmoid / SiLU, attained (within 1e-3) and never exceeded."""
    for module, exact, key in ((HardSigmoid(), torch.sigmoid, "sigmoid"), (HardSwish(), F.silu, "silu")):
        error = (module(GRID) - exact(GRID)).abs().max().item()
        assert HARD_MAX_ERROR[key] - 1e-3 < error <= HARD_MAX_ERROR[key] + 1e-4


@pytest.mark.parametrize("mode", ["linear", "nearest"])
@pytest.mark.parametrize("key", ["sigmoid", "silu"])
def test_lut_error_bound(key, mode):
    module = (LUTSigmoid if key == "sigmoid" else LUTSiLU)(mode=mode).double()
    exact = torch.sigmoid if key == "sigmoid" else F.silu
    error = (module(GRID) - exact(GRID)).abs().max().item()
    bound = LUT_MAX_ERROR[(key, mode)]
    assert 0.5 * bound < error <= bound  # the documented figure is tight, not just an upper bound


def test_lut_saturates_and_matches_naive_loop():
    table = sigmoid_table(17, torch.float64)
    x = torch.tensor([-100.0, -8.5, -8.0, -7.99, -3.3, -0.5, 0.0, 0.26, 4.49, 7.99, 8.0, 8.01, 1e4], dtype=torch.float64)
    for mode in ("linear", "nearest"):
        got = lut_sigmoid(x, table, mode)
        expected = torch.tensor([_naive_sigmoid_lut(v, 17, mode) for v in x.tolist()], dtype=torch.float64)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-12)
    assert lut_sigmoid(torch.tensor([-9.0, 9.0]), sigmoid_table(257)).tolist() == [0.0, 1.0]


def test_lut_table_size_bounds():
    """Inside [-8, 8]: linear error <= h^2 * 0.0120, nearest <= h / 8 (module docstring)."""
    inside = torch.linspace(-7.999, 7.999, 100_001, dtype=torch.float64)
    for entries in (33, 65, 129):
        h = 16 / (entries - 1)
        for mode, bound in (("linear", h * h * 0.0121), ("nearest", h / 8 + 1e-12)):
            error = (LUTSigmoid(entries, mode).double()(inside) - torch.sigmoid(inside)).abs().max().item()
            assert bound / 3 < error <= bound


def test_lut_float32_and_shapes():
    x = torch.randn(2, 3, 5, 7) * 6
    for module, exact in ((LUTSigmoid(), torch.sigmoid), (LUTSiLU(), F.silu)):
        y = module(x)
        assert y.shape == x.shape and y.dtype == torch.float32
        assert (y - exact(x)).abs().max() < 3e-3
    assert "entries=257" in repr(LUTSigmoid()) and "mode='nearest'" in repr(LUTSiLU(mode="nearest"))


def test_lut_bad_arguments():
    with pytest.raises(ValueError, match="mode must be one of"):
        LUTSigmoid(mode="cubic")
    with pytest.raises(ValueError, match="entries must be an integer >= 2"):
        LUTSiLU(entries=1)


def test_shift_leaky_relu_float_form():
    x = torch.randn(10_000, dtype=torch.float64) * 50
    y = ShiftLeakyReLU()(x)
    torch.testing.assert_close(y, torch.where(x >= 0, x, x * 13 / 128), rtol=0, atol=0)
    error = (y - F.leaky_relu(x, 0.1)).abs()
    torch.testing.assert_close(error, torch.where(x < 0, -x / 640, torch.zeros_like(x)), rtol=1e-12, atol=1e-15)
    assert "slope=13/128" in repr(ShiftLeakyReLU())


@pytest.mark.parametrize("dtype", [torch.int8, torch.int16, torch.int32])
def test_shift_leaky_relu_integer_form_vs_float_form(dtype):
    info = torch.iinfo(dtype)
    if dtype == torch.int8:
        x = torch.arange(info.min, info.max + 1, dtype=dtype)  # every int8 value
    else:
        limit = min(info.max, 2 ** 31 // 13 - 1)  # x * 13 must fit in int32
        x = torch.cat([torch.randint(-limit, limit, (20_000,), dtype=torch.int64),
                       torch.tensor([-limit, -129, -128, -10, -1, 0, 1, 127, limit])]).to(dtype)
    y = ShiftLeakyReLU()(x)
    assert y.dtype == dtype
    reference = ShiftLeakyReLU()(x.double())
    gap = reference - y.double()
    assert bool(((gap >= 0) & (gap < 1)).all())  # the shift floors: below the float form by < 1 unit
    assert bool((y[x >= 0] == x[x >= 0]).all())
    negatives = x[x < 0].to(torch.int64)
    assert bool((y[x < 0].to(torch.int64) == (negatives * 13).div(128, rounding_mode="floor")).all())


def test_shift_leaky_relu_rejects_other_dtypes():
    with pytest.raises(TypeError, match="int8/int16/int32"):
        ShiftLeakyReLU()(torch.zeros(3, dtype=torch.uint8))
