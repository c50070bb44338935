"""``convzoo train --qat`` (quantization-aware fine-tuning, convzoo.deploy.qat): a round trip through
the real command on a tiny ShuffleNetV2 and the built-in data, and the bad input it refuses
before any work."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn as nn

import convzoo
from convzoo.cli import main
from convzoo.deploy import _inductor, sqnr_db
from convzoo.deploy.qat import QATModel, prepare_qat
from convzoo.models import _registry, build_model, load_model, register_model, save_checkpoint
from convzoo.train.data import RelationConfig, RelationDataset

# The INT8 program against the fake-quantized model it was converted from: the same arithmetic
# (measured: identical outputs, SQNR inf, with the plain fake-quantize modules convzoo.deploy.qat uses).
MIN_FAKE_QUANT_SQNR_DB = 40.0
TINY_SHUFFLENET = dict(stages_repeats=(1, 1, 1), stages_out_channels=(8, 16, 32, 64, 64))


def _images(split: str, count: int) -> torch.Tensor:
    data = RelationDataset(split, RelationConfig(num_train=count, num_val=count))
    return torch.stack([data[i][0] for i in range(count)])


def _with_data_statistics(model: nn.Module) -> nn.Module:
    """``model`` with BatchNorm running statistics of the built-in data (as a trained model has)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for norm in norms:
        norm.momentum = None  # a cumulative average: one pass gives the batch's statistics
    model.train()
    with torch.no_grad():
        model(_images("train", 64))
    for norm in norms:
        norm.momentum = 0.1
    return model.eval()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = convzoo.create_model("shufflenetv2_x0_5", num_classes=2, **TINY_SHUFFLENET)
    path = str(tmp_path_factory.mktemp("qat") / "tiny_shufflenet.safetensors")
    save_checkpoint(_with_data_statistics(model), path)
    return path


@pytest.mark.slow
def test_cli_round_trip_on_builtin_data(tmp_path, checkpoint):
    output = tmp_path / "run"
    command = [sys.executable, "-m", "convzoo", "train", "--qat", "--pretrained", checkpoint, "--train-size", "64",
               "--val-size", "64", "--batch-size", "32", "--epochs", "2", "--freeze-bn-after", "1",
               "--freeze-observers-after", "1", "--output", str(output)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"shufflenetv2_x0_5: wrote {output / 'model_int8.pt2'} (INT8, inductor" in result.stdout
    assert "fake-quant  INT8 agrees with the fake-quantized model" in result.stdout
    assert sorted(os.listdir(output)) == ["checkpoint.pt", "metrics.jsonl", "model_int8.pt2", "summary.json"]
    with open(output / "metrics.jsonl") as handle:
        assert [json.loads(line)["epoch"] for line in handle] == [1, 2]
    summary = json.loads((output / "summary.json").read_text())
    report = summary["qat"]
    assert summary["model_file"] == str(output / "model_int8.pt2") and report["eval_images"] == 64
    assert report["fake_quant_sqnr_db"] >= MIN_FAKE_QUANT_SQNR_DB and report["fp32_top1"] is not None

    # the file is what `convzoo quantize --backend inductor` writes: a torch.export program, int8 weights
    program = _inductor.load_module(str(output / "model_int8.pt2"))  # torch.export.load, torchao's ops registered
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    convs = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in load_model(checkpoint).modules())
    assert sum("dequantize_per_channel" in t for t in targets) == convs
    assert not any("batch_norm" in t for t in targets)  # folded at conversion

    # ... and agrees with the fake-quantized model rebuilt from the run's checkpoint
    images = _images("val", 64)
    fake_quant = prepare_qat(load_model(checkpoint), images[:2])
    state = torch.load(output / "checkpoint.pt", map_location="cpu", weights_only=True)
    fake_quant.load_state_dict(state["model"])
    fake_quant.freeze_bn_stats()
    fake_quant.eval()
    with torch.no_grad():
        expected, loaded = fake_quant(images), program(images)
    assert sqnr_db(expected, loaded) >= MIN_FAKE_QUANT_SQNR_DB
    assert (expected.argmax(1) == loaded.argmax(1)).double().mean() >= 0.95


