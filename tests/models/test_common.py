"""Checks every registered classifier must pass, parametrised over ``convzoo.list_models()``
less the segmentation models (``upernet_*``, ``semfpn_*``: tests/models/test_segmentation.py).

Families listed in ``SMALL`` run with reduced depths/widths (their variant-specific options,
such as kernel sizes, are kept); other families run every variant whose parameter count is at
most ``MAX_PARAMS`` on a real forward pass, plus the smallest variant of the family. Every
model is also built on the meta device, which costs no memory.
"""
import logging

import pytest
import torch
import torch.nn as nn

import convzoo
from convzoo.models import _registry
from convzoo.layers import is_reparameterized

SMALL = {
    "replknet": dict(depths=(1, 1, 1, 1), channels=(16, 16, 24, 32)),
    "convnext": dict(depths=(1, 1, 1, 1), dims=(16, 16, 24, 32)),
    "convnext_ladder": dict(depths=(1, 1, 1, 1), width=8),
    "internimage": dict(depths=(1, 1, 2, 1), channels=16, groups=(1, 2, 4, 8)),
    "unireplknet": dict(depths=(1, 1, 1, 1), dims=(16, 16, 24, 32), kernel_sizes=((3,), (13,), (7,), (5,))),
}
MAX_PARAMS = 30_000_000
IMAGE = 64
NUM_CLASSES = 7


CLASSIFIERS = [n for n in convzoo.list_models() if not n.startswith(("upernet_", "semfpn_"))]


def family(name):
    return _registry.get_entry_point(name).__module__.rsplit(".", 1)[-1]


def meta_param_count(name):
    with torch.device("meta"):
        model = convzoo.create_model(name)
    return sum(p.numel() for p in model.parameters())


def runnable_models():
    """(name, overrides) of the models cheap enough for a real forward/backward on CPU."""
    picked, smallest = [], {}
    for name in CLASSIFIERS:
        fam = family(name)
        if fam in SMALL:
            picked.append(name)
            continue
        try:
            count = meta_param_count(name)
        except Exception:  # a model that cannot be built fails its own tests below, not the collection
            count = 0
        if count <= MAX_PARAMS:
            picked.append(name)
        if fam not in smallest or count < smallest[fam][1]:
            smallest[fam] = (name, count)
    picked += [name for name, _ in smallest.values() if name not in picked]
    return sorted(picked)


def one_per_family():
    chosen = {}
    for name in runnable_models():
        chosen.setdefault(family(name), name)
    return sorted(chosen.values())


RUNNABLE = runnable_models()


pytestmark = pytest.mark.usefixtures("one_thread")


def build(name, **kwargs):
    kwargs.setdefault("num_classes", NUM_CLASSES)
    return convzoo.create_model(name, **SMALL.get(family(name), {}), **kwargs)


