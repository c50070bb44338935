"""Structural re-parameterization: DepthwiseConv2d, fuse_conv_bn, ConvNormAct, ReparamLargeKernelConv, reparameterize."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

import convzoo
from convzoo.layers import ReparamLargeKernelConv, fuse_conv_bn, reparameterize
from convzoo.layers.reparam import ConvNormAct, DepthwiseConv2d, PointwiseConv2d, conv_norm_act, fuse_bn_pointwise_conv
from convzoo.layers import is_reparameterized


def randomize_bn(module: nn.Module) -> None:
    """Give every BatchNorm non-trivial affine parameters and running statistics."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)


def assert_rel_close(actual, expected, rtol=1e-5):
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max error {err.item():.3g} > {rtol} * {scale.item():.3g}"


def naive_dwconv(x, weight, stride, padding, dilation):
    """Depthwise conv by loops over output pixels and taps, from the definition (tiny sizes only)."""
    n, c, h, w = x.shape
    k = weight.shape[-1]
    h_out = (h + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    w_out = (w + 2 * padding - dilation * (k - 1) - 1) // stride + 1
    out = torch.zeros(n, c, h_out, w_out, dtype=x.dtype)
    for i in range(h_out):
        for j in range(w_out):
            for a in range(k):
                for b in range(k):
                    y = i * stride - padding + a * dilation
                    z = j * stride - padding + b * dilation
                    if 0 <= y < h and 0 <= z < w:
                        out[:, :, i, j] += x[:, :, y, z] * weight[:, 0, a, b]
    return out


# ----------------------------------------------------------------------------- DepthwiseConv2d


def test_depthwise_conv_matches_grouped_conv2d():
    conv = DepthwiseConv2d(6, 5, stride=2, dilation=2)
    x = torch.randn(2, 6, 11, 9)
    assert conv.padding == (4, 4)
    expected = F.conv2d(x, conv.weight, conv.bias, 2, 4, 2, groups=6)
    torch.testing.assert_close(conv(x), expected)


def test_depthwise_conv_extra_repr_and_impl():
    conv = DepthwiseConv2d(4, 3, bias=False)
    assert "impl='auto'" in repr(conv)
    conv.impl = "reference"
    assert "impl='reference'" in repr(conv)
    assert conv(torch.randn(1, 4, 5, 5)).shape == (1, 4, 5, 5)


# ----------------------------------------------------------------------------- fuse_conv_bn


@pytest.mark.parametrize(
    "conv",
    [
        pytest.param(lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, bias=False), id="conv3x3-s2-nobias"),
        pytest.param(lambda: nn.Conv2d(4, 8, 1, bias=True), id="conv1x1-bias"),
        pytest.param(lambda: nn.Conv2d(4, 8, 3, padding=1, groups=2), id="grouped"),
        pytest.param(lambda: DepthwiseConv2d(4, 7, bias=False), id="depthwise"),
    ],
)
def test_fuse_conv_bn_equals_conv_then_bn(conv):
    conv = conv()
    bn = nn.BatchNorm2d(conv.out_channels)
    randomize_bn(bn)
    conv.eval(), bn.eval()
    x = torch.randn(2, 4, 9, 8)
    fused = fuse_conv_bn(conv, bn)
    assert type(fused) is type(conv) and fused.bias is not None
    assert_rel_close(fused(x), bn(conv(x)))


def test_fuse_conv_bn_keeps_impl_of_depthwise():
    conv = DepthwiseConv2d(3, 3, bias=False)
    conv.impl = "reference"
    assert fuse_conv_bn(conv, nn.BatchNorm2d(3)).impl == "reference"


def test_fuse_conv_bn_errors():
    with pytest.raises(TypeError, match="expects \\(nn.Conv2d, nn.BatchNorm2d\\), got \\(Linear, BatchNorm2d\\)"):
        fuse_conv_bn(nn.Linear(2, 2), nn.BatchNorm2d(2))
    with pytest.raises(ValueError, match="bn.num_features \\(5\\) must equal conv.out_channels \\(4\\)"):
        fuse_conv_bn(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(5))
    with pytest.raises(ValueError, match="running statistics"):
        fuse_conv_bn(nn.Conv2d(2, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))


