"""DCNv2's spatial-support analyses on tiny models whose answers are known, and `convzoo support`."""
import json

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

from convzoo.analysis.support import node_index, spatial_support
from convzoo.cli import main
from convzoo.layers import DCNv3, ModulatedDeformConv2dPack


class OneDCN(nn.Module):
    """One 3x3 modulated deformable conv (stride 1, padding 1): the node's support is its own 3x3 window."""

    def __init__(self, dilation=1):
        super().__init__()
        self.dcn = ModulatedDeformConv2dPack(3, 4, 3, padding=dilation, dilation=dilation)

    def forward(self, x):
        return self.dcn(x)


class OneDCNv3(nn.Module):
    """A 1x1 projection then DCNv3 (NHWC, 2 groups); zero-initialised offsets."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, 8, 1)
        self.dcn = DCNv3(8, 3, group=2)

    def forward(self, x):
        return self.dcn(self.proj(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def grid(cy, cx, dilation=1, shift=(0.0, 0.0)):
    return {(cy + dilation * a + shift[0], cx + dilation * b + shift[1]) for a in (-1, 0, 1) for b in (-1, 0, 1)}


def support_set(result, layer="dcn"):
    locations, gradient = result.layers[layer].effective()
    assert (gradient > 0).all()
    return {tuple(p) for p in locations.tolist()}


@pytest.mark.parametrize("dilation", [1, 2])
def test_zero_offsets_give_the_regular_grid_and_a_window_sized_erf(dilation):
    torch.manual_seed(0)
    result = spatial_support(OneDCN(dilation), torch.randn(1, 3, 16, 16), (8, 5), error_bound=1e-6, step=2)
    assert result.node == (8, 5)
    assert support_set(result) == grid(8, 5, dilation)
    rows, cols = torch.nonzero(result.erf > 0, as_tuple=True)
    # The input pixels the 3x3 window reads: the grid itself.
    assert set(zip(rows.tolist(), cols.tolist())) == {(int(y), int(x)) for y, x in grid(8, 5, dilation)}
    # The smallest centred square holding the window: side 2 * dilation + 1.
    side = 2 * dilation + 1
    assert result.saliency_box == (8 - dilation, 5 - dilation, 8 - dilation + side, 5 - dilation + side)
    assert result.saliency_error <= 1e-6


def test_constant_offsets_move_the_effective_locations_by_that_much():
    torch.manual_seed(0)
    model = OneDCN()
    with torch.no_grad():
        bias = model.dcn.conv_offset.bias
        bias[: 18].copy_(torch.tensor([1.0, -2.0]).repeat(9))  # (dy, dx) = (1, -2) at every kernel point
    result = spatial_support(model, torch.randn(1, 3, 16, 16), (8, 8), error_bound=1e-6)
    assert support_set(result) == grid(8, 8, shift=(1.0, -2.0))


def test_dcnv3_zero_offsets_give_the_regular_grid_per_group():
    torch.manual_seed(0)
    result = spatial_support(OneDCNv3(), torch.randn(1, 3, 12, 12), (6, 6), error_bound=1e-6)
    layer = result.layers["dcn"]
    assert layer.op == "dcnv3" and int((layer.gradient > 0).sum()) == 2 * 9  # two groups, nine points each
    assert support_set(result) == grid(6, 6)


def test_saliency_region_is_the_whole_image_for_a_global_node():
    """Global pooling makes the node depend on every pixel: no smaller window is within 1e-6."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.AdaptiveAvgPool2d(1))
    result = spatial_support(model, torch.randn(1, 3, 10, 10), (5, 5), error_bound=1e-6, step=2)
    assert result.saliency_box == (0, 0, 10, 10) and result.layers == {}
    assert int((result.erf > 0).sum()) == 100


def test_node_index_and_bad_arguments():
    assert node_index((31.9, 0.0), (64, 64), (2, 2)) == (0, 0)
    assert node_index((63.0, 40.0), (64, 64), (4, 4)) == (3, 2)
    model = OneDCN()
    with pytest.raises(ValueError, match="outside the 8x8 image"):
        spatial_support(model, torch.randn(1, 3, 8, 8), (8, 2))
    with pytest.raises(ValueError, match="one image"):
        spatial_support(model, torch.randn(2, 3, 8, 8), (1, 2))
    with pytest.raises(ValueError, match="error_bound"):
        spatial_support(model, torch.randn(1, 3, 8, 8), (1, 2), error_bound=1.5)


@pytest.fixture
def picture(tmp_path):
    path = tmp_path / "picture.png"
    Image.fromarray((np.random.RandomState(0).rand(40, 50, 3) * 255).astype("uint8")).save(path)
    return path


def test_cli_writes_the_figure_and_json(picture, tmp_path, capsys):
    out, report = tmp_path / "support.png", tmp_path / "support.json"
    code = main(["support", "--model", "resnet50_dcnv2", "--image", str(picture), "--point", "20,25",
                 "--input-size", "32", "--step", "16", "--out", str(out), "--json", str(report)])
    assert code == 0
    text = capsys.readouterr().out
    assert "layer4.2.conv2 (deform_conv2d)" in text and "saliency region" in text
    with Image.open(out) as figure:
        assert figure.width > 3 * 64
    data = json.loads(report.read_text())
    assert data["drawn_layer"] == "layer4.2.conv2" and len(data["layers"]) == 13
    assert data["saliency_error"] <= data["error_bound"] == 0.1


@pytest.mark.parametrize("argv,message", [
    (["--point", "20"], "--point takes Y,X"),
    (["--point", "45,10"], "outside the 50x40 image"),
    (["--point", "5,5", "--step", "16", "--layer", "nope"], "no deformable layer named 'nope'"),
])
def test_cli_errors_name_the_problem(picture, tmp_path, capsys, argv, message):
    code = main(["support", "--model", "resnet50_dcnv2", "--image", str(picture), "--input-size", "32",
                 "--out", str(tmp_path / "s.png")] + argv)
    assert code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "s.png").exists()
