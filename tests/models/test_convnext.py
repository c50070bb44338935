"""ConvNeXt: architecture figures, facebookresearch/ConvNeXt and timm checkpoint layouts."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convzoo
from convzoo.analysis import count_flops, count_params
from convzoo.models.convnext import checkpoint_filter_fn

from _family_helpers import build_on_meta, layer_norm_channels_first

SMALL = dict(depths=(1, 2, 1, 1), dims=(8, 16, 16, 24))

# Our exact counts of the official architecture, the paper's params (M) and MACs (G) at 224.
FIGURES = {
    "convnext_tiny": (28_589_128, 4_455_531_264, 28.6, 4.5),
    "convnext_small": (50_223_688, 8_683_712_256, 50, 8.7),
    "convnext_base": (88_591_464, 15_354_729_472, 89, 15.4),
    "convnext_large": (197_767_336, 34_361_433_600, 198, 34.4),
    "convnext_xlarge": (350_196_968, 60_921_030_656, 350, 60.9),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def to_official(state):
    """Our (timm's) keys -> facebookresearch/ConvNeXt's (the inverse of checkpoint_filter_fn)."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^stem\.([01])\.", r"downsample_layers.0.\1.", key)
        key = re.sub(r"^stages\.(\d+)\.downsample\.([01])\.", r"downsample_layers.\1.\2.", key)
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", key)
        if m:
            rest = m.group(3).replace("conv_dw.", "dwconv.").replace("mlp.fc1.", "pwconv1.").replace("mlp.fc2.", "pwconv2.")
            key = f"stages.{m.group(1)}.{m.group(2)}.{rest}"
        key = re.sub(r"^head\.norm\.", "norm.", key)
        key = re.sub(r"^head\.fc\.", "head.", key)
        out[key] = value
    return out


def official_forward(sd, x, depths):
    """facebookresearch/ConvNeXt's forward from its state dict, written with F.conv2d (NCHW)."""
    for i, depth in enumerate(depths):
        p = f"downsample_layers.{i}"
        if i == 0:
            x = F.conv2d(x, sd[p + ".0.weight"], sd[p + ".0.bias"], stride=4)
            x = layer_norm_channels_first(x, sd[p + ".1.weight"], sd[p + ".1.bias"])
        else:
            x = layer_norm_channels_first(x, sd[p + ".0.weight"], sd[p + ".0.bias"])
            x = F.conv2d(x, sd[p + ".1.weight"], sd[p + ".1.bias"], stride=2)
        for j in range(depth):
            b = f"stages.{i}.{j}."
            c = x.shape[1]
            y = F.conv2d(x, sd[b + "dwconv.weight"], sd[b + "dwconv.bias"], padding=3, groups=c).permute(0, 2, 3, 1)
            y = F.layer_norm(y, (c,), sd[b + "norm.weight"], sd[b + "norm.bias"], 1e-6)
            y = F.linear(F.gelu(F.linear(y, sd[b + "pwconv1.weight"], sd[b + "pwconv1.bias"])),
                         sd[b + "pwconv2.weight"], sd[b + "pwconv2.bias"])
            x = x + (sd[b + "gamma"] * y).permute(0, 3, 1, 2)
    x = F.layer_norm(x.mean((2, 3)), (x.shape[1],), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def randomized_small_model(num_classes=10):
    model = convzoo.create_model("convnext_tiny", num_classes=num_classes, **SMALL)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 else 0.0) * 0.5)
    return model.eval()


@pytest.mark.parametrize("name", sorted(FIGURES))
def test_parameter_and_mac_counts(name):
    params, macs, paper_m, paper_g = FIGURES[name]
    model = build_on_meta(name)
    assert count_params(model) == params
    assert round(params / 1e6, 1 if paper_m < 30 else 0) == paper_m
    result = count_flops(model, (1, 3, 224, 224))
    assert result.macs == macs
    assert round(macs / 1e9, 1) == paper_g