@pytest.mark.parametrize(
    "conv",
    [
        pytest.param(lambda: nn.Conv2d(4, 6, 1, bias=False), id="conv1x1"),
        pytest.param(lambda: nn.Conv2d(4, 6, 1, stride=2), id="conv1x1-s2-bias"),
        pytest.param(lambda: PointwiseConv2d(4, 6), id="pointwise"),
    ],
)
def test_fuse_bn_pointwise_conv_equals_bn_then_conv(conv):
    """A BatchNorm *before* a 1x1 conv (RepLKNet's pre-BN), in float64, both layouts."""
    conv = conv().double()
    bn = nn.BatchNorm2d(4).double()
    randomize_bn(bn)
    conv.eval(), bn.eval()
    fused = fuse_bn_pointwise_conv(bn, conv)
    assert type(fused) is type(conv) and fused.bias is not None and fused is not conv
    for memory_format in (torch.contiguous_format, torch.channels_last):
        x = torch.randn(2, 4, 7, 6, dtype=torch.float64).contiguous(memory_format=memory_format)
        torch.testing.assert_close(fused(x), conv(bn(x)), rtol=1e-12, atol=1e-12)


def test_fuse_bn_pointwise_conv_errors():
    with pytest.raises(TypeError, match="expects \\(nn.BatchNorm2d, nn.Conv2d\\), got \\(Linear, Conv2d\\)"):
        fuse_bn_pointwise_conv(nn.Linear(2, 2), nn.Conv2d(2, 4, 1))
    for conv in (nn.Conv2d(2, 4, 3), nn.Conv2d(2, 4, 1, padding=1), nn.Conv2d(2, 4, 1, groups=2)):
        with pytest.raises(ValueError, match="must be a 1x1 conv without padding and with one group"):
            fuse_bn_pointwise_conv(nn.BatchNorm2d(2), conv)
    with pytest.raises(ValueError, match="bn.num_features \\(5\\) must equal conv.in_channels \\(2\\)"):
        fuse_bn_pointwise_conv(nn.BatchNorm2d(5), nn.Conv2d(2, 4, 1))
    with pytest.raises(ValueError, match="running statistics"):
        fuse_bn_pointwise_conv(nn.BatchNorm2d(2, track_running_stats=False), nn.Conv2d(2, 4, 1))


def test_conv_norm_act_reparameterize():
    block = conv_norm_act(3, 5, 3, stride=2, act=True)
    assert isinstance(block.conv, nn.Conv2d) and isinstance(block.nonlinear, nn.ReLU)
    randomize_bn(block)
    block.eval()
    x = torch.randn(2, 3, 7, 7)
    expected = block(x)
    block.reparameterize()
    assert isinstance(block.bn, nn.Identity) and block.conv.bias is not None
    assert_rel_close(block(x), expected)
    block.reparameterize()  # a second call leaves it as it is
    assert_rel_close(block(x), expected)
    assert isinstance(conv_norm_act(4, 4, 3, groups=4).conv, DepthwiseConv2d)


# ----------------------------------------------------------------------------- ReparamLargeKernelConv


def test_state_dict_names_follow_replknet_pytorch():
    layer = ReparamLargeKernelConv(4, 7, small_kernels=(3,))
    keys = set(layer.state_dict())
    assert {"lkb_origin.conv.weight", "lkb_origin.bn.weight", "lkb_origin.bn.running_var",
            "small_convs.0.conv.weight", "small_convs.0.bn.bias"} <= keys
    assert not any(k.endswith("conv.bias") for k in keys)
    layer.reparameterize()
    assert set(layer.state_dict()) == {"lkb_reparam.weight", "lkb_reparam.bias"}
    assert layer.lkb_reparam.weight.shape == (4, 1, 7, 7)
    assert not hasattr(layer, "lkb_origin") and not hasattr(layer, "small_convs")


