"""UniRepLKNet: the Dilated Reparam Block, the variants' figures and the official checkpoint layout."""
import re

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import convzoo
from convzoo.analysis import count_flops, count_params
from convzoo.layers import DilatedReparamBlock
from convzoo.models.unireplknet import checkpoint_filter_fn, default_kernel_sizes

from _family_helpers import build_on_meta, layer_norm_channels_first, randomize_batchnorms

pytestmark = pytest.mark.usefixtures("one_thread")

# README of AILab-CVC/UniRepLKNet: params (M), FLOPs (G) and the resolution they are quoted at.
README = {
    "unireplknet_a": (4.4, 0.6, 224), "unireplknet_f": (6.2, 0.9, 224), "unireplknet_p": (10.7, 1.6, 224),
    "unireplknet_n": (18.3, 2.8, 224), "unireplknet_t": (31, 4.9, 224), "unireplknet_s": (56, 9.1, 224),
    "unireplknet_b": (98, 47.2, 384), "unireplknet_l": (218, 105.4, 384), "unireplknet_xl": (386, 187, 384),
}
DEPTHS_DIMS = {
    "unireplknet_a": ((2, 2, 6, 2), (40, 80, 160, 320)), "unireplknet_f": ((2, 2, 6, 2), (48, 96, 192, 384)),
    "unireplknet_p": ((2, 2, 6, 2), (64, 128, 256, 512)), "unireplknet_n": ((2, 2, 8, 2), (80, 160, 320, 640)),
    "unireplknet_t": ((3, 3, 18, 3), (80, 160, 320, 640)), "unireplknet_s": ((3, 3, 27, 3), (96, 192, 384, 768)),
    "unireplknet_b": ((3, 3, 27, 3), (128, 256, 512, 1024)), "unireplknet_l": ((3, 3, 27, 3), (192, 384, 768, 1536)),
    "unireplknet_xl": ((3, 3, 27, 3), (256, 512, 1024, 2048)),
}
BRANCHES = {13: ((5, 1), (7, 2), (3, 3), (3, 4), (3, 5)), 7: ((5, 1), (3, 2), (3, 3))}
SMALL = dict(depths=(1, 2, 1, 1), dims=(8, 16, 16, 24), kernel_sizes=((3,), (13, 3), (7,), (5,)))


