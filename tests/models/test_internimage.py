"""InternImage T/S/B: official configs, parameter counts, official checkpoint layout, block forms."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convzoo
from convzoo.models.internimage import official_key_to_native
from _family_helpers import assert_reparameterize_exact, build_on_meta, count_macs, num_params

# Our own counts of the official architectures (intern_image.py with the *_1k_224 configs;
# paper: 30M / 50M / 97M) and the papers' MACs (5G / 8G / 16G).
PARAMS = {"internimage_t": 29_918_424, "internimage_s": 50_079_880, "internimage_b": 97_461_832}
PAPER_GMACS = {"internimage_t": 5, "internimage_s": 8, "internimage_b": 16}
# The official configs (classification/configs/*_1k_224.yaml plus config.py defaults).
OFFICIAL_CFGS = {
    "internimage_t": dict(channels=64, depths=(4, 4, 18, 4), groups=(4, 8, 16, 32), layer_scale=None, post_norm=False),
    "internimage_s": dict(channels=80, depths=(4, 4, 21, 4), groups=(5, 10, 20, 40), layer_scale=1e-5, post_norm=True),
    "internimage_b": dict(channels=112, depths=(4, 4, 21, 4), groups=(7, 14, 28, 56), layer_scale=1e-5, post_norm=True),
}
# Small variants (same code paths, few blocks) for the tests that run the model.
TINY = dict(channels=16, depths=(1, 1, 2, 1), groups=(2, 4, 8, 8))
NAMES = sorted(PARAMS)


def native_to_official(state):
    """Our inverse mapping: the official code wraps its norms in nn.Sequential with permutes."""
    rules = [
        (r"^patch_embed\.(norm[12])\.", r"patch_embed.\1.1."),
        (r"^(levels\.\d+\.blocks\.\d+)\.(norm1|norm2|res_post_norm1|res_post_norm2)\.", r"\1.\2.0."),
        (r"^(levels\.\d+)\.norm\.", r"\1.norm.0."),
        (r"^(levels\.\d+)\.downsample\.norm\.", r"\1.downsample.norm.1."),
        (r"^conv_head\.1\.", "conv_head.1.0."),
    ]
    out = {}
    for key, value in state.items():
        for pattern, replacement in rules:
            key = re.sub(pattern, replacement, key)
        out[key] = value
    return out


@pytest.mark.parametrize("name", NAMES)
def test_official_config(name):
    cfg = build_on_meta(name).cfg
    for field, value in OFFICIAL_CFGS[name].items():
        assert getattr(cfg, field) == value, field
    assert (cfg.mlp_ratio, cfg.offset_scale, cfg.cls_scale, cfg.center_feature_scale) == (4.0, 1.0, 1.5, False)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count(name):
    assert num_params(build_on_meta(name)) == PARAMS[name]


@pytest.mark.parametrize("name", NAMES)
def test_macs_match_paper(name):
    assert round(count_macs(build_on_meta(name)) / 1e9) == PAPER_GMACS[name]


def test_official_keys_typed_by_hand_map_onto_ours():
    """Keys and shapes read from intern_image.py / ops_dcnv3/modules/dcnv3.py for InternImage-T."""
    official = {
        "patch_embed.conv1.weight": (32, 3, 3, 3),
        "patch_embed.norm1.1.weight": (32,),
        "patch_embed.norm2.1.bias": (64,),
        "levels.0.blocks.0.norm1.0.weight": (64,),
        "levels.0.blocks.0.dcn.dw_conv.0.weight": (64, 1, 3, 3),
        "levels.0.blocks.0.dcn.offset.weight": (4 * 9 * 2, 64),
        "levels.0.blocks.0.dcn.mask.bias": (4 * 9,),
        "levels.0.blocks.0.dcn.input_proj.weight": (64, 64),
        "levels.0.blocks.0.dcn.output_proj.bias": (64,),
        "levels.0.blocks.0.norm2.0.bias": (64,),
        "levels.0.blocks.0.mlp.fc1.weight": (256, 64),
        "levels.0.norm.0.weight": (64,),
        "levels.0.downsample.conv.weight": (128, 64, 3, 3),
        "levels.0.downsample.norm.1.weight": (128,),
        "levels.2.blocks.17.mlp.fc2.weight": (256, 1024),
        "levels.3.norm.0.bias": (512,),
        "conv_head.0.weight": (768, 512, 1, 1),
        "conv_head.1.0.running_var": (768,),
        "head.weight": (1000, 768),
    }
    ours = build_on_meta("internimage_t").state_dict()
    mapped = {key: official_key_to_native(key) for key in official}
    for key, shape in official.items():
        assert mapped[key] in ours, key
        assert tuple(ours[mapped[key]].shape) == shape, key


def test_post_norm_models_have_layer_scale_and_no_level_norm():
    state = build_on_meta("internimage_s").state_dict()
    assert tuple(state["levels.1.blocks.0.gamma1"].shape) == (160,)
    assert not any(re.match(r"levels\.\d+\.norm\.", k) for k in state)
    assert not any(k.startswith("levels.0.blocks.0.gamma") for k in build_on_meta("internimage_t").state_dict())


def official_forward(sd, x, channels, depths, groups, post_norm, layer_scale):
    """InternImage's classification forward from an official state dict, written from
    intern_image.py and DCNv3_pytorch: NHWC between the stem and the head, LayerNorm eps 1e-6,
    DCNv3 = input_proj, depthwise 3x3 + LN + GELU of the input predicting offsets and per-group
    softmax-normalised masks, the DCNv3 core (convzoo.ops.dcnv3's reference), output_proj."""
    def ln(t, key):
        return F.layer_norm(t, t.shape[-1:], sd[key + ".weight"], sd[key + ".bias"], 1e-6)

    def linear(t, key):
        return F.linear(t, sd[key + ".weight"], sd[key + ".bias"])

    x = F.conv2d(x, sd["patch_embed.conv1.weight"], sd["patch_embed.conv1.bias"], stride=2, padding=1)
    x = F.gelu(ln(x.permute(0, 2, 3, 1), "patch_embed.norm1.1")).permute(0, 3, 1, 2)
    x = F.conv2d(x, sd["patch_embed.conv2.weight"], sd["patch_embed.conv2.bias"], stride=2, padding=1)
    x = ln(x.permute(0, 2, 3, 1), "patch_embed.norm2.1")
    for level, (depth, group) in enumerate(zip(depths, groups)):
        c = channels * 2 ** level
        for j in range(depth):
            b = f"levels.{level}.blocks.{j}."

            def dcn(t):
                n, h, w, _ = t.shape
                proj = linear(t, b + "dcn.input_proj")
                y = F.conv2d(t.permute(0, 3, 1, 2), sd[b + "dcn.dw_conv.0.weight"], sd[b + "dcn.dw_conv.0.bias"],
                             padding=1, groups=c)
                y = F.gelu(ln(y.permute(0, 2, 3, 1), b + "dcn.dw_conv.1.1"))
                offset = linear(y, b + "dcn.offset")
                mask = linear(y, b + "dcn.mask").reshape(n, h, w, group, -1).softmax(-1).reshape(n, h, w, -1)
                out = convzoo.ops.dcnv3(proj, offset, mask, 3, 3, 1, 1, 1, 1, 1, 1, group, c // group, 1.0,
                                        impl="reference")
                return linear(out, b + "dcn.output_proj")

            def mlp(t):
                return linear(F.gelu(linear(t, b + "mlp.fc1")), b + "mlp.fc2")

            for branch, norm, gamma in ((dcn, "norm1.0", "gamma1"), (mlp, "norm2.0", "gamma2")):
                y = ln(branch(x), b + norm) if post_norm else branch(ln(x, b + norm))
                x = x + (sd[b + gamma] * y if layer_scale else y)
        if not post_norm:
            x = ln(x, f"levels.{level}.norm.0")
        if level < len(depths) - 1:
            d = f"levels.{level}.downsample."
            x = F.conv2d(x.permute(0, 3, 1, 2), sd[d + "conv.weight"], stride=2, padding=1)
            x = ln(x.permute(0, 2, 3, 1), d + "norm.1")
    x = F.conv2d(x.permute(0, 3, 1, 2), sd["conv_head.0.weight"])
    x = F.batch_norm(x, sd["conv_head.1.0.running_mean"], sd["conv_head.1.0.running_var"], sd["conv_head.1.0.weight"],
                     sd["conv_head.1.0.bias"], False, 0.0, 1e-5)
    return linear(F.gelu(x).mean((2, 3)), "head")


@pytest.mark.parametrize("name, post_norm, layer_scale", [("internimage_t", False, False), ("internimage_s", True, True)])
def test_official_checkpoint_loads_and_gives_the_official_forward(tmp_path, name, post_norm, layer_scale):
    reference = convzoo.create_model(name, num_classes=10, **TINY)
    with torch.no_grad():  # every parameter random (offsets and masks start at zero), BN statistics too
        for p in reference.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
        reference.conv_head[1].running_mean.uniform_(-0.2, 0.2)
        reference.conv_head[1].running_var.uniform_(0.5, 1.5)
    official = native_to_official(reference.state_dict())
    assert "patch_embed.norm1.1.weight" in official and "conv_head.1.0.weight" in official
    torch.save({"model": official}, tmp_path / f"{name}.pth")
    model = convzoo.create_model(name, pretrained=tmp_path / f"{name}.pth", num_classes=10, **TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = official_forward(official, x, TINY["channels"], TINY["depths"], TINY["groups"], post_norm, layer_scale)
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_native_layout_loads_too(tmp_path):
    reference = convzoo.create_model("internimage_t", num_classes=3, **TINY)
    torch.save(reference.state_dict(), tmp_path / "native.pth")
    model = convzoo.create_model("internimage_t", pretrained=tmp_path / "native.pth", num_classes=3, **TINY)
    torch.testing.assert_close(model.head.weight, reference.head.weight)


@pytest.mark.parametrize("name", ["internimage_t", "internimage_b"])
def test_forward_backward_and_features(name):
    model = convzoo.create_model(name, num_classes=7, drop_path_rate=0.1, **TINY)
    x = torch.randn(2, 3, 64, 32)
    out = model(x)
    assert out.shape == (2, 7)
    out.sum().backward()
    assert model.patch_embed.conv1.weight.grad is not None
    features = convzoo.create_model(name, features_only=True, **TINY)
    maps = features(x)
    assert [tuple(m.shape) for m in maps] == [(2, 16, 16, 8), (2, 32, 8, 4), (2, 64, 4, 2), (2, 128, 2, 1)]
    assert features.reductions() == [4, 8, 16, 32]


def test_grad_checkpointing_gives_same_output():
    model = convzoo.create_model("internimage_s", num_classes=4, **TINY).eval()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    ref = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), ref)


