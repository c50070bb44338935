"""ConvNeXt's modernisation ladder: each step changes only what the paper's step changes, the
ends are ResNet-50 and ConvNeXt-T, and `convzoo list` shows the paper's figures beside ours."""
import dataclasses
import re

import pytest
import torch

import convzoo
from convzoo.cli import main
from convzoo.analysis import count_flops, count_params
from convzoo.models.convnext_ladder import STEPS, LadderCfg, ladder_configs

from _family_helpers import build_on_meta, randomize_batchnorms

pytestmark = pytest.mark.usefixtures("one_thread")

# What each of the paper's steps changes (Section 2), typed from the paper, in order.
PAPER_CHANGES = [
    {},
    {"depths": (3, 3, 9, 3)},
    {"stem": "patchify"},
    {"groups": "depthwise", "width": 96},
    {"block": "inverted"},
    {"block": "inverted_dw_first"},
    {"kernel_size": 7},
    {"act": "gelu"},
    {"fewer_acts": True},
    {"fewer_norms": True},
    {"norm": "ln"},
    {"separate_downsample": True},
]


def test_each_step_changes_only_what_the_paper_changes():
    configs = list(ladder_configs().values())
    assert [s[0] for s in STEPS] == convzoo.list_models("convnext_ladder*")
    previous = LadderCfg()
    assert previous.depths == (3, 4, 6, 3) and previous.kernel_size == 3 and previous.norm == "bn"
    for cfg, expected in zip(configs, PAPER_CHANGES, strict=True):
        diff = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
                if getattr(cfg, f.name) != getattr(previous, f.name)}
        assert diff == expected
        previous = cfg


def torchvision_to_step0(state):
    """torchvision's ResNet-50 keys -> the first ladder step's."""
    out = {}
    for key, value in state.items():
        key = re.sub(r"^conv1\.", "stem.0.", key)
        key = re.sub(r"^bn1\.", "stem.1.", key)
        m = re.match(r"layer(\d)\.(\d+)\.(.*)", key)
        if m:
            rest = re.sub(r"^conv(\d)\.", r"conv\1.0.", m.group(3))
            rest = re.sub(r"^bn(\d)\.", r"conv\1.1.", rest)
            rest = rest.replace("downsample.", "shortcut.")
            key = f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}.{rest}"
        out[re.sub(r"^fc\.", "head.fc.", key)] = value
    return out


def test_first_step_is_resnet50_with_the_recipes_layer_scale():
    resnet = randomize_batchnorms(convzoo.create_model("resnet50", num_classes=10)).eval()
    step = convzoo.create_model("convnext_ladder_00_resnet50", num_classes=10, ls_init_value=1.0).eval()
    gammas = {k: v for k, v in step.state_dict().items() if k.endswith(".gamma")}
    assert count_params(step) == count_params(resnet) + sum(v.numel() for v in gammas.values())
    step.load_state_dict({**torchvision_to_step0(resnet.state_dict()), **gammas})
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(step(x), resnet(x), rtol=1e-4, atol=1e-4)


def convnext_to_last_step(state):
    """ConvNeXt's (timm-layout) keys -> the last ladder step's; its Linear 1x1s become 1x1 convs."""
    out = {}
    for key, value in state.items():
        for ours, theirs in (("conv_dw.", "conv1.0."), ("norm.", "conv1.1."), ("mlp.fc1.", "conv2.0."), ("mlp.fc2.", "conv3.0.")):
            key = re.sub(rf"(blocks\.\d+\.){re.escape(ours)}", rf"\g<1>{theirs}", key)
        if re.search(r"blocks\.\d+\.conv[23]\.0\.weight$", key):
            value = value[:, :, None, None]
        out[key] = value
    return out


def test_last_step_is_convnext_tiny():
    torch.manual_seed(0)
    convnext = convzoo.create_model("convnext_tiny", num_classes=10, ls_init_value=0.5).eval()
    step = convzoo.create_model("convnext_ladder_11_separate_downsample", num_classes=10).eval()
    assert count_params(step) == count_params(convnext)
    assert count_params(build_on_meta("convnext_ladder_11_separate_downsample")) == count_params(build_on_meta("convnext_tiny"))
    step.load_state_dict(convnext_to_last_step(convnext.state_dict()))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(step(x), convnext(x), rtol=1e-4, atol=1e-4)


def test_macs_where_the_paper_figure_was_found():
    found = [(name, gflops) for name, _, _, _, gflops in STEPS if gflops is not None]
    assert len(found) == 2
    for name, gflops in found:
        assert abs(count_flops(build_on_meta(name)).macs / 1e9 - gflops) < 0.06, name


def test_convzoo_list_prints_each_step_beside_the_paper(capsys):
    assert main(["list", "convnext_ladder*"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert "paper" in out[0]
    rows = out[1:]
    assert [r.split()[0] for r in rows] == [s[0] for s in STEPS]
    assert rows[0].split()[1:3] == ["25.57M", "4.09G"] and "4.1G, top-1 78.8%" in rows[0]
    assert rows[-1].split()[1:3] == ["28.59M", "4.46G"] and "4.5G, top-1 82.0%" in rows[-1]
    assert "n/f" in rows[8]