@given(
    channels=st.integers(1, 5),
    kernel=st.sampled_from([1, 3, 5, 7, 9, 11]),
    branches=st.lists(st.tuples(st.sampled_from([1, 3, 5]), st.integers(1, 3)), max_size=3),
    stride=st.integers(1, 3),
    height=st.integers(1, 13),
    width=st.integers(1, 13),
)
def test_reparameterize_keeps_eval_outputs(channels, kernel, branches, stride, height, width):
    branches = [(k, d) for k, d in branches if d * (k - 1) + 1 <= kernel]
    layer = ReparamLargeKernelConv(
        channels, kernel, small_kernels=[k for k, _ in branches], stride=stride,
        small_dilations=[d for _, d in branches], dtype=torch.float64,
    )
    with torch.no_grad():
        for p in layer.parameters():
            p.normal_()
    randomize_bn(layer)
    layer.eval()
    x = torch.randn(2, channels, height, width, dtype=torch.float64)
    expected = layer(x)
    params_before = sum(p.numel() for p in layer.parameters())
    layer.reparameterize()
    assert sum(p.numel() for p in layer.parameters()) <= params_before
    actual = layer(x)
    assert actual.shape == expected.shape == (2, channels, (height - 1) // stride + 1, (width - 1) // stride + 1)
    assert_rel_close(actual, expected)


def test_reparameterize_float32_large_kernel_within_1e5():
    layer = ReparamLargeKernelConv(8, 31, small_kernels=(5, 3), small_dilations=(1, 3))
    randomize_bn(layer)
    layer.eval()
    x = torch.randn(1, 8, 20, 20)
    expected = layer(x)
    layer.reparameterize()
    assert_rel_close(layer(x), expected)


def test_dilated_branch_equals_naive_sparse_kernel():
    """A dilated 3x3 branch is a 5x5 (d=2) kernel whose taps sit on the even positions."""
    layer = ReparamLargeKernelConv(2, 5, small_kernels=(3,), small_dilations=(2,), stride=2, dtype=torch.float64)
    layer.eval()  # fresh BN: running mean 0, var 1, weight 1, bias 0
    with torch.no_grad():
        layer.lkb_origin.conv.weight.zero_()
        layer.small_convs[0].conv.weight.normal_()
    x = torch.randn(1, 2, 7, 6, dtype=torch.float64)
    small = layer.small_convs[0].conv.weight
    expected = naive_dwconv(x, small, stride=2, padding=2, dilation=2) / (1 + 1e-5) ** 0.5
    torch.testing.assert_close(layer(x), expected)
    layer.reparameterize()
    merged = layer.lkb_reparam.weight
    torch.testing.assert_close(merged[:, :, ::2, ::2], small / (1 + 1e-5) ** 0.5)
    assert merged[:, :, 1::2, :].abs().max() == 0 and merged[:, :, :, 1::2].abs().max() == 0
    torch.testing.assert_close(naive_dwconv(x, merged, stride=2, padding=2, dilation=1), expected)


def test_reset_parameters_restores_fresh_weights_and_statistics():
    layer = ReparamLargeKernelConv(3, 5, small_kernels=(3,))
    randomize_bn(layer)
    with torch.no_grad():
        layer.lkb_origin.conv.weight.fill_(7.0)
    layer.reset_parameters()
    assert layer.lkb_origin.conv.weight.abs().max() < 7.0
    for bn in (layer.lkb_origin.bn, layer.small_convs[0].bn):
        assert torch.equal(bn.running_var, torch.ones(3)) and torch.equal(bn.weight, torch.ones(3))


def test_no_small_branch_and_training_gradients():
    layer = ReparamLargeKernelConv(3, 5, small_kernels=())
    assert len(layer.small_convs) == 0
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    layer(x).square().sum().backward()
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())


def test_channels_last_batch_zero_and_float64():
    layer = ReparamLargeKernelConv(4, 7, small_kernels=(3,), dtype=torch.float64).eval()
    x = torch.randn(2, 4, 9, 9, dtype=torch.float64)
    torch.testing.assert_close(layer(x.to(memory_format=torch.channels_last)), layer(x))
    assert layer(x[:0]).shape == (0, 4, 9, 9)
    assert layer.lkb_origin.conv.weight.dtype == torch.float64


