"""Where deformable layers sample: offsets and masks captured during a forward pass.

The convzoo deformable operators run as the custom ops ``convzoo::deform_conv2d`` (v1/v2,
torchvision layout) and ``convzoo::dcnv3`` (InternImage layout). :func:`capture_sampling` runs
the model once under a :class:`~torch.utils._python_dispatch.TorchDispatchMode` that records the
arguments of every call of those ops, with forward hooks telling which module made the call, so
it works on any module that calls them (``ModulatedDeformConv2dPack``, ``DCNv3``, custom ones)
whatever it computes its offsets with. Layers switched to ``impl="reference"`` bypass the custom
ops and are not seen.

Sampling locations use torchvision's definition: output position (i, j), kernel position
(ky, kx) of offset group g samples the input at
``y = i * stride_h - pad_h + ky * dilation_h + dy``, ``x = j * stride_w - pad_w + kx * dilation_w + dx``
(pixel centres at integer coordinates), weighted by the mask. DCNv3 calls are converted to that
layout first with :func:`convzoo.ops.dcnv3_offsets_to_torchvision`, which is exact.
"""
from __future__ import annotations

import contextlib
import dataclasses
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

DEFORMABLE_OPS = ("convzoo::deform_conv2d", "convzoo::dcnv3")


@dataclasses.dataclass
class SamplingMap:
    """The sampling locations of one deformable op call.

    Attributes:
        layer: dotted name of the module that called the op (``""``: the model itself).
        op: ``"deform_conv2d"`` or ``"dcnv3"``.
        input_size: (H_in, W_in) of the op's input feature map.
        locations: (N, H_out, W_out, P, 2) (y, x) input coordinates, P = groups * points.
        weights: (N, H_out, W_out, P) modulation of each location (1 without a mask).
        groups: offset groups (each has its own locations); points per group = P / groups.
    """

    layer: str
    op: str
    input_size: Tuple[int, int]
    locations: torch.Tensor
    weights: torch.Tensor
    groups: int

    @property
    def output_size(self) -> Tuple[int, int]:
        return tuple(self.locations.shape[1:3])


def deform_conv2d_locations(
    offset: torch.Tensor,
    kernel_size: Tuple[int, int],
    stride: Tuple[int, int] = (1, 1),
    padding: Tuple[int, int] = (0, 0),
    dilation: Tuple[int, int] = (1, 1),
) -> torch.Tensor:
    """Sampling locations of ``deform_conv2d`` (torchvision layout).

    Args:
        offset (Tensor[N, 2 * G * kh * kw, H_out, W_out]): (dy, dx) pairs per offset group and
            row-major kernel position.
    Returns:
        Tensor[N, H_out, W_out, G * kh * kw, 2]: the (y, x) input coordinates.
    """
    kh, kw = kernel_size
    n, channels, height_out, width_out = offset.shape
    if channels % (2 * kh * kw):
        raise ValueError(f"offset must have 2 * groups * {kh * kw} channels for a {kh}x{kw} kernel, got {channels}")
    groups = channels // (2 * kh * kw)
    off = offset.reshape(n, groups, kh * kw, 2, height_out, width_out).permute(0, 4, 5, 1, 2, 3)
    ky = torch.arange(kh, device=offset.device).repeat_interleave(kw).to(offset.dtype)
    kx = torch.arange(kw, device=offset.device).repeat(kh).to(offset.dtype)
    rows = torch.arange(height_out, device=offset.device, dtype=offset.dtype) * stride[0] - padding[0]
    cols = torch.arange(width_out, device=offset.device, dtype=offset.dtype) * stride[1] - padding[1]
    base_y = rows[:, None, None, None] + ky * dilation[0]  # (H_out, 1, 1, K)
    base_x = cols[None, :, None, None] + kx * dilation[1]  # (1, W_out, 1, K)
    y = base_y + off[..., 0]
    x = base_x + off[..., 1]
    return torch.stack([y, x], dim=-1).reshape(n, height_out, width_out, groups * kh * kw, 2)


