"""RepLKNet: architecture figures, RepLKNet-pytorch checkpoints (trained and structural_reparam forms)."""
import argparse
import logging
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convzoo
from convzoo.analysis import count_flops, count_params
from convzoo.layers import ReparamLargeKernelConv
from convzoo.layers import is_reparameterized
from convzoo.models.replknet import RepLKNetCfg, checkpoint_filter_fn, merge_large_kernels

from _family_helpers import build_on_meta

SMALL = dict(depths=(1, 2, 1, 1), channels=(8, 16, 16, 24))

# Our counts of the official architecture. Training form / large kernels merged (the form the
# paper reports: 79M, 172M, 335M params; 15.3G@224, 96.0G@384, 128.7G@320 MACs).
PARAMS = {
    "replknet_tiny": (1_397_320, 1_390_024),
    "replknet_31b": (79_864_168, 79_527_272),
    "replknet_31l": (172_671_016, 172_165_672),
    "replknet_xl": (335_435_752, 335_399_656),
}
MACS = {  # resolution, our MACs, the paper's MACs (G) and params (M)
    "replknet_31b": (224, 15_353_525_248, 15.3, 79),
    "replknet_31l": (384, 95_989_420_032, 96.0, 172),
    "replknet_xl": (320, 128_730_316_800, 128.7, 335),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def to_official(state):
    """Our keys -> RepLKNet-pytorch's (the inverse of checkpoint_filter_fn)."""
    return {k.replace(".small_convs.0.", ".small_conv."): v for k, v in state.items()}


def randomize(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.1) + (1.0 if name.endswith("bn.weight") else 0.0))
        for name, b in model.named_buffers():
            if name.endswith("running_mean"):
                b.uniform_(-0.1, 0.1)
            elif name.endswith("running_var"):
                b.uniform_(0.5, 1.5)


def bn(x, sd, prefix):
    return F.batch_norm(x, sd[prefix + ".running_mean"], sd[prefix + ".running_var"], sd[prefix + ".weight"],
                        sd[prefix + ".bias"], False, 0.0, 1e-5)


