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
    ModulatedDeformRoIPoolPack,
    MultiScaleRoIAlign,
    PSRoIAlign,
    PSRoIPool,
    RoIAlign,
    RoIPool,
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
    modulated = ModulatedDeformRoIPoolPack(3, 4, deform_fc_channels=8, spatial_scale=0.5, sampling_ratio=2)
    torch.testing.assert_close(modulated(x, ROIS), plain * 0.5)  # sigmoid(0) mask
    for module in (pack, modulated):
        module(x, ROIS).square().sum().backward()
        assert module.offset_fc[-1].weight.grad.abs().sum() > 0
    assert modulated.mask_fc[2].weight.grad.abs().sum() > 0


def test_modulated_pack_matches_mmcv_definition():
    x = features(2, torch.float64)
    module = ModulatedDeformRoIPoolPack((2, 2), 2, deform_fc_channels=6, spatial_scale=0.5, sampling_ratio=0).double()
    for linear in (module.offset_fc[-1], module.mask_fc[2]):
        torch.nn.init.normal_(linear.weight, std=0.3)
    pooled = ops.deform_roi_pool(x, ROIS.double(), None, 2, 0.5, 0, 0.1)
    offset = module.offset_fc(pooled.flatten(1)).view(3, 2, 2, 2)
    mask = module.mask_fc(pooled.flatten(1)).view(3, 1, 2, 2)
    want = ops.deform_roi_pool(x, ROIS.double(), offset, 2, 0.5, 0, 0.1) * mask
    torch.testing.assert_close(module(x, ROIS.double()), want)


def test_parameter_names_follow_mmcv():
    names = [n for n, _ in ModulatedDeformRoIPoolPack(7, 4, deform_fc_channels=8).named_parameters()]
    assert names == [
        "offset_fc.0.weight", "offset_fc.0.bias", "offset_fc.2.weight", "offset_fc.2.bias",
        "offset_fc.4.weight", "offset_fc.4.bias", "mask_fc.0.weight", "mask_fc.0.bias",
        "mask_fc.2.weight", "mask_fc.2.bias",
    ]
    assert ModulatedDeformRoIPoolPack(7, 4, deform_fc_channels=8).offset_fc[0].in_features == 7 * 7 * 4


