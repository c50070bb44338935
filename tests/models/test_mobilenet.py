"""MobileNet V1/V2/V3: architecture figures, torchvision/timm checkpoints, BN folding."""
import logging

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convzoo
from _family_helpers import (
    assert_checkpoint_round_trip, assert_key_shapes, assert_reparameterize_exact, build_on_meta, count_macs,
    load_saved, num_params,
)

# Our own counts of the official architectures (torchvision mobilenet_v2 / v3_large /
# v3_small and timm mobilenetv1_100), and the papers' MACs at 224x224.
PARAMS = {
    "mobilenetv1_100": 4_231_976,
    "mobilenetv2_100": 3_504_872,
    "mobilenetv3_large_100": 5_483_032,
    "mobilenetv3_small_100": 2_542_856,
}
PAPER_MACS = {
    "mobilenetv1_100": 569e6,
    "mobilenetv2_100": 300e6,
    "mobilenetv3_large_100": 217e6,
    "mobilenetv3_small_100": 56e6,
}
STAGE_CHANNELS = {
    "mobilenetv1_100": [128, 256, 512, 1024],
    "mobilenetv2_100": [24, 32, 96, 1280],
    "mobilenetv3_large_100": [24, 40, 112, 960],
    "mobilenetv3_small_100": [16, 24, 48, 576],
}
# Keys typed by hand from torchvision/models/mobilenetv2.py and mobilenetv3.py
# (Conv2dNormActivation = [conv, bn, act]; InvertedResidual.conv / .block; SE fc1/fc2) and
# from timm's EfficientNet/DepthwiseSeparableConv (conv_stem, bn1, blocks.i.j.conv_dw/bn1/conv_pw/bn2).
OFFICIAL_KEYS = {
    "mobilenetv1_100": {
        "conv_stem.weight": (32, 3, 3, 3),
        "bn1.running_mean": (32,),
        "blocks.0.0.conv_dw.weight": (32, 1, 3, 3),
        "blocks.0.0.conv_pw.weight": (64, 32, 1, 1),
        "blocks.3.5.bn2.running_var": (512,),
        "blocks.4.1.conv_pw.weight": (1024, 1024, 1, 1),
        "classifier.weight": (1000, 1024),
    },
    "mobilenetv2_100": {
        "features.0.0.weight": (32, 3, 3, 3),
        "features.1.conv.0.0.weight": (32, 1, 3, 3),
        "features.1.conv.1.weight": (16, 32, 1, 1),
        "features.1.conv.2.num_batches_tracked": (),
        "features.2.conv.0.0.weight": (96, 16, 1, 1),
        "features.2.conv.3.running_mean": (24,),
        "features.17.conv.2.weight": (320, 960, 1, 1),
        "features.18.0.weight": (1280, 320, 1, 1),
        "classifier.1.weight": (1000, 1280),
    },
    "mobilenetv3_large_100": {
        "features.1.block.0.0.weight": (16, 1, 3, 3),
        "features.4.block.2.fc1.weight": (24, 72, 1, 1),
        "features.4.block.2.fc2.bias": (72,),
        "features.4.block.3.1.weight": (40,),
        "features.13.block.1.0.weight": (672, 1, 5, 5),
        "features.16.0.weight": (960, 160, 1, 1),
        "classifier.0.weight": (1280, 960),
        "classifier.3.weight": (1000, 1280),
    },
    "mobilenetv3_small_100": {
        "features.1.block.1.fc1.weight": (8, 16, 1, 1),
        "features.1.block.2.0.weight": (16, 16, 1, 1),
        "features.12.0.weight": (576, 96, 1, 1),
        "classifier.0.weight": (1024, 576),
        "classifier.3.bias": (1000,),
    },
}
NAMES = sorted(PARAMS)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count(name):
    assert num_params(build_on_meta(name)) == PARAMS[name]


@pytest.mark.parametrize("name", NAMES)
def test_macs_match_paper(name):
    assert count_macs(build_on_meta(name)) == pytest.approx(PAPER_MACS[name], rel=0.02)


@pytest.mark.parametrize("name", NAMES)
def test_official_keys_typed_by_hand(name):
    state = build_on_meta(name).state_dict()
    assert_key_shapes(state, OFFICIAL_KEYS[name])


def test_mobilenetv3_uses_torchvision_batchnorm_eps():
    model = build_on_meta("mobilenetv3_small_100")
    assert {m.eps for m in model.modules() if isinstance(m, nn.BatchNorm2d)} == {1e-3}


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward_and_features(name):
    model = convzoo.create_model(name, num_classes=10)
    x = torch.randn(2, 3, 64, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    features = convzoo.create_model(name, features_only=True)
    maps = features(x)
    assert [m.shape[1] for m in maps] == STAGE_CHANNELS[name] == features.channels()
    assert [tuple(m.shape[2:]) for m in maps] == [(16, 8), (8, 4), (4, 2), (2, 1)]
    assert features.reductions() == [4, 8, 16, 32]


@pytest.mark.parametrize("name", ["mobilenetv2_100", "mobilenetv3_large_100"])
def test_drop_path_and_grad_checkpointing(name):
    model = convzoo.create_model(name, drop_path_rate=0.2, num_classes=4)
    model.eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    ref = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), ref)
    model.train()
    torch.manual_seed(1)
    model(x).sum().backward()
    assert x.grad is not None


