"""ResNet-50 and ResNet-50-DCNv2: architecture figures, torchvision checkpoints, BN folding."""
import logging

import pytest
import torch
import torch.nn as nn

import convzoo
from convzoo.layers import ModulatedDeformConv2dPack
from _family_helpers import assert_key_shapes, assert_reparameterize_exact, build_on_meta, count_macs, num_params

# Our own counts of the official architectures (torchvision resnet50: 25,557,032). The DCNv2
# model adds a 3x3 conv predicting 27 offset/mask channels (with bias) before each of the 13
# deformable convs: 243 * (4 * 128 + 6 * 256 + 3 * 512) + 13 * 27 = 871,263.
PARAMS = {"resnet50": 25_557_032, "resnet50_dcnv2": 26_428_295}
# Forward/backward tests run a shallow variant (same blocks, fewer of them) to stay fast.
SHALLOW = dict(layers=(1, 2, 1, 1))


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_count(name):
    assert num_params(build_on_meta(name)) == PARAMS[name]


def test_macs_match_paper():
    macs = count_macs(build_on_meta("resnet50"))
    assert macs == pytest.approx(4.1e9, rel=0.01)  # paper: 3.8G FLOPs = MACs with fc/BN left out; torchvision 4.09G


def test_dcnv2_macs_are_counted_through_the_deformable_op():
    from convzoo.analysis import count_flops

    plain, deform = count_flops(build_on_meta("resnet50")), count_flops(build_on_meta("resnet50_dcnv2"))
    assert deform.by_op["convzoo.deform_conv2d"] > 0
    assert plain.macs < deform.macs < 1.1 * plain.macs  # + the offset convs and the bilinear sampling


def test_deformable_convs_are_in_conv3_to_conv5_only():
    model = build_on_meta("resnet50_dcnv2")
    deformable = sorted(n for n, m in model.named_modules() if isinstance(m, ModulatedDeformConv2dPack))
    assert len(deformable) == 4 + 6 + 3
    assert all(n.startswith(("layer2.", "layer3.", "layer4.")) and n.endswith(".conv2") for n in deformable)
    assert [b.deformable for b in model.layer1] == [False] * 3
    assert model.layer2[0].conv2.conv_offset.weight.shape == (27, 128, 3, 3)
    assert model.layer2[0].conv2.bias is None


def test_forward_backward_and_features():
    model = convzoo.create_model("resnet50", num_classes=10, **SHALLOW)
    x = torch.randn(2, 3, 64, 48)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    feats = convzoo.create_model("resnet50", features_only=True, **SHALLOW)(x)
    assert [f.shape for f in feats] == [(2, 256, 16, 12), (2, 512, 8, 6), (2, 1024, 4, 3), (2, 2048, 2, 2)]


def test_grad_checkpointing_gives_same_output():
    torch.manual_seed(0)
    model = convzoo.create_model("resnet50", num_classes=5, drop_path_rate=0.1, **SHALLOW).eval()
    x = torch.randn(1, 3, 32, 32, requires_grad=True)
    ref = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), ref)


def test_dcnv2_starts_as_half_of_plain_resnet_conv():
    """Zero offsets and mask sigmoid(0) = 0.5: each deformable conv computes 0.5 * a plain 3x3 conv."""
    plain = convzoo.create_model("resnet50", **SHALLOW).eval()
    deform = convzoo.create_model("resnet50_dcnv2", **SHALLOW).eval()
    deform.load_state_dict(plain.state_dict(), strict=False)
    x = torch.randn(1, 128, 9, 7)
    with torch.no_grad():
        torch.testing.assert_close(deform.layer2[1].conv2(x), 0.5 * plain.layer2[1].conv2(x), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(deform.layer2[0].conv2(x), 0.5 * plain.layer2[0].conv2(x), rtol=1e-5, atol=1e-5)


def torchvision_state(name="resnet50", **kwargs):
    """A state dict in torchvision's resnet50 layout (it is ours: the names are the same)."""
    model = convzoo.create_model(name, **kwargs)
    return model.state_dict(), model


def test_torchvision_keys_typed_by_hand():
    state = build_on_meta("resnet50").state_dict()
    expected_shapes = {  # from torchvision/models/resnet.py: Bottleneck(conv1, bn1, conv2, bn2, conv3, bn3, downsample)
        "conv1.weight": (64, 3, 7, 7),
        "bn1.running_var": (64,),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer1.0.downsample.1.num_batches_tracked": (),
        "layer2.0.conv2.weight": (128, 128, 3, 3),
        "layer3.5.bn3.bias": (1024,),
        "layer4.2.conv3.weight": (2048, 512, 1, 1),
        "fc.weight": (1000, 2048),
        "fc.bias": (1000,),
    }
    assert_key_shapes(state, expected_shapes)
    assert len(state) == 320


def test_torchvision_checkpoint_round_trip(tmp_path):
    state, reference = torchvision_state(**SHALLOW)
    torch.save(state, tmp_path / "resnet50-0676ba61.pth")
    model = convzoo.create_model("resnet50", pretrained=tmp_path / "resnet50-0676ba61.pth", **SHALLOW).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model(x), reference.eval()(x))


