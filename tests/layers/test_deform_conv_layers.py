"""Tests of the deformable conv layers: torchvision's DeformConv2d, mmcv's ModulatedDeformConv2d,
ModulatedDeformConv2dPack and DeformConv2dPack."""
import inspect

import pytest
import torch
import torch.nn.functional as F

from convzoo.layers import DeformConv2d, DeformConv2dPack, ModulatedDeformConv2d, ModulatedDeformConv2dPack
from convzoo.ops import deform_conv2d


def test_deform_conv2d_layer_zero_offsets_is_conv2d():
    layer = DeformConv2d(4, 6, (3, 2), stride=(2, 1), padding=1, dilation=(1, 2), groups=2)
    x = torch.randn(2, 4, 7, 6)
    expected = F.conv2d(x, layer.weight, layer.bias, (2, 1), 1, (1, 2), groups=2)
    offset = torch.zeros(2, 2 * 3 * 2, *expected.shape[2:])
    torch.testing.assert_close(layer(x, offset), expected)


def test_deform_conv2d_layer_passes_offsets_mask_and_impl():
    layer = DeformConv2d(3, 5, 3, padding=1, bias=False)
    x = torch.randn(2, 3, 5, 4)
    offset = torch.randn(2, 3 * 18, 5, 4)  # three offset groups
    mask = torch.rand(2, 3 * 9, 5, 4)
    expected = deform_conv2d(x, offset, layer.weight, None, 1, 1, 1, mask=mask, impl="reference")
    torch.testing.assert_close(layer(x, offset, mask), expected)
    layer.impl = "reference"
    torch.testing.assert_close(layer(x, offset, mask), expected)
    layer.impl = "bogus"
    with pytest.raises(ValueError, match="impl must be one of"):
        layer(x, offset, mask)


def test_deform_conv2d_layer_parameters_device_dtype_and_reset():
    layer = DeformConv2d(4, 8, 3, groups=2, dtype=torch.float64, device="cpu")
    assert layer.weight.shape == (8, 2, 3, 3) and layer.weight.dtype == torch.float64
    assert layer.bias.shape == (8,)
    assert [name for name, _ in layer.named_parameters()] == ["weight", "bias"]
    before = layer.weight.detach().clone()
    layer.reset_parameters()
    assert not torch.equal(before, layer.weight)
    bound = 1 / (2 * 9) ** 0.5  # kaiming_uniform(a=sqrt(5)) bound for fan_in = 18
    assert layer.weight.abs().max() <= bound and layer.bias.abs().max() <= bound
    assert DeformConv2d(4, 8, 3, bias=False).bias is None


def test_deform_conv2d_layer_bad_groups():
    with pytest.raises(ValueError, match=r"groups \(3\) must be >= 1 and divide in_channels \(4\)"):
        DeformConv2d(4, 6, 3, groups=3)


def test_extra_repr():
    assert repr(DeformConv2d(4, 8, 3, padding=1, groups=2, bias=False)) == (
        "DeformConv2d(4, 8, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), groups=2, bias=False)"
    )
    for cls in (ModulatedDeformConv2d, ModulatedDeformConv2dPack):
        layer = cls(4, 8, (3, 1), stride=2, dilation=2, deform_groups=2)
        assert layer.extra_repr() == "4, 8, kernel_size=(3, 1), stride=(2, 2), dilation=(2, 2), deform_groups=2"
    assert DeformConv2dPack(4, 8, 3).extra_repr() == "4, 8, kernel_size=(3, 3), stride=(1, 1), bias=False"


def test_modulated_pack_at_init_is_half_a_plain_conv_plus_bias():
    layer = ModulatedDeformConv2dPack(4, 6, 3, stride=2, padding=1, groups=2, deform_groups=2)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 4, 9, 8)
    expected = 0.5 * F.conv2d(x, layer.weight, None, 2, 1, groups=2) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected)


def test_modulated_pack_init_and_parameter_names_match_mmcv():
    layer = ModulatedDeformConv2dPack(8, 16, 3, padding=1, deform_groups=2)
    assert sorted(layer.state_dict()) == ["bias", "conv_offset.bias", "conv_offset.weight", "weight"]
    assert layer.conv_offset.weight.shape == (3 * 2 * 9, 8, 3, 3)
    assert layer.conv_offset.weight.abs().sum() == 0 and layer.conv_offset.bias.abs().sum() == 0
    assert layer.bias.abs().sum() == 0
    bound = 1 / (8 * 9) ** 0.5  # mmcv: n = in_channels * kh * kw
    assert layer.weight.abs().max() <= bound


