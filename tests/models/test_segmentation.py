"""UperNet / Semantic FPN models: shapes at every stride pattern, gradients, registry, loading,
channels_last, re-parameterization, ONNX export."""
import os
import re

import pytest
import torch
import torch.nn.functional as F

import convzoo
from convzoo.models import segmentation
from convzoo.models.segmentation import adaptive_avg_pool_matrix

# Narrow variants so that every test builds in well under a second.
NARROW = {
    "replknet_tiny": dict(channels=(8, 8, 16, 16), depths=(1, 1, 1, 1)),   # strides 4, 8, 16, 32
    "squeezenet1_1": {},                                                   # strides 2, 4, 8, 16
    "mobilenetv3_small_100": {},                                           # strides 4, 8, 16, 32, uneven widths
}
HEAD = dict(head_channels=8, head_fpn_channels=8, aux_channels=4)


def _model(head, backbone, **kwargs):
    torch.manual_seed(0)
    return convzoo.create_model(f"{head}_{backbone}", num_classes=5, **{**NARROW[backbone], **HEAD, **kwargs})


def test_every_backbone_gets_both_heads():
    backbones = [n for n in convzoo.list_models() if not n.startswith(("upernet_", "semfpn_"))]
    assert backbones and all(f"upernet_{b}" in convzoo.list_models() and f"semfpn_{b}" in convzoo.list_models()
                             for b in backbones)


@pytest.mark.parametrize("backbone", sorted(NARROW))
@pytest.mark.parametrize("head", ["upernet", "semfpn"])
def test_shapes_and_every_parameter_gets_a_gradient(head, backbone):
    model = _model(head, backbone)
    x = torch.randn(2, 3, 64, 80)
    outputs = model(x)
    assert isinstance(outputs, tuple) and [o.shape for o in outputs] == [(2, 5, 64, 80)] * 2
    model.loss(outputs, torch.randint(0, 5, (2, 64, 80))).backward()
    missing = [name for name, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    model.eval()
    assert model(torch.randn(1, 3, 50, 70)).shape == (1, 5, 50, 70)  # sizes that no stride divides


def test_head_reads_the_stride_4_map_and_fuses_there():
    model = _model("upernet", "replknet_tiny").eval()
    seen = {}
    model.decode_head.register_forward_hook(lambda m, i, o: seen.update(out=o.shape))
    model(torch.randn(1, 3, 64, 96))
    assert seen["out"] == (1, 8, 16, 24)


def test_defaults_are_the_papers():
    cfg = convzoo.create_model("upernet_replknet_tiny", num_classes=150).cfg
    assert (cfg.head_channels, cfg.aux_channels, cfg.aux_weight, cfg.head_pool_scales) == (512, 256, 0.4, (1, 2, 3, 6))
    model = convzoo.create_model("semfpn_replknet_tiny", num_classes=3)
    assert model.aux_head is None and model.cfg.head_fpn_channels == 256 and model.cfg.head_channels == 128


def test_loss_weights_the_auxiliary_head_and_ignores_255():
    model = _model("upernet", "replknet_tiny")
    main, aux = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)
    target = torch.randint(0, 5, (2, 8, 8))
    target[0, :4] = 255
    expected = F.cross_entropy(main, target, ignore_index=255) + 0.4 * F.cross_entropy(aux, target, ignore_index=255)
    torch.testing.assert_close(model.loss((main, aux), target), expected)


def test_unknown_option_lists_both_sets():
    with pytest.raises(TypeError, match="no option 'widths'.*head_channels"):
        convzoo.create_model("semfpn_replknet_tiny", widths=3)


def test_pretrained_backbone_loads_an_official_layout_checkpoint(tmp_path):
    torch.manual_seed(1)
    official = convzoo.create_model("replknet_tiny", num_classes=1000, **NARROW["replknet_tiny"])
    state = {re.sub(r"\.small_convs\.0\.", ".small_conv.", k): v for k, v in official.state_dict().items()}
    path = str(tmp_path / "RepLKNet-tiny.pth")
    torch.save({"model": state}, path)
    model = _model("upernet", "replknet_tiny", pretrained_backbone=path)
    ours = model.backbone.model.state_dict()
    for key, value in official.state_dict().items():
        if key in ours:
            assert torch.equal(ours[key], value), key
    assert "stages.0.blocks.0.large_kernel.small_convs.0.conv.weight" in ours
    assert not any(k.startswith("head.") for k in ours)


def test_save_and_load_model_round_trip(tmp_path):
    model = _model("semfpn", "replknet_tiny").eval()
    model.model_name = "semfpn_replknet_tiny"
    path = str(tmp_path / "seg.safetensors")
    convzoo.save_checkpoint(model, path)
    loaded = convzoo.models.load_model(path).eval()
    x = torch.randn(1, 3, 32, 48)
    torch.testing.assert_close(loaded(x), model(x))


def test_channels_last_and_reparameterize_give_the_same_output():
    model = _model("upernet", "replknet_tiny")
    model.train()
    model(torch.randn(4, 3, 64, 64))  # non-trivial BatchNorm statistics
    model.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = model(x)
        torch.testing.assert_close(model.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last)),
                                   expected, rtol=1e-4, atol=1e-4)
        params = sum(p.numel() for p in model.parameters())
        convzoo.reparameterize(model)
        assert sum(p.numel() for p in model.parameters()) < params
        torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("size_in,size_out", [(7, 3), (2, 6), (5, 5), (12, 1), (9, 2)])
def test_adaptive_pool_matrix_matches_pytorch(size_in, size_out):
    x = torch.randn(2, 3, size_in, size_in + 1)
    ph = adaptive_avg_pool_matrix(size_in, size_out)
    pw = adaptive_avg_pool_matrix(size_in + 1, size_out)
    torch.testing.assert_close(ph @ x @ pw.t(), F.adaptive_avg_pool2d(x, size_out))


def test_onnx_export_runs_in_onnxruntime(tmp_path):
    from convzoo.export import export_onnx

    model = _model("upernet", "replknet_tiny")
    result = export_onnx(model, str(tmp_path / "seg.onnx"), input_size=(64, 96), exporter="torchscript")
    assert result.output_shape == (2, 5, 64, 96)  # traced at batch 2: the batch is dynamic by default
    assert result.max_abs_error is not None and result.max_rel_error < 1e-4
    assert "MatMul" in result.onnx_ops and "Resize" in result.onnx_ops


def test_register_for_a_custom_backbone(monkeypatch):
    from convzoo.models import _registry

    monkeypatch.setattr(_registry, "_ENTRY_POINTS", dict(_registry._ENTRY_POINTS))
    monkeypatch.setattr(segmentation, "_ENTRY_POINTS", _registry._ENTRY_POINTS)
    monkeypatch.setitem(_registry._ENTRY_POINTS, "my_backbone", _registry._ENTRY_POINTS["replknet_tiny"])
    assert segmentation.register_segmentation_models(["my_backbone"]) == ["upernet_my_backbone", "semfpn_my_backbone"]
    assert segmentation.register_segmentation_models(["my_backbone"]) == []
