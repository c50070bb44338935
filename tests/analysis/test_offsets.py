"""Capturing where deformable layers sample: the locations must be the ones the operators read.

Each check rebuilds an operator's output from the captured locations and weights with a naive
bilinear sampler written from the definition (zero outside the input): if the locations were
wrong, the rebuilt output would not match the operator's.
"""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from convzoo import ops
from convzoo.analysis.offsets import capture_sampling, deform_conv2d_locations, samples_at
from convzoo.analysis.plotting import draw_points


def bilinear(image: torch.Tensor, y: float, x: float) -> float:
    """Value of the (H, W) ``image`` at (y, x), pixel centres at integers, zero outside."""
    height, width = image.shape
    y0, x0 = math.floor(y), math.floor(x)
    total = 0.0
    for yy, wy in ((y0, 1 - (y - y0)), (y0 + 1, y - y0)):
        for xx, wx in ((x0, 1 - (x - x0)), (x0 + 1, x - x0)):
            if 0 <= yy < height and 0 <= xx < width:
                total += wy * wx * float(image[yy, xx])
    return total


class FixedDeformConv(nn.Module):
    """Calls ops.deform_conv2d with fixed offsets/mask; weight one-hot at kernel position ``tap``."""

    def __init__(self, offset, mask, kernel=(3, 3), tap=0, stride=1, padding=1, dilation=1):
        super().__init__()
        self.offset, self.mask = offset, mask
        weight = torch.zeros(1, 1, *kernel, dtype=offset.dtype)
        weight.view(-1)[tap] = 1.0
        self.weight = nn.Parameter(weight)
        self.stride, self.padding, self.dilation = stride, padding, dilation

    def forward(self, x):
        return ops.deform_conv2d(x, self.offset, self.weight, None, self.stride, self.padding, self.dilation, mask=self.mask)


def naive_locations(offset, kernel, stride, padding, dilation):
    n, _, height_out, width_out = offset.shape
    kh, kw = kernel
    groups = offset.shape[1] // (2 * kh * kw)
    out = torch.empty(n, height_out, width_out, groups * kh * kw, 2, dtype=offset.dtype)
    for b in range(n):
        for i in range(height_out):
            for j in range(width_out):
                for g in range(groups):
                    for ky in range(kh):
                        for kx in range(kw):
                            k = ky * kw + kx
                            dy, dx = offset[b, 2 * (g * kh * kw + k), i, j], offset[b, 2 * (g * kh * kw + k) + 1, i, j]
                            out[b, i, j, g * kh * kw + k, 0] = i * stride[0] - padding[0] + ky * dilation[0] + dy
                            out[b, i, j, g * kh * kw + k, 1] = j * stride[1] - padding[1] + kx * dilation[1] + dx
    return out


@pytest.mark.parametrize("kernel, stride, padding, dilation, groups", [
    ((3, 3), (1, 1), (1, 1), (1, 1), 1),
    ((3, 2), (2, 1), (0, 1), (1, 2), 2),
], ids=["3x3", "3x2-strided-dilated-2groups"])
def test_locations_match_the_definition(kernel, stride, padding, dilation, groups):
    offset = torch.randn(2, 2 * groups * kernel[0] * kernel[1], 4, 3, dtype=torch.float64)
    torch.testing.assert_close(
        deform_conv2d_locations(offset, kernel, stride, padding, dilation),
        naive_locations(offset, kernel, stride, padding, dilation),
    )


@pytest.mark.parametrize("tap, stride", [(0, 1), (4, 1), (7, 2)], ids=["corner-tap", "centre-tap", "strided"])
def test_captured_deform_conv_locations_reproduce_the_operator(tap, stride):
    x = torch.randn(1, 1, 7, 6, dtype=torch.float64)
    height_out, width_out = (7 - 1) // stride + 1, (6 - 1) // stride + 1
    offset = 2.5 * torch.randn(1, 18, height_out, width_out, dtype=torch.float64)  # some fall outside
    mask = torch.rand(1, 9, height_out, width_out, dtype=torch.float64)
    layer = FixedDeformConv(offset, mask, tap=tap, stride=stride)
    model = nn.Sequential(nn.Identity(), layer)
    maps = capture_sampling(model, x)
    assert list(maps) == ["1"]
    sampling = maps["1"]
    assert sampling.op == "deform_conv2d" and sampling.groups == 1
    assert sampling.input_size == (7, 6) and sampling.output_size == (height_out, width_out)
    with torch.no_grad():
        expected = layer(x)[0, 0]
    rebuilt = torch.tensor([
        [float(sampling.weights[0, i, j, tap]) * bilinear(x[0, 0], *sampling.locations[0, i, j, tap].tolist())
         for j in range(width_out)] for i in range(height_out)
    ], dtype=torch.float64)
    torch.testing.assert_close(rebuilt, expected)


