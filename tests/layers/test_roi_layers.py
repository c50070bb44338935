"""Tests for the deformable RoI pooling modules."""
import pytest
import torch

from convzoo import ops
from convzoo.layers import (
    DeformPSRoIPool,
    DeformPSRoIPoolPack,
    DeformRoIPool,
    DeformRoIPoolPack,
    ModulatedDeformRoIPool,
)
from _export_check import exported_call_targets

ROIS = torch.tensor([[0, 1.0, 2.0, 14.0, 11.0], [1, 0.0, 0.0, 9.0, 17.0], [1, 5.5, 3.0, 19.0, 12.5]])


def features(channels, dtype=torch.float32):
    return torch.randn(2, channels, 10, 11, dtype=dtype)


def test_deform_roi_pool_module_calls_the_op():
    pool = DeformRoIPool((2, 3), spatial_scale=0.5, sampling_ratio=2, gamma=0.2)
    x = features(3)
    offset = torch.randn(3, 2, 2, 3)
    torch.testing.assert_close(pool(x, ROIS, offset), ops.deform_roi_pool(x, ROIS, offset, (2, 3), 0.5, 2, 0.2))
    torch.testing.assert_close(pool(x, ROIS), ops.deform_roi_pool(x, ROIS, None, (2, 3), 0.5, 2, 0.2))
    assert pool.impl == "auto"


def test_packs_start_as_plain_pooling_and_learn():
    x = features(4)
    plain = ops.deform_roi_pool(x, ROIS, None, 3, 0.5, 2, 0.1)
    pack = DeformRoIPoolPack(3, 4, deform_fc_channels=8, spatial_scale=0.5, sampling_ratio=2)
    torch.testing.assert_close(pack(x, ROIS), plain)  # zero-initialised offsets
    modulated = ModulatedDeformRoIPool(3, 4, deform_fc_channels=8, spatial_scale=0.5, sampling_ratio=2)
    torch.testing.assert_close(modulated(x, ROIS), plain * 0.5)  # sigmoid(0) mask
    for module in (pack, modulated):
        module(x, ROIS).square().sum().backward()
        assert module.offset_fc[-1].weight.grad.abs().sum() > 0
    assert modulated.mask_fc[2].weight.grad.abs().sum() > 0


def test_modulated_pack_matches_mmcv_definition():
    x = features(2, torch.float64)
    module = ModulatedDeformRoIPool((2, 2), 2, deform_fc_channels=6, spatial_scale=0.5, sampling_ratio=0).double()
    for linear in (module.offset_fc[-1], module.mask_fc[2]):
        torch.nn.init.normal_(linear.weight, std=0.3)
    pooled = ops.deform_roi_pool(x, ROIS.double(), None, 2, 0.5, 0, 0.1)
    offset = module.offset_fc(pooled.flatten(1)).view(3, 2, 2, 2)
    mask = module.mask_fc(pooled.flatten(1)).view(3, 1, 2, 2)
    want = ops.deform_roi_pool(x, ROIS.double(), offset, 2, 0.5, 0, 0.1) * mask
    torch.testing.assert_close(module(x, ROIS.double()), want)


def test_parameter_names_follow_mmcv():
    names = [n for n, _ in ModulatedDeformRoIPool(7, 4, deform_fc_channels=8).named_parameters()]
    assert names == [
        "offset_fc.0.weight", "offset_fc.0.bias", "offset_fc.2.weight", "offset_fc.2.bias",
        "offset_fc.4.weight", "offset_fc.4.bias", "mask_fc.0.weight", "mask_fc.0.bias",
        "mask_fc.2.weight", "mask_fc.2.bias",
    ]
    assert ModulatedDeformRoIPool(7, 4, deform_fc_channels=8).offset_fc[0].in_features == 7 * 7 * 4


def test_reset_parameters_zeroes_the_last_layers():
    module = ModulatedDeformRoIPool(2, 3, deform_fc_channels=4)
    with torch.no_grad():
        for p in module.parameters():
            p.fill_(1.0)
    module.reset_parameters()
    for linear in (module.offset_fc[4], module.mask_fc[2]):
        assert linear.weight.abs().sum() == 0 and linear.bias.abs().sum() == 0
    assert module.offset_fc[0].weight.abs().sum() > 0 and not (module.offset_fc[0].weight == 1).all()