def test_modulated_pack_splits_offsets_and_mask_in_mmcv_order():
    """mmcv: o1, o2, mask = chunk(conv_offset(x), 3); offset = cat(o1, o2); mask = sigmoid(mask)."""
    layer = ModulatedDeformConv2dPack(4, 5, (2, 3), padding=(1, 0), deform_groups=2)
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, 0.3)
        layer.conv_offset.bias.normal_()
    x = torch.randn(2, 4, 6, 7)
    predicted = layer.conv_offset(x)
    o1, o2, mask_logits = torch.chunk(predicted, 3, dim=1)
    offset = torch.cat((o1, o2), dim=1)
    expected = deform_conv2d(x, offset, layer.weight, layer.bias, 1, (1, 0), 1, mask=mask_logits.sigmoid(), impl="reference")
    torch.testing.assert_close(layer(x), expected)


def test_modulated_pack_loads_an_mmcv_style_state_dict_and_trains():
    source = ModulatedDeformConv2dPack(3, 4, 3, padding=1)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.2)
    checkpoint = {k: v.clone() for k, v in source.state_dict().items()}
    target = ModulatedDeformConv2dPack(3, 4, 3, padding=1)
    target.load_state_dict(checkpoint, strict=True)
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(target(x), source(x))
    fresh = ModulatedDeformConv2dPack(3, 4, 3, padding=1)
    fresh(torch.randn(2, 3, 5, 5)).square().sum().backward()
    assert fresh.conv_offset.weight.grad.abs().sum() > 0
    assert fresh.weight.grad.abs().sum() > 0


def test_modulated_pack_device_dtype_and_bad_deform_groups():
    layer = ModulatedDeformConv2dPack(4, 4, 3, padding=1, dtype=torch.float64)
    assert layer.weight.dtype == layer.conv_offset.weight.dtype == torch.float64
    assert layer(torch.randn(1, 4, 4, 4, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match=r"deform_groups \(3\) must be >= 1 and divide in_channels \(4\)"):
        ModulatedDeformConv2dPack(4, 4, 3, deform_groups=3)


@pytest.mark.filterwarnings("ignore")
def test_reference_impl_exports_to_onnx():
    import io

    import onnxruntime
    layer = ModulatedDeformConv2dPack(4, 4, 3, padding=1).eval()
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, 0.2)
    layer.impl = "reference"
    x = torch.randn(1, 4, 6, 5)
    buffer = io.BytesIO()
    torch.onnx.export(layer, (x,), buffer, dynamo=False)
    session = onnxruntime.InferenceSession(buffer.getvalue())
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), layer(x).detach(), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# torchvision's keyword names, mmcv's names and semantics, mmcv checkpoints
# ---------------------------------------------------------------------------------------------


def test_torchvision_keyword_names():
    """torchvision.ops.deform_conv2d(input, offset, weight, bias=None, stride=(1, 1), padding=(0, 0),
    dilation=(1, 1), mask=None) and DeformConv2d.forward(input, offset, mask=None), called by keyword."""
    assert list(inspect.signature(deform_conv2d).parameters)[:8] == [
        "input", "offset", "weight", "bias", "stride", "padding", "dilation", "mask"]
    assert list(inspect.signature(DeformConv2d.forward).parameters) == ["self", "input", "offset", "mask"]
    x, weight = torch.randn(2, 4, 6, 5), torch.randn(3, 4, 3, 3)
    offset, mask = torch.randn(2, 18, 3, 1) * 2, torch.rand(2, 9, 3, 1)
    expected = deform_conv2d(x, offset, weight, None, (2, 1), (1, 0), (1, 2), mask, impl="reference")
    got = deform_conv2d(input=x, offset=offset, weight=weight, bias=None, stride=(2, 1), padding=(1, 0),
                        dilation=(1, 2), mask=mask)
    torch.testing.assert_close(got, expected)
    layer = DeformConv2d(4, 3, 3, stride=(2, 1), padding=(1, 0), dilation=(1, 2), bias=False)
    with torch.no_grad():
        layer.weight.copy_(weight)
    torch.testing.assert_close(layer(input=x, offset=offset, mask=mask), expected)
    torch.testing.assert_close(layer(x, offset=offset, mask=mask), expected)


