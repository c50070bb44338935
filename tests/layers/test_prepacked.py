"""PackedLinear and PackedConv2d: nn.Linear / nn.Conv2d with pre-packed oneDNN weights in eager float32 CPU inference."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from convzoo.layers.prepacked import PackedConv2d, PackedLinear
from convzoo.layers.reparam import fuse_conv_bn


def _inputs():
    """(name, input) pairs over the layouts the models feed: rows, tokens, NHWC maps, strided views."""
    torch.manual_seed(0)
    return [
        ("rows", torch.randn(7, 24)),
        ("tokens", torch.randn(2, 5, 24)),
        ("nhwc", torch.randn(2, 3, 4, 24)),
        ("nhwc-view-of-nchw", torch.randn(2, 24, 3, 4).permute(0, 2, 3, 1)),
        ("strided-columns", torch.randn(6, 48)[:, ::2]),
        ("vector", torch.randn(24)),
    ]


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_packed_path_equals_the_plain_linear(bias):
    layer = PackedLinear(24, 40, bias=bias).eval()
    with torch.no_grad():
        for name, x in _inputs():
            out = layer(x)
            assert layer._packed is not None, name  # the packed path ran
            torch.testing.assert_close(out, F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5, msg=name)
            assert out.shape == (*x.shape[:-1], 40)
    with torch.inference_mode():  # inference mode takes the packed path too, with the same packed copy
        packed = layer._packed[1]
        x = _inputs()[0][1]
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert layer._packed[1] is packed


def test_packs_once_and_repacks_when_the_weight_changes():
    torch.manual_seed(0)
    layer = PackedLinear(16, 8).eval()
    x = torch.randn(5, 16)
    with torch.no_grad():
        layer(x)
        packed = layer._packed[1]
        layer(torch.randn(3, 2, 16))  # another input shape: the same packed weight
        assert layer._packed[1] is packed
        layer.load_state_dict({"weight": torch.randn(8, 16), "bias": torch.randn(8)})  # an in-place load
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert layer._packed[1] is not packed
        packed = layer._packed[1]
        layer.weight.mul_(2)  # an in-place update, as an optimizer step makes
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)
        assert layer._packed[1] is not packed
        layer.weight.data = torch.randn(8, 16)  # new storage (what .to() does)
        torch.testing.assert_close(layer(x), F.linear(x, layer.weight, layer.bias), rtol=1e-5, atol=1e-5)


def test_packed_copy_is_neither_copied_nor_pickled_and_keys_are_nn_linears():
    layer = PackedLinear(16, 8).eval()
    x = torch.randn(4, 16)
    with torch.no_grad():
        layer(x)
    assert copy.deepcopy(layer)._packed is None and layer._packed is not None
    assert pickle.loads(pickle.dumps(layer))._packed is None
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    plain = nn.Linear(16, 8)
    assert set(layer.state_dict()) == set(plain.state_dict()) == {"weight", "bias"}
    buffer.seek(0)
    plain.load_state_dict(torch.load(buffer))  # an nn.Linear checkpoint and ours are interchangeable
    with torch.no_grad():
        torch.testing.assert_close(plain(x), layer(x), rtol=1e-5, atol=1e-5)


def test_gradients_other_dtypes_and_disabled_onednn_take_the_plain_path(monkeypatch):
    torch.manual_seed(0)
    layer = PackedLinear(6, 4)
    x = torch.randn(3, 6, requires_grad=True)
    layer(x).sum().backward()  # training: F.linear, differentiable
    assert layer._packed is None and x.grad is not None and layer.weight.grad is not None
    double = PackedLinear(6, 4).double()
    xd = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    params = {name: p.detach().clone().requires_grad_() for name, p in double.named_parameters()}
    torch.autograd.gradcheck(lambda x, w, b: torch.func.functional_call(double, {"weight": w, "bias": b}, (x,)),
                             (xd, *params.values()))
    with torch.no_grad():
        double(xd)
        assert double._packed is None  # float64: F.linear
        layer(torch.empty(0, 6))
        assert layer._packed is None  # an empty input: F.linear
        monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)  # oneDNN turned off by the user
        layer(x)
        assert layer._packed is None
        monkeypatch.undo()
        layer(x)
        assert layer._packed is not None


def test_traced_graphs_and_modes_see_a_plain_linear():
    """torch.export/torch.compile trace F.linear (inductor's freezing packs the weight itself), and a
    dispatch mode such as the FLOP counter sees the product."""
    layer = PackedLinear(8, 4).eval()
    x = torch.randn(2, 3, 8)
    program = torch.export.export(layer, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert targets == {"aten.linear.default"}, targets
    compiled = torch.compile(layer, backend="eager", fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), F.linear(x, layer.weight, layer.bias))
        assert layer._packed is None
        with FlopCounterMode(display=False) as counter:
            layer(x)
    assert counter.get_total_flops() == 2 * 6 * 8 * 4


def test_convnext_and_internimage_blocks_run_packed_and_match_the_plain_path(monkeypatch):
    """ConvNeXt's MLP and InternImage's DCNv3 projections and MLP are PackedLinear: eager inference
    packs their weights and gives the plain forward's output."""
    from convzoo.layers import DCNv3
    from convzoo.models.convnext import Mlp
    from convzoo.models.internimage import MLPLayer

    torch.manual_seed(0)
    dcn = DCNv3(channels=16, group=2).eval()
    with torch.no_grad():
        dcn.offset.weight.normal_(0, 0.1)
        dcn.mask.weight.normal_(0, 0.1)
    blocks = [(dcn, torch.randn(1, 5, 6, 16)), (Mlp(16, 32).eval(), torch.randn(2, 3, 3, 16)),
              (MLPLayer(16, 32).eval(), torch.randn(1, 4, 4, 16))]
    for block, x in blocks:
        linears = [m for m in block.modules() if isinstance(m, nn.Linear)]
        assert linears and all(type(m) is PackedLinear for m in linears), type(block).__name__
        with torch.no_grad():
            packed = block(x)
            assert all(m._packed is not None for m in linears)
            monkeypatch.setattr(PackedLinear, "_PACKABLE", False)
            torch.testing.assert_close(packed, block(x), rtol=1e-5, atol=1e-5)
            monkeypatch.undo()


def _channels_last(*shape):
    return torch.randn(*shape).contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("geometry", [
    pytest.param(dict(kernel_size=3, stride=2, padding=1, bias=False), id="3x3-s2"),
    pytest.param(dict(kernel_size=2, stride=2), id="2x2-s2"),
    pytest.param(dict(kernel_size=4, stride=4), id="4x4-s4"),
    pytest.param(dict(kernel_size=3, padding=2, dilation=2, groups=2), id="dilated-grouped"),
    pytest.param(dict(kernel_size=3, padding=1, groups=8), id="depthwise"),
])
def test_packed_conv_equals_the_plain_conv_and_keeps_the_layout(geometry):
    torch.manual_seed(0)
    conv = PackedConv2d(8, 8, **geometry).eval()
    x = _channels_last(2, 8, 9, 10)
    plain = F.conv2d(x, conv.weight, conv.bias, conv.stride, conv.padding, conv.dilation, conv.groups)
    with torch.no_grad():
        out = conv(x)
        assert conv._packed is not None  # the packed path ran
        torch.testing.assert_close(out, plain.detach(), rtol=1e-5, atol=1e-5)
        assert out.is_contiguous(memory_format=torch.channels_last)
        packed = conv._packed[1]
        conv(x)
        assert conv._packed[1] is packed  # reused for the same shape
        other = _channels_last(1, 8, 6, 7)  # another shape: packed for it
        torch.testing.assert_close(conv(other), F.conv2d(other, conv.weight, conv.bias, conv.stride, conv.padding,
                                                         conv.dilation, conv.groups), rtol=1e-5, atol=1e-5)
        conv.weight.mul_(-1)  # an in-place change: re-packed
        torch.testing.assert_close(conv(x), -plain.detach() + (2 * conv.bias.view(1, -1, 1, 1) if conv.bias is not None
                                                              else 0), rtol=1e-5, atol=1e-5)


def test_packed_conv_takes_nn_conv2ds_path_otherwise():
    """NCHW inputs, gradients, other padding modes, string padding, export: nn.Conv2d's path; the keys
    are nn.Conv2d's, and folding a BatchNorm keeps the class."""
    torch.manual_seed(0)
    conv = PackedConv2d(4, 6, 3, padding=1)
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        out = conv(x)
    assert conv._packed is None and out.is_contiguous()  # NCHW in, NCHW out
    y = conv(x.contiguous(memory_format=torch.channels_last).requires_grad_())
    y.sum().backward()
    assert conv._packed is None and conv.weight.grad is not None
    reflect = PackedConv2d(4, 6, 3, padding=1, padding_mode="reflect").eval()
    same = PackedConv2d(4, 6, 3, padding="same").eval()
    with torch.no_grad():
        for layer in (reflect, same):
            xl = x.contiguous(memory_format=torch.channels_last)
            torch.testing.assert_close(layer(xl), nn.Conv2d.forward(layer, x))
            assert layer._packed is None
    assert set(conv.state_dict()) == set(nn.Conv2d(4, 6, 3).state_dict())
    program = torch.export.export(conv.eval(), (x.contiguous(memory_format=torch.channels_last),))
    assert {str(n.target) for n in program.graph.nodes if n.op == "call_function"} == {"aten.conv2d.default"}
    bn = nn.BatchNorm2d(6).eval()
    assert type(fuse_conv_bn(conv, bn)) is PackedConv2d