def conv_bn(x, sd, prefix, stride=1, depthwise=False, relu=False):
    w = sd[prefix + ".conv.weight"]
    y = bn(F.conv2d(x, w, None, stride, w.shape[-1] // 2, 1, x.shape[1] if depthwise else 1), sd, prefix + ".bn")
    return F.relu(y) if relu else y


def official_forward(sd, x, depths):
    """RepLKNet-pytorch's eval forward from its state dict, written with F.conv2d (NCHW)."""
    x = conv_bn(x, sd, "stem.0", 2, relu=True)
    x = conv_bn(x, sd, "stem.1", 1, depthwise=True, relu=True)
    x = conv_bn(x, sd, "stem.2", relu=True)
    x = conv_bn(x, sd, "stem.3", 2, depthwise=True, relu=True)
    for i, depth in enumerate(depths):
        for j in range(depth):
            p = f"stages.{i}.blocks.{2 * j}"
            y = conv_bn(bn(x, sd, p + ".prelkb_bn"), sd, p + ".pw1", relu=True)
            z = conv_bn(y, sd, p + ".large_kernel.lkb_origin", depthwise=True)
            if p + ".large_kernel.small_conv.conv.weight" in sd:
                z = z + conv_bn(y, sd, p + ".large_kernel.small_conv", depthwise=True)
            x = x + conv_bn(F.relu(z), sd, p + ".pw2")
            p = f"stages.{i}.blocks.{2 * j + 1}"
            x = x + conv_bn(F.gelu(conv_bn(bn(x, sd, p + ".preffn_bn"), sd, p + ".pw1")), sd, p + ".pw2")
        if i < len(depths) - 1:
            x = conv_bn(x, sd, f"transitions.{i}.0", relu=True)
            x = conv_bn(x, sd, f"transitions.{i}.1", 2, depthwise=True, relu=True)
    return F.linear(bn(x, sd, "norm").mean((2, 3)), sd["head.weight"], sd["head.bias"])


@pytest.mark.parametrize("name", sorted(PARAMS))
def test_parameter_counts(name):
    model = build_on_meta(name)
    trained, merged = PARAMS[name]
    assert count_params(model) == trained
    merge_large_kernels(model)
    assert count_params(model) == merged


@pytest.mark.parametrize("name", sorted(MACS))
def test_macs_match_the_paper(name):
    size, macs, paper_g, paper_m = MACS[name]
    model = build_on_meta(name)
    merge_large_kernels(model)
    result = count_flops(model, (1, 3, size, size))
    assert result.macs == macs
    assert abs(result.macs / 1e9 - paper_g) < 0.06
    assert count_params(model) // 1_000_000 == paper_m


def test_variant_configs_follow_the_official_code():
    b, l, xl = (build_on_meta(n).cfg for n in ("replknet_31b", "replknet_31l", "replknet_xl"))
    assert b == RepLKNetCfg((31, 29, 27, 13), (2, 2, 18, 2), (128, 256, 512, 1024), 5, 1.0, 4.0, False)
    assert l.channels == (192, 384, 768, 1536) and l.kernel_sizes == b.kernel_sizes and l.small_kernel == 5
    assert xl == RepLKNetCfg((27, 27, 27, 13), (2, 2, 18, 2), (256, 512, 1024, 2048), None, 1.5, 4.0, False)
    xl_model = build_on_meta("replknet_xl")
    block = xl_model.stages[0].blocks[0]
    assert block.pw1.conv.out_channels == 384 and len(block.large_kernel.small_convs) == 0


def test_hand_typed_official_keys():
    """Keys and shapes read from RepLKNet-pytorch's replknet.py for RepLKNet-31B."""
    official = to_official(build_on_meta("replknet_31b").state_dict())
    expected = {
        "stem.0.conv.weight": (128, 3, 3, 3),
        "stem.1.conv.weight": (128, 1, 3, 3),
        "stem.3.bn.running_var": (128,),
        "stages.0.blocks.0.prelkb_bn.weight": (128,),
        "stages.0.blocks.0.pw1.conv.weight": (128, 128, 1, 1),
        "stages.0.blocks.0.large_kernel.lkb_origin.conv.weight": (128, 1, 31, 31),
        "stages.0.blocks.0.large_kernel.small_conv.conv.weight": (128, 1, 5, 5),
        "stages.0.blocks.0.large_kernel.small_conv.bn.bias": (128,),
        "stages.2.blocks.35.pw1.conv.weight": (2048, 512, 1, 1),
        "stages.2.blocks.35.preffn_bn.running_mean": (512,),
        "stages.3.blocks.0.large_kernel.lkb_origin.conv.weight": (1024, 1, 13, 13),
        "transitions.0.0.conv.weight": (256, 128, 1, 1),
        "transitions.2.1.conv.weight": (1024, 1, 3, 3),
        "norm.running_mean": (1024,),
        "head.weight": (1000, 1024),
        "head.bias": (1000,),
    }
    for key, shape in expected.items():
        assert tuple(official[key].shape) == shape, key
    assert not any("lkb_reparam" in k or "small_convs" in k for k in official)


@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "model-wrapped"])
def test_official_checkpoint_loads_and_gives_the_official_output(tmp_path, wrapped):
    source = convzoo.create_model("replknet_31b", num_classes=10, **SMALL)
    randomize(source)
    official = to_official(source.state_dict())
    path = tmp_path / "RepLKNet-31B.pth"
    torch.save({"model": official} if wrapped else official, path)
    model = convzoo.create_model("replknet_31b", pretrained=path, num_classes=10, **SMALL).eval()
    x = torch.randn(2, 3, 48, 40)
    with torch.no_grad():
        expected = official_forward(official, x, SMALL["depths"])
        out = model(x)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_deployed_form_folds_every_block_batchnorm_and_keeps_the_official_output():
    """``reparameterize`` also folds each block's pre-BN (``prelkb_bn``, ``preffn_bn``) into the 1x1
    conv after it: only the final ``norm`` stays a BatchNorm."""
    model = convzoo.create_model("replknet_31b", num_classes=10, **SMALL).eval()
    randomize(model)
    official = to_official(model.state_dict())
    x = torch.randn(2, 3, 48, 40)
    convzoo.reparameterize(model)
    assert [name for name, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)] == ["norm"]
    assert isinstance(model.stages[0].blocks[0].prelkb_bn, nn.Identity)
    assert isinstance(model.stages[0].blocks[1].preffn_bn, nn.Identity)
    with torch.no_grad():
        expected = official_forward(official, x, SMALL["depths"])
        for memory_format in (torch.contiguous_format, torch.channels_last):
            out = model(x.contiguous(memory_format=memory_format))
            torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4 * expected.abs().max().item())


