"""convzoo.deploy.hardware_friendly: the swaps, the reported output change, ONNX export."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convzoo
from convzoo.deploy import hardware_friendly
from convzoo.export import export_onnx
from convzoo.layers import HardSigmoid, HardSwish, LUTSigmoid, LUTSiLU, ShiftLeakyReLU, SqueezeExcite


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.SiLU(),
        SqueezeExcite(8, 4, nn.ReLU, torch.sigmoid),
        nn.Conv2d(8, 8, 3, padding=1), nn.LeakyReLU(0.1),
        nn.Conv2d(8, 8, 1), nn.LeakyReLU(0.3), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5), nn.Sigmoid(),
    ).eval()


def test_lut_swap_in_place_and_report():
    model, x = _net(), torch.randn(4, 3, 12, 12)
    with torch.no_grad():
        before = model(x)
    report = hardware_friendly(model, x)
    assert report.swapped == {
        "2": ("SiLU", "LUTSiLU"), "3.gate": ("sigmoid", "LUTSigmoid"), "5": ("LeakyReLU", "ShiftLeakyReLU"),
        "12": ("Sigmoid", "LUTSigmoid"),
    }
    assert isinstance(model[2], LUTSiLU) and isinstance(model[3].gate, LUTSigmoid) and isinstance(model[5], ShiftLeakyReLU)
    assert isinstance(model[7], nn.LeakyReLU)  # slope 0.3 is no 13/128
    with torch.no_grad():
        after = model(x)
    assert report.max_abs_change == pytest.approx((after - before).abs().max().item())
    assert 0 < report.max_abs_change < 0.05  # a LUT and a 1.6 % slope change, no more
    assert report.top1_agreement is not None and 0 <= report.top1_agreement <= 1
    assert "3.gate.table" not in model.state_dict()  # the tables are not stored in checkpoints


def test_hard_style_and_idempotence():
    model = _net()
    report = hardware_friendly(model, style="hard")
    assert report.max_abs_change is None
    assert isinstance(model[2], HardSwish) and isinstance(model[3].gate, HardSigmoid) and isinstance(model[12], HardSigmoid)
    assert hardware_friendly(model).swapped == {}


def test_light_family_has_nothing_to_swap():
    model = convzoo.create_model("mobilenetv3_small_100", num_classes=3).eval()
    x = torch.randn(2, 3, 32, 32)
    report = hardware_friendly(model, x)
    assert report.swapped == {} and report.max_abs_change == 0.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="style must be one of"):
        hardware_friendly(_net(), style="int")
    with pytest.raises(ValueError, match="mode must be one of"):
        hardware_friendly(_net(), mode="cubic")
    with pytest.raises(TypeError, match="inputs must be a tensor"):
        hardware_friendly(_net(), [torch.randn(1, 3, 8, 8)])


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_onnx_export_lut_as_gather(tmp_path, mode):
    """The swapped model exports (the LUT as Gather) and onnxruntime reproduces PyTorch."""
    model = _net()
    hardware_friendly(model, mode=mode)
    result = export_onnx(model, tmp_path / "hw.onnx", input_size=(12, 12), batch_size=2)
    assert "Gather" in result.onnx_ops and "Sigmoid" not in result.onnx_ops
    assert result.max_abs_error < 1e-5


def test_integer_shift_traces_to_integer_ops():
    """On int32 input the shift form traces to integer multiply and shift, no float op."""
    program = torch.export.export(ShiftLeakyReLU(), (torch.randint(-128, 128, (4, 8), dtype=torch.int32),))
    targets = {str(node.target) for node in program.graph.nodes if node.op == "call_function"}
    assert any("bitwise_right_shift" in t for t in targets) and any("mul" in t for t in targets)
    x = torch.arange(-16, 16, dtype=torch.int32).reshape(4, 8)
    assert torch.equal(program.module()(x), ShiftLeakyReLU()(x))
