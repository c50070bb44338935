"""SqueezeNet 1.0/1.1: architecture figures, torchvision checkpoints, features, reparameterize."""
import pytest
import torch

import convzoo
from convzoo.layers import is_reparameterized
from _family_helpers import (
    assert_checkpoint_round_trip, assert_key_shapes, build_on_meta, count_macs, load_saved, num_params,
)

# Our own counts of torchvision's squeezenet1_0 / squeezenet1_1 and the papers' MACs.
PARAMS = {"squeezenet1_0": 1_248_424, "squeezenet1_1": 1_235_496}
PAPER_MACS = {"squeezenet1_0": 819e6, "squeezenet1_1": 352e6}
# Stage maps of a 224x224 input: stride 2 (stem), then the last module before each max-pool, the last Fire.
STAGE_SHAPES = {
    "squeezenet1_0": [(96, 109, 109), (256, 54, 54), (512, 27, 27), (512, 13, 13)],
    "squeezenet1_1": [(64, 111, 111), (128, 55, 55), (256, 27, 27), (512, 13, 13)],
}
# Keys typed by hand from torchvision/models/squeezenet.py (Fire: squeeze, expand1x1, expand3x3).
OFFICIAL_KEYS = {
    "squeezenet1_0": {
        "features.0.weight": (96, 3, 7, 7),
        "features.3.squeeze.weight": (16, 96, 1, 1),
        "features.3.expand3x3.weight": (64, 16, 3, 3),
        "features.12.expand1x1.bias": (256,),
        "classifier.1.weight": (1000, 512, 1, 1),
    },
    "squeezenet1_1": {
        "features.0.weight": (64, 3, 3, 3),
        "features.6.squeeze.weight": (32, 128, 1, 1),
        "features.12.expand3x3.weight": (256, 64, 3, 3),
        "classifier.1.bias": (1000,),
    },
}
NAMES = sorted(PARAMS)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count(name):
    assert num_params(build_on_meta(name)) == PARAMS[name]


@pytest.mark.parametrize("name", NAMES)
def test_macs_match_paper(name):
    assert count_macs(build_on_meta(name)) == pytest.approx(PAPER_MACS[name], rel=0.01)


@pytest.mark.parametrize("name", NAMES)
def test_official_keys_typed_by_hand(name):
    state = build_on_meta(name).state_dict()
    assert_key_shapes(state, OFFICIAL_KEYS[name])
    assert len(state) == 52


@pytest.mark.parametrize("name", NAMES)
def test_feature_stages_at_224(name):
    features = build_on_meta(name, features_only=True)
    maps = features(torch.empty(1, 3, 224, 224, device="meta"))
    assert [tuple(m.shape[1:]) for m in maps] == STAGE_SHAPES[name]
    assert features.reductions() == [2, 4, 8, 16]
    assert features.channels() == [s[0] for s in STAGE_SHAPES[name]]


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name):
    model = convzoo.create_model(name, num_classes=10)
    x = torch.randn(2, 3, 48, 40)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    model.reset_classifier(0)
    assert model(x).shape == (2, 512)


def test_pre_logits_and_grad_checkpointing():
    model = convzoo.create_model("squeezenet1_1", num_classes=4).eval()
    x = torch.randn(1, 3, 40, 40, requires_grad=True)
    feats = model.forward_features(x)
    assert model.forward_head(feats, pre_logits=True).shape == (1, 512)
    ref = model(x)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), ref)


@pytest.mark.parametrize("name", NAMES)
def test_grad_checkpointing_in_training_gives_same_gradients(name):
    """In-place ReLUs sit between the checkpointed blocks; recomputation must not disturb them."""
    plain = convzoo.create_model(name, num_classes=3, drop_rate=0.0).train()
    checkpointed = convzoo.create_model(name, num_classes=3, drop_rate=0.0, grad_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 40, 40)
    grads = []
    for model in (plain, checkpointed):
        xi = x.clone().requires_grad_(True)
        model(xi).sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[1], grads[0])


def test_rejects_drop_path():
    with pytest.raises(ValueError, match="no residual branches"):
        convzoo.create_model("squeezenet1_0", drop_path_rate=0.1)


@pytest.mark.parametrize("name", NAMES)
def test_torchvision_checkpoint_round_trip(tmp_path, name):
    assert_checkpoint_round_trip(tmp_path, name)


def test_other_num_classes_reinitialises_final_conv(tmp_path):
    reference = convzoo.create_model("squeezenet1_0")
    model = load_saved(tmp_path, "squeezenet1_0", reference, num_classes=2)
    assert model.classifier[1].out_channels == 2
    torch.testing.assert_close(model.features[12].squeeze.weight, reference.features[12].squeeze.weight)


def test_reparameterize_has_nothing_to_fold():
    model = convzoo.create_model("squeezenet1_1", num_classes=3).eval()
    x = torch.randn(1, 3, 40, 40)
    before, params = model(x), num_params(model)
    convzoo.reparameterize(model)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)
    assert num_params(model) == params and is_reparameterized(model)