def test_structural_reparam_checkpoint_is_loaded_into_a_merged_model(tmp_path):
    source = convzoo.create_model("replknet_tiny", num_classes=10)
    randomize(source)
    source.eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        expected = source(x)
    merge_large_kernels(source)
    state = source.state_dict()
    assert any(k.endswith("large_kernel.lkb_reparam.weight") for k in state)
    assert not any("lkb_origin" in k or "small_conv" in k for k in state)
    assert "stages.0.blocks.0.pw1.bn.running_var" in state  # structural_reparam keeps the other BNs
    path = tmp_path / "RepLKNet-tiny-reparam.pth"
    torch.save(state, path)
    model = convzoo.create_model("replknet_tiny", pretrained=path, num_classes=10).eval()
    assert all(m.is_reparameterized for m in model.modules() if isinstance(m, ReparamLargeKernelConv))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("how", ["merged_by_hand", "loaded_from_structural_reparam"])
def test_model_with_merged_large_kernels_saves_and_loads_back(tmp_path, how):
    """Only the large kernels merged (not the whole model): save_checkpoint records that form and
    load_model redoes it before reading the lkb_reparam weights."""
    source = convzoo.create_model("replknet_tiny", num_classes=10)
    randomize(source)
    source.eval()
    merge_large_kernels(source)
    if how == "loaded_from_structural_reparam":
        torch.save(source.state_dict(), tmp_path / "RepLKNet-tiny-reparam.pth")
        source = convzoo.create_model("replknet_tiny", pretrained=tmp_path / "RepLKNet-tiny-reparam.pth",
                                      num_classes=10).eval()
    path = tmp_path / "model.safetensors"
    convzoo.save_checkpoint(source, path)
    loaded = convzoo.models.load_model(path).eval()
    assert not is_reparameterized(loaded)
    assert all(m.is_reparameterized for m in loaded.modules() if isinstance(m, ReparamLargeKernelConv))
    assert "stages.0.blocks.0.pw1.bn.running_var" in loaded.state_dict()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)
    convzoo.reparameterize(loaded)  # still goes on to the full inference form
    convzoo.save_checkpoint(loaded, path)
    with torch.no_grad():
        torch.testing.assert_close(convzoo.models.load_model(path).eval()(x), source(x), rtol=1e-4, atol=1e-5)


def test_official_checkpoint_loads_without_classifier(tmp_path, caplog):
    source = convzoo.create_model("replknet_31b", num_classes=10, **SMALL)
    randomize(source)
    source.eval()
    path = tmp_path / "RepLKNet-31B.pth"
    torch.save(to_official(source.state_dict()), path)
    with caplog.at_level(logging.WARNING, logger="convzoo"):
        model = convzoo.create_model("replknet_31b", pretrained=path, num_classes=0, **SMALL).eval()
    assert "no classifier for num_classes=0 (checkpoint head head.weight, head.bias not loaded)" in caplog.text
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source.forward_head(source.forward_features(x), pre_logits=True))


