"""Tests of convzoo.layers.DeformConv2d and ModulatedDeformConv2d."""
import pytest
import torch
import torch.nn.functional as F

from convzoo.layers import DeformConv2d, ModulatedDeformConv2d
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
    layer = ModulatedDeformConv2d(4, 8, (3, 1), stride=2, dilation=2, deform_groups=2)
    assert layer.extra_repr() == "4, 8, kernel_size=(3, 1), stride=(2, 2), dilation=(2, 2), deform_groups=2"


def test_modulated_layer_at_init_is_half_a_plain_conv_plus_bias():
    layer = ModulatedDeformConv2d(4, 6, 3, stride=2, padding=1, groups=2, deform_groups=2)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 4, 9, 8)
    expected = 0.5 * F.conv2d(x, layer.weight, None, 2, 1, groups=2) + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected)


def test_modulated_layer_init_and_parameter_names_match_mmcv():
    layer = ModulatedDeformConv2d(8, 16, 3, padding=1, deform_groups=2)
    assert sorted(layer.state_dict()) == ["bias", "conv_offset.bias", "conv_offset.weight", "weight"]
    assert layer.conv_offset.weight.shape == (3 * 2 * 9, 8, 3, 3)
    assert layer.conv_offset.weight.abs().sum() == 0 and layer.conv_offset.bias.abs().sum() == 0
    assert layer.bias.abs().sum() == 0
    bound = 1 / (8 * 9) ** 0.5  # mmcv: n = in_channels * kh * kw
    assert layer.weight.abs().max() <= bound


def test_modulated_layer_splits_offsets_and_mask_in_mmcv_order():
    """mmcv: o1, o2, mask = chunk(conv_offset(x), 3); offset = cat(o1, o2); mask = sigmoid(mask)."""
    layer = ModulatedDeformConv2d(4, 5, (2, 3), padding=(1, 0), deform_groups=2)
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, 0.3)
        layer.conv_offset.bias.normal_()
    x = torch.randn(2, 4, 6, 7)
    predicted = layer.conv_offset(x)
    o1, o2, mask_logits = torch.chunk(predicted, 3, dim=1)
    offset = torch.cat((o1, o2), dim=1)
    expected = deform_conv2d(x, offset, layer.weight, layer.bias, 1, (1, 0), 1, mask=mask_logits.sigmoid(), impl="reference")
    torch.testing.assert_close(layer(x), expected)


def test_modulated_layer_loads_an_mmcv_style_state_dict_and_trains():
    source = ModulatedDeformConv2d(3, 4, 3, padding=1)
    with torch.no_grad():
        for p in source.parameters():
            p.normal_(0, 0.2)
    checkpoint = {k: v.clone() for k, v in source.state_dict().items()}
    target = ModulatedDeformConv2d(3, 4, 3, padding=1)
    target.load_state_dict(checkpoint, strict=True)
    x = torch.randn(1, 3, 5, 5)
    torch.testing.assert_close(target(x), source(x))
    fresh = ModulatedDeformConv2d(3, 4, 3, padding=1)
    fresh(torch.randn(2, 3, 5, 5)).square().sum().backward()
    assert fresh.conv_offset.weight.grad.abs().sum() > 0
    assert fresh.weight.grad.abs().sum() > 0


def test_modulated_layer_device_dtype_and_bad_deform_groups():
    layer = ModulatedDeformConv2d(4, 4, 3, padding=1, dtype=torch.float64)
    assert layer.weight.dtype == layer.conv_offset.weight.dtype == torch.float64
    assert layer(torch.randn(1, 4, 4, 4, dtype=torch.float64)).dtype == torch.float64
    with pytest.raises(ValueError, match=r"deform_groups \(3\) must be >= 1 and divide in_channels \(4\)"):
        ModulatedDeformConv2d(4, 4, 3, deform_groups=3)


@pytest.mark.filterwarnings("ignore")
def test_reference_impl_exports_to_onnx():
    import io

    import onnxruntime
    layer = ModulatedDeformConv2d(4, 4, 3, padding=1).eval()
    with torch.no_grad():
        layer.conv_offset.weight.normal_(0, 0.2)
    layer.impl = "reference"
    x = torch.randn(1, 4, 6, 5)
    buffer = io.BytesIO()
    torch.onnx.export(layer, (x,), buffer, dynamo=False)
    session = onnxruntime.InferenceSession(buffer.getvalue())
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), layer(x).detach(), rtol=1e-5, atol=1e-5)