def test_observers_move_in_training_only_until_frozen(checkpoint):
    images = _images("train", 32)
    model = prepare_qat(load_model(checkpoint), images[:2])
    assert isinstance(model, QATModel) and model.training

    def state():
        return {k: v.clone() for k, v in model.state_dict().items()}

    def changed(before):
        return {k for k, v in model.state_dict().items() if v.shape != before[k].shape or not torch.equal(v, before[k])}

    before = state()
    with torch.no_grad():
        model(images)
    assert any(k.endswith("min_val") for k in changed(before))  # ranges observed in training
    model.eval()
    before = state()
    with torch.no_grad():
        model(images.flip(0) * 2)
    assert not changed(before)  # evaluation moves nothing
    model.train()
    model.freeze_observers()
    with torch.no_grad():
        model(images * 2)
    assert not changed(before) and model.training


# ------------------------------------------------------------------------------------- bad input

@torch.library.custom_op("convzoo_test::qat_twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


class _Twice(nn.Module):
    def forward(self, x):
        return _twice(x)


@dataclasses.dataclass(frozen=True)
class _TwiceCfg:
    width: int = 8


class _TwiceNet(nn.Module):
    """conv -> BN -> ReLU -> a custom operator the quantizer cannot handle -> pool -> linear."""

    def __init__(self, cfg=None, num_classes: int = 2, in_chans: int = 3, drop_path_rate: float = 0.0):
        super().__init__()
        self.in_chans, self.num_classes = in_chans, num_classes
        width = cfg.width
        self.stem = nn.Sequential(nn.Conv2d(in_chans, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.extra = _Twice()
        self.head = nn.Linear(width, num_classes)

    def forward(self, x):
        return self.head(self.extra(self.stem(x)).mean((2, 3)))


@pytest.fixture
def custom_op_checkpoint(tmp_path):
    def entry(pretrained=None, **kwargs):
        return build_model(_TwiceNet, _TwiceCfg(), pretrained=pretrained, **kwargs)
    entry.__name__ = "test_qat_twice_net"
    register_model(entry)
    try:
        path = str(tmp_path / "twice.safetensors")
        save_checkpoint(convzoo.create_model("test_qat_twice_net", num_classes=2), path)
        yield path
    finally:
        _registry._ENTRY_POINTS.pop("test_qat_twice_net")


@pytest.mark.parametrize("argv, match", [
    ([], "--qat fine-tunes a trained model: give its checkpoint with --pretrained PATH"),
    (["--task", "segmentation", "--pretrained", "{ckpt}"], "--qat fine-tunes classifiers only, not --task segmentation"),
    (["--pretrained", "{tmp}/missing.safetensors"], "checkpoint file not found: {tmp}/missing.safetensors"),
    (["--pretrained", "{ckpt}", "--model-ema", "0.99"], "--qat does not take --model-ema"),
    (["--pretrained", "{ckpt}", "--data-arg", "relation='shape+colour'"], "classifies 2 classes but the data has 4"),
])
def test_bad_input_before_any_work(tmp_path, checkpoint, capsys, argv, match):
    output = tmp_path / "run"
    argv = [a.format(tmp=tmp_path, ckpt=checkpoint) for a in argv]
    code = main(["train", "--qat", "--train-size", "32", "--val-size", "32", "--output", str(output), *argv])
    assert code == 2
    assert match.format(tmp=tmp_path) in capsys.readouterr().err
    assert not output.exists()


def test_custom_operator_is_an_error_naming_the_layer(tmp_path, custom_op_checkpoint, capsys):
    output = tmp_path / "run"
    code = main(["train", "--qat", "--pretrained", custom_op_checkpoint, "--train-size", "32", "--val-size", "32",
                 "--output", str(output)])
    assert code == 2
    err = capsys.readouterr().err
    assert "layer 'extra' calls the custom operator convzoo_test::qat_twice, which the quantizer cannot handle" in err
    assert not output.exists()


def test_freeze_options_need_qat(tmp_path, capsys):
    code = main(["train", "--freeze-bn-after", "1", "--output", str(tmp_path / "run")])
    assert code == 2 and "--freeze-bn-after only apply to --qat" in capsys.readouterr().err