def _sampling_from_deform_conv2d(layer: str, args: dict) -> SamplingMap:
    x, offset, weight, mask = args["x"], args["offset"], args["weight"], args.get("mask")
    kernel = tuple(weight.shape[-2:])
    locations = deform_conv2d_locations(
        offset, kernel, (args["stride_h"], args["stride_w"]), (args["pad_h"], args["pad_w"]),
        (args["dilation_h"], args["dilation_w"]),
    )
    n, height_out, width_out, points, _ = locations.shape
    if mask is None:
        weights = torch.ones(n, height_out, width_out, points, dtype=offset.dtype, device=offset.device)
    else:
        weights = mask.permute(0, 2, 3, 1).reshape(n, height_out, width_out, points)
    return SamplingMap(layer, "deform_conv2d", tuple(x.shape[-2:]), locations, weights, points // (kernel[0] * kernel[1]))


def _sampling_from_dcnv3(layer: str, args: dict) -> SamplingMap:
    from ..ops import dcnv3_offsets_to_torchvision
    from ..ops.dcnv3.reference import softmax_points

    kh, kw, group = args["kernel_h"], args["kernel_w"], args["group"]
    mask = softmax_points(args["mask"], group) if args.get("mask_softmax") else args["mask"]  # logits given
    tv_offset, tv_mask = dcnv3_offsets_to_torchvision(
        args["offset"], mask, kh, kw, group, args["dilation_h"], args["dilation_w"],
        args["offset_scale"], args["remove_center"],
    )
    locations = deform_conv2d_locations(
        tv_offset, (kh, kw), (args["stride_h"], args["stride_w"]), (args["pad_h"], args["pad_w"]),
        (args["dilation_h"], args["dilation_w"]),
    )
    n, height_out, width_out, _, _ = locations.shape
    weights = tv_mask.permute(0, 2, 3, 1).reshape(n, height_out, width_out, group * kh * kw)
    if args["remove_center"]:  # the converter keeps the removed centre with mask 0: drop it
        keep = torch.ones(kh * kw, dtype=torch.bool)
        keep[(kh // 2) * kw + kw // 2] = False
        keep = keep.repeat(group)
        locations, weights = locations[..., keep, :], weights[..., keep]
    return SamplingMap(layer, "dcnv3", tuple(args["x"].shape[1:3]), locations, weights, group)


class _DeformableOpRecorder(TorchDispatchMode):
    """Records (module name, op, bound arguments) of each deformable op call."""

    def __init__(self, module_stack: List[str]):
        super().__init__()
        self.module_stack = module_stack
        self.calls: List[Tuple[str, str, dict]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        if name in DEFORMABLE_OPS:
            bound = dict(zip((a.name for a in func._schema.arguments), args))
            bound.update(kwargs)
            layer = self.module_stack[-1] if self.module_stack else ""
            self.calls.append((layer, name.split("::")[1], bound))
        return func(*args, **kwargs)


@contextlib.contextmanager
def module_stack(model: nn.Module) -> Iterator[List[str]]:
    """While active, the yielded list holds the names of the modules of ``model`` whose forward
    is running, innermost last (forward pre-hooks and hooks on every module)."""
    stack: List[str] = []

    def enter(name: str):
        def hook(module, inputs) -> None:
            stack.append(name)
        return hook

    def leave(module, inputs, output) -> None:
        stack.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


def unique_key(layer: str, taken) -> str:
    """``layer``, or ``layer#2``, ``layer#3``, ... when a module called the op more than once."""
    key, count = layer, 1
    while key in taken:
        count += 1
        key = f"{layer}#{count}"
    return key


def capture_sampling(model: nn.Module, x: torch.Tensor) -> Dict[str, SamplingMap]:
    """Run ``model`` on ``x`` (eval, no grad) and return the sampling map of every deformable op
    call, keyed by the calling module's name (``name#2``, ... when a module calls more than once)."""
    was_training = model.training
    try:
        model.eval()
        with module_stack(model) as stack, torch.no_grad(), _DeformableOpRecorder(stack) as recorder:
            model(x)
    finally:
        model.train(was_training)
    maps: Dict[str, SamplingMap] = {}
    for layer, op, args in recorder.calls:
        convert = _sampling_from_deform_conv2d if op == "deform_conv2d" else _sampling_from_dcnv3
        sampling = convert(layer, {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in args.items()})
        maps[unique_key(layer, maps)] = sampling
    return maps


@dataclasses.dataclass
class PointSamples:
    """The sampling of one output point, in the coordinates of the model's input image."""

    centre: Tuple[float, float]  # (y, x) of the output point
    output_index: Tuple[int, int]  # (i, j) in the layer's output grid
    locations: torch.Tensor  # (P, 2) (y, x)
    weights: torch.Tensor  # (P,)


def samples_at(
    sampling: SamplingMap, points: Sequence[Tuple[float, float]], image_size: Tuple[int, int], batch_index: int = 0,
) -> List[PointSamples]:
    """For each (y, x) ``point`` of the (H, W) model input, the sampling of the nearest output
    position of ``sampling``, mapped from the layer's input grid to the image's pixels."""
    height, width = image_size
    height_in, width_in = sampling.input_size
    height_out, width_out = sampling.output_size
    scale_in = torch.tensor([height / height_in, width / width_in], dtype=torch.float64)
    result = []
    for y, x in points:
        i = min(max(int(y * height_out / height), 0), height_out - 1)
        j = min(max(int(x * width_out / width), 0), width_out - 1)
        centre = ((i + 0.5) * height / height_out - 0.5, (j + 0.5) * width / width_out - 0.5)
        locations = (sampling.locations[batch_index, i, j].double().cpu() + 0.5) * scale_in - 0.5
        result.append(PointSamples(centre, (i, j), locations, sampling.weights[batch_index, i, j].double().cpu()))
    return result
