"""Helpers for the per-family model tests."""
import torch
import torch.nn as nn

import convzoo
from convzoo.analysis import count_flops


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_on_meta(name: str, **kwargs) -> nn.Module:
    """The registered model ``name`` with its parameters on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        return convzoo.create_model(name, **kwargs)


def count_macs(model: nn.Module, size: int = 224) -> int:
    """Multiply-accumulates of one (1, 3, size, size) forward (FlopCounterMode's FLOPs / 2)."""
    return count_flops(model, (1, 3, size, size)).macs


@torch.no_grad()
def randomize_batchnorms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every BatchNorm non-trivial running statistics and affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            m.running_mean.copy_(torch.randn(c, generator=gen) * 0.2)
            m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
            m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
            m.bias.copy_(torch.randn(c, generator=gen) * 0.2)
    return model


def assert_reparameterize_exact(model: nn.Module, x: torch.Tensor) -> None:
    """Eval outputs match within 1e-5 relative after ``convzoo.reparameterize``; no BatchNorm is
    left, the parameter count drops."""
    randomize_batchnorms(model).eval()
    with torch.no_grad():
        before = model(x)
    params_before = num_params(model)
    convzoo.reparameterize(model)
    with torch.no_grad():
        after = model(x)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert num_params(model) < params_before
    scale = before.abs().max()
    assert (after - before).abs().max() <= 1e-5 * scale, float((after - before).abs().max() / scale)


def assert_key_shapes(state: dict, expected: dict) -> None:
    """Each ``key -> shape`` of ``expected`` (typed by hand from the official code) is in ``state``."""
    for key, shape in expected.items():
        assert tuple(state[key].shape) == shape, key


def load_saved(tmp_path, name: str, reference: nn.Module, **kwargs) -> nn.Module:
    """Model ``name`` built with ``pretrained=`` a file holding ``reference``'s state dict."""
    path = tmp_path / f"{name}.pth"
    torch.save(reference.state_dict(), path)
    return convzoo.create_model(name, pretrained=path, **kwargs)


def assert_checkpoint_round_trip(tmp_path, name: str) -> None:
    """A saved state dict of model ``name`` loads back and gives the same eval outputs."""
    reference = convzoo.create_model(name).eval()
    model = load_saved(tmp_path, name, reference).eval()
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x))


def layer_norm_channels_first(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """LayerNorm over the channels of (N, C, H, W), written out as the official ConvNeXt-style code does."""
    mean = x.mean(1, keepdim=True)
    var = (x - mean).pow(2).mean(1, keepdim=True)
    return weight[:, None, None] * (x - mean) / torch.sqrt(var + eps) + bias[:, None, None]
