"""Tests of convzoo.layers.DCNv3 (InternImage's DCNv3 module, plus softmax=False for DCNv4)."""
import pytest
import torch
import torch.nn.functional as F

from convzoo.layers import DCNv3

# Parameter names and shapes of InternImage's DCNv3(channels=16, group=2, center_feature_scale=True), LN norm.
INTERNIMAGE_KEYS = {
    "center_feature_scale_proj_weight": (2, 16),
    "center_feature_scale_proj_bias": (2,),
    "dw_conv.0.weight": (16, 1, 3, 3),
    "dw_conv.0.bias": (16,),
    "dw_conv.1.1.weight": (16,),
    "dw_conv.1.1.bias": (16,),
    "offset.weight": (36, 16),
    "offset.bias": (36,),
    "mask.weight": (18, 16),
    "mask.bias": (18,),
    "input_proj.weight": (16, 16),
    "input_proj.bias": (16,),
    "output_proj.weight": (16, 16),
    "output_proj.bias": (16,),
}


def _avg3x3(t, stride=1):
    """3x3 mean with zero padding (count_include_pad) of NHWC ``t``."""
    return F.avg_pool2d(t.permute(0, 3, 1, 2), 3, stride, 1, count_include_pad=True).permute(0, 2, 3, 1)


def test_parameter_names_and_shapes_match_internimage():
    layer = DCNv3(channels=16, group=2, center_feature_scale=True)
    assert {k: tuple(v.shape) for k, v in layer.state_dict().items()} == INTERNIMAGE_KEYS


def test_batchnorm_variant_keys():
    keys = set(DCNv3(channels=8, group=2, norm_layer="BN", act_layer="ReLU").state_dict())
    assert {"dw_conv.1.0.weight", "dw_conv.1.0.running_mean", "dw_conv.1.0.num_batches_tracked"} <= keys


def test_initialisation_samples_the_regular_grid():
    """Zero offsets and uniform softmax mask at init: output_proj(3x3 mean of input_proj(x))."""
    torch.manual_seed(0)
    layer = DCNv3(channels=8, group=2).double()
    x = torch.randn(2, 5, 7, 8, dtype=torch.float64)
    expected = layer.output_proj(_avg3x3(layer.input_proj(x)))
    torch.testing.assert_close(layer(x), expected)
    assert layer.offset.weight.abs().sum() == 0 and layer.mask.bias.abs().sum() == 0


def test_softmax_false_uses_the_mask_as_is():
    layer = DCNv3(channels=8, group=2, softmax=False).double()
    x = torch.randn(1, 4, 4, 8, dtype=torch.float64)
    # Zero mask logits used as is: the sampled features are zero, only output_proj's bias remains.
    nn_bias = torch.randn(8, dtype=torch.float64)
    with torch.no_grad():
        layer.output_proj.bias.copy_(nn_bias)
        assert torch.allclose(layer(x), nn_bias.expand(1, 4, 4, 8))
        layer.mask.bias.fill_(1.0)  # weight 1 on every point: a 3x3 sum instead of a mean
        expected = layer.output_proj(9 * _avg3x3(layer.input_proj(x)))
    torch.testing.assert_close(layer(x), expected)


def test_center_feature_scale_blends_with_the_projection():
    layer = DCNv3(channels=8, group=2, center_feature_scale=True).double()
    x = torch.randn(2, 4, 5, 8, dtype=torch.float64)
    projected = layer.input_proj(x)
    # Zero gate parameters: sigmoid(0) = 1/2 for every group.
    expected = layer.output_proj(0.5 * _avg3x3(projected) + 0.5 * projected)
    torch.testing.assert_close(layer(x), expected)
    layer(x).sum().backward()
    assert layer.center_feature_scale_proj_weight.grad is not None


def test_remove_center():
    layer = DCNv3(channels=8, group=2, remove_center=True).double()
    assert layer.offset.out_features == 2 * 8 * 2 and layer.mask.out_features == 2 * 8
    x = torch.randn(1, 5, 5, 8, dtype=torch.float64)
    projected = layer.input_proj(x)
    expected = layer.output_proj((9 * _avg3x3(projected) - projected) / 8)
    torch.testing.assert_close(layer(x), expected)
    with pytest.raises(ValueError, match="remove_center needs an odd kernel_size, got 4"):
        DCNv3(channels=8, group=2, kernel_size=4, remove_center=True)