def test_modulated_deform_conv2d_takes_offsets_and_mask_like_mmcv():
    """mmcv's ModulatedDeformConv2d.forward(x, offset, mask): no offset predictor of its own."""
    layer = ModulatedDeformConv2d(4, 6, 3, stride=2, padding=1, groups=2, deform_groups=2)
    assert sorted(layer.state_dict()) == ["bias", "weight"]
    assert list(inspect.signature(ModulatedDeformConv2d.forward).parameters) == ["self", "x", "offset", "mask"]
    assert layer.bias.abs().sum() == 0 and layer.weight.abs().max() <= 1 / (4 * 9) ** 0.5
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 4, 9, 8)
    offset, mask = torch.randn(2, 36, 5, 4), torch.rand(2, 18, 5, 4)
    expected = deform_conv2d(x, offset, layer.weight, layer.bias, 2, 1, 1, mask=mask, impl="reference")
    torch.testing.assert_close(layer(x, offset, mask), expected)
    with pytest.raises(ValueError, match=r"offset must have 2 \* deform_groups \* kh \* kw = 36 channels"):
        layer(x, offset[:, :18], mask[:, :9])
    with pytest.raises(TypeError, match="mask must be a torch.Tensor"):
        layer(x, offset, None)


def test_deform_conv2d_pack_predicts_offsets_like_mmcv():
    """mmcv's DeformConv2dPack: conv_offset (2 * deform_groups * kh * kw channels, zero at init), no mask."""
    layer = DeformConv2dPack(4, 6, 3, padding=1, deform_groups=2)
    assert sorted(layer.state_dict()) == ["conv_offset.bias", "conv_offset.weight", "weight"]
    assert layer.conv_offset.weight.shape == (2 * 2 * 9, 4, 3, 3)
    x = torch.randn(2, 4, 5, 6)
    torch.testing.assert_close(layer(x), F.conv2d(x, layer.weight, None, 1, 1))  # zero offsets at init
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, 0.3)
    expected = deform_conv2d(x, layer.conv_offset(x), layer.weight, None, 1, 1, 1, impl="reference")
    torch.testing.assert_close(layer(x), expected)


def _mmcv_layout_state_dict(generator, out_channels, in_channels, deform_channels, bias):
    """A state dict with mmcv's keys, shapes and dtypes, written out by hand (what mmcv's
    ``ModulatedDeformConv2dPack`` / ``DeformConv2dPack`` / ``ModulatedDeformConv2d`` save)."""
    state = {"weight": torch.randn(out_channels, in_channels, 3, 3, generator=generator)}
    if bias:
        state["bias"] = torch.randn(out_channels, generator=generator)
    if deform_channels:
        state["conv_offset.weight"] = torch.randn(deform_channels, in_channels, 3, 3, generator=generator) * 0.1
        state["conv_offset.bias"] = torch.randn(deform_channels, generator=generator)
    return state


@pytest.mark.parametrize("cls,deform_channels,bias", [
    pytest.param(ModulatedDeformConv2dPack, 3 * 9, True, id="ModulatedDeformConv2dPack"),
    pytest.param(ModulatedDeformConv2d, 0, True, id="ModulatedDeformConv2d"),
    pytest.param(DeformConv2dPack, 2 * 9, False, id="DeformConv2dPack"),
])
def test_loads_an_mmcv_layout_state_dict(cls, deform_channels, bias):
    """Strict loading of mmcv's keys; the loaded layer computes the mmcv formula with those tensors."""
    state = _mmcv_layout_state_dict(torch.Generator().manual_seed(0), 5, 4, deform_channels, bias)
    layer = cls(4, 5, 3, padding=1, bias=bias)
    layer.load_state_dict(state, strict=True)
    x = torch.randn(2, 4, 6, 7)
    if deform_channels:
        predicted = F.conv2d(x, state["conv_offset.weight"], state["conv_offset.bias"], padding=1)
        offset, mask = predicted[:, :18], (predicted[:, 18:].sigmoid() if deform_channels == 27 else None)
        out = layer(x)
    else:
        offset, mask = torch.randn(2, 18, 6, 7), torch.rand(2, 9, 6, 7)
        out = layer(x, offset, mask)
    expected = deform_conv2d(x, offset, state["weight"], state.get("bias"), 1, 1, 1, mask=mask, impl="reference")
    torch.testing.assert_close(out, expected)


def test_resnet50_dcnv2_uses_the_pack_and_keeps_its_keys():
    from convzoo.models.resnet import Bottleneck

    block = Bottleneck(16, 4, dcn=True)
    assert isinstance(block.conv2, ModulatedDeformConv2dPack)
    assert {"conv2.weight", "conv2.conv_offset.weight", "conv2.conv_offset.bias"} <= set(block.state_dict())
