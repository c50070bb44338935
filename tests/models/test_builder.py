"""The shared model machinery: registry, builder, features_only and checkpoints, on a toy family."""
import argparse
import dataclasses
import logging
import pathlib

import pytest
import torch
import torch.nn as nn

import convzoo
from convzoo.models import _registry, build_model, load_model, save_checkpoint
from convzoo.models._checkpoint import load_checkpoint, read_state_dict
from convzoo.layers import is_reparameterized


@dataclasses.dataclass(frozen=True)
class ToyCfg:
    widths: tuple = (4, 8)


class ToyNet(nn.Module):
    classifier_name = "head"

    def __init__(self, cfg, num_classes=1000, in_chans=3, drop_path_rate=0.0):
        super().__init__()
        chans = (in_chans,) + tuple(cfg.widths)
        self.stages = nn.ModuleList(nn.Conv2d(a, b, 3, stride=2, padding=1) for a, b in zip(chans, chans[1:]))
        self.feature_info = [dict(num_chs=c, reduction=2 ** (i + 1), module=f"stages.{i}") for i, c in enumerate(cfg.widths)]
        self.head = nn.Linear(cfg.widths[-1], num_classes) if num_classes else nn.Identity()

    def forward_intermediates(self, x, indices):
        outs = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in indices:
                outs.append(x)
        return outs

    def reset_classifier(self, num_classes):
        self.head = nn.Linear(self.cfg.widths[-1], num_classes) if num_classes else nn.Identity()

    def forward(self, x):
        for stage in self.stages:
            x = stage(x)
        return self.head(x.mean((2, 3)))


def official_to_native(state, model):
    """The toy 'official' layout names the stages 'layerI'."""
    if any(k.startswith("stages.") for k in state):
        return state
    return {k.replace("layer", "stages."): v for k, v in state.items()}


@pytest.fixture
def toy_registered(monkeypatch):
    def toy_net(pretrained=None, **kwargs):
        return build_model(ToyNet, ToyCfg(), official_to_native, pretrained=pretrained, **kwargs)

    monkeypatch.setitem(_registry._ENTRY_POINTS, "toy_net", toy_net)
    return toy_net


def official_state(num_classes=1000):
    model = build_model(ToyNet, ToyCfg(), num_classes=num_classes)
    return {k.replace("stages.", "layer"): v for k, v in model.state_dict().items()}, model


def test_unknown_model_lists_close_names(toy_registered):
    with pytest.raises(ValueError, match=r"unknown model 'toy_nett'; did you mean toy_net"):
        convzoo.create_model("toy_nett")


def test_list_models_pattern(toy_registered):
    assert "toy_net" in convzoo.list_models("toy*")
    assert convzoo.list_models("no_such_family_*") == []


def test_unknown_override_is_named(toy_registered):
    with pytest.raises(TypeError, match=r"no option 'depth'; its options are widths"):
        convzoo.create_model("toy_net", depth=3)


@pytest.mark.parametrize("kwargs, match", [({"num_classes": -1}, "num_classes"), ({"in_chans": 0}, "in_chans"),
                                           ({"drop_path_rate": 1.0}, "drop_path_rate")])
def test_bad_common_arguments(toy_registered, kwargs, match):
    with pytest.raises(ValueError, match=match):
        convzoo.create_model("toy_net", **kwargs)


def test_override_reaches_config(toy_registered):
    model = convzoo.create_model("toy_net", widths=(2, 6), num_classes=5)
    assert model.cfg.widths == (2, 6) and model.head.out_features == 5 and model.model_name == "toy_net"


def test_features_only_returns_requested_stages(toy_registered):
    feats = convzoo.create_model("toy_net", features_only=True, out_indices=(1,))
    out = feats(torch.randn(2, 3, 16, 12))
    assert [o.shape for o in out] == [torch.Size([2, 8, 4, 3])]
    assert feats.channels() == [8] and feats.reductions() == [4]
    with pytest.raises(ValueError, match="out_indices"):
        convzoo.create_model("toy_net", features_only=True, out_indices=(2,))


