"""PackedLinear: nn.Linear with a pre-packed oneDNN product in eager float32 CPU inference."""
import copy
import io
import pickle

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from convzoo.layers.prepacked import PackedLinear


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