def _official_layer_forward(layer, x):
    """The official InternImageLayer._inner_forward, written from intern_image.py."""
    if not layer.layer_scale:
        if layer.post_norm:
            x = x + layer.norm1(layer.dcn(x))
            return x + layer.norm2(layer.mlp(x))
        if layer.res_post_norm:
            x = x + layer.res_post_norm1(layer.dcn(layer.norm1(x)))
            return x + layer.res_post_norm2(layer.mlp(layer.norm2(x)))
        x = x + layer.dcn(layer.norm1(x))
        return x + layer.mlp(layer.norm2(x))
    if layer.post_norm:
        x = x + layer.gamma1 * layer.norm1(layer.dcn(x))
        return x + layer.gamma2 * layer.norm2(layer.mlp(x))
    x = x + layer.gamma1 * layer.dcn(layer.norm1(x))
    return x + layer.gamma2 * layer.mlp(layer.norm2(x))


@pytest.mark.parametrize(
    "options",
    [dict(), dict(post_norm=True), dict(res_post_norm=True), dict(layer_scale=0.5), dict(layer_scale=0.5, post_norm=True)],
    ids=["pre_norm", "post_norm", "res_post_norm", "layer_scale", "layer_scale_post_norm"],
)
def test_block_forms_follow_official_code(options):
    model = convzoo.create_model("internimage_t", num_classes=2, **TINY, **options).eval()
    layer = model.levels[0].blocks[0]
    for p in layer.parameters():  # move every norm / projection away from its identity init
        nn.init.normal_(p, std=0.3) if p.dim() > 1 else nn.init.uniform_(p, 0.5, 1.5)
    x = torch.randn(1, 5, 6, 16)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), _official_layer_forward(layer, x))
    assert ("res_post_norm1.weight" in dict(layer.named_parameters())) == bool(options.get("res_post_norm"))


def test_center_feature_scale_keeps_level_norm_with_post_norm():
    model = convzoo.create_model("internimage_s", center_feature_scale=True, **TINY).eval()
    assert isinstance(model.levels[0].norm, nn.LayerNorm)
    assert "levels.0.blocks.0.dcn.center_feature_scale_proj_weight" in model.state_dict()
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 1000)


def test_bad_groups_are_rejected():
    with pytest.raises(ValueError, match=r"not divisible by groups\[0\]=3"):
        convzoo.create_model("internimage_t", channels=16, groups=(3, 4, 8, 8))


def test_reset_classifier_and_pre_logits():
    model = convzoo.create_model("internimage_t", **TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    pooled = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pooled.shape == (1, 192)
    model.reset_classifier(0)
    torch.testing.assert_close(model(x), pooled)


def test_reparameterize_folds_the_head_batchnorm():
    model = convzoo.create_model("internimage_s", num_classes=3, **TINY)
    assert_reparameterize_exact(model, torch.randn(2, 3, 32, 32))
    assert model.conv_head[0].bias is not None