def randomize_norms(model):
    """Non-trivial BatchNorm statistics, so that folding them is really tested."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.running_var is not None:
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                if m.weight is not None:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.2, 0.2)


def assert_rel_close(actual, expected, rtol=1e-5):
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rtol * scale, f"max error {err.item():.3g} > {rtol} * {scale.item():.3g}"


def image(batch=2):
    return torch.randn(batch, 3, IMAGE, IMAGE)


# ----------------------------------------------------------------------------- every model, on meta


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_builds_on_meta_with_the_contract(name):
    with torch.device("meta"):
        model = convzoo.create_model(name)
    assert model.model_name == name
    assert len(model.feature_info) >= 1
    strides = [f["reduction"] for f in model.feature_info]
    assert strides == sorted(strides)
    modules = dict(model.named_modules())
    assert all(f["module"] in modules for f in model.feature_info)
    keys = list(model.state_dict())
    heads = (model.classifier_name,) if isinstance(model.classifier_name, str) else model.classifier_name
    assert any(k.startswith(h + ".") for h in heads for k in keys)
    for method in ("forward_features", "forward_head", "forward_intermediates", "reset_classifier", "set_grad_checkpointing"):
        assert callable(getattr(model, method))


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_unknown_name_lists_close_names(name):
    with pytest.raises(ValueError, match=f"unknown model '{name}x'; did you mean .*{name}"):
        convzoo.create_model(name + "x")


# ----------------------------------------------------------------------------- real forward passes


@pytest.mark.parametrize("name", RUNNABLE)
def test_forward_backward_every_parameter_gets_a_gradient(name):
    model = build(name).train()
    out = model(image())
    assert out.shape == (2, NUM_CLASSES)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"no gradient for {missing}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", RUNNABLE)
def test_features_only_matches_feature_info(name):
    """Channels exactly; strides from how much each map grows when the input grows by IMAGE pixels
    (exact whatever the padding); sizes at most IMAGE / stride."""
    model = build(name, features_only=True, out_indices=tuple(range(len(build(name).feature_info)))).eval()
    with torch.no_grad():
        feats = model(image(1))
        bigger = model(torch.randn(1, 3, 2 * IMAGE, IMAGE))
    assert len(feats) == len(bigger) == len(model.feature_info)
    for feat, feat_big, info in zip(feats, bigger, model.feature_info):
        stride = info["reduction"]
        assert feat.shape[:2] == (1, info["num_chs"]), info
        assert feat.shape[2] == feat.shape[3] <= IMAGE // stride, info
        assert feat_big.shape[2] - feat.shape[2] == IMAGE // stride and feat_big.shape[3] == feat.shape[3], info
        if family(name) in SMALL:
            assert feat.shape[2:] == (IMAGE // stride, IMAGE // stride)
    last = build(name, features_only=True, out_indices=(-1,)).eval()
    assert last.feature_info == [model.feature_info[-1]]


@pytest.mark.parametrize("name", RUNNABLE)
def test_reparameterize_keeps_eval_outputs(name):
    model = build(name)
    randomize_norms(model)
    model.eval()
    x = image()
    with torch.no_grad():
        expected = model(x)
        params_before = sum(p.numel() for p in model.parameters())
        convzoo.reparameterize(model)
        actual = model(x)
    assert is_reparameterized(model) and not model.training
    assert sum(p.numel() for p in model.parameters()) <= params_before
    assert_rel_close(actual, expected)


def _inputs_of_reparameterizable_parts(model, x):
    """{part: its input} for the first module of each class with ``reparameterize()`` in ``model``."""
    parts, inputs, hooks = {}, {}, []
    for module in model.modules():
        if module is not model and callable(getattr(module, "reparameterize", None)):
            parts.setdefault(type(module), module)
    for part in parts.values():
        hooks.append(part.register_forward_pre_hook(lambda m, args: inputs.setdefault(m, args[0].detach().clone())))
    with torch.no_grad():
        model(x)
    for hook in hooks:
        hook.remove()
    return inputs


@pytest.mark.parametrize("name", one_per_family())
def test_reparameterize_each_part_alone_and_the_model_twice(name):
    import copy

    model = build(name)
    randomize_norms(model)
    model.eval()
    x = image()
    inputs = _inputs_of_reparameterizable_parts(model, x)  # none in SqueezeNet (no norms)
    for part, part_input in inputs.items():
        alone = copy.deepcopy(part).eval()
        with torch.no_grad():
            expected = alone(part_input)
            assert convzoo.reparameterize(alone) is alone and is_reparameterized(alone), type(part).__name__
            assert_rel_close(alone(part_input), expected)
    with torch.no_grad():
        expected = model(x)
        convzoo.reparameterize(model)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        convzoo.reparameterize(model)
        assert is_reparameterized(model)
        assert model.state_dict().keys() == state.keys()
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
        assert_rel_close(model(x), expected)


@pytest.mark.parametrize("name", RUNNABLE)
def test_channels_last_input_gives_the_same_output(name):
    model = build(name).eval()
    x = image()
    with torch.no_grad():
        expected = model(x)
        actual = model(x.contiguous(memory_format=torch.channels_last))
        actual_cl_model = model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert_rel_close(actual, expected)
    assert_rel_close(actual_cl_model, expected)


@pytest.mark.parametrize("name", RUNNABLE)
def test_grad_checkpointing_gives_the_same_output_and_gradients(name):
    torch.manual_seed(0)
    plain = build(name).train()
    checkpointed = build(name, grad_checkpointing=True).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = image()
    outs, grads = [], []
    for model in (plain, checkpointed):
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(1)  # the same dropout masks on both sides
        out = model(xi)
        out.sum().backward()
        outs.append(out.detach())
        grads.append(xi.grad)
    assert_rel_close(outs[1], outs[0])
    assert_rel_close(grads[1], grads[0])


@pytest.mark.parametrize("name", RUNNABLE)
def test_save_and_load_model_round_trip(name, tmp_path):
    model = build(name)
    randomize_norms(model)
    model.eval()
    path = tmp_path / "model.safetensors"
    convzoo.save_checkpoint(model, path)
    loaded = convzoo.models.load_model(path).eval()
    x = image()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))
    convzoo.reparameterize(model)
    convzoo.save_checkpoint(model, path)
    deployed = convzoo.models.load_model(path)
    assert is_reparameterized(deployed)
    with torch.no_grad():
        torch.testing.assert_close(deployed.eval()(x), model(x))


@pytest.mark.parametrize("name", RUNNABLE)
def test_other_num_classes_reinitialises_the_head_and_says_so(name, tmp_path, caplog):
    model = build(name)
    path = tmp_path / "model.safetensors"
    convzoo.save_checkpoint(model, path)
    with caplog.at_level(logging.WARNING, logger="convzoo"):
        other = build(name, pretrained=path, num_classes=3)
    assert "classifier re-initialised for num_classes=3" in caplog.text
    own = model.state_dict()
    for key, value in other.state_dict().items():
        if not key.startswith(other.classifier_name + "."):
            torch.testing.assert_close(value, own[key])
    assert other.eval()(image()).shape == (2, 3)


@pytest.mark.parametrize("name", RUNNABLE)
def test_no_classifier_drops_the_checkpoint_head_and_says_so(name, tmp_path, caplog):
    """num_classes=0 (timm's headless model) loads a file with a head: its classifier keys are
    left out with a log message, everything else loads, the output is the pre-logits features."""
    model = build(name)
    randomize_norms(model)
    model.eval()
    path = tmp_path / "with_head.pth"
    torch.save(model.state_dict(), path)
    with caplog.at_level(logging.WARNING, logger="convzoo"):
        headless = build(name, pretrained=path, num_classes=0).eval()
    assert "no classifier for num_classes=0" in caplog.text
    heads = (model.classifier_name,) if isinstance(model.classifier_name, str) else model.classifier_name
    assert not any(k.startswith(h + ".") for h in heads for k in headless.state_dict())
    own = model.state_dict()
    for key, value in headless.state_dict().items():
        torch.testing.assert_close(value, own[key])
    x = image()
    with torch.no_grad():
        assert_rel_close(headless(x), model.forward_head(model.forward_features(x), pre_logits=True))


@pytest.mark.parametrize("name", RUNNABLE)
def test_wrong_keys_are_named(name, tmp_path):
    model = build(name)
    state = model.state_dict()
    dropped = next(k for k in state if not k.startswith(model.classifier_name))
    del state[dropped]
    state["not_a_layer.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError, match="missing keys") as info:
        build(name, pretrained=path)
    assert dropped in str(info.value) and "not_a_layer.weight" in str(info.value)


@pytest.mark.parametrize("name", one_per_family())
def test_torch_compile(name):
    model = build(name).eval()
    x = image(1)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        assert_rel_close(compiled(x), model(x))


@pytest.mark.parametrize("name", sorted(set(one_per_family()) | {"mobilenetv2_100", "mobilenetv3_small_100"}))
def test_drop_rate_is_dropout_right_before_the_classifier(name):
    """timm's ``drop_rate``: in training, the classifier's input is the input it gets without
    dropout, with about half of its non-zero entries zeroed and the rest doubled; in eval, no change."""
    dropped = build(name, drop_rate=0.5)
    plain = build(name, drop_rate=0.0)
    plain.load_state_dict(dropped.state_dict())
    heads = (dropped.classifier_name,) if isinstance(dropped.classifier_name, str) else dropped.classifier_name
    seen = []
    for model in (dropped, plain):
        model.get_submodule(heads[0]).register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    x = image(4)
    torch.manual_seed(0)
    dropped.train()(x)
    plain.train()(x)
    got, clean = seen
    zeroed = got == 0
    assert 0.3 < zeroed[clean != 0].float().mean() < 0.7
    torch.testing.assert_close(got[~zeroed], 2 * clean[~zeroed])
    torch.testing.assert_close(dropped.eval()(x), plain.eval()(x))
    with pytest.raises(ValueError, match="drop_rate must be in"):
        convzoo.create_model(name, drop_rate=1.5)