@pytest.mark.parametrize("wrapper", ["model", "state_dict", None])
def test_official_layout_loads_through_filter(tmp_path, toy_registered, wrapper):
    state, reference = official_state()
    payload = {wrapper: state} if wrapper else state
    torch.save(payload, tmp_path / "official.pth")
    model = convzoo.create_model("toy_net", pretrained=tmp_path / "official.pth")
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(model(x), reference(x))


def test_dataparallel_prefix_is_stripped(tmp_path):
    _, reference = official_state()
    torch.save({"module." + k: v for k, v in reference.state_dict().items()}, tmp_path / "ddp.pth")
    assert set(read_state_dict(tmp_path / "ddp.pth")) == set(reference.state_dict())


def _load_1000_class_checkpoint(tmp_path, caplog, num_classes):
    """toy_net built for ``num_classes`` from a 1000-class official file; also the file's model."""
    state, reference = official_state(num_classes=1000)
    torch.save(state, tmp_path / "official.pth")
    with caplog.at_level(logging.WARNING):
        model = convzoo.create_model("toy_net", pretrained=tmp_path / "official.pth", num_classes=num_classes)
    return model, reference


def test_other_num_classes_reinitialises_head_and_says_so(tmp_path, toy_registered, caplog):
    model, reference = _load_1000_class_checkpoint(tmp_path, caplog, num_classes=7)
    assert "classifier re-initialised for num_classes=7" in caplog.text
    torch.testing.assert_close(model.stages[0].weight, reference.stages[0].weight)
    assert model.head.out_features == 7


def test_no_classifier_drops_the_checkpoint_head_and_says_so(tmp_path, toy_registered, caplog):
    model, reference = _load_1000_class_checkpoint(tmp_path, caplog, num_classes=0)
    assert "no classifier for num_classes=0 (checkpoint head head.weight, head.bias not loaded)" in caplog.text
    assert isinstance(model.head, nn.Identity)
    torch.testing.assert_close(model.stages[1].weight, reference.stages[1].weight)


def training_script_checkpoint(state):
    """What official training scripts save: weights, optimizer state, epoch and their argparse args."""
    args = argparse.Namespace(model="toy_net", lr=4e-3, input_size=224, drop_path=0.1, layer_decay=None)
    return {"model": state, "optimizer": {"state": {}, "param_groups": [{"lr": 4e-3}]}, "epoch": 299, "args": args}


@pytest.mark.parametrize("scoped", [True, False], ids=["safe_globals", "add_safe_globals"])
def test_training_script_checkpoint_with_argparse_args_loads(tmp_path, toy_registered, monkeypatch, scoped):
    """The Namespace is allowed for this load only (torch 2.4 has no scoped safe_globals: the
    process-wide list is restored); other globals are still refused."""
    if not scoped:
        monkeypatch.delattr(torch.serialization, "safe_globals")
    state, reference = official_state()
    torch.save(training_script_checkpoint(state), tmp_path / "checkpoint-best.pth")
    model = convzoo.create_model("toy_net", pretrained=tmp_path / "checkpoint-best.pth")
    assert argparse.Namespace not in torch.serialization.get_safe_globals()
    with pytest.raises(Exception, match="argparse.Namespace"):
        torch.load(tmp_path / "checkpoint-best.pth", weights_only=True)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(model(x), reference(x))
    payload = training_script_checkpoint(state)
    payload["args"].output_dir = pathlib.PurePosixPath("/output")  # only the Namespace itself is allowed
    torch.save(payload, tmp_path / "other_global.pth")
    with pytest.raises(Exception, match="PurePosixPath"):
        convzoo.create_model("toy_net", pretrained=tmp_path / "other_global.pth")


def test_wrong_keys_are_named(tmp_path, toy_registered):
    state, _ = official_state()
    del state["layer1.bias"]
    state["extra.weight"] = torch.zeros(1)
    state["layer0.weight"] = torch.zeros(4, 3, 1, 1)
    torch.save(state, tmp_path / "broken.pth")
    with pytest.raises(ValueError) as info:
        convzoo.create_model("toy_net", pretrained=tmp_path / "broken.pth")
    message = str(info.value)
    assert "missing keys (1): stages.1.bias" in message
    assert "unexpected keys (1): extra.weight" in message
    assert "stages.0.weight: checkpoint (4, 3, 1, 1) vs model (4, 3, 3, 3)" in message