def test_training_script_checkpoint_with_args_loads(tmp_path):
    """RepLKNet-pytorch's training script saves the model with its optimizer, epoch and argparse args."""
    source = convzoo.create_model("replknet_tiny", num_classes=10)
    randomize(source)
    source.eval()
    args = argparse.Namespace(model="RepLKNet-31B", lr=4e-3, drop_path=0.3, input_size=224, model_ema=False)
    path = tmp_path / "checkpoint-best.pth"
    torch.save({"model": to_official(source.state_dict()), "optimizer": {"state": {}, "param_groups": []},
                "epoch": 299, "args": args}, path)
    model = convzoo.create_model("replknet_tiny", pretrained=path, num_classes=10).eval()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source(x))


def test_checkpoint_without_batchnorm_counters_loads(tmp_path):
    source = convzoo.create_model("replknet_tiny", num_classes=10)
    randomize(source)
    official = {k: v for k, v in to_official(source.state_dict()).items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / "no_counters.pth"
    torch.save(official, path)
    model = convzoo.create_model("replknet_tiny", pretrained=path, num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), source.eval()(x))
    assert model.norm.num_batches_tracked.item() == 0


def test_filter_returns_native_state_dicts_unchanged():
    model = convzoo.create_model("replknet_tiny")
    state = model.state_dict()
    assert checkpoint_filter_fn(state, model) is state


def test_small_kernel_baseline_and_dilation_free_config():
    model = convzoo.create_model("replknet_tiny", kernel_sizes=(3, 3, 3, 3), small_kernel=None, num_classes=4)
    kernels = [m for m in model.modules() if isinstance(m, ReparamLargeKernelConv)]
    assert kernels and all(m.kernel_size == 3 and m.small_kernels == () for m in kernels)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 4)


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(kernel_sizes=(13, 13, 8, 5)), "kernel_sizes must be odd positive ints"),
        (dict(small_kernel=7), "small_kernel \\(7\\) must not exceed any of kernel_sizes \\(13, 13, 7, 5\\)"),
        (dict(depths=(1, 1, 2)), "one entry per stage"),
        (dict(channels=(32, 0, 128, 256)), "depths and channels must be positive"),
    ],
)
def test_config_errors(overrides, match):
    with pytest.raises(ValueError, match=match):
        convzoo.create_model("replknet_tiny", **overrides)


def test_drop_path_rates_rise_linearly_and_are_shared_by_each_pair():
    model = build_on_meta("replknet_31b", drop_path_rate=0.3)
    blocks = [b for stage in model.stages for b in stage.blocks]
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.3)
    assert rates[0::2] == rates[1::2]
    assert rates == sorted(rates)


def test_grad_checkpointing_switch_and_impl_of_depthwise_convs():
    model = convzoo.create_model("replknet_tiny", grad_checkpointing=True)
    assert model.grad_checkpointing and all(s.grad_checkpointing for s in model.stages)
    model.set_grad_checkpointing(False)
    assert not any(s.grad_checkpointing for s in model.stages)
    depthwise = [m for m in model.modules() if type(m).__name__ == "DepthwiseConv2d"]
    assert len(depthwise) == 2 + 3 + 5 * 2  # stem 2, transitions 3, 5 blocks x (large + small)
    assert re.search(r"groups=32.*impl='auto'", repr(model.stem[1].conv))


def test_norm_intermediate_features_only_normalises_the_dense_outputs():
    model = convzoo.create_model("replknet_tiny", norm_intermediate_features=True, num_classes=3)
    randomize(model)
    model.eval()
    plain = convzoo.create_model("replknet_tiny", num_classes=3).eval()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if not re.match(r"stages\.\d\.norm\.", k)})
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(model(x), plain(x))
        normed, raw = model.forward_intermediates(x, (1,)), plain.forward_intermediates(x, (1,))
        torch.testing.assert_close(normed[0], model.stages[1].norm(raw[0]))
    assert "stages.3.norm.running_var" in model.state_dict()


# ----------------------------------------------------------------------------- the paper's Table 5