def test_impl_reaches_every_branch_and_extra_repr():
    layer = ReparamLargeKernelConv(4, 9, small_kernels=(5, 3), small_dilations=(1, 2))
    assert layer.impl == "auto"
    layer.impl = "reference"
    assert all(m.impl == "reference" for m in layer.modules() if isinstance(m, DepthwiseConv2d))
    assert layer.extra_repr() == "4, kernel_size=9, small_kernels=(5, 3), stride=1, small_dilations=(1, 2)"
    assert "(lkb_origin): ConvNormAct" in repr(layer)
    layer.reparameterize()
    assert layer.lkb_reparam.impl == "reference"
    assert "reparameterized=True" in layer.extra_repr()


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        (dict(channels=4, kernel_size=6), ValueError, "kernel_size must be a positive odd int.*got 6"),
        (dict(channels=4, kernel_size=7, small_kernels=(4,)), ValueError, "small_kernels must be a positive odd int.*got 4"),
        (dict(channels=4, kernel_size=5, small_kernels=(7,)), ValueError, "small kernel 7 with dilation 1 spans 7 pixels, larger than kernel_size 5"),
        (dict(channels=4, kernel_size=7, small_kernels=(3,), small_dilations=(4,)), ValueError, "spans 9 pixels"),
        (dict(channels=4, kernel_size=7, small_kernels=(3,), small_dilations=(1, 1)), ValueError, "one entry per small kernel"),
        (dict(channels=4, kernel_size=7, small_kernels=(3,), small_dilations=(0,)), ValueError, "small_dilations must hold positive ints"),
        (dict(channels=0, kernel_size=7), ValueError, "channels must be a positive int, got 0"),
        (dict(channels=4, kernel_size=7, stride=0), ValueError, "stride must be a positive int, got 0"),
        (dict(channels=4, kernel_size=7.0), TypeError, "kernel_size must be an int, got 7.0"),
    ],
)
def test_validation_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        ReparamLargeKernelConv(**kwargs)


# ----------------------------------------------------------------------------- reparameterize (walker)


def test_reparameterize_walks_a_model():
    model = nn.Sequential(
        conv_norm_act(3, 6, 3, act=True),
        nn.Sequential(ReparamLargeKernelConv(6, 9, small_kernels=(5, 3))),
        conv_norm_act(6, 4, 1),
    )
    randomize_bn(model)
    model.train()
    x = torch.randn(2, 3, 12, 10)
    expected = model.eval()(x)
    model.train()
    out = convzoo.reparameterize(model)
    assert out is model and not model.training and is_reparameterized(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert model[1][0].lkb_reparam is not None
    assert_rel_close(model(x), expected)
    assert reparameterize is convzoo.reparameterize


def test_reparameterize_leaves_children_of_a_handled_module():
    calls = []

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = ConvNormAct(nn.Conv2d(2, 2, 1, bias=False), nn.BatchNorm2d(2))

        def reparameterize(self):
            calls.append("outer")

    model = nn.Sequential(Outer())
    reparameterize(model)
    assert calls == ["outer"]
    assert isinstance(model[0].inner.bn, nn.BatchNorm2d)


def test_reparameterize_a_single_layer_and_twice():
    """The walker on the layer itself (it declares ``is_reparameterized`` read-only)."""
    layer = ReparamLargeKernelConv(8, 7, (3,))
    randomize_bn(layer)
    layer.eval()
    x = torch.randn(2, 8, 9, 9)
    expected = layer(x)
    assert not is_reparameterized(layer) and not layer.is_reparameterized
    assert convzoo.reparameterize(layer) is layer
    assert is_reparameterized(layer) and layer.is_reparameterized
    merged = layer.lkb_reparam
    convzoo.reparameterize(layer)
    assert layer.lkb_reparam is merged
    assert_rel_close(layer(x), expected)


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: conv_norm_act(4, 6, 3, act=True), id="conv_norm_act"),
        pytest.param(lambda: conv_norm_act(6, 6, 5, groups=6), id="depthwise_conv_norm"),
        pytest.param(lambda: ReparamLargeKernelConv(6, 9, small_kernels=(5, 3), small_dilations=(1, 2)), id="large_kernel"),
    ],
)
def test_reparameterize_every_layer_on_its_own(make):
    layer = make()
    randomize_bn(layer)
    layer.eval()
    x = torch.randn(2, 6 if isinstance(layer, ReparamLargeKernelConv) or layer.conv.in_channels == 6 else 4, 11, 10)
    expected = layer(x)
    convzoo.reparameterize(layer)
    assert is_reparameterized(layer)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in layer.modules())
    assert_rel_close(layer(x), expected)


