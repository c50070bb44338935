"""convzoo.deploy.quantize and ``convzoo quantize``: round trips in both backends on a tiny model
calibrated on the built-in data, the choice of float layers, and the bad-input cases."""
from __future__ import annotations

import dataclasses
import json
import os

import onnx
import pytest
import torch
import torch.nn as nn

import convzoo
from convzoo.cli import main
from convzoo.deploy import load_quantized, quantize, sqnr_db
from convzoo.deploy import int8
from convzoo.layers import ModulatedDeformConv2dPack
from convzoo.models import _registry, build_model, register_model, save_checkpoint
from convzoo.train.data import RelationConfig, RelationDataset

# The SQNR every backend must reach on this model and data (measured: about 35-40 dB).
MIN_SQNR_DB = 25.0


@dataclasses.dataclass(frozen=True)
class TinyQConfig:
    width: int = 16


class TinyQNet(nn.Module):
    """conv-BN-ReLU x3 (the second strided) -> global pool -> linear; (N, 3, 32, 32) -> (N, classes)."""

    def __init__(self, cfg=None, num_classes: int = 2, in_chans: int = 3, drop_path_rate: float = 0.0, extra=None):
        super().__init__()
        self.in_chans, self.num_classes = in_chans, num_classes
        block = lambda i, o, s: nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())  # noqa: E731
        self.features = nn.Sequential(block(in_chans, 16, 1), block(16, 24, 2), block(24, 32, 1))
        self.extra = extra if extra is not None else nn.Identity()
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        return self.head(self.extra(self.features(x)).mean((2, 3)))


def _images(split: str, count: int):
    data = RelationDataset(split, RelationConfig(num_train=count, num_val=count))
    samples = [data[i] for i in range(count)]
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])


def _model(extra=None) -> nn.Module:
    """TinyQNet with BatchNorm statistics of the built-in data (so folding them matters)."""
    torch.manual_seed(0)
    model = TinyQNet(extra=extra)
    model.train()
    with torch.no_grad():
        model(_images("train", 64)[0])
    return model.eval()


@pytest.fixture(scope="module")
def data():
    calibration, _ = _images("train", 128)
    images, labels = _images("val", 96)
    return calibration, images, labels


def test_onnxruntime_round_trip(tmp_path, data):
    calibration, images, labels = data
    model, path = _model(), tmp_path / "tiny.onnx"
    seen = []
    report = quantize(model, calibration, path, keep_float=["head"], eval_images=images, eval_labels=labels,
                      batch_size=50, progress=lambda done, total: seen.append((done, total)))
    assert seen == [(50, 128), (100, 128), (128, 128)]
    assert report.path == str(path) and sorted(os.listdir(tmp_path)) == ["tiny.onnx"]  # no temporary left
    assert report.kept_float == ["head"] and report.calibration_images == 128
    assert report.sqnr_db >= MIN_SQNR_DB and report.top1_agreement >= 0.95
    assert abs(report.int8_top1 - report.fp32_top1) <= 5.0
    assert report.size_ratio > 1.5 and set(report.speed_ms) == {1} and min(report.speed_ms[1]) > 0
    # the file loads back on its own and agrees with the float model at the reported SQNR
    with torch.no_grad():
        reference = model(images)
    loaded = load_quantized(path)(images)
    assert sqnr_db(reference, loaded) == pytest.approx(report.sqnr_db, abs=0.5)
    graph = onnx.load(str(path)).graph
    ops = [node.op_type for node in graph.node]
    assert ops.count("DequantizeLinear") >= 6 and "Gemm" in ops
    gemm = next(node for node in graph.node if node.op_type == "Gemm")  # the kept-float head: float weight
    assert gemm.input[1] in {init.name for init in graph.initializer}
    weights = {init.name: init for init in graph.initializer}
    int8_weights = [weights[node.input[0]] for node in graph.node if node.op_type == "DequantizeLinear"
                    and node.input[0] in weights and weights[node.input[0]].data_type == onnx.TensorProto.INT8]
    assert [len(w.dims) for w in int8_weights] == [4, 4, 4]  # the 3 convs, int8
    scales = [weights[node.input[1]] for node in graph.node if node.op_type == "DequantizeLinear" and node.input[0] in
              {w.name for w in int8_weights}]
    assert [tuple(s.dims) for s in scales] == [(16,), (24,), (32,)]  # one scale per output channel