def test_missing_file_and_non_state_dict(tmp_path):
    model = build_model(ToyNet, ToyCfg())
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(model, tmp_path / "nope.pth")
    torch.save({"epoch": 3}, tmp_path / "meta.pth")
    with pytest.raises(ValueError, match="does not hold a state dict"):
        load_checkpoint(model, tmp_path / "meta.pth")


def test_safetensors_round_trip_rebuilds_model(tmp_path, toy_registered):
    model = convzoo.create_model("toy_net", widths=(3, 5), num_classes=4)
    save_checkpoint(model, tmp_path / "toy.safetensors")
    assert not (tmp_path / "toy.safetensors.tmp").exists()
    loaded = load_model(tmp_path / "toy.safetensors")
    assert loaded.cfg.widths == (3, 5) and loaded.num_classes == 4
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(loaded(x), model(x))
    with pytest.raises(ValueError, match="safetensors"):
        save_checkpoint(model, tmp_path / "toy.pth")


def test_reparameterize_walks_children_and_marks_model():
    calls = []

    class Branchy(nn.Module):
        def __init__(self, tag):
            super().__init__()
            self.tag = tag
            self.inner = nn.Identity()

        def reparameterize(self):
            calls.append(self.tag)

    net = nn.Sequential(Branchy("a"), nn.Sequential(Branchy("b")))
    net.train()
    assert convzoo.reparameterize(net) is net
    assert calls == ["a", "b"] and not net.training and is_reparameterized(net)


@pytest.mark.parametrize("name, size, crop_pct, crop_mode, interpolation, mean", [
    pytest.param("replknet_31b", 224, 0.875, "center", "bicubic", (0.485, 0.456, 0.406), id="replknet_31b-224"),
    pytest.param("replknet_31l", 384, 1.0, "squash", "bicubic", (0.485, 0.456, 0.406), id="replknet_31l-384-warped"),
    pytest.param("replknet_xl", 320, 0.875, "center", "bicubic", (0.485, 0.456, 0.406), id="replknet_xl-320"),
    pytest.param("unireplknet_s", 224, 0.875, "center", "bicubic", (0.485, 0.456, 0.406), id="unireplknet_s-224"),
    pytest.param("unireplknet_xl", 384, 1.0, "squash", "bicubic", (0.485, 0.456, 0.406), id="unireplknet_xl-384"),
    pytest.param("convnext_tiny", 224, 0.875, "center", "bicubic", (0.485, 0.456, 0.406), id="convnext"),
    pytest.param("internimage_t", 224, 0.875, "center", "bicubic", (0.485, 0.456, 0.406), id="internimage"),
    pytest.param("resnet50", 224, 0.875, "center", "bilinear", (0.485, 0.456, 0.406), id="torchvision-resnet"),
    pytest.param("shufflenetv2_x1_0", 224, 0.875, "center", "bilinear", (0.485, 0.456, 0.406), id="torchvision-shufflenet"),
    pytest.param("mobilenetv1_100", 224, 0.875, "center", "bicubic", (0.5, 0.5, 0.5), id="timm-mobilenetv1"),
])
def test_pretrained_cfg_holds_the_official_evaluation_settings(name, size, crop_pct, crop_mode, interpolation, mean):
    """The official evaluation settings (RepLKNet-pytorch's and UniRepLKNet's datasets.py warp at
    384 and crop 224/256 below; torchvision resizes 256 bilinear; timm's MobileNetV1 uses the
    Inception normalisation), on the model and from the registry without building it."""
    from convzoo.models._builder import pretrained_cfg_of

    with torch.device("meta"):
        model = convzoo.create_model(name, in_chans=1)
    expected = dict(input_size=(1, size, size), crop_pct=crop_pct, crop_mode=crop_mode, interpolation=interpolation,
                    mean=mean)
    assert {k: model.pretrained_cfg[k] for k in expected} == expected
    assert pretrained_cfg_of(name, in_chans=1) == model.pretrained_cfg
    # a caller's (or a training run's) configuration overrides the registered one
    with torch.device("meta"):
        tuned = convzoo.create_model(name, pretrained_cfg=dict(input_size=(3, 64, 64)))
    assert tuned.pretrained_cfg["input_size"] == (3, 64, 64) and tuned.pretrained_cfg["crop_mode"] == crop_mode