# RepLKNet paper, Table 5 (kernel sizes per stage on the 31B macro architecture, deployed form, 224):
# params (M) and FLOPs (G) of the two end rows; the paper's text gives the same ratio (+10.4% params,
# +18.6% FLOPs from 3-3-3-3 to 31-29-27-13). The middle rows' figures could not be found with the
# search tools; they are held by the per-stage difference formula below.
TABLE5_PAPER = {(3, 3, 3, 3): (71.8, 12.9), (31, 29, 27, 13): (79.3, 15.3)}
TABLE5_ROWS = [(3, 3, 3, 3), (7, 7, 7, 7), (13, 13, 13, 13), (25, 25, 25, 13), (31, 29, 27, 13)]


def deployed_31b(kernel_sizes):
    model = build_on_meta("replknet_31b", kernel_sizes=kernel_sizes, small_kernel=5 if min(kernel_sizes) >= 5 else None)
    return convzoo.reparameterize(model)


def test_table5_end_rows_match_the_paper_within_rounding():
    for kernel_sizes, (params_m, gmacs) in TABLE5_PAPER.items():
        model = deployed_31b(kernel_sizes)
        assert abs(count_params(model) / 1e6 - params_m) < 0.15, kernel_sizes
        assert abs(count_flops(model).macs / 1e9 - gmacs) < 0.06, kernel_sizes


def test_table5_rows_differ_by_the_depthwise_kernels_only():
    """Against 3-3-3-3, each row adds depth_i * C_i * (k_i^2 - 9) weights and, at 224, that many
    MACs per output pixel of stage i (56 / 2^i squared)."""
    depths, channels = (2, 2, 18, 2), (128, 256, 512, 1024)
    base = deployed_31b((3, 3, 3, 3))
    base_params, base_macs = count_params(base), count_flops(base).macs
    for kernel_sizes in TABLE5_ROWS[1:]:
        model = deployed_31b(kernel_sizes)
        extra = [d * c * (k * k - 9) for d, c, k in zip(depths, channels, kernel_sizes)]
        assert count_params(model) - base_params == sum(extra), kernel_sizes
        assert count_flops(model).macs - base_macs == sum(e * (56 >> i) ** 2 for i, e in enumerate(extra)), kernel_sizes


def test_lk_shortcut_off_drops_only_the_replk_blocks_identity():
    torch.manual_seed(0)
    with_sc = convzoo.create_model("replknet_tiny", num_classes=3).eval()
    without = convzoo.create_model("replknet_tiny", num_classes=3, lk_shortcut=False).eval()
    without.load_state_dict(with_sc.state_dict())
    block, plain = without.stages[0].blocks[0], with_sc.stages[0].blocks[0]
    x = torch.randn(1, 32, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(block(x), plain(x) - x)
        ffn_x = torch.randn(1, 32, 8, 8)
        torch.testing.assert_close(without.stages[0].blocks[1](ffn_x), with_sc.stages[0].blocks[1](ffn_x))
    assert count_params(without) == count_params(with_sc)


def test_norm_layer_builds_every_norm():
    class CountingNorm(nn.BatchNorm2d):
        pass

    model = convzoo.create_model("replknet_tiny", num_classes=3, norm_layer=CountingNorm)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(m, CountingNorm) for m in norms)
    with pytest.raises(TypeError, match="ResNet takes no norm_layer"):
        convzoo.create_model("resnet50", norm_layer=CountingNorm)


def test_loading_a_structural_reparam_file_merges_only_what_the_file_holds_and_the_filter_changes_nothing():
    source = convzoo.create_model("replknet_tiny", num_classes=3)
    merge_large_kernels(source)
    state = source.state_dict()
    model = convzoo.create_model("replknet_tiny", num_classes=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert checkpoint_filter_fn(dict(state), model).keys() == state.keys()
    assert model.state_dict().keys() == before.keys()  # the filter left the model as it was
    assert len(model.checkpoint_form(state)) == sum(isinstance(m, ReparamLargeKernelConv) for m in model.modules())