class FixedDCNv3(nn.Module):
    def __init__(self, offset, mask, group, remove_center, offset_scale=1.0, mask_softmax=False):
        super().__init__()
        self.offset, self.mask = offset, mask
        self.group, self.remove_center, self.offset_scale = group, remove_center, offset_scale
        self.mask_softmax = mask_softmax

    def forward(self, x):
        return ops.dcnv3(x, self.offset, self.mask, 3, 3, 1, 1, 1, 1, 1, 1, self.group, x.shape[-1] // self.group,
                         self.offset_scale, self.remove_center, mask_softmax=self.mask_softmax)


@pytest.mark.parametrize("remove_center, offset_scale", [(False, 1.0), (True, 0.5)], ids=["plain", "remove_center-scaled"])
def test_captured_dcnv3_locations_reproduce_the_operator(remove_center, offset_scale):
    group, points = 2, 9 - remove_center
    x = torch.randn(1, 5, 6, group, dtype=torch.float64)  # NHWC, one channel per group
    offset = 2 * torch.randn(1, 5, 6, group * points * 2, dtype=torch.float64)
    chosen = 3  # each group puts all its weight on point 3 (x-major order)
    mask = torch.zeros(1, 5, 6, group, points, dtype=torch.float64)
    mask[..., chosen] = 1.0
    layer = FixedDCNv3(offset, mask.reshape(1, 5, 6, -1), group, remove_center, offset_scale)
    sampling = capture_sampling(layer, x)[""]
    assert sampling.op == "dcnv3" and sampling.groups == group and sampling.input_size == (5, 6)
    assert sampling.locations.shape == (1, 5, 6, group * points, 2)
    with torch.no_grad():
        expected = layer(x)[0]
    for g in range(group):
        weights = sampling.weights[0, :, :, g * points:(g + 1) * points]
        assert torch.all(weights.sum(-1) == 1)
        for i in range(5):
            for j in range(6):
                p = int(weights[i, j].argmax())
                value = bilinear(x[0, :, :, g], *sampling.locations[0, i, j, g * points + p].tolist())
                assert value == pytest.approx(float(expected[i, j, g]), abs=1e-9)


def test_dcnv3_with_mask_logits_captures_the_softmax_weights():
    """``mask_softmax=True`` hands the op logits: the captured weights are their softmax per group."""
    group, points = 2, 9
    x = torch.randn(1, 4, 5, group * 3, dtype=torch.float64)
    offset = torch.randn(1, 4, 5, group * points * 2, dtype=torch.float64)
    logits = 3 * torch.randn(1, 4, 5, group * points, dtype=torch.float64)
    probs = torch.softmax(logits.view(1, 4, 5, group, points), -1).view(logits.shape)
    got = capture_sampling(FixedDCNv3(offset, logits, group, False, mask_softmax=True), x)[""]
    want = capture_sampling(FixedDCNv3(offset, probs, group, False), x)[""]
    torch.testing.assert_close(got.weights, want.weights)
    torch.testing.assert_close(got.locations, want.locations)


class TwoDeformLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.offset_conv = nn.Conv2d(2, 18, 3, padding=1)
        self.weight = nn.Parameter(torch.randn(2, 2, 3, 3))

    def forward(self, x):
        for _ in range(2):  # the same module calls the operator twice
            x = ops.deform_conv2d(x, self.offset_conv(x), self.weight, padding=1)
        return x


def test_repeated_calls_get_numbered_names_and_the_model_is_left_as_it_was():
    model = nn.Sequential(nn.Conv2d(3, 2, 1), TwoDeformLayers()).train()
    maps = capture_sampling(model, torch.randn(1, 3, 6, 6))
    assert list(maps) == ["1", "1#2"]
    assert torch.all(maps["1"].weights == 1)  # v1: no mask
    assert model.training
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


def test_a_model_without_deformable_layers_gives_nothing():
    assert capture_sampling(nn.Conv2d(3, 3, 3), torch.randn(1, 3, 5, 5)) == {}


def test_samples_at_maps_the_layer_grid_onto_the_image():
    # a layer at stride 2 (input 8x8 of a 16x16 image), zero offsets: a regular 3x3 grid
    offset = torch.zeros(1, 18, 8, 8)
    model = nn.Sequential(nn.AvgPool2d(2), FixedDeformConv(offset, None))
    sampling = capture_sampling(model, torch.randn(1, 1, 16, 16))["1"]
    (point,) = samples_at(sampling, [(9.0, 5.0)], (16, 16))
    assert point.output_index == (4, 2)
    assert point.centre == (8.5, 4.5)
    grid = torch.tensor([[(8.5 + 2 * dy, 4.5 + 2 * dx) for dx in (-1, 0, 1)] for dy in (-1, 0, 1)], dtype=torch.float64)
    torch.testing.assert_close(point.locations, grid.reshape(9, 2))


def test_draw_points_marks_the_image():
    image = Image.new("RGB", (64, 48), (128, 128, 128))
    locations = [np.array([[10.0, 10.0], [30.0, 40.0], [np.nan, 5.0]])]
    picture = draw_points(image, [(20.0, 20.0)], locations, [np.array([1.0, 0.2, 0.5])])
    assert picture.size == image.size
    changed = np.any(np.asarray(picture) != 128, axis=-1)
    assert changed[10, 10] and changed[30, 40] and changed[20, 20]
    assert 0.01 < changed.mean() < 0.5
