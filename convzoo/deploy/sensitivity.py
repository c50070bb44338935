"""Which layers INT8 quantization hurts most: simulated quantization one layer at a time.

Each convolution and linear layer is quantized on its own, in float arithmetic (PyTorch's fake
quantization): its weight per output channel to symmetric int8, its input per tensor to uint8
over the range seen on the images. The model's output is compared with the float output by its
signal-to-quantization-noise ratio, SQNR = 10 log10(sum(y^2) / sum((y_q - y)^2)) dB; the layers
with the lowest SQNR are the ones ``--keep-float auto`` leaves in float, the worst first, until
the simulation of the whole quantized model reaches the target SQNR.
"""
from __future__ import annotations

import contextlib
import math
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn as nn


def sqnr_db(reference: torch.Tensor, test: torch.Tensor) -> float:
    """10 log10(sum(reference^2) / sum((test - reference)^2)) in dB (inf when equal)."""
    reference, test = reference.double(), test.double()
    noise = float((test - reference).pow(2).sum())
    signal = float(reference.pow(2).sum())
    if noise == 0.0:
        return math.inf
    return 10.0 * math.log10(max(signal, 1e-300) / noise)


def quantizable_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The convolution and linear layers of ``model`` by module name (what INT8 backends quantize)."""
    return {name: module for name, module in model.named_modules() if isinstance(module, (nn.Conv2d, nn.Linear))}


def _fake_weight(weight: torch.Tensor) -> torch.Tensor:
    scale = weight.detach().abs().flatten(1).amax(1).clamp(min=1e-12) / 127.0
    zero = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(weight, scale.float(), zero, 0, -127, 127)


def _fake_input(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    low, high = min(low, 0.0), max(high, 0.0)
    scale = max((high - low) / 255.0, 1e-12)
    zero_point = int(round(-low / scale))
    return torch.fake_quantize_per_tensor_affine(x, scale, zero_point, 0, 255)


def input_ranges(model: nn.Module, images: torch.Tensor, layers: Dict[str, nn.Module]) -> Dict[str, Tuple[float, float]]:
    """(min, max) of each layer's input over ``images`` (N, C, H, W)."""
    ranges: Dict[str, Tuple[float, float]] = {}

    def hook(name):
        def record(module, args):
            low, high = float(args[0].min()), float(args[0].max())
            old = ranges.get(name, (low, high))
            ranges[name] = (min(old[0], low), max(old[1], high))
        return record

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    try:
        with torch.no_grad():
            model(images)
    finally:
        for handle in handles:
            handle.remove()
    return ranges


@contextlib.contextmanager
def simulated(layers: Dict[str, nn.Module], ranges: Dict[str, Tuple[float, float]]):
    """Within the context, ``layers`` compute with fake-quantized weights and inputs."""
    saved, handles = {}, []
    try:
        with torch.no_grad():
            for name, module in layers.items():
                saved[name] = module.weight.detach().clone()
                module.weight.copy_(_fake_weight(module.weight))
                low, high = ranges[name]
                handles.append(module.register_forward_pre_hook(
                    lambda m, args, low=low, high=high: (_fake_input(args[0], low, high),) + tuple(args[1:])))
        yield
    finally:
        with torch.no_grad():
            for name, weight in saved.items():
                layers[name].weight.copy_(weight)
        for handle in handles:
            handle.remove()


def layer_sensitivity(model: nn.Module, images: torch.Tensor) -> Dict[str, float]:
    """Output SQNR (dB) of ``model`` on ``images`` with each quantizable layer alone quantized,
    lowest (most hurt) first."""
    layers = quantizable_layers(model)
    ranges = input_ranges(model, images, layers)
    with torch.no_grad():
        reference = model(images)
        result = {}
        for name, module in layers.items():
            if name not in ranges:  # not reached by forward
                continue
            with simulated({name: module}, ranges):
                result[name] = sqnr_db(reference, model(images))
    return dict(sorted(result.items(), key=lambda item: item[1]))


def choose_keep_float(model: nn.Module, images: torch.Tensor, target_db: float, max_layers: int,
                      exclude: Sequence[str] = ()) -> Tuple[List[str], Dict[str, float], float]:
    """(layers to keep float, per-layer SQNR, simulated SQNR of the result).

    Starting from all quantizable layers but ``exclude`` quantized, the most sensitive ones are
    taken out one at a time until the simulated whole-model SQNR reaches ``target_db`` or
    ``max_layers`` are kept.
    """
    sensitivity = layer_sensitivity(model, images)
    layers = quantizable_layers(model)
    ranges = input_ranges(model, images, layers)
    with torch.no_grad():
        reference = model(images)
    candidates = [name for name in sensitivity if name not in exclude]
    kept: List[str] = []
    while True:
        active = {name: layers[name] for name in candidates if name not in kept}
        with simulated(active, ranges), torch.no_grad():
            current = sqnr_db(reference, model(images))
        if current >= target_db or len(kept) >= max_layers or not active:
            return kept, sensitivity, current
        kept.append(next(name for name in candidates if name not in kept))