def official_param_count(depths, dims, kernel_sizes, num_classes=1000, deployed=False):
    """Parameters of the official UniRepLKNet, layer by layer as its code declares them."""
    d0 = dims[0]
    total = 3 * (d0 // 2) * 9 + d0 // 2 + 2 * (d0 // 2) + (d0 // 2) * d0 * 9 + d0 + 2 * d0  # stem
    for i in range(1, 4):
        total += dims[i - 1] * dims[i] * 9 + dims[i] + 2 * dims[i]  # downsample conv + LayerNorm
    for stage, c in zip(kernel_sizes, dims):
        h = 4 * c
        for k in stage:
            if deployed:
                dw = c * k * k + c
            elif k >= 7:
                dw = c * k * k + 2 * c + sum(c * kb * kb + 2 * c for kb, _ in BRANCHES[k])
            else:
                dw = c * k * k
            norm = 0 if deployed else 2 * c
            se = 2 * c * (c // 4) + c // 4 + c
            ffn = c * h + h + (h if deployed else 2 * h) + h * c + (c if deployed else 2 * c)
            gamma = 0 if deployed else c
            total += dw + norm + se + ffn + gamma
    return total + 2 * dims[-1] + dims[-1] * num_classes + num_classes


@pytest.mark.parametrize("name", sorted(README))
def test_params_exact_and_flops_match_the_readme(name):
    depths, dims = DEPTHS_DIMS[name]
    sizes = default_kernel_sizes(depths)
    model = build_on_meta(name)
    assert count_params(model) == official_param_count(depths, dims, sizes)
    params_m, gflops, res = README[name]
    convzoo.reparameterize(model)
    deployed = count_params(model)
    assert deployed == official_param_count(depths, dims, sizes, deployed=True)
    # The README quotes the deployed form, rounded or cut to its last digit (XL: 386.53M is "386M").
    digits = 0 if params_m >= 30 else 1
    assert 0 <= deployed / 1e6 - params_m + 0.5 * 10 ** -digits < 1.5 * 10 ** -digits, deployed
    macs = count_flops(model, (1, 3, res, res)).macs / 1e9
    assert abs(macs - gflops) <= (0.5 if gflops >= 100 else 0.05), macs


def test_default_kernel_sizes_follow_the_official_table():
    assert default_kernel_sizes((2, 2, 6, 2)) == ((3, 3), (13, 13), (13,) * 6, (13, 13))
    assert default_kernel_sizes((3, 3, 18, 3))[2] == (13, 3) * 9
    assert default_kernel_sizes((3, 3, 27, 3))[2] == (13, 3, 3) * 9
    with pytest.raises(ValueError, match="pass kernel_sizes"):
        default_kernel_sizes((1, 1, 1, 1))
    with pytest.raises(ValueError, match="one size per block"):
        convzoo.create_model("unireplknet_a", depths=(1, 1, 1, 1), kernel_sizes=((3,), (13,), (13,)))
    with pytest.raises(ValueError, match="kernel_sizes may hold"):
        convzoo.create_model("unireplknet_a", depths=(1, 1, 1, 1), kernel_sizes=((3,), (13,), (19,), (13,)))


@pytest.mark.parametrize("kernel_size", [13, 7, 5])
def test_dilated_reparam_block_merges_into_one_kernel(kernel_size):
    torch.manual_seed(0)
    block = DilatedReparamBlock(6, kernel_size)
    randomize_batchnorms(block)
    block.eval()
    x = torch.randn(2, 6, 17, 19)
    with torch.no_grad():
        before = block(x)
        # The sum of the branches, from the definition: each dilated conv + its BN.
        naive = F.batch_norm(F.conv2d(x, block.lkb_origin.conv.weight, padding=kernel_size // 2, groups=6),
                             block.lkb_origin.bn.running_mean, block.lkb_origin.bn.running_var,
                             block.lkb_origin.bn.weight, block.lkb_origin.bn.bias, eps=block.lkb_origin.bn.eps)
        for branch, k, d in zip(block.small_convs, block.small_kernels, block.small_dilations):
            y = F.conv2d(x, branch.conv.weight, padding=d * (k // 2), dilation=d, groups=6)
            naive = naive + F.batch_norm(y, branch.bn.running_mean, branch.bn.running_var, branch.bn.weight,
                                         branch.bn.bias, eps=branch.bn.eps)
        block.reparameterize()
        after = block(x)
    torch.testing.assert_close(before, naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert block.lkb_reparam.weight.shape == (6, 1, kernel_size, kernel_size)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in block.modules())


def test_dilated_reparam_block_branches_of_k13():
    block = DilatedReparamBlock(4, 13)
    assert tuple(zip(block.small_kernels, block.small_dilations)) == BRANCHES[13]
    with pytest.raises(ValueError, match="kernel_size must be one of"):
        DilatedReparamBlock(4, 19)


def randomized_small_model(num_classes=10):
    torch.manual_seed(0)
    model = convzoo.create_model("unireplknet_a", num_classes=num_classes, **SMALL)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (0.5 if p.dim() == 1 and "gamma" not in name else 0.0))
    return randomize_batchnorms(model).eval()


def test_reparameterize_whole_model_keeps_outputs():
    model = randomized_small_model()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(x)
        convzoo.reparameterize(model)
        after = model(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert all(b.gamma is None and b.grn.beta is None for s in model.stages for b in s.blocks)
    scale = before.abs().max()
    assert (after - before).abs().max() <= 1e-5 * scale


def to_official(state, model):
    """Our keys -> AILab-CVC/UniRepLKNet's training-form keys (the inverse of checkpoint_filter_fn)."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^stem\.(\d)\.", r"downsample_layers.0.\1.", key)
        key = re.sub(r"^stages\.(\d+)\.downsample\.([01])\.", r"downsample_layers.\1.\2.", key)
        m = re.match(r"stages\.(\d+)\.blocks\.(\d+)\.(.*)", key)
        if m:
            i, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            for ours, theirs in (("se.fc1.", "se.down."), ("se.fc2.", "se.up."), ("pwconv1.", "pwconv1.1."),
                                 ("grn.", "act.1."), ("pwconv2.", "pwconv2.0."), ("ffn_norm.", "pwconv2.2."),
                                 ("dwconv.lkb_origin.conv.", "dwconv.lk_origin."), ("dwconv.lkb_origin.bn.", "dwconv.origin_bn.")):
                if rest.startswith(ours):
                    rest = theirs + rest[len(ours):]
            b = re.match(r"dwconv\.small_convs\.(\d+)\.(conv|bn)\.(.*)", rest)
            if b:
                dw = model.stages[i].blocks[j].dwconv
                n = int(b.group(1))
                rest = f"dwconv.dil_{b.group(2)}_k{dw.small_kernels[n]}_{dw.small_dilations[n]}.{b.group(3)}"
            key = f"stages.{i}.{j}.{rest}"
        key = re.sub(r"^head\.norm\.", "norm.", key)
        key = re.sub(r"^head\.fc\.", "head.", key)
        out[key] = value
    return out


def bn(x, sd, p):
    return F.batch_norm(x, sd[p + "running_mean"], sd[p + "running_var"], sd[p + "weight"], sd[p + "bias"], eps=1e-5)


def official_forward(sd, x, kernel_sizes):
    """The official training-form forward in eval mode, from its state dict, with F ops (NCHW)."""
    p = "downsample_layers.0."
    x = F.conv2d(x, sd[p + "0.weight"], sd[p + "0.bias"], stride=2, padding=1)
    x = F.gelu(layer_norm_channels_first(x, sd[p + "1.weight"], sd[p + "1.bias"]))
    x = F.conv2d(x, sd[p + "3.weight"], sd[p + "3.bias"], stride=2, padding=1)
    x = layer_norm_channels_first(x, sd[p + "4.weight"], sd[p + "4.bias"])
    for i, sizes in enumerate(kernel_sizes):
        if i:
            p = f"downsample_layers.{i}."
            x = F.conv2d(x, sd[p + "0.weight"], sd[p + "0.bias"], stride=2, padding=1)
            x = layer_norm_channels_first(x, sd[p + "1.weight"], sd[p + "1.bias"])
        for j, k in enumerate(sizes):
            b = f"stages.{i}.{j}."
            c = x.shape[1]
            if k >= 7:
                y = bn(F.conv2d(x, sd[b + "dwconv.lk_origin.weight"], padding=k // 2, groups=c), sd, b + "dwconv.origin_bn.")
                for kb, r in BRANCHES[k]:
                    conv = F.conv2d(x, sd[b + f"dwconv.dil_conv_k{kb}_{r}.weight"], padding=r * (kb // 2), dilation=r, groups=c)
                    y = y + bn(conv, sd, b + f"dwconv.dil_bn_k{kb}_{r}.")
            else:
                y = F.conv2d(x, sd[b + "dwconv.weight"], padding=k // 2, groups=c)
            y = bn(y, sd, b + "norm.")
            s = F.relu(F.conv2d(y.mean((2, 3), keepdim=True), sd[b + "se.down.weight"], sd[b + "se.down.bias"]))
            y = y * torch.sigmoid(F.conv2d(s, sd[b + "se.up.weight"], sd[b + "se.up.bias"]))
            y = F.gelu(F.linear(y.permute(0, 2, 3, 1), sd[b + "pwconv1.1.weight"], sd[b + "pwconv1.1.bias"]))
            g = torch.norm(y, p=2, dim=(1, 2), keepdim=True)
            y = (sd[b + "act.1.gamma"] * (g / (g.mean(-1, keepdim=True) + 1e-6)) + 1) * y + sd[b + "act.1.beta"]
            y = bn(F.linear(y, sd[b + "pwconv2.0.weight"]).permute(0, 3, 1, 2), sd, b + "pwconv2.2.")
            x = x + sd[b + "gamma"].view(1, -1, 1, 1) * y
    x = F.layer_norm(x.mean((2, 3)), (x.shape[1],), sd["norm.weight"], sd["norm.bias"], 1e-6)
    return F.linear(x, sd["head.weight"], sd["head.bias"])


def test_official_checkpoint_layout_loads_and_computes_the_official_forward(tmp_path):
    reference = randomized_small_model()
    official = to_official(reference.state_dict(), reference)
    assert "stages.1.0.dwconv.dil_conv_k7_2.weight" in official and "stages.0.0.act.1.beta" in official
    assert "downsample_layers.0.3.weight" in official and "stages.1.1.dwconv.weight" in official
    path = tmp_path / "unireplknet_official.pth"
    torch.save({"model": official}, path)
    model = convzoo.create_model("unireplknet_a", pretrained=path, num_classes=10, **SMALL).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = official_forward(official, x, SMALL["kernel_sizes"])
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(reference(x), expected, rtol=1e-4, atol=1e-4)


def test_official_deployed_layout_loads(tmp_path):
    """A file written after the official reparameterize_unireplknet(): lk_origin with a bias, no
    BatchNorm, pwconv2.0 with a bias, no gamma and no GRN beta."""
    reference = randomized_small_model()
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        expected = reference(x)
    convzoo.reparameterize(reference)
    deployed = {}
    for key, value in reference.state_dict().items():
        key = key.replace("dwconv.lkb_reparam.", "dwconv.lk_origin.")
        deployed[key] = value
    official = to_official(deployed, reference)
    assert "stages.1.0.dwconv.lk_origin.bias" in official and "stages.1.0.pwconv2.0.bias" in official
    assert not any("origin_bn" in k or k.endswith(".gamma") and "act" not in k for k in official)
    path = tmp_path / "deployed.pth"
    torch.save(official, path)
    model = convzoo.create_model("unireplknet_a", pretrained=path, num_classes=10, **SMALL).eval()
    assert convzoo.is_reparameterized(model)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)
    # the filter itself maps keys only: the loader puts the model into the deployed form first
    fresh = convzoo.create_model("unireplknet_a", num_classes=10, **SMALL)
    keys = list(fresh.state_dict())
    mapped = checkpoint_filter_fn(dict(official), fresh)
    assert list(fresh.state_dict()) == keys and not convzoo.is_reparameterized(fresh)
    assert fresh.checkpoint_form(official) == [""] and fresh.checkpoint_form(fresh.state_dict()) == []
    assert set(mapped) == set(model.state_dict()) - {k for k in model.state_dict() if k.endswith("num_batches_tracked")}