def test_deform_ps_roi_pool_modules():
    x = features(2 * 9)
    plain = DeformPSRoIPool(2, 3, sample_per_part=2, spatial_scale=0.5)
    want = ops.deform_ps_roi_pool(x, ROIS, None, 2, 3, 3, 3, 2, 0.1, 0.5, no_trans=True)
    torch.testing.assert_close(plain(x, ROIS), want)
    trans = torch.randn(3, 2, 3, 3)
    torch.testing.assert_close(plain(x, ROIS, trans), ops.deform_ps_roi_pool(x, ROIS, trans, 2, 3, 3, 3, 2, 0.1, 0.5))
    pack = DeformPSRoIPoolPack(2, 3, sample_per_part=2, spatial_scale=0.5, deform_fc_channels=8, num_offset_fcs=2)
    torch.testing.assert_close(pack(x, ROIS), want)
    pack(x, ROIS).square().sum().backward()
    assert pack.offset_fc[-1].weight.grad.abs().sum() > 0
    assert [type(m).__name__ for m in pack.offset_fc] == ["Linear", "ReLU", "Linear"]


def test_extra_repr():
    assert repr(DeformRoIPool(7, 0.0625)) == (
        "DeformRoIPool(output_size=(7, 7), spatial_scale=0.0625, sampling_ratio=0, gamma=0.1)"
    )
    assert ModulatedDeformRoIPool((7, 5), 256, 64).extra_repr() == (
        "output_size=(7, 5), output_channels=256, deform_fc_channels=64, spatial_scale=1.0, "
        "sampling_ratio=0, gamma=0.1"
    )
    assert DeformPSRoIPool(21, 7, trans_std=0.1, spatial_scale=0.0625).extra_repr() == (
        "output_dim=21, pooled_size=7, group_size=7, part_size=7, sample_per_part=4, trans_std=0.1, "
        "spatial_scale=0.0625"
    )
    assert DeformPSRoIPoolPack(2, 3, deform_fc_channels=8).extra_repr().endswith(
        "deform_fc_channels=8, num_offset_fcs=3"
    )


def test_device_dtype_and_zero_rois():
    module = ModulatedDeformRoIPool(2, 3, deform_fc_channels=4, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in module.parameters())
    out = module(features(3, torch.float64), torch.zeros(0, 5, dtype=torch.float64))
    assert out.shape == (0, 3, 2, 2)
    ps = DeformPSRoIPoolPack(1, 2, deform_fc_channels=4, dtype=torch.float64)
    assert ps(features(4, torch.float64), torch.zeros(0, 5, dtype=torch.float64)).shape == (0, 1, 2, 2)


def test_reference_impl_matches_auto():
    x = features(4, torch.float64)
    module = ModulatedDeformRoIPool(2, 4, deform_fc_channels=6, spatial_scale=0.5).double()
    torch.nn.init.normal_(module.offset_fc[-1].weight, std=0.3)
    want = module(x, ROIS.double())
    module.impl = "reference"
    torch.testing.assert_close(module(x, ROIS.double()), want)


def test_wrong_channels_name_the_argument():
    with pytest.raises(ValueError, match=r"input must have shape \(N, 4, H, W\) \(output_channels\)"):
        DeformRoIPoolPack(2, 4, deform_fc_channels=4)(features(3), ROIS)
    with pytest.raises(ValueError, match=r"output_dim \* group_size\*\*2"):
        DeformPSRoIPoolPack(1, 2, deform_fc_channels=4)(features(3), ROIS)
    with pytest.raises(ValueError, match="num_offset_fcs must be >= 1"):
        DeformPSRoIPoolPack(1, 2, num_offset_fcs=0)
    with pytest.raises(ValueError, match="output_size must be >= 1"):
        DeformRoIPool(0)


def test_torch_export_captures_the_custom_op():
    module = ModulatedDeformRoIPool(2, 4, deform_fc_channels=8, spatial_scale=0.5)
    torch.nn.init.normal_(module.offset_fc[-1].weight, std=0.1)
    x = features(4)
    assert exported_call_targets(module, x, ROIS).count("convzoo.deform_roi_pool.default") == 2