def test_mobilenetv1_rejects_drop_path():
    with pytest.raises(ValueError, match="no residual branches"):
        convzoo.create_model("mobilenetv1_100", drop_path_rate=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_official_checkpoint_round_trip(tmp_path, name):
    assert_checkpoint_round_trip(tmp_path, name)


def test_other_num_classes_reinitialises_head(tmp_path):
    reference = convzoo.create_model("mobilenetv3_small_100")
    model = load_saved(tmp_path, "mobilenetv3_small_100", reference, num_classes=6)
    assert model.classifier[3].out_features == 6
    torch.testing.assert_close(model.classifier[0].weight, reference.classifier[0].weight)


@pytest.mark.parametrize("name", NAMES)
def test_reparameterize_folds_every_batchnorm(name):
    model = convzoo.create_model(name, num_classes=5)
    assert_reparameterize_exact(model, torch.randn(2, 3, 32, 32))


def test_reparameterized_model_saves_and_reloads(tmp_path):
    model = convzoo.reparameterize(convzoo.create_model("mobilenetv2_100", num_classes=3))
    convzoo.save_checkpoint(model, tmp_path / "mnv2.safetensors")
    loaded = convzoo.models.load_model(tmp_path / "mnv2.safetensors").eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(loaded(x), model(x))
    assert not any(isinstance(m, nn.BatchNorm2d) for m in loaded.modules())


# timm's MobileNetV3 as its generator describes it (block type, repeats, kernel, stride, expansion
# ratio, output channels, SE ratio, ReLU ('nre') else hard-swish), one list per stage.
TIMM_V3 = {
    "mobilenetv3_large_100": (1280, [["ds_r1_k3_s1_e1_c16_nre"],
                                     ["ir_r1_k3_s2_e4_c24_nre", "ir_r1_k3_s1_e3_c24_nre"],
                                     ["ir_r3_k5_s2_e3_c40_se0.25_nre"],
                                     ["ir_r1_k3_s2_e6_c80", "ir_r1_k3_s1_e2.5_c80", "ir_r2_k3_s1_e2.3_c80"],
                                     ["ir_r2_k3_s1_e6_c112_se0.25"],
                                     ["ir_r3_k5_s2_e6_c160_se0.25"],
                                     ["cn_r1_k1_s1_c960"]]),
    "mobilenetv3_small_100": (1024, [["ds_r1_k3_s2_e1_c16_se0.25_nre"],
                                     ["ir_r1_k3_s2_e4.5_c24_nre", "ir_r1_k3_s1_e3.67_c24_nre"],
                                     ["ir_r1_k5_s2_e4_c40_se0.25", "ir_r2_k5_s1_e6_c40_se0.25"],
                                     ["ir_r2_k5_s1_e3_c48_se0.25"],
                                     ["ir_r3_k5_s2_e6_c96_se0.25"],
                                     ["cn_r1_k1_s1_c576"]]),
}


def _round8(v):
    rounded = max(8, int(v + 4) // 8 * 8)
    return rounded + 8 if rounded < 0.9 * v else rounded


def _timm_blocks(stages):
    """[(stage, index, type, kernel, stride, in, mid, out, se_chs, relu)] from timm's block strings."""
    blocks, in_chs = [], 16
    for s, stage in enumerate(stages):
        j = 0
        for text in stage:
            parts = text.split("_")
            opts = {p[0]: p[1:] for p in parts[1:] if p not in ("nre",) and not p.startswith("se")}
            se = next((float(p[2:]) for p in parts if p.startswith("se")), 0.0)
            for r in range(int(opts["r"])):
                out = int(opts["c"])
                mid = _round8(in_chs * float(opts.get("e", 1)))
                blocks.append((s, j, parts[0], int(opts["k"]), int(opts["s"]) if r == 0 else 1, in_chs, mid, out,
                               _round8(mid * se) if se else 0, "nre" in parts))
                in_chs, j = out, j + 1
    return blocks


def timm_v3_state_dict(name, num_classes=10):
    """Random weights and BatchNorm statistics under timm's MobileNetV3 key names."""
    gen = torch.Generator().manual_seed(1)
    sd = {}

    def conv(key, cout, cin, k, bias=False):
        sd[key + ".weight"] = torch.randn(cout, cin, k, k, generator=gen) * (2.0 / (cin * k * k)) ** 0.5
        if bias:
            sd[key + ".bias"] = torch.randn(cout, generator=gen) * 0.1

    def bn(key, c):
        sd[key + ".weight"] = 1 + 0.2 * torch.randn(c, generator=gen)
        sd[key + ".bias"] = 0.1 * torch.randn(c, generator=gen)
        sd[key + ".running_mean"] = 0.1 * torch.randn(c, generator=gen)
        sd[key + ".running_var"] = 0.5 + torch.rand(c, generator=gen)
        sd[key + ".num_batches_tracked"] = torch.tensor(7)

    head, stages = TIMM_V3[name]
    conv("conv_stem", 16, 3, 3)
    bn("bn1", 16)
    for s, j, kind, k, _, cin, mid, cout, se, _ in _timm_blocks(stages):
        b = f"blocks.{s}.{j}."
        if kind == "cn":
            conv(b + "conv", cout, cin, 1)
            bn(b + "bn1", cout)
            continue
        if kind == "ir":
            conv(b + "conv_pw", mid, cin, 1)
            bn(b + "bn1", mid)
        dw = ("bn2", "bn1")[kind == "ds"]
        conv(b + "conv_dw", mid, 1, k)
        bn(b + dw, mid)
        if se:
            conv(b + "se.conv_reduce", se, mid, 1, bias=True)
            conv(b + "se.conv_expand", mid, se, 1, bias=True)
        conv(b + ("conv_pwl" if kind == "ir" else "conv_pw"), cout, mid, 1)
        bn(b + ("bn3" if kind == "ir" else "bn2"), cout)
    last = _timm_blocks(stages)[-1][7]
    conv("conv_head", head, last, 1, bias=True)
    sd["classifier.weight"] = torch.randn(num_classes, head, generator=gen) * head ** -0.5
    sd["classifier.bias"] = torch.zeros(num_classes)
    return sd


def timm_v3_forward(sd, stages, x):
    """timm's MobileNetV3 forward, written from its description: BatchNorm eps 1e-5, hard-swish
    except in 'nre' blocks, SE gate hard-sigmoid with a ReLU inside, residual when the stride
    is 1 and the width is kept, pooling before the biased 1x1 ``conv_head``."""
    def bn(t, key):
        return F.batch_norm(t, sd[key + ".running_mean"], sd[key + ".running_var"], sd[key + ".weight"],
                            sd[key + ".bias"], False, 0.0, 1e-5)

    x = F.hardswish(bn(F.conv2d(x, sd["conv_stem.weight"], stride=2, padding=1), "bn1"))
    for s, j, kind, k, stride, cin, mid, cout, se, relu in _timm_blocks(stages):
        act = F.relu if relu else F.hardswish
        b = f"blocks.{s}.{j}."
        if kind == "cn":
            x = F.hardswish(bn(F.conv2d(x, sd[b + "conv.weight"]), b + "bn1"))
            continue
        y = x
        if kind == "ir":
            y = act(bn(F.conv2d(y, sd[b + "conv_pw.weight"]), b + "bn1"))
        y = act(bn(F.conv2d(y, sd[b + "conv_dw.weight"], stride=stride, padding=k // 2, groups=mid),
                   b + ("bn2" if kind == "ir" else "bn1")))
        if se:
            z = F.relu(F.conv2d(y.mean((2, 3), keepdim=True), sd[b + "se.conv_reduce.weight"], sd[b + "se.conv_reduce.bias"]))
            y = y * F.relu6(F.conv2d(z, sd[b + "se.conv_expand.weight"], sd[b + "se.conv_expand.bias"]) + 3) / 6
        y = bn(F.conv2d(y, sd[b + ("conv_pwl" if kind == "ir" else "conv_pw") + ".weight"]), b + ("bn3" if kind == "ir" else "bn2"))
        x = x + y if stride == 1 and cin == cout else y
    x = F.hardswish(F.conv2d(x.mean((2, 3), keepdim=True), sd["conv_head.weight"], sd["conv_head.bias"])).flatten(1)
    return F.linear(x, sd["classifier.weight"], sd["classifier.bias"])


@pytest.mark.parametrize("name", ["mobilenetv3_large_100", "mobilenetv3_small_100"])
def test_timm_mobilenetv3_layout_loads_and_computes_timms_forward(tmp_path, name, caplog):
    sd = timm_v3_state_dict(name)
    path = tmp_path / f"{name}_timm.pth"
    torch.save(sd, path)
    model = convzoo.create_model(name, pretrained=path, num_classes=10, bn_eps=1e-5).eval().double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)  # float64: random weights make large logits
    sd64 = {k: v.double() if v.is_floating_point() else v for k, v in sd.items()}
    with torch.no_grad():
        torch.testing.assert_close(model(x), timm_v3_forward(sd64, TIMM_V3[name][1], x), rtol=1e-9, atol=1e-9)
    # with torchvision's eps the file still loads, and the log says how to get timm's outputs
    with caplog.at_level(logging.WARNING):
        convzoo.create_model(name, pretrained=path, num_classes=10)
    assert "bn_eps=1e-5" in caplog.text