def test_inductor_round_trip(tmp_path, data):
    calibration, images, labels = data
    model, path = _model(), tmp_path / "tiny.pt2"
    report = quantize(model, calibration, path, backend="inductor", keep_float=["features.0.0"], eval_images=images,
                      eval_labels=labels, speed_batches=())
    assert report.sqnr_db >= MIN_SQNR_DB and report.top1_agreement >= 0.95 and report.speed_ms == {}
    assert report.kept_float == ["features.0.0"]
    program = torch.export.load(str(path))  # loads back as a torch.export program
    targets = [str(node.target) for node in program.graph.nodes if node.op == "call_function"]
    assert sum("dequantize_per_channel" in t for t in targets) == 3  # 2 of 3 convs + the linear
    with torch.no_grad():
        eager = program.module()(images)
        reference = model(images)
    assert sqnr_db(reference, eager) >= MIN_SQNR_DB


class SharedReluBlock(nn.Module):
    """ResNet's pattern: one ReLU module called after a conv and after the residual add."""

    def __init__(self, chs: int = 32):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(chs, chs, 3, padding=1), nn.Conv2d(chs, chs, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)


def test_inductor_quantizes_a_module_called_twice(tmp_path, data):
    """torchao's x86 quantizer rejected a ReLU module called more than once (ResNet-50 failed)."""
    from convzoo.deploy import _inductor

    calibration, images, _ = data
    model, path = _model(extra=SharedReluBlock()), str(tmp_path / "shared.pt2")
    program = _inductor.export_program(model, calibration[:8])
    _inductor.quantize(program, path, iter([calibration[:32]]), keep_float=(), sample=calibration[:8])
    loaded = _inductor.load_module(path)
    targets = [str(node.target) for node in loaded.graph.nodes if node.op == "call_function"]
    assert sum("dequantize_per_channel" in t for t in targets) == 6  # 5 convs + the linear, all int8
    with torch.no_grad():
        assert sqnr_db(model(images), loaded(images)) >= MIN_SQNR_DB


def test_keep_float_auto_keeps_the_most_sensitive_layer(tmp_path, data, monkeypatch):
    calibration, images, _ = data
    monkeypatch.setattr(int8, "AUTO_TARGET_SQNR_DB", 1e9)  # unreachable: keep the most allowed
    report = quantize(_model(), calibration, tmp_path / "auto.onnx", keep_float="auto", eval_images=images[:32],
                      speed_batches=())
    sensitivity = report.layer_sqnr_db
    assert set(sensitivity) == {"features.0.0", "features.1.0", "features.2.0", "head"}
    assert list(sensitivity.values()) == sorted(sensitivity.values())
    assert report.kept_float == [next(iter(sensitivity))]  # 10% of 4 layers, rounded up: the worst one


def test_too_few_calibration_images_warns(tmp_path, data):
    calibration, _, _ = data
    with pytest.warns(UserWarning, match="only 16 calibration images"):
        report = quantize(_model(), calibration[:16], tmp_path / "few.onnx", speed_batches=())
    assert report.calibration_images == 16 and os.path.isfile(tmp_path / "few.onnx")


@torch.library.custom_op("convzoo_test::twice", mutates_args=())
def _twice(x: torch.Tensor) -> torch.Tensor:
    return x * 2


@_twice.register_fake
def _(x):
    return torch.empty_like(x)


class Twice(nn.Module):
    def forward(self, x):
        return _twice(x)


def test_custom_op_is_an_error_naming_the_layer(tmp_path, data):
    calibration, _, _ = data
    with pytest.raises(ValueError, match=r"layer 'extra' calls the custom operator convzoo_test::twice"):
        quantize(_model(extra=Twice()), calibration, tmp_path / "custom.onnx")
    assert os.listdir(tmp_path) == []