# ----------------------------------------------------------------------------------------------
# PointwiseConv2d: 1x1 conv, channels_last inputs as one matrix product
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "channels_last"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_pointwise_conv_equals_a_1x1_conv_with_gradients(memory_format, bias):
    conv = PointwiseConv2d(3, 4, bias=bias).double()
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64).contiguous(memory_format=memory_format).requires_grad_()
    out = conv(x)
    torch.testing.assert_close(out, F.conv2d(x, conv.weight, conv.bias))
    assert out.is_contiguous(memory_format=memory_format)  # the caller's layout comes back
    params = {name: p.detach().clone().requires_grad_() for name, p in conv.named_parameters()}
    names = list(params)
    torch.autograd.gradcheck(
        lambda x, *values: torch.func.functional_call(conv, dict(zip(names, values)), (x,)), (x, *params.values()))


def test_pointwise_conv_keeps_its_class_when_folded_and_is_what_conv_norm_act_builds():
    block = conv_norm_act(8, 12, 1).eval()
    assert type(block.conv) is PointwiseConv2d and set(block.conv.state_dict()) == {"weight"}
    with torch.no_grad():
        block.bn.running_mean.uniform_(-1, 1)
        block.bn.running_var.uniform_(0.5, 2)
    x = torch.randn(2, 8, 6, 6).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        expected = block(x)
        block.reparameterize()
        torch.testing.assert_close(block(x), expected, rtol=1e-5, atol=1e-5)
    assert type(block.conv) is PointwiseConv2d and block.conv.bias is not None
    assert type(conv_norm_act(8, 12, 1, stride=2).conv) is nn.Conv2d  # strided 1x1: a plain conv


def test_pointwise_conv_eager_inference_packs_the_weight_once_and_repacks_when_it_changes():
    """Eager float32 inference on a channels_last input runs oneDNN's conv with the weight packed
    once per input shape; an in-place change of the weight (a load, an optimizer step) re-packs."""
    import copy
    import io
    import pickle

    torch.manual_seed(0)
    conv = PointwiseConv2d(16, 24).eval()
    x = torch.randn(2, 16, 5, 7).contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        out = conv(x)
        torch.testing.assert_close(out, F.conv2d(x, conv.weight, conv.bias), rtol=1e-5, atol=1e-5)
        assert out.is_contiguous(memory_format=torch.channels_last)
        packed = conv._packed[1]
        conv(x)
        assert conv._packed[1] is packed  # reused
        conv.load_state_dict({"weight": torch.randn(24, 16, 1, 1), "bias": torch.randn(24)})
        torch.testing.assert_close(conv(x), F.conv2d(x, conv.weight, conv.bias), rtol=1e-5, atol=1e-5)
        assert conv._packed[1] is not packed
        other = torch.randn(1, 16, 3, 3).contiguous(memory_format=torch.channels_last)  # another shape
        torch.testing.assert_close(conv(other), F.conv2d(other, conv.weight, conv.bias), rtol=1e-5, atol=1e-5)
    copied = copy.deepcopy(conv)  # the packed oneDNN tensor is neither copied nor pickled
    assert copied._packed is None and conv._packed is not None
    buffer = io.BytesIO()
    torch.save(conv, buffer)
    assert pickle.loads(pickle.dumps(conv))._packed is None
    with torch.no_grad():
        torch.testing.assert_close(copied(x), conv(x))
    y = conv(x.requires_grad_())  # with gradients: the matrix product, differentiable
    y.sum().backward()
    assert x.grad is not None and conv.weight.grad is not None


def test_pointwise_conv_stays_a_conv_in_traced_graphs():
    """torch.compile/torch.export see the conv (inductor's freezing pre-packs its weight)."""
    x = torch.randn(1, 4, 3, 3).contiguous(memory_format=torch.channels_last)
    program = torch.export.export(PointwiseConv2d(4, 6).eval(), (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert targets == {"aten.conv2d.default"}, targets
