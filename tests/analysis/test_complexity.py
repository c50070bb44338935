"""count_params / count_flops against counts worked out by hand."""
import pytest
import torch
import torch.nn as nn

import convzoo
from convzoo.analysis import FlopCount, count_flops, count_params
from convzoo.layers import ReparamLargeKernelConv
from convzoo.layers.reparam import DepthwiseConv2d


def test_count_params_by_hand_and_shared_once():
    conv = nn.Conv2d(3, 8, 3)  # 8*3*3*3 + 8
    linear = nn.Linear(16, 4)  # 16*4 + 4
    assert count_params(conv) == 224 and count_params(linear) == 68
    shared = nn.Sequential(linear, linear)
    assert count_params(shared) == 68
    conv.bias.requires_grad_(False)
    assert count_params(conv, trainable_only=True) == 216 and count_params(conv) == 224


def test_conv_macs_by_hand():
    model = nn.Conv2d(3, 8, 3, padding=1, bias=True)
    result = count_flops(model, (2, 3, 10, 10))
    macs = 2 * 8 * 10 * 10 * 3 * 3 * 3  # batch * out channels * out pixels * in channels * taps
    assert isinstance(result, FlopCount)
    assert result.macs == macs and result.flops == 2 * macs
    assert result.by_op == {"aten.convolution": 2 * macs}
    assert result.input_size == (2, 3, 10, 10)


def test_strided_grouped_conv_and_linear_by_hand():
    model = nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.Flatten(), nn.Linear(6 * 4 * 4, 5))
    result = count_flops(model, (1, 4, 8, 8))
    conv_macs = 6 * 4 * 4 * (4 // 2) * 9
    linear_macs = 96 * 5
    assert result.macs == conv_macs + linear_macs
    assert result.by_op["aten.addmm"] == 2 * linear_macs
    assert result.by_module[""] == result.flops
    assert result.by_module["0"] == 2 * conv_macs and result.by_module["2"] == 2 * linear_macs


def test_depthwise_and_reparam_large_kernel_by_hand():
    dw = DepthwiseConv2d(4, 5, bias=True)
    assert count_flops(dw, (1, 4, 8, 8)).macs == 4 * 64 * 25
    layer = ReparamLargeKernelConv(4, 7, small_kernels=(3,)).eval()
    assert count_flops(layer, (1, 4, 8, 8)).macs == 4 * 64 * (49 + 9)
    layer.reparameterize()
    assert count_flops(layer, (1, 4, 8, 8)).macs == 4 * 64 * 49


def test_meta_device_model_and_mode_is_restored():
    with torch.device("meta"):
        model = convzoo.create_model("replknet_tiny", num_classes=10)
    model.train()
    result = count_flops(model, (1, 3, 32, 32))
    assert result.macs > 0 and model.training
    assert next(model.parameters()).is_meta
    real = convzoo.create_model("replknet_tiny", num_classes=10)
    assert count_flops(real, (1, 3, 32, 32)).macs == result.macs
    assert count_params(real) == count_params(model)


def test_bad_input_size():
    with pytest.raises(ValueError, match="input_size must be a non-empty shape"):
        count_flops(nn.Conv2d(1, 1, 1), ())


@pytest.mark.parametrize("name, size", [
    pytest.param("mobilenetv3_small_100", 64, id="mobilenetv3-hardswish-se"),
    pytest.param("semfpn_replknet_tiny", 64, id="segmentation-upsampling"),
])
def test_meta_flop_counter_gives_count_flops_total(name, size):
    from convzoo.analysis import MetaFlopCounter

    counter = MetaFlopCounter()
    with torch.device("meta"), counter:
        model = convzoo.create_model(name)
    expected = count_flops(model, (1, 3, size, size)).flops
    assert counter.count(model, (1, 3, size, size)) == expected > 0
    # the second pass answers every operator from the remembered shapes, with the same total
    assert counter.count(model, (1, 3, size, size)) == expected
    assert model.training  # the mode is restored