def test_legacy_checkpoint_without_batchnorm_counters_loads(tmp_path):
    """torchvision's first resnet50 file (resnet50-19c8e357.pth) predates num_batches_tracked."""
    state, reference = torchvision_state(**SHALLOW)
    legacy = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    assert len(legacy) < len(state)
    torch.save(legacy, tmp_path / "resnet50-19c8e357.pth")
    model = convzoo.create_model("resnet50", pretrained=tmp_path / "resnet50-19c8e357.pth", **SHALLOW).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model(x), reference.eval()(x))
    assert model.bn1.num_batches_tracked.item() == 0
    del legacy["layer1.0.bn1.running_var"]  # any other missing key is still an error
    torch.save(legacy, tmp_path / "broken.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): layer1.0.bn1.running_var"):
        convzoo.create_model("resnet50", pretrained=tmp_path / "broken.pth", **SHALLOW)


def test_torchvision_checkpoint_loads_into_dcnv2_with_zero_offsets(tmp_path, caplog):
    state, reference = torchvision_state(**SHALLOW)
    torch.save(state, tmp_path / "resnet50.pth")
    with caplog.at_level(logging.INFO, logger="convzoo.models.resnet"):
        model = convzoo.create_model("resnet50_dcnv2", pretrained=tmp_path / "resnet50.pth", **SHALLOW)
    assert "4 deformable offset/mask convs keep their zero initialisation" in caplog.text
    torch.testing.assert_close(model.layer3[0].conv2.weight, reference.layer3[0].conv2.weight)
    assert all(torch.count_nonzero(m.conv_offset.weight) == 0 for m in model.modules() if isinstance(m, ModulatedDeformConv2dPack))


def test_dcnv2_checkpoint_with_some_offsets_missing_is_rejected(tmp_path):
    state, _ = torchvision_state("resnet50_dcnv2", **SHALLOW)
    del state["layer2.1.conv2.conv_offset.bias"]
    torch.save(state, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match=r"missing keys \(1\): layer2.1.conv2.conv_offset.bias"):
        convzoo.create_model("resnet50_dcnv2", pretrained=tmp_path / "partial.pth", **SHALLOW)


def test_other_num_classes_reinitialises_fc(tmp_path):
    state, reference = torchvision_state(**SHALLOW)
    torch.save(state, tmp_path / "resnet50.pth")
    model = convzoo.create_model("resnet50", pretrained=tmp_path / "resnet50.pth", num_classes=3, **SHALLOW)
    assert model.fc.out_features == 3
    torch.testing.assert_close(model.layer4[0].conv1.weight, reference.layer4[0].conv1.weight)


@pytest.mark.parametrize("name", ["resnet50", "resnet50_dcnv2"])
def test_reparameterize_folds_every_batchnorm(name):
    model = convzoo.create_model(name, num_classes=7, **SHALLOW)
    if name == "resnet50_dcnv2":  # non-zero offsets so that the folded conv is really deformable
        for m in model.modules():
            if isinstance(m, ModulatedDeformConv2dPack):
                nn.init.normal_(m.conv_offset.weight, std=0.01)
    assert_reparameterize_exact(model, torch.randn(2, 3, 40, 40))
    assert model.layer1[0].conv1.bias is not None


@pytest.mark.parametrize("name", ["resnet50", "resnet50_dcnv2"])
def test_output_stride_dilates_the_last_stages_with_the_same_weights(name):
    base = convzoo.create_model(name, features_only=True, **SHALLOW).eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = base(x)
    for output_stride, reductions in ((16, [4, 8, 16, 16]), (8, [4, 8, 8, 8])):
        model = convzoo.create_model(name, features_only=True, output_stride=output_stride, **SHALLOW).eval()
        model.load_state_dict(base.state_dict())  # the same parameters: only strides and dilations change
        assert model.reductions() == reductions
        with torch.no_grad():
            feats = model(x)
        assert [f.shape[-1] for f in feats] == [64 // r for r in reductions]
        kept = 3 if output_stride == 16 else 2  # the stages before the first dilated one are unchanged
        for got, want in zip(feats[:kept], expected[:kept]):
            torch.testing.assert_close(got, want)
    with pytest.raises(ValueError, match="output_stride must be 8, 16 or 32, got 12"):
        convzoo.create_model(name, output_stride=12)