def test_hand_typed_official_and_timm_keys():
    """Keys and shapes read from facebookresearch/ConvNeXt and timm for ConvNeXt-T."""
    native = build_on_meta("convnext_tiny").state_dict()
    official = to_official(native)
    for key, shape in {
        "downsample_layers.0.0.weight": (96, 3, 4, 4),
        "downsample_layers.0.1.bias": (96,),
        "downsample_layers.1.0.weight": (96,),
        "downsample_layers.1.1.weight": (192, 96, 2, 2),
        "stages.0.0.dwconv.weight": (96, 1, 7, 7),
        "stages.0.0.gamma": (96,),
        "stages.2.8.pwconv1.weight": (1536, 384),
        "stages.3.2.pwconv2.bias": (768,),
        "norm.weight": (768,),
        "head.weight": (1000, 768),
    }.items():
        assert tuple(official[key].shape) == shape, key
    for key, shape in {
        "stem.0.weight": (96, 3, 4, 4),
        "stem.1.weight": (96,),
        "stages.1.downsample.0.bias": (96,),
        "stages.1.downsample.1.weight": (192, 96, 2, 2),
        "stages.0.blocks.0.conv_dw.weight": (96, 1, 7, 7),
        "stages.0.blocks.2.norm.weight": (96,),
        "stages.2.blocks.8.mlp.fc1.weight": (1536, 384),
        "stages.3.blocks.2.mlp.fc2.weight": (768, 3072),
        "stages.3.blocks.2.gamma": (768,),
        "head.norm.weight": (768,),
        "head.fc.weight": (1000, 768),
    }.items():
        assert tuple(native[key].shape) == shape, key
    assert len(official) == len(native) and not any(k.startswith("stages.0.downsample") for k in native)


def test_official_checkpoint_loads_and_gives_the_official_output(tmp_path):
    source = randomized_small_model()
    official = to_official(source.state_dict())
    path = tmp_path / "convnext_tiny_1k_224_ema.pth"
    torch.save({"model": official}, path)
    model = convzoo.create_model("convnext_tiny", pretrained=path, num_classes=10, **SMALL).eval()
    x = torch.randn(2, 3, 64, 48)
    with torch.no_grad():
        expected = official_forward(official, x, SMALL["depths"])
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_timm_checkpoint_loads(tmp_path):
    source = randomized_small_model()
    path = tmp_path / "pytorch_model.pth"
    torch.save(source.state_dict(), path)
    model = convzoo.create_model("convnext_tiny", pretrained=path, num_classes=10, **SMALL).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))
    state = source.state_dict()
    assert checkpoint_filter_fn(state, model) is state


def test_official_checkpoint_with_another_head_loads_into_a_new_head(tmp_path, caplog):
    official = to_official(randomized_small_model(num_classes=21841).state_dict())
    path = tmp_path / "convnext_tiny_22k_224.pth"
    torch.save({"model": official}, path)
    with caplog.at_level("WARNING", logger="convzoo"):
        model = convzoo.create_model("convnext_tiny", pretrained=path, num_classes=10, **SMALL)
    assert "classifier re-initialised for num_classes=10" in caplog.text
    assert model.head.fc.weight.shape == (10, 24)
    torch.testing.assert_close(model.head.norm.weight, official["norm.weight"])


def test_official_checkpoint_loads_without_classifier(tmp_path, caplog):
    source = randomized_small_model()
    path = tmp_path / "convnext_tiny_1k_224_ema.pth"
    torch.save({"model": to_official(source.state_dict())}, path)
    with caplog.at_level("WARNING", logger="convzoo"):
        model = convzoo.create_model("convnext_tiny", pretrained=path, num_classes=0, **SMALL).eval()
    assert "no classifier for num_classes=0 (checkpoint head head.fc.weight, head.fc.bias not loaded)" in caplog.text
    assert isinstance(model.head.fc, nn.Identity)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source.forward_head(source.forward_features(x), pre_logits=True))


