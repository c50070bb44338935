"""MobileNet V1/V2/V3: architecture figures, torchvision/timm checkpoints, BN folding."""
import pytest
import torch
import torch.nn as nn

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