def test_deformable_layer_stays_float_with_warning(tmp_path, data):
    calibration, images, _ = data
    extra = ModulatedDeformConv2dPack(32, 32, 3, padding=1)
    nn.init.normal_(extra.conv_offset.weight, std=0.1)
    model = _model(extra=extra)
    with pytest.warns(UserWarning, match=r"layer 'extra' \(ModulatedDeformConv2dPack\) runs a convzoo operator with no INT8"):
        report = quantize(model, calibration, tmp_path / "dcn.onnx", eval_images=images[:32], speed_batches=())
    assert report.kept_float == ["extra"] and report.sqnr_db >= MIN_SQNR_DB


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(backend="tensorrt"), ValueError, "backend must be one of onnxruntime, inductor"),
    (dict(path_name="model.pt2"), ValueError, r"writes a \.onnx file"),
    (dict(keep_float=["features.0.O"]), ValueError, "no module of the model; close names: .*features.0.0"),
    (dict(keep_float="head"), TypeError, "keep_float must be 'auto' or a sequence"),
    (dict(calibration=torch.randn(4, 1, 32, 32)), ValueError, "calibration has 1 channels but the model takes 3"),
    (dict(eval_labels=torch.zeros(3, dtype=torch.long)), ValueError, "eval_labels must be"),
])
def test_bad_arguments_before_any_work(tmp_path, data, kwargs, error, match):
    calibration = kwargs.pop("calibration", data[0])
    path = tmp_path / kwargs.pop("path_name", "model.onnx")
    with pytest.raises(error, match=match):
        quantize(TinyQNet(), calibration, path, **kwargs)
    assert os.listdir(tmp_path) == []


def test_missing_output_folder_and_file(tmp_path, data):
    with pytest.raises(ValueError, match="the folder of path does not exist"):
        quantize(TinyQNet(), data[0], tmp_path / "no" / "model.onnx")
    with pytest.raises(FileNotFoundError, match="no such quantized model file"):
        load_quantized(tmp_path / "absent.onnx")


# ------------------------------------------------------------------------------------- the CLI

@pytest.fixture
def tiny_checkpoint(tmp_path):
    def entry(pretrained=None, **kwargs):
        return build_model(TinyQNet, TinyQConfig(), pretrained=pretrained, **kwargs)
    entry.__name__ = "test_tiny_qnet"
    register_model(entry)
    try:
        path = str(tmp_path / "tiny.safetensors")
        model = convzoo.create_model("test_tiny_qnet", num_classes=2)
        model.load_state_dict(_model().state_dict())
        save_checkpoint(model, path)
        yield path
    finally:
        _registry._ENTRY_POINTS.pop("test_tiny_qnet")


def test_cli_end_to_end_on_builtin_data(tmp_path, tiny_checkpoint, capsys):
    out, report = tmp_path / "q.onnx", tmp_path / "report.json"
    code = main(["quantize", "--checkpoint", tiny_checkpoint, "--out", str(out), "--calibration-images", "64",
                 "--eval-images", "64", "--keep-float", "head", "--json", str(report)])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "calibrating [####################] 64/64 images" in captured.err
    assert "warning: only 64 calibration images" in captured.err
    assert f"test_tiny_qnet: wrote {out}" in captured.out and "kept float  head" in captured.out
    assert "speed       batch 1:" in captured.out and "output SQNR" in captured.out
    result = json.loads(report.read_text())
    assert result["sqnr_db"] >= MIN_SQNR_DB and result["eval_images"] == 64 and result["fp32_top1"] is not None
    assert os.path.isfile(out)


@pytest.mark.parametrize("argv, match", [
    (["--data", "{tmp}/missing"], "data folder not found: {tmp}/missing"),
    (["--backend", "inductor"], "--out must end in .pt2"),
    (["--keep-float", "features.9"], "no module of the model"),
])
def test_cli_bad_input(tmp_path, tiny_checkpoint, capsys, argv, match):
    argv = [a.format(tmp=tmp_path) for a in argv]
    code = main(["quantize", "--checkpoint", tiny_checkpoint, "--out", str(tmp_path / "q.onnx"),
                 "--calibration-images", "8", "--eval-images", "8", "--no-speed", *argv])
    assert code == 2
    assert match.format(tmp=tmp_path) in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "q.onnx")
