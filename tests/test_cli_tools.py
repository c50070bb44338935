"""End-to-end tests of the deployment and analysis commands: reparam, export, erf, offsets, bench.

The commands run on tiny models registered here (a few thousand parameters, 32x32 inputs), so
the whole file stays fast on a 2-core CPU.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn
from PIL import Image

import convzoo
from convzoo.cli import main
from convzoo.export import export_onnx
from convzoo.layers import DCNv3, ModulatedDeformConv2dPack
from convzoo.layers.reparam import fuse_conv_bn
from convzoo.models import _registry, build_model, register_model, save_checkpoint
from convzoo.layers import is_reparameterized


# ----------------------------------------------------------------------------------------------
# A tiny registered model family: stride-2 stem, two stages of re-parameterizable depthwise blocks
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TinyConfig:
    width: int = 8
    kernel_size: int = 3
    depth: int = 1
    deformable: bool = False  # end with a DCNv2 layer (offsets initialised non-zero)


class TinyRepBlock(nn.Module):
    """x + relu(BN(dwconv_k(x)) + BN(dwconv_3(x))); ``reparameterize`` merges the branches."""

    def __init__(self, channels: int, kernel_size: int):
        super().__init__()
        self.large = nn.Sequential(nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=False), nn.BatchNorm2d(channels))
        self.small = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False), nn.BatchNorm2d(channels))
        self.fused = None

    def forward(self, x):
        y = self.fused(x) if self.fused is not None else self.large(x) + self.small(x)
        return x + torch.relu(y)

    def reparameterize(self):
        large, small = fuse_conv_bn(*self.large), fuse_conv_bn(*self.small)
        pad = (large.kernel_size[0] - 3) // 2
        large.weight.data += nn.functional.pad(small.weight.data, [pad] * 4)
        large.bias.data += small.bias.data
        self.fused, self.large, self.small = large, None, None


class TinyNet(nn.Module):
    def __init__(self, cfg: TinyConfig, num_classes=1000, in_chans=3, drop_path_rate=0.0):
        super().__init__()
        c = cfg.width
        self.stem = nn.Sequential(nn.Conv2d(in_chans, c, 3, stride=2, padding=1), nn.BatchNorm2d(c), nn.ReLU())
        self.stages = nn.Sequential(*[
            nn.Sequential(*[TinyRepBlock(c, cfg.kernel_size) for _ in range(cfg.depth)]) for _ in range(2)
        ])
        if cfg.deformable:
            self.stages.append(ModulatedDeformConv2dPack(c, c, 3, padding=1, deform_groups=2))
            nn.init.normal_(self.stages[-1].conv_offset.weight, std=0.3)
        self.feature_info = [dict(num_chs=c, reduction=2, module=f"stages.{i}") for i in range(len(self.stages))]
        self.classifier_name = "head"
        self.head = nn.Linear(c, num_classes) if num_classes else nn.Identity()
        for module in self.modules():  # non-trivial BN statistics, so that fusing them matters
            if isinstance(module, nn.BatchNorm2d):
                nn.init.uniform_(module.running_var, 0.5, 2.0)
                nn.init.normal_(module.running_mean, 0.0, 0.2)
                nn.init.uniform_(module.weight, 0.5, 1.5)

    def forward_intermediates(self, x, indices):
        x, out = self.stem(x), []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in indices:
                out.append(x)
        return out

    def forward_features(self, x):
        return self.stages(self.stem(x))

    def forward_head(self, x):
        return self.head(x.mean((2, 3)))

    def forward(self, x):
        return self.forward_head(self.forward_features(x))

    def reset_classifier(self, num_classes):
        self.head = nn.Linear(self.head.in_features, num_classes) if num_classes else nn.Identity()

    def set_grad_checkpointing(self, enable=True):
        pass


def _tiny(variant_cfg):
    def entry(pretrained=None, **kwargs):
        return build_model(TinyNet, variant_cfg, pretrained=pretrained, **kwargs)
    return entry


_VARIANTS = {"test_tiny_k3": TinyConfig(), "test_tiny_k9": TinyConfig(kernel_size=9), "test_tiny_dcn": TinyConfig(deformable=True)}


@pytest.fixture(autouse=True, scope="module")
def _tiny_models():
    """Register the tiny variants for this module only (the registry is global: other test
    modules parametrised over ``list_models()`` must not see them)."""
    added = []
    for name, cfg in _VARIANTS.items():
        if name not in convzoo.list_models():
            entry = _tiny(cfg)
            entry.__name__ = name
            register_model(entry)
            added.append(name)
    yield
    for name in added:
        _registry._ENTRY_POINTS.pop(name)


def cli(argv):
    return main(argv)


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = convzoo.create_model("test_tiny_k9", num_classes=5)
    path = str(tmp_path / "tiny.safetensors")
    save_checkpoint(model, path)
    return path


# ----------------------------------------------------------------------------------------------
# --help
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["reparam", "export", "erf", "offsets", "bench"])
def test_help_describes_the_command(command, capsys):
    assert cli([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert f"usage: convzoo {command}" in text
    assert "examples:" in text


# ----------------------------------------------------------------------------------------------
# reparam
# ----------------------------------------------------------------------------------------------

def test_reparam_writes_an_equivalent_inference_form(tiny_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "deploy.safetensors")
    code = cli(["reparam", tiny_checkpoint, out, "--input-size", "32", "--repeats", "2"])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "outputs match" in text and "parameters:" in text and "latency" in text
    training = convzoo.models.load_model(tiny_checkpoint).eval()
    deployed = convzoo.models.load_model(out).eval()
    assert is_reparameterized(deployed)
    assert sum(p.numel() for p in deployed.parameters()) < sum(p.numel() for p in training.parameters())
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), training(x), rtol=1e-5, atol=1e-5)


def test_reparam_from_a_pth_checkpoint_needs_the_model_name(tmp_path, capsys):
    model = convzoo.create_model("test_tiny_k3")
    pth = str(tmp_path / "official.pth")
    torch.save({"model": model.state_dict()}, pth)
    out = str(tmp_path / "deploy.safetensors")
    assert cli(["reparam", pth, out, "--repeats", "0", "--input-size", "16"]) == 2
    assert "--model NAME" in capsys.readouterr().err
    assert cli(["reparam", pth, out, "--model", "test_tiny_k3", "--repeats", "0", "--input-size", "16"]) == 0
    assert is_reparameterized(convzoo.models.load_model(out))


@pytest.mark.parametrize("case, message", [
    ("missing_input", "input checkpoint not found"),
    ("not_safetensors", "must be a .safetensors file"),
    ("same_file", "must differ from IN"),
    ("unknown_model", "did you mean test_tiny_k3"),
])
def test_reparam_bad_input(case, message, tiny_checkpoint, tmp_path, capsys):
    out = str(tmp_path / "out.safetensors")
    argv = {
        "missing_input": [str(tmp_path / "nope.safetensors"), out],
        "not_safetensors": [tiny_checkpoint, str(tmp_path / "out.pth")],
        "same_file": [tiny_checkpoint, tiny_checkpoint],
        "unknown_model": [tiny_checkpoint, out, "--model", "test_tiny_k33"],
    }[case]
    if case == "unknown_model":
        pth = str(tmp_path / "w.pth")
        torch.save(convzoo.create_model("test_tiny_k3").state_dict(), pth)
        argv[0] = pth
    assert cli(["reparam"] + argv) == 2
    assert message in capsys.readouterr().err
    assert not os.path.exists(out)


# ----------------------------------------------------------------------------------------------
# export
# ----------------------------------------------------------------------------------------------

def test_export_round_trip_with_onnxruntime(tiny_checkpoint, tmp_path, capsys):
    onnx_path = str(tmp_path / "tiny.onnx")
    report = str(tmp_path / "export.json")
    code = cli(["export", "--checkpoint", tiny_checkpoint, "--onnx", onnx_path, "--input-size", "32",
                "--exporter", "torchscript", "--dynamic-batch", "--json", report])
    text = capsys.readouterr().out
    assert code == 0, text
    result = json.loads(open(report).read())
    assert result["max_rel_error"] <= 1e-4
    assert result["input_shape"] == [2, 3, 32, 32] and result["checked_shape"] == [3, 3, 32, 32]
    assert "BatchNormalization" not in result["onnx_ops"]  # exported in its re-parameterized form
    import onnxruntime as ort

    session = ort.InferenceSession(onnx_path, providers=["CPUExecutionProvider"])
    x = torch.randn(4, 3, 32, 32)
    expected = convzoo.reparameterize(convzoo.models.load_model(tiny_checkpoint))(x).detach().numpy()
    np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], expected, rtol=1e-4, atol=1e-5)


def test_reparam_then_export_and_bench_the_deployed_file(tiny_checkpoint, tmp_path, capsys):
    deployed = str(tmp_path / "deploy.safetensors")
    assert cli(["reparam", tiny_checkpoint, deployed, "--input-size", "16", "--repeats", "0"]) == 0
    assert cli(["export", "--checkpoint", deployed, "--onnx", str(tmp_path / "d.onnx"), "--input-size", "16",
                "--exporter", "torchscript"]) == 0
    assert cli(["bench", "--model", "test_tiny_k9", "--checkpoint", deployed, "--reparam", "--input-size", "16",
                "--mode", "inference", "--warmup", "0", "--repeats", "1"]) == 0
    text = capsys.readouterr().out
    assert "max relative error" in text and "test_tiny_k9 (reparam)" in text


@pytest.mark.parametrize("argv, message", [
    (["--model", "test_tiny_k3", "--onnx", "out.txt"], "must name a .onnx file"),
    (["--model", "test_tiny_k3", "--onnx", "missing/out.onnx"], "folder of --onnx does not exist"),
    (["--model", "test_tiny_k3", "--onnx", "out.onnx", "--opset", "13"], "GridSample"),
    (["--model", "no_such_model", "--onnx", "out.onnx"], "unknown model"),
    (["--onnx", "out.onnx"], "--model NAME is required"),
    (["--model", "test_tiny_k3", "--checkpoint", "nope.pth", "--onnx", "out.onnx"], "checkpoint not found"),
])
def test_export_bad_input(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(["export"] + argv) == 2
    assert message in capsys.readouterr().err


def test_export_a_registered_deformable_model(tmp_path, capsys):
    report = tmp_path / "export.json"
    code = cli(["export", "--model", "test_tiny_dcn", "--onnx", str(tmp_path / "dcn.onnx"), "--input-size", "20,24",
                "--exporter", "torchscript", "--json", str(report)])
    text = capsys.readouterr().out
    assert code == 0, text
    result = json.loads(report.read_text())
    assert result["max_rel_error"] <= 1e-4
    assert not any(op.startswith("convzoo") or op.startswith("deform") for op in result["onnx_ops"])
    assert {"Gather", "GatherElements", "GridSample"} & set(result["onnx_ops"])  # the sampling, in standard ops
    assert "max relative error" in text


class DeformableNet(nn.Module):
    """A DCNv2 layer (ModulatedDeformConv2dPack) then a DCNv3 layer, offsets initialised non-zero."""

    def __init__(self):
        super().__init__()
        self.dcn = ModulatedDeformConv2dPack(3, 8, 3, padding=1, deform_groups=1)
        self.dcnv3 = DCNv3(8, kernel_size=3, group=2)
        for offset_weight in (self.dcn.conv_offset.weight, self.dcnv3.offset.weight):
            nn.init.normal_(offset_weight, std=0.5)
        self.head = nn.Linear(8, 4)

    def forward(self, x):
        y = self.dcnv3(self.dcn(x).permute(0, 2, 3, 1))
        return self.head(y.mean((1, 2)))


def test_export_deformable_layers_with_the_default_exporter(tmp_path):
    model = DeformableNet()
    result = export_onnx(model, tmp_path / "net.onnx", input_size=(10, 12), batch_size=2)
    assert result.exporter == "dynamo"  # onnxscript is installed with the test extras
    assert model.dcn.impl == "reference" and model.dcnv3.impl == "reference"
    assert result.max_rel_error <= 1e-4
    assert result.output_shape == (2, 4) and result.input_shape == (2, 3, 10, 12)
    assert result.dynamic_batch and result.checked_shape == (3, 3, 10, 12)  # a dynamic batch by default


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_export_deformable_layers_with_dynamic_sizes(exporter, tmp_path):
    import onnxruntime as ort

    model = DeformableNet()
    path = str(tmp_path / "net.onnx")
    result = export_onnx(model, path, input_size=(10, 12), exporter=exporter, dynamic_size=True)
    assert result.dynamic_size and result.checked_shape == (3, 3, 26, 28) and result.max_rel_error <= 1e-4
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    x = torch.randn(1, 3, 17, 9)  # another batch, another size, odd sides
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": x.numpy()})[0], model(x).numpy(), rtol=1e-4, atol=1e-5)


def test_export_refuses_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="exporter must be one of"):
        export_onnx(DeformableNet(), tmp_path / "x.onnx", exporter="tflite")
    with pytest.raises(ValueError, match=r"input_size must be \(H, W\)"):
        export_onnx(DeformableNet(), tmp_path / "x.onnx", input_size=(0, 4))


# ----------------------------------------------------------------------------------------------
# offsets
# ----------------------------------------------------------------------------------------------

def _picture(path, size=(80, 60)):
    x = np.linspace(0, 255, size[0])[None, :, None]
    y = np.linspace(0, 255, size[1])[:, None, None]
    Image.fromarray(np.broadcast_to((x + y) / 2, (size[1], size[0], 3)).astype(np.uint8)).save(path)
    return str(path)


def test_offsets_draws_where_the_layer_samples(tmp_path, capsys):
    image = _picture(tmp_path / "picture.png")
    out, report = tmp_path / "offsets.png", tmp_path / "offsets.json"
    code = cli(["offsets", "--model", "test_tiny_dcn", "--image", image, "--out", str(out), "--input-size", "32",
                "--points", "40,30", "--points", "10,50", "--display-size", "160", "--json", str(report)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "stages.2" in text
    figure = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert figure.shape[1] >= 160 and figure.shape[0] > 120
    colourful = np.abs(figure - figure.mean(-1, keepdims=True)).max(-1) > 40  # the grey gradient is not
    assert colourful.sum() > 50
    result = json.loads(report.read_text())
    assert result["layer"] == "stages.2" and result["op"] == "deform_conv2d" and result["layers"] == ["stages.2"]
    first = result["points"][0]
    assert first["point"] == [40, 30] and len(first["locations_xy"]) == 18 == len(first["weights"])
    assert all(0 < w < 1 for w in first["weights"])
    xs = sorted(round(x, 6) for x, _ in first["locations_xy"])
    assert len(set(xs)) > 3  # offsets moved the points off the regular 3x3 grid


@pytest.mark.parametrize("argv, message", [
    (["--model", "test_tiny_dcn", "--image", "missing.png"], "image not found: missing.png"),
    (["--model", "test_tiny_dcn", "--image", "broken.jpg"], "cannot read the image broken.jpg"),
    (["--model", "test_tiny_dcn", "--image", "p.png", "--layer", "stem"], "the layers are: stages.2"),
    (["--model", "test_tiny_k3", "--image", "p.png"], "has no deformable layer"),
    (["--model", "test_tiny_dcn", "--image", "p.png", "--points", "500,5"], "points outside the 80x60 image: 500,5"),
    (["--model", "test_tiny_dcn", "--image", "p.png", "--points", "5"], "--points takes X,Y"),
])
def test_offsets_bad_input(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    _picture(tmp_path / "p.png")
    (tmp_path / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    assert cli(["offsets"] + argv + ["--out", "o.png", "--input-size", "16"]) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# erf
# ----------------------------------------------------------------------------------------------

def _image_folder(root, count=3, size=(40, 36)):
    rng = np.random.default_rng(0)
    folder = root / "val" / "a"
    folder.mkdir(parents=True)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size[0], size[1], 3), dtype=np.uint8)).save(folder / f"{i}.png")
    (folder / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    return root


def test_erf_two_models_side_by_side(tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    out, report = tmp_path / "erf.png", tmp_path / "erf.json"
    code = cli(["erf", "--model", "test_tiny_k9", "--model", "test_tiny_k3", "--data", str(data),
                "--num-images", "3", "--input-size", "32", "--batch-size", "2", "--panel-size", "64",
                "--out", str(out), "--json", str(report)])
    text = capsys.readouterr().out
    assert code == 0, text
    picture = np.asarray(Image.open(out).convert("RGB"))
    assert picture.shape[1] > 2 * 64 and picture.shape[0] > 64
    assert len(np.unique(picture.reshape(-1, 3), axis=0)) > 50  # a heatmap, not a blank canvas
    result = json.loads(report.read_text())
    assert [m["model"] for m in result["models"]] == ["test_tiny_k9", "test_tiny_k3"]
    for entry in result["models"]:
        assert entry["num_images"] == 3  # the broken JPEG was skipped
        ratios = [entry["area_ratios"][str(t)] for t in result["thresholds"]]
        assert all(0 < r <= 1 for r in ratios) and ratios == sorted(ratios)
    large, small = (m["area_ratios"]["0.5"] for m in result["models"])
    assert large > small
    assert text.count("BatchNorm statistics re-estimated on 8 images") == 2  # random init: recalibrated
    assert all(set(m["area_ratios_linear"]) == set(m["area_ratios"]) for m in result["models"])


def test_erf_keeps_the_statistics_of_a_checkpoint(tiny_checkpoint, tmp_path, capsys):
    code = cli(["erf", "--model", "test_tiny_k9", "--checkpoint", tiny_checkpoint, "--num-images", "1",
                "--input-size", "24", "--out", str(tmp_path / "e.png")])
    assert code == 0
    assert "re-estimated" not in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["--model", "test_tiny_k3", "--out", "erf.jpg"], "must name a .png file"),
    (["--model", "test_tiny_k3", "--out", "erf.png", "--data", "nowhere"], "data folder not found: nowhere"),
    (["--model", "test_tiny_k3", "--model", "test_tiny_k9", "--checkpoint", "a.pth", "--out", "erf.png"], "one --checkpoint per --model"),
    (["--model", "test_tiny_k3", "--out", "erf.png", "--input-size", "16,20"], "square --input-size"),
    (["--model", "test_tiny", "--out", "erf.png", "--data", "."], "did you mean"),
    (["--model", "test_tiny_k3", "--out", "erf.png", "--recalibrate-bn", "-1"], "--recalibrate-bn must be >= 0"),
])
def test_erf_bad_input(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(["erf"] + argv) == 2
    assert message in capsys.readouterr().err


def test_erf_folder_without_images(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert cli(["erf", "--model", "test_tiny_k3", "--data", str(tmp_path / "empty"), "--out", str(tmp_path / "e.png")]) == 2
    assert "no images" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# bench
# ----------------------------------------------------------------------------------------------

def test_bench_compare_table_and_json(tmp_path, capsys):
    report = tmp_path / "bench.json"
    code = cli(["bench", "--model", "test_tiny_k9", "--compare", "test_tiny_k3", "--reparam", "--input-size", "32",
                "--batch-size", "2", "--warmup", "1", "--repeats", "2", "--json", str(report)])
    text = capsys.readouterr().out
    assert code == 0, text
    assert "test_tiny_k9 (reparam)" in text and "test_tiny_k3 (reparam)" in text
    assert "inference latency" in text and "train latency" in text
    results = json.loads(report.read_text())["results"]
    assert [r["model"] for r in results] == ["test_tiny_k9", "test_tiny_k3"]
    for r in results:
        assert r["params"] < r["params_train"]  # measured in the re-parameterized form
        assert r["input_size"] == [32, 32] and r["batch_size"] == 2
        for mode in ("inference", "train"):
            m = r["results"][mode]
            assert m["latency_ms"] > 0 and m["throughput"] == pytest.approx(2000 / m["latency_ms"])
            assert m["latency_ms_min"] <= m["latency_ms"] <= m["latency_ms_max"]
            assert m["memory_method"] in ("cpu_rss_growth", "cuda_max_memory_allocated")
            assert m["peak_memory_mb"] >= 0


@pytest.mark.parametrize("argv, message", [
    pytest.param(["--model", "test_tiny_k3", "--device", "cuda:0"] if not torch.cuda.is_available() else ["--model", "test_tiny_k3", "--device", "tpu"],
                 "no CUDA GPU" if not torch.cuda.is_available() else "unknown device", id="device"),
    pytest.param(["--model", "test_tiny_k3", "--compare", "tst_tiny_k9"], "did you mean", id="unknown-compare"),
    pytest.param(["--model", "test_tiny_k3", "--json", "no/such/dir/b.json"], "dir does not exist; create it first", id="json-folder"),
])
def test_bench_bad_input(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli(["bench"] + argv) == 2
    assert message in capsys.readouterr().err


def test_bench_rejects_a_bad_input_size(capsys):
    assert cli(["bench", "--model", "test_tiny_k3", "--input-size", "0"]) == 2
    assert "positive integers" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# a real process, a real zoo model
# ----------------------------------------------------------------------------------------------

def test_python_m_convzoo_reparam_on_a_zoo_model(tmp_path):
    model = convzoo.create_model("replknet_tiny", num_classes=3)
    checkpoint = str(tmp_path / "replknet_tiny.safetensors")
    save_checkpoint(model, checkpoint)
    out = str(tmp_path / "deploy.safetensors")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, "-m", "convzoo", "reparam", checkpoint, out, "--input-size", "32", "--repeats", "0"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "outputs match" in done.stdout
    deployed = convzoo.models.load_model(out)
    assert is_reparameterized(deployed) and deployed.num_classes == 3
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(deployed(x), convzoo.reparameterize(model)(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- what a new user ran into

# tiny built-in data for the training runs below
BUILTIN_DATA = ["--image-size", "24", "--train-size", "64", "--val-size", "32", "--batch-size", "16", "--threads", "1"]


def _run(argv, capsys):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def _unreadable(tmp_path, suffix):
    path = tmp_path / f"notes{suffix}"
    path.write_text("these are my notes, not weights\n")
    return str(path)


def _commands_given(checkpoint, tmp_path):
    image = str(tmp_path / "cat.png")
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(image)
    out = str(tmp_path / "out")
    return {
        "eval": ["eval", "--model", "replknet_tiny", "--checkpoint", checkpoint],
        "export": ["export", "--model", "replknet_tiny", "--checkpoint", checkpoint, "--onnx", out + ".onnx"],
        "bench": ["bench", "--model", "replknet_tiny", "--checkpoint", checkpoint],
        "erf": ["erf", "--model", "replknet_tiny", "--checkpoint", checkpoint, "--out", out + ".png"],
        "offsets": ["offsets", "--model", "resnet50_dcnv2", "--checkpoint", checkpoint, "--image", image, "--out", out + ".png"],
        "reparam": ["reparam", checkpoint, out + ".safetensors", "--model", "replknet_tiny"],
        "train --pretrained": ["train", "--pretrained", checkpoint, "--output", out],
        "train --resume": ["train", "--resume", checkpoint, "--output", out],
    }


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
@pytest.mark.parametrize("command", ["eval", "export", "bench", "erf", "offsets", "reparam", "train --pretrained", "train --resume"])
def test_a_text_file_given_as_checkpoint_is_named_with_the_reason(command, suffix, tmp_path, capsys):
    checkpoint = _unreadable(tmp_path, suffix)
    code, _, err = _run(_commands_given(checkpoint, tmp_path)[command], capsys)
    assert code == 2, err
    assert f"{checkpoint} is not a readable checkpoint" in err, err
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_create_model_names_an_unreadable_checkpoint(suffix, tmp_path):
    checkpoint = _unreadable(tmp_path, suffix)
    with pytest.raises(ValueError, match=f"{re.escape(checkpoint)} is not a readable checkpoint: it cannot be read as"):
        convzoo.create_model("replknet_tiny", pretrained=checkpoint)


def test_pretrained_true_explains_that_weights_come_from_a_local_file():
    with pytest.raises(TypeError, match=r"path of a local checkpoint file .* got True; for example create_model\("):
        convzoo.create_model("replknet_tiny", pretrained=True)


def test_a_checkpoint_of_another_model_gives_a_short_summary_of_the_keys(tmp_path, capsys):
    path = str(tmp_path / "resnet.safetensors")
    state = convzoo.create_model("resnet50").state_dict()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in state.items()}, path)
    code, _, err = _run(["train", "--pretrained", path, "--output", str(tmp_path / "run")] + BUILTIN_DATA, capsys)
    assert code == 2
    assert "missing keys (" in err and "unexpected keys (" in err and "more)" in err
    assert len(err) < 2000, len(err)


def test_reparam_of_a_training_checkpoint_keeps_its_classes(tmp_path, capsys):
    output = str(tmp_path / "run")
    code, _, err = _run(["train", "--model", "replknet_tiny", "--output", output, "--epochs", "1",
                         "--model-arg", "kernel_sizes=(3,3,3,3)", "--model-arg", "small_kernel=None"] + BUILTIN_DATA, capsys)
    assert code == 0, err
    out = str(tmp_path / "deployed.safetensors")
    code, stdout, err = _run(["reparam", os.path.join(output, "checkpoint.pt"), out, "--model", "replknet_tiny",
                              "--input-size", "32", "--repeats", "3"], capsys)
    assert code == 0, err
    deployed = convzoo.models.load_model(out)
    assert deployed.num_classes == 2 and deployed.cfg.kernel_sizes == (3, 3, 3, 3)
    assert "classifier re-initialised" not in err
    assert "medians of 3 interleaved runs" in stdout


def test_latency_comparison_says_when_the_machine_is_too_noisy():
    from convzoo.analysis.latency import Comparison, compare_inference

    assert Comparison(latency_ms=(10.0, 5.0), spread_ms=(1.0, 1.0), repeats=5).decided
    assert not Comparison(latency_ms=(10.0, 9.0), spread_ms=(3.0, 0.5), repeats=5).decided
    slow = nn.Sequential(*[nn.Conv2d(8, 8, 3, padding=1) for _ in range(6)])
    result = compare_inference(slow, nn.Identity(), torch.randn(1, 8, 32, 32), repeats=3)
    assert result.repeats == 3 and result.latency_ms[0] > 0 and result.latency_ms[1] >= 0


@pytest.mark.parametrize("command", ["bench", "export", "reparam", "erf"])
def test_an_input_too_small_for_the_model_is_refused_before_any_work(command, tmp_path, capsys):
    model = convzoo.create_model("squeezenet1_1", num_classes=3)
    checkpoint = str(tmp_path / "squeezenet.safetensors")
    save_checkpoint(model, checkpoint)
    Image.fromarray(np.zeros((16, 16, 3), dtype=np.uint8)).save(tmp_path / "cat.png")
    out = str(tmp_path / "out")
    argv = {
        "bench": ["bench", "--checkpoint", checkpoint],
        "export": ["export", "--checkpoint", checkpoint, "--onnx", out + ".onnx"],
        "reparam": ["reparam", checkpoint, out + ".safetensors"],
        "erf": ["erf", "--model", "squeezenet1_1", "--checkpoint", checkpoint, "--out", out + ".png", "--data", str(tmp_path)],
    }[command]
    if command == "bench":
        argv += ["--model", "squeezenet1_1"]
    code, _, err = _run(argv + ["--input-size", "8"], capsys)
    assert code == 2 and "squeezenet1_1 cannot take a 8x8 input (--input-size)" in err, err
    assert not any(name.startswith("out") for name in os.listdir(tmp_path))


def test_bench_reports_its_progress(capsys):
    code, out, err = _run(["bench", "--model", "squeezenet1_1", "--input-size", "32", "--mode", "inference",
                           "--warmup", "0", "--repeats", "1"], capsys)
    assert code == 0, err
    assert "measuring squeezenet1_1 (1/1): inference, 0 warm-up + 1 timed runs of batch 1 at 32x32" in err
    assert "squeezenet1_1 done in" in err


def test_bench_optimize_reports_its_steps_and_labels_the_result(tmp_path, capsys, caplog):
    import torch._inductor.config as inductor_config

    report = tmp_path / "bench.json"
    # no C++ compiler for inductor (the compiled path itself is tested in tests/deploy/test_optimize.py)
    with inductor_config.patch({"cpp.cxx": (None, "/nonexistent/bin/c++")}):
        code, out, err = _run(["bench", "--model", "test_tiny_k3", "--optimize", "--input-size", "16", "--mode", "inference",
                               "--warmup", "0", "--repeats", "2", "--json", str(report)], capsys)
    assert code == 0, err
    assert "optimizing for inference (re-parameterize, choose the layout, torch.compile with freezing)" in err
    assert re.search(r"optimized in [\d.]+ s: (contiguous|channels_last) layout, not compiled \(eager\), "
                     r"max relative difference to eager", err), err
    # the CLI routes warnings to logging (py.warnings); exactly one says why nothing was compiled
    assert [r.getMessage().count("no C++ compiler found") for r in caplog.records if "C++" in r.getMessage()] == [1]
    assert "test_tiny_k3 (optimized)" in out and "inference latency" in out
    result = json.loads(report.read_text())["results"][0]
    assert result["optimized"] and result["reparameterized"] and result["params"] < result["params_train"]


def test_bench_optimize_needs_inference(capsys):
    code, _, err = _run(["bench", "--model", "test_tiny_k3", "--optimize", "--mode", "train"], capsys)
    assert code == 2 and "--optimize applies to inference" in err


def test_erf_panels_of_one_model_name_get_distinct_titles():
    from convzoo.commands.erf import panel_names

    assert panel_names(["a", "b"], [None, None]) == ["a", "b"]
    assert panel_names(["a", "a", "b"], ["x/one.pt", None, "y.pt"]) == ["a (one.pt)", "a (random init)", "b"]
    assert panel_names(["a", "a"], ["x/w.pt", "y/w.pt"]) == ["a (w.pt) #1", "a (w.pt) #2"]