def test_reset_parameters_zeroes_the_last_layers():
    module = ModulatedDeformRoIPoolPack(2, 3, deform_fc_channels=4)
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
    assert ModulatedDeformRoIPoolPack((7, 5), 256, 64).extra_repr() == (
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
    module = ModulatedDeformRoIPoolPack(2, 3, deform_fc_channels=4, dtype=torch.float64)
    assert all(p.dtype == torch.float64 for p in module.parameters())
    out = module(features(3, torch.float64), torch.zeros(0, 5, dtype=torch.float64))
    assert out.shape == (0, 3, 2, 2)
    ps = DeformPSRoIPoolPack(1, 2, deform_fc_channels=4, dtype=torch.float64)
    assert ps(features(4, torch.float64), torch.zeros(0, 5, dtype=torch.float64)).shape == (0, 1, 2, 2)


def test_reference_impl_matches_auto():
    x = features(4, torch.float64)
    module = ModulatedDeformRoIPoolPack(2, 4, deform_fc_channels=6, spatial_scale=0.5).double()
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
    module = ModulatedDeformRoIPoolPack(2, 4, deform_fc_channels=8, spatial_scale=0.5)
    torch.nn.init.normal_(module.offset_fc[-1].weight, std=0.1)
    x = features(4)
    assert exported_call_targets(module, x, ROIS).count("convzoo.deform_roi_pool.default") == 2


def test_mmcv_names_both_forms():
    """Plain forms take offsets (and mask) as inputs; packs predict them. No pack changes the
    forward signature of a class it inherits from (composition: pack.pool)."""
    import inspect

    x = features(4)
    offset = torch.randn(3, 2, 2, 2)
    mask = torch.rand(3, 1, 2, 2)
    plain = ModulatedDeformRoIPool(2, 0.5, 2, 0.2)
    torch.testing.assert_close(plain(x, ROIS, offset, mask), ops.modulated_deform_roi_pool(x, ROIS, offset, mask,
                                                                                          2, 0.5, 2, 0.2))
    for pack in (DeformRoIPoolPack(2, 4, 8), ModulatedDeformRoIPoolPack(2, 4, 8), DeformPSRoIPoolPack(1, 2)):
        assert isinstance(pack.pool, (DeformRoIPool, DeformPSRoIPool))
        for base in type(pack).__mro__[1:]:
            if "forward" in vars(base) and base is not torch.nn.Module:
                assert inspect.signature(base.forward) == inspect.signature(type(pack).forward)
        pack.impl = "reference"
        assert pack.pool.impl == "reference"


def test_loads_an_mmcv_layout_state_dict():
    """A state dict with mmcv's ModulatedDeformRoIPoolPack key names and shapes loads strictly and
    gives mmcv's forward: deform_roi_pool(x, rois, offset_fc(pool)) * mask_fc(pool)."""
    g = torch.Generator().manual_seed(0)
    bins, channels, hidden = 4, 3, 5
    mmcv_state = {
        "offset_fc.0.weight": torch.randn(hidden, bins * channels, generator=g), "offset_fc.0.bias": torch.randn(hidden, generator=g),
        "offset_fc.2.weight": torch.randn(hidden, hidden, generator=g), "offset_fc.2.bias": torch.randn(hidden, generator=g),
        "offset_fc.4.weight": torch.randn(bins * 2, hidden, generator=g) * 0.1, "offset_fc.4.bias": torch.zeros(bins * 2),
        "mask_fc.0.weight": torch.randn(hidden, bins * channels, generator=g), "mask_fc.0.bias": torch.randn(hidden, generator=g),
        "mask_fc.2.weight": torch.randn(bins, hidden, generator=g), "mask_fc.2.bias": torch.randn(bins, generator=g),
    }
    module = ModulatedDeformRoIPoolPack(2, channels, hidden, spatial_scale=0.5, sampling_ratio=2)
    module.load_state_dict(mmcv_state, strict=True)
    x = features(channels)
    pooled = ops.deform_roi_pool(x, ROIS, None, 2, 0.5, 2, 0.1).flatten(1)
    s = mmcv_state
    offset_hidden = torch.relu(torch.relu(pooled @ s["offset_fc.0.weight"].T + s["offset_fc.0.bias"]) @ s["offset_fc.2.weight"].T
                               + s["offset_fc.2.bias"])
    offset = (offset_hidden @ s["offset_fc.4.weight"].T + s["offset_fc.4.bias"]).view(3, 2, 2, 2)
    mask = torch.sigmoid(torch.relu(pooled @ s["mask_fc.0.weight"].T + s["mask_fc.0.bias"]) @ s["mask_fc.2.weight"].T
                         + s["mask_fc.2.bias"]).view(3, 1, 2, 2)
    want = ops.deform_roi_pool(x, ROIS, offset, 2, 0.5, 2, 0.1) * mask
    torch.testing.assert_close(module(x, ROIS), want)
    plain = DeformRoIPoolPack(2, channels, hidden, spatial_scale=0.5, sampling_ratio=2)
    plain.load_state_dict({k: v for k, v in mmcv_state.items() if k.startswith("offset_fc")}, strict=True)


def test_torchvision_modules_call_the_ops():
    x = features(8)
    boxes = [ROIS[:1, 1:], ROIS[1:, 1:]]
    pairs = [
        (RoIAlign(2, 0.5, 2, aligned=True), lambda: ops.roi_align(x, ROIS, 2, 0.5, 2, True)),
        (RoIPool((2, 3), 0.5), lambda: ops.roi_pool(x, ROIS, (2, 3), 0.5)),
        (PSRoIAlign(2, 0.5, 2), lambda: ops.ps_roi_align(x, ROIS, 2, 0.5, 2)),
        (PSRoIPool(2, 0.5), lambda: ops.ps_roi_pool(x, ROIS, 2, 0.5)),
    ]
    for module, call in pairs:
        torch.testing.assert_close(module(x, ROIS), call())
        torch.testing.assert_close(module(x, boxes), call())
    assert repr(RoIAlign(7, 0.25, 2)) == "RoIAlign(output_size=(7, 7), spatial_scale=0.25, sampling_ratio=2, aligned=False)"
    with pytest.raises(ValueError, match="spatial_scale must be a finite number > 0"):
        RoIPool(2, 0.0)


def test_multi_scale_roi_align_maps_boxes_to_fpn_levels():
    """Small boxes pool from the fine level, large ones from the coarse one (FPN eq. 1), each
    with that level's inferred scale; one level pools every box from it."""
    g = torch.Generator().manual_seed(0)
    feats = {"p2": torch.randn(2, 3, 64, 64, generator=g), "unused": torch.randn(2, 3, 8, 8, generator=g),
             "p3": torch.randn(2, 3, 32, 32, generator=g)}
    small = torch.tensor([[10.0, 10.0, 40.0, 40.0]])  # sqrt(area) 30: level floor(4 + log2(30/224)) = 1 -> k_min 2
    large = torch.tensor([[0.0, 0.0, 250.0, 250.0], [5.0, 5.0, 30.0, 30.0]])  # 250 -> level 4 -> clamped to 3
    boxes = [small, large]
    pooler = MultiScaleRoIAlign(["p2", "p3"], 2, 2)
    out = pooler(feats, boxes, [(256, 256), (256, 240)])
    rois = torch.tensor([[0, 10.0, 10.0, 40.0, 40.0], [1, 0.0, 0.0, 250.0, 250.0], [1, 5.0, 5.0, 30.0, 30.0]])
    fine = ops.roi_align(feats["p2"], rois, 2, 0.25, 2)
    coarse = ops.roi_align(feats["p3"], rois, 2, 0.125, 2)
    torch.testing.assert_close(out, torch.stack([fine[0], coarse[1], fine[2]]))
    single = MultiScaleRoIAlign(["p3"], 2, 2)(feats, boxes, [(256, 256), (256, 256)])
    torch.testing.assert_close(single, coarse)
    with pytest.raises(ValueError, match="holds none of featmap_names"):
        MultiScaleRoIAlign(["p9"], 2, 2)(feats, boxes, [(256, 256)])
