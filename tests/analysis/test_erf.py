"""Effective receptive field: the contribution map against a hand-derived gradient, the
high-contribution area ratio against a brute-force search, averaging and error handling."""
import math

import numpy as np
import pytest
import torch
import torch.nn as nn
from hypothesis import given
from hypothesis import strategies as st

from convzoo.analysis.erf import (
    THRESHOLDS, contribution_map, effective_receptive_field, high_contribution_area, last_feature_map, log_scores,
    recalibrate_batchnorm,
)
from convzoo.analysis.plotting import colormap, heatmap_image, panels_figure


class ConvNet(nn.Module):
    """Stacked convolutions of one kernel size; ``forward_features`` is the last map."""

    def __init__(self, kernel_size: int, depth: int = 2, width: int = 4):
        super().__init__()
        layers = []
        for i in range(depth):
            layers += [nn.Conv2d(3 if i == 0 else width, width, kernel_size, padding=kernel_size // 2), nn.ReLU()]
        self.body = nn.Sequential(*layers)

    def forward_features(self, x):
        return self.body(x)

    def forward(self, x):
        return self.body(x).mean((2, 3))


def naive_single_conv_map(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """The aggregated positive gradient of relu(centre).sum() of one 'same' conv, from the definition:
    d y[o, cy, cx] / d x[c, cy - p + i, cx - p + j] = w[o, c, i, j] for the channels o with y > 0."""
    _, channels, height, width = x.shape
    k, p = conv.kernel_size[0], conv.padding[0]
    with torch.no_grad():
        y = conv(x)
    cy, cx = y.shape[-2] // 2, y.shape[-1] // 2
    grad = torch.zeros(channels, height, width, dtype=torch.float64)
    for o in range(conv.out_channels):
        if y[0, o, cy, cx] <= 0:
            continue
        for c in range(channels):
            for i in range(k):
                for j in range(k):
                    yy, xx = cy - p + i, cx - p + j
                    if 0 <= yy < height and 0 <= xx < width:
                        grad[c, yy, xx] += float(conv.weight.detach()[o, c, i, j])
    return grad.clamp_min(0).sum(0)


@pytest.mark.parametrize("kernel_size, size", [(3, (7, 7)), (5, (8, 6)), (3, (2, 3))], ids=["3x3-odd", "5x5-even", "3x3-border"])
def test_contribution_map_matches_the_definition(kernel_size, size):
    conv = nn.Conv2d(3, 4, kernel_size, padding=kernel_size // 2).double()
    x = torch.randn(1, 3, *size, dtype=torch.float64)
    got, feature_size = contribution_map(conv, x)
    assert feature_size == size
    torch.testing.assert_close(got, naive_single_conv_map(conv, x))


def test_contribution_map_sums_over_the_batch():
    model = ConvNet(3).double().eval()
    x = torch.randn(3, 3, 9, 9, dtype=torch.float64)
    total, _ = contribution_map(model, x)
    separate = sum(contribution_map(model, x[i:i + 1])[0] for i in range(3))
    torch.testing.assert_close(total, separate)


def brute_force_area(scores: np.ndarray, threshold: float):
    """Try every odd centred square from side 3 up; the first one holding > threshold of the total."""
    height, width = scores.shape
    cy, cx = height // 2, width // 2
    total = scores.sum()
    side = 3
    while True:
        r = side // 2
        rows = [y for y in range(cy - r, cy + r + 1) if 0 <= y < height]
        cols = [x for x in range(cx - r, cx + r + 1) if 0 <= x < width]
        inside = sum(scores[y, x] for y in rows for x in cols)
        if inside / total > threshold or len(rows) * len(cols) == height * width:
            return side, len(rows) * len(cols) / (height * width)
        side += 2


@given(
    height=st.integers(1, 12), width=st.integers(1, 12), seed=st.integers(0, 2**16),
    threshold=st.sampled_from(THRESHOLDS + (0.05, 0.75)),
)
def test_area_ratio_matches_brute_force(height, width, seed, threshold):
    scores = np.random.default_rng(seed).random((height, width)) ** 3
    side, ratio = high_contribution_area(torch.from_numpy(scores), threshold)
    expected_side, expected_ratio = brute_force_area(scores, threshold)
    assert side == expected_side
    assert ratio == pytest.approx(expected_ratio)


@given(size=st.integers(3, 20), seed=st.integers(0, 2**16))
def test_area_ratio_grows_with_the_threshold(size, seed):
    scores = torch.from_numpy(np.random.default_rng(seed).random((size, size)))
    ratios = [high_contribution_area(scores, t)[1] for t in THRESHOLDS]
    assert ratios == sorted(ratios)
    assert all(0 < r <= 1 for r in ratios)


def test_area_ratio_of_known_maps():
    delta = torch.zeros(11, 11)
    delta[5, 5] = 1.0
    assert high_contribution_area(delta, 0.99) == (3, 9 / 121)  # the paper's smallest square is 3x3
    uniform = torch.ones(10, 10)
    side, ratio = high_contribution_area(uniform, 0.5)  # 7x7 = 49 < 50 cells, 9x9 = 81 > 50
    assert (side, ratio) == (9, 0.81)
    assert high_contribution_area(torch.zeros(5, 5), 0.5) == (None, None)
    with pytest.raises(ValueError, match="threshold must be in"):
        high_contribution_area(uniform, 1.0)


def test_log_scores_are_scaled_to_one():
    contribution = torch.tensor([[0.0, 9.0], [99.0, 999.0]], dtype=torch.float64)
    torch.testing.assert_close(log_scores(contribution), torch.tensor([[0.0, 1 / 3], [2 / 3, 1.0]], dtype=torch.float64))
    assert torch.equal(log_scores(torch.zeros(2, 2)), torch.zeros(2, 2, dtype=torch.float64))


def test_erf_averages_over_exactly_num_images():
    model = ConvNet(3).eval()
    images = torch.randn(5, 3, 12, 12)
    batched = effective_receptive_field(model, [images[:2], images[2:]], num_images=3, name="net")
    singles = effective_receptive_field(model, list(images), num_images=3)
    assert batched.num_images == singles.num_images == 3
    torch.testing.assert_close(batched.contribution, singles.contribution)
    expected = sum(contribution_map(model, images[i:i + 1])[0] for i in range(3)) / 3
    torch.testing.assert_close(batched.contribution, expected)
    summary = batched.to_dict()
    assert summary["model"] == "net" and summary["input_size"] == [12, 12] and summary["feature_size"] == [12, 12]
    assert set(summary["area_ratios"]) == {str(t) for t in THRESHOLDS}


def test_large_kernels_have_a_larger_erf():
    torch.manual_seed(0)
    images = [torch.randn(2, 3, 33, 33) for _ in range(2)]
    small = effective_receptive_field(ConvNet(3, depth=3), images, num_images=4)
    large = effective_receptive_field(ConvNet(9, depth=3), images, num_images=4)
    for t in THRESHOLDS:
        assert large.area_ratios[t] > small.area_ratios[t]
        assert large.side_lengths[t] > small.side_lengths[t]


class SquareNet(ConvNet):
    """Features of x * x: a NaN input pixel in the centre's window makes the gradient NaN."""

    def forward_features(self, x):
        return self.body(x * x)


def test_non_finite_gradients_are_skipped():
    model = SquareNet(3).eval()
    good = torch.randn(1, 3, 8, 8)
    bad = good.clone()
    bad[0, 0, 4, 4] = float("nan")
    result = effective_receptive_field(model, [bad, good], num_images=2)
    assert result.num_images == 1
    torch.testing.assert_close(result.contribution, contribution_map(model, good)[0])


@pytest.mark.parametrize("batches, num_images, message", [
    pytest.param([torch.randn(1, 3, 8, 8)], 0, "num_images must be >= 1", id="no-images-asked"),
    pytest.param([], 2, "no image gave a finite gradient", id="no-batches"),
    pytest.param([torch.randn(1, 3, 8, 8), torch.randn(1, 3, 9, 9)], 2, "all images must have one size", id="two-sizes"),
])
def test_erf_errors(batches, num_images, message):
    with pytest.raises(ValueError, match=message):
        effective_receptive_field(ConvNet(3), batches, num_images=num_images)


def test_last_feature_map_needs_a_feature_map():
    flat = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten())
    with pytest.raises(ValueError, match=r"needs an \(N, C, h, w\) feature map from Sequential, got \(1, 72\)"):
        last_feature_map(flat, torch.randn(1, 3, 8, 8))


def test_last_feature_map_uses_the_last_stage():
    class Staged(ConvNet):
        feature_info = [dict(num_chs=4, reduction=1, module="a"), dict(num_chs=4, reduction=1, module="b")]

        def forward_intermediates(self, x, indices):
            assert list(indices) == [1]
            return [x[:, :1] * 0, x * 2]

    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(last_feature_map(Staged(3), x), x * 2)


def test_colormap_is_monotone_in_lightness():
    colours = colormap(np.linspace(0, 1, 50)).astype(float)
    lightness = colours @ np.array([0.299, 0.587, 0.114])
    assert np.all(np.diff(lightness) > 0)
    assert colormap(np.array([-1.0, 2.0])).tolist() == colormap(np.array([0.0, 1.0])).tolist()


def test_figure_has_one_panel_per_map():
    maps = [torch.rand(16, 16), torch.rand(8, 12)]
    panels = [(heatmap_image(m, 48), f"model {i}", ["line"]) for i, m in enumerate(maps)]
    figure = panels_figure(panels, legend="scale")
    assert figure.width > 2 * 48 and figure.height > 48
    assert heatmap_image(maps[1], 48).size == (48, 32)
    pixels = np.asarray(figure)
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 30
    with pytest.raises(ValueError, match="at least one panel"):
        panels_figure([])
    assert math.isclose(float(log_scores(maps[0]).max()), 1.0)


def test_linear_ratios_do_not_depend_on_the_gradient_scale():
    model = ConvNet(5, depth=2).eval()
    images = [torch.randn(2, 3, 21, 21)]
    base = effective_receptive_field(model, images, num_images=2)
    with torch.no_grad():
        model.body[-2].weight.mul_(1e4)
        model.body[-2].bias.mul_(1e4)
    scaled = effective_receptive_field(model, images, num_images=2)
    assert scaled.area_ratios_linear == base.area_ratios_linear
    # the paper's log scores flatten large gradients: more of the total lies away from the centre
    assert float(scaled.scores().mean()) > 2 * float(base.scores().mean())
    assert all(scaled.area_ratios[t] >= base.area_ratios[t] for t in THRESHOLDS)


class BNNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4, momentum=0.3)
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        return self.drop(self.bn(self.conv(x)))


def test_recalibrate_batchnorm_averages_over_the_images():
    model = BNNet()
    images = torch.randn(10, 3, 6, 6)
    count = recalibrate_batchnorm(model, [images[:4], images[4:7], images[7:]], num_images=9)
    assert count == 1
    with torch.no_grad():
        features = model.conv(images[:9])
    # the pieces (4 + 3 + 2 images) are gathered into one batch of 9
    torch.testing.assert_close(model.bn.running_mean, features.mean((0, 2, 3)))
    torch.testing.assert_close(model.bn.running_var, features.var((0, 2, 3)))
    assert int(model.bn.num_batches_tracked) == 1
    images_one_by_one = list(images[:9])  # single images: forwarded in batches of 8 and 1, averaged
    recalibrate_batchnorm(model, images_one_by_one, num_images=9)
    expected = (features[:8].mean((0, 2, 3)) + features[8:].mean((0, 2, 3))) / 2
    torch.testing.assert_close(model.bn.running_mean, expected)
    assert model.bn.momentum == 0.3 and not model.training and not model.bn.training
    assert recalibrate_batchnorm(ConvNet(3), [images], num_images=4) == 0