def test_stride_two_reads_offsets_at_window_centres():
    layer = DCNv3(channels=8, group=2, stride=2, center_feature_scale=True).double()
    x = torch.randn(2, 7, 6, 8, dtype=torch.float64)
    out = layer(x)
    assert out.shape == (2, 4, 3, 8)
    projected = layer.input_proj(x)
    expected = layer.output_proj(0.5 * _avg3x3(projected, stride=2) + 0.5 * projected[:, ::2, ::2])
    torch.testing.assert_close(out, expected)
    message = r"with stride > 1, pad must be <= dilation \* \(kernel_size - 1\) // 2 = 1, got pad=2"
    with pytest.raises(ValueError, match=message):
        DCNv3(channels=8, group=2, stride=2, pad=2)


def test_gradients_reach_every_parameter_after_perturbation():
    torch.manual_seed(0)
    layer = DCNv3(channels=8, group=2)
    with torch.no_grad():
        layer.offset.weight.normal_(0, 0.5)
        layer.mask.weight.normal_(0, 0.5)
    x = torch.randn(2, 6, 5, 8, requires_grad=True)
    layer(x).square().sum().backward()
    for name, param in layer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


def test_impl_attribute_is_passed_to_the_op():
    torch.manual_seed(0)
    layer = DCNv3(channels=8, group=2)
    with torch.no_grad():
        layer.offset.weight.normal_(0, 1.0)
    x = torch.randn(1, 5, 6, 8)
    assert layer.impl == "auto"
    out_auto = layer(x)
    layer.impl = "reference"
    torch.testing.assert_close(layer(x), out_auto)
    layer.impl = "bogus"
    with pytest.raises(ValueError, match="impl must be one of"):
        layer(x)


def test_device_dtype_and_reset_parameters():
    layer = DCNv3(channels=8, group=2, center_feature_scale=True, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in layer.parameters())
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(3.0)
    layer.reset_parameters()
    assert layer.offset.weight.abs().sum() == 0 and layer.mask.weight.abs().sum() == 0
    assert layer.input_proj.bias.abs().sum() == 0 and layer.center_feature_scale_proj_weight.abs().sum() == 0
    assert layer.input_proj.weight.abs().max() < 1  # xavier_uniform bound for 8x8 is sqrt(6/16)
    assert layer.dw_conv[1][1].weight.eq(1).all()


def test_extra_repr():
    layer = DCNv3(channels=8, kernel_size=3, group=2, offset_scale=0.5, remove_center=True, softmax=False)
    assert layer.extra_repr() == ("channels=8, kernel_size=3, stride=1, pad=1, dilation=1, group=2, offset_scale=0.5, "
                                  "center_feature_scale=False, remove_center=True, softmax=False")
    assert "DCNv3(\n  channels=8" in repr(layer)


@pytest.mark.parametrize("kwargs, match", [
    (dict(channels=10, group=4), "channels must be divisible by group, got channels=10 and group=4"),
    (dict(channels=8, group=2, norm_layer="GN"), "norm_layer must be 'LN' or 'BN', got 'GN'"),
    (dict(channels=8, group=2, act_layer="Tanh"), "act_layer must be 'GELU', 'ReLU' or 'SiLU', got 'Tanh'"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DCNv3(**kwargs)


def test_bad_input_shape():
    with pytest.raises(ValueError, match=r"input must have shape \(N, H, W, 8\), got \(1, 8, 4, 4\)"):
        DCNv3(channels=8, group=2)(torch.randn(1, 8, 4, 4))


def test_batch_size_zero_and_non_contiguous_input():
    layer = DCNv3(channels=8, group=2)
    assert layer(torch.randn(0, 4, 4, 8)).shape == (0, 4, 4, 8)
    x_nchw = torch.randn(2, 8, 5, 6)
    torch.testing.assert_close(layer(x_nchw.permute(0, 2, 3, 1)), layer(x_nchw.permute(0, 2, 3, 1).contiguous()))