def test_init_follows_the_official_code():
    model = convzoo.create_model("convnext_tiny", **SMALL)
    block = model.stages[0].blocks[0]
    assert torch.equal(block.gamma, torch.full((8,), 1e-6))
    assert block.norm.eps == 1e-6 and model.stem[1].eps == 1e-6 and model.head.norm.eps == 1e-6
    assert torch.equal(block.mlp.fc1.bias, torch.zeros(32))
    assert block.conv_dw.kernel_size == (7, 7) and block.conv_dw.padding == (3, 3)
    weights = torch.cat([m.weight.flatten() for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))])
    assert 0.018 < weights.std() < 0.022 and weights.mean().abs() < 0.002  # trunc_normal_(std=.02) as timm's
    scaled = convzoo.create_model("convnext_tiny", head_init_scale=0.0, num_classes=5, **SMALL)
    assert scaled.head.fc.weight.abs().max() == 0


def test_no_layer_scale_and_drop_path_rates():
    model = convzoo.create_model("convnext_tiny", ls_init_value=0.0, drop_path_rate=0.2, **SMALL)
    blocks = [b for s in model.stages for b in s.blocks]
    assert all(b.gamma is None for b in blocks)
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.2) and rates == sorted(rates)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 1000)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(depths=(1, 1, 1)), "one entry per stage"),
        (dict(kernel_size=4), "kernel_size must be an odd positive int, got 4"),
        (dict(dims=(8, 16, 0, 24)), "depths and dims must be positive"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        convzoo.create_model("convnext_tiny", **{**SMALL, **overrides})


@pytest.mark.parametrize("output_stride, reductions", [(16, (4, 8, 16, 16)), (8, (4, 8, 8, 8))])
def test_output_stride_dilates_the_last_stages_with_the_same_weights(output_stride, reductions):
    """A dilated stage computed on the dense map gives, on the grid of the strided model's
    samples, exactly the strided model's output (the 2x2 downsampling conv at stride 1 with
    "same" padding, then depthwise convs dilated by the skipped stride): for OS 16 the last stage
    at every other position; for OS 8 stage 2 at every other and stage 3 at every fourth, offset
    by the dilated downsampling conv's one-pixel padding."""
    strided = randomized_small_model().eval()
    dilated = convzoo.create_model("convnext_tiny", num_classes=10, output_stride=output_stride, **SMALL).eval()
    dilated.load_state_dict(strided.state_dict())  # the same keys and shapes: classification weights load
    assert tuple(f["reduction"] for f in dilated.feature_info) == reductions
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        dense, sparse = dilated.forward_intermediates(x), strided.forward_intermediates(x)
        assert [tuple(f.shape[-2:]) for f in dense] == [(64 // r, 64 // r) for r in reductions]
        torch.testing.assert_close(dense[1], sparse[1])
        if output_stride == 16:
            torch.testing.assert_close(dense[3][..., ::2, ::2], sparse[3])
        else:
            torch.testing.assert_close(dense[2][..., ::2, ::2], sparse[2])
            torch.testing.assert_close(dense[3][..., 1::4, 1::4], sparse[3])
        assert dilated(x).shape == (2, 10)
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32"):
        convzoo.create_model("convnext_tiny", output_stride=4, **SMALL)


@pytest.mark.parametrize("head", ["upernet", "semfpn"])
def test_output_stride_for_segmentation(head):
    """Both heads on an output-stride-16 ConvNeXt: they read the 1/16 maps and predict at full size."""
    model = convzoo.create_model(f"{head}_convnext_tiny", num_classes=3, output_stride=16, head_channels=8,
                                 head_fpn_channels=8, aux_channels=4, **SMALL).eval()
    assert model.backbone.reductions() == [4, 8, 16, 16]
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, 3, 64, 64)
