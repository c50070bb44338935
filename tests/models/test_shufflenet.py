"""ShuffleNet V2: architecture figures, torchvision checkpoints, channel shuffle, BN folding."""
import pytest
import torch

import convzoo
from convzoo.models.shufflenet import channel_shuffle
from _family_helpers import (
    assert_checkpoint_round_trip, assert_key_shapes, assert_reparameterize_exact, build_on_meta, count_macs,
    load_saved, num_params,
)

# Our own counts of torchvision's shufflenet_v2_x*; MACs from the paper (Table 5 / 8).
PARAMS = {
    "shufflenetv2_x0_5": 1_366_792,
    "shufflenetv2_x1_0": 2_278_604,
    "shufflenetv2_x1_5": 3_503_624,
    "shufflenetv2_x2_0": 7_393_996,
}
PAPER_MACS = {"shufflenetv2_x0_5": 41e6, "shufflenetv2_x1_0": 146e6, "shufflenetv2_x1_5": 299e6, "shufflenetv2_x2_0": 591e6}
NAMES = sorted(PARAMS)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count(name):
    assert num_params(build_on_meta(name)) == PARAMS[name]


@pytest.mark.parametrize("name", NAMES)
def test_macs_match_paper(name):
    assert count_macs(build_on_meta(name)) == pytest.approx(PAPER_MACS[name], rel=0.015)


def test_torchvision_keys_typed_by_hand():
    state = build_on_meta("shufflenetv2_x1_0").state_dict()
    expected = {  # torchvision/models/shufflenetv2.py: conv1, stage2..4 (branch1, branch2), conv5, fc
        "conv1.0.weight": (24, 3, 3, 3),
        "conv1.1.running_var": (24,),
        "stage2.0.branch1.0.weight": (24, 1, 3, 3),
        "stage2.0.branch1.2.weight": (58, 24, 1, 1),
        "stage2.0.branch2.0.weight": (58, 24, 1, 1),
        "stage2.1.branch2.0.weight": (58, 58, 1, 1),
        "stage3.7.branch2.3.weight": (116, 1, 3, 3),
        "stage4.3.branch2.6.bias": (232,),
        "conv5.0.weight": (1024, 464, 1, 1),
        "fc.weight": (1000, 1024),
    }
    assert_key_shapes(state, expected)
    assert not any(k.startswith("stage2.1.branch1") for k in state)
    assert len(state) == 338


def test_channel_shuffle_interleaves_the_two_halves():
    x = torch.arange(6.0).reshape(1, 6, 1, 1)
    assert channel_shuffle(x, 2).flatten().tolist() == [0, 3, 1, 4, 2, 5]
    assert channel_shuffle(x, 3).flatten().tolist() == [0, 2, 4, 1, 3, 5]


@pytest.mark.parametrize("name", ["shufflenetv2_x0_5", "shufflenetv2_x2_0"])
def test_forward_backward_and_features(name):
    model = convzoo.create_model(name, num_classes=10)
    x = torch.randn(2, 3, 64, 32)
    out = model(x)
    assert out.shape == (2, 10)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    features = convzoo.create_model(name, features_only=True)
    maps = features(x)
    chs = model.cfg.stages_out_channels
    assert [tuple(m.shape[1:]) for m in maps] == [(chs[0], 16, 8), (chs[1], 8, 4), (chs[2], 4, 2), (chs[4], 2, 1)]
    assert features.reductions() == [4, 8, 16, 32]


def test_grad_checkpointing_and_channels_last():
    model = convzoo.create_model("shufflenetv2_x0_5", num_classes=4).eval()
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    ref = model(x)
    torch.testing.assert_close(model(x.contiguous(memory_format=torch.channels_last)), ref)
    model.set_grad_checkpointing(True)
    torch.testing.assert_close(model(x), ref)


def test_rejects_drop_path():
    with pytest.raises(ValueError, match="no residual branches"):
        convzoo.create_model("shufflenetv2_x1_0", drop_path_rate=0.1)


@pytest.mark.parametrize("name", ["shufflenetv2_x0_5", "shufflenetv2_x1_0"])
def test_torchvision_checkpoint_round_trip(tmp_path, name):
    assert_checkpoint_round_trip(tmp_path, name)


def test_other_num_classes_reinitialises_fc(tmp_path):
    reference = convzoo.create_model("shufflenetv2_x0_5")
    model = load_saved(tmp_path, "shufflenetv2_x0_5", reference, num_classes=9)
    assert model.fc.out_features == 9
    torch.testing.assert_close(model.conv5[0].weight, reference.conv5[0].weight)


@pytest.mark.parametrize("name", ["shufflenetv2_x0_5", "shufflenetv2_x1_5"])
def test_reparameterize_folds_every_batchnorm(name):
    assert_reparameterize_exact(convzoo.create_model(name, num_classes=5), torch.randn(2, 3, 32, 32))
