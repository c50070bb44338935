"""DCNv2's spatial-support analyses of one output node (Zhu et al., "Deformable ConvNets v2: More
Deformable, Better Results", CVPR 2019, Section 2).

The node is the position of the last feature map (:func:`~convzoo.analysis.erf.last_feature_map`)
under a chosen image point; its response ``r`` is the sum of that position's channels, and its
feature vector ``v`` the channels themselves.

- **Effective receptive field**: ``|dr/dx|`` summed over the input channels, an (H, W) map.
- **Effective sampling locations**: for every deformable op call (``deform_conv2d``, ``dcnv3``),
  the gradient of ``r`` with respect to each sampling location (the (y, x) where a kernel point
  of an output position samples its input), found by adding a zero "probe" to the op's offsets
  (in torchvision's layout: a location moves exactly as its offset does) and differentiating.
  Locations are given in the image's pixel coordinates; a location whose gradient is zero does
  not support the node.
- **Error-bounded saliency region**: the smallest square window centred on the point (sides
  growing by ``step`` pixels, clipped to the image) such that the image masked to zero outside
  it (zero is the mean colour after normalisation) gives a node vector within ``error_bound``
  of the full image's, in relative L2 norm: ``||v_masked - v|| <= error_bound * ||v||``. (The
  paper grows the region progressively too; its exact region shapes are not published as code.)
"""
from __future__ import annotations

import dataclasses
from typing import Dict, List, Optional, Tuple

import torch
import torch.nn as nn
from torch.overrides import TorchFunctionMode

from .erf import last_feature_map
from .offsets import DEFORMABLE_OPS, deform_conv2d_locations, module_stack, unique_key

__all__ = ["LayerSupport", "SpatialSupport", "spatial_support", "node_index", "saliency_region"]


@dataclasses.dataclass
class LayerSupport:
    """The sampling locations of one deformable op call and the node's gradient at each.

    Attributes:
        layer: the calling module's name (``name#2`` for its second call).
        op: ``"deform_conv2d"`` or ``"dcnv3"``.
        locations: (M, 2) (y, x) in image pixels, M = H_out * W_out * groups * kernel points.
        gradient: (M,) the norm of dr/d(location) of each.
    """

    layer: str
    op: str
    locations: torch.Tensor
    gradient: torch.Tensor

    def effective(self, top: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """The locations with a non-zero gradient (the ``top`` largest when given), largest first."""
        order = torch.argsort(self.gradient, descending=True)
        order = order[self.gradient[order] > 0]
        if top is not None:
            order = order[:top]
        return self.locations[order], self.gradient[order]


@dataclasses.dataclass
class SpatialSupport:
    """The three analyses of one node; maps and locations are in the input image's pixels."""

    point: Tuple[float, float]  # (y, x) asked for
    node: Tuple[int, int]  # (i, j) in the last feature map
    feature_size: Tuple[int, int]
    response: float  # r of the full image
    erf: torch.Tensor  # (H, W) float64
    layers: Dict[str, LayerSupport]
    saliency_box: Tuple[int, int, int, int]  # (top, left, bottom, right), bottom/right exclusive
    saliency_error: float  # relative error of the node vector with only that box kept
    error_bound: float

    def to_dict(self, top: int = 64) -> dict:
        """JSON-ready summary: the maps left out, the ``top`` effective locations of each layer."""
        layers = {}
        for name, support in self.layers.items():
            locations, gradient = support.effective(top)
            layers[name] = {"op": support.op, "effective_locations": int((support.gradient > 0).sum()),
                            "top_locations_yx": locations.tolist(), "top_gradients": gradient.tolist()}
        top_, left, bottom, right = self.saliency_box
        return {"point_yx": list(self.point), "node": list(self.node), "feature_size": list(self.feature_size),
                "response": self.response, "erf_pixels": int((self.erf > 0).sum()),
                "saliency_box": {"top": top_, "left": left, "bottom": bottom, "right": right,
                                 "height": bottom - top_, "width": right - left},
                "saliency_error": self.saliency_error, "error_bound": self.error_bound, "layers": layers}


def node_index(point: Tuple[float, float], image_size: Tuple[int, int], feature_size: Tuple[int, int]) -> Tuple[int, int]:
    """The (i, j) of the feature map cell that covers image pixel ``point`` (y, x)."""
    (y, x), (height, width), (h, w) = point, image_size, feature_size
    return min(max(int(y * h / height), 0), h - 1), min(max(int(x * w / width), 0), w - 1)


class _OffsetProbes(TorchFunctionMode):
    """Adds a zero probe (requires grad, torchvision layout) to the offsets of every deformable
    op call and keeps, per call, the probe and the sampling locations in the op's input grid."""

    def __init__(self, stack: List[str]):
        super().__init__()
        self.stack = stack
        self.calls: List[Tuple[str, str, torch.Tensor, torch.Tensor, Tuple[int, int]]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        name = getattr(getattr(func, "_schema", None), "name", None)
        if name not in DEFORMABLE_OPS:
            return func(*args, **kwargs)
        names = [a.name for a in func._schema.arguments]
        bound = dict(zip(names, args), **kwargs)
        if name == "convzoo::deform_conv2d":
            tv_offset, kernel = bound["offset"].detach(), tuple(bound["weight"].shape[-2:])
            probe = torch.zeros_like(tv_offset, requires_grad=True)
            bound["offset"] = bound["offset"] + probe
            input_size = tuple(bound["x"].shape[-2:])
        else:
            from ..ops import dcnv3_offsets_to_torchvision, torchvision_offsets_to_dcnv3

            kernel = (bound["kernel_h"], bound["kernel_w"])
            geometry = (bound["kernel_h"], bound["kernel_w"], bound["group"], bound["dilation_h"], bound["dilation_w"],
                        bound["offset_scale"], bound["remove_center"])
            tv_offset, _ = dcnv3_offsets_to_torchvision(bound["offset"].detach(), bound["mask"].detach(), *geometry)
            probe = torch.zeros_like(tv_offset, requires_grad=True)
            moved, _ = torchvision_offsets_to_dcnv3(probe, None, *geometry)
            still, _ = torchvision_offsets_to_dcnv3(torch.zeros_like(tv_offset), None, *geometry)
            bound["offset"] = bound["offset"] + (moved - still)  # the linear part: a location's own shift
            input_size = tuple(bound["x"].shape[1:3])
        locations = deform_conv2d_locations(tv_offset, kernel, (bound["stride_h"], bound["stride_w"]),
                                            (bound["pad_h"], bound["pad_w"]), (bound["dilation_h"], bound["dilation_w"]))
        layer = self.stack[-1] if self.stack else ""
        self.calls.append((layer, name.split("::")[1], probe, locations, input_size))
        return func(*(bound[n] for n in names if n in bound))


@torch.no_grad()
def saliency_region(model: nn.Module, x: torch.Tensor, node: Tuple[int, int], point: Tuple[float, float],
                    error_bound: float, step: int, batch: int = 8) -> Tuple[Tuple[int, int, int, int], float]:
    """The smallest centred window (box, relative error) keeping the node's vector within
    ``error_bound`` (see the module docstring); the whole image when no smaller one does."""
    height, width = x.shape[-2:]
    full = last_feature_map(model, x)[0, :, node[0], node[1]]
    norm = float(full.norm())
    cy, cx = int(round(point[0])), int(round(point[1]))
    boxes, side = [], 1
    while True:
        half = side // 2
        box = (max(cy - half, 0), max(cx - half, 0), min(cy + half + 1, height), min(cx + half + 1, width))
        boxes.append(box)
        if box == (0, 0, height, width):
            break
        side += step
    for start in range(0, len(boxes), batch):
        chunk = boxes[start:start + batch]
        masked = x.new_zeros((len(chunk),) + tuple(x.shape[1:]))
        for k, (top, left, bottom, right) in enumerate(chunk):
            masked[k, :, top:bottom, left:right] = x[0, :, top:bottom, left:right]
        vectors = last_feature_map(model, masked)[:, :, node[0], node[1]]
        errors = (vectors - full).norm(dim=1) / max(norm, 1e-30)
        for box, error in zip(chunk, errors.tolist()):
            if error <= error_bound:
                return box, error
    return boxes[-1], float(errors[-1])


def spatial_support(model: nn.Module, x: torch.Tensor, point: Tuple[float, float],
                    error_bound: float = 0.1, step: int = 2) -> SpatialSupport:
    """The ERF, the effective sampling locations and the error-bounded saliency region of the node
    under ``point`` (y, x in pixels of ``x``, a (1, C, H, W) normalised image), in eval mode."""
    if x.dim() != 4 or x.shape[0] != 1:
        raise ValueError(f"x must be one image (1, C, H, W), got shape {tuple(x.shape)}")
    height, width = x.shape[-2:]
    if not (0 <= point[0] < height and 0 <= point[1] < width):
        raise ValueError(f"point (y, x) = {point} is outside the {height}x{width} image")
    if not 0 <= error_bound < 1:
        raise ValueError(f"error_bound must be in [0, 1), got {error_bound}")
    if step < 1:
        raise ValueError(f"step must be a positive number of pixels, got {step}")
    was_training = model.training
    model.eval()
    try:
        image = x.detach().clone().requires_grad_(True)
        with torch.enable_grad(), module_stack(model) as stack, _OffsetProbes(stack) as probes:
            features = last_feature_map(model, image)
        feature_size = tuple(features.shape[-2:])
        node = node_index(point, (height, width), feature_size)
        response = features[0, :, node[0], node[1]].sum()
        inputs = [image] + [probe for _, _, probe, _, _ in probes.calls]
        grads = torch.autograd.grad(response, inputs, allow_unused=True)
        erf = grads[0].abs().sum((0, 1)).double().cpu() if grads[0] is not None else torch.zeros(height, width, dtype=torch.float64)
        layers: Dict[str, LayerSupport] = {}
        for (layer, op, probe, locations, (h_in, w_in)), grad in zip(probes.calls, grads[1:]):
            n, _, h_out, w_out = probe.shape
            grad = torch.zeros_like(probe) if grad is None else grad
            points = locations.shape[3]
            norms = grad.reshape(n, points, 2, h_out, w_out).permute(0, 3, 4, 1, 2).norm(dim=-1)
            scale = torch.tensor([height / h_in, width / w_in], dtype=torch.float64)
            in_image = (locations[0].double().cpu().reshape(-1, 2) + 0.5) * scale - 0.5
            layers[unique_key(layer, layers)] = LayerSupport(layer, op, in_image, norms[0].double().cpu().reshape(-1))
        box, error = saliency_region(model, x.detach(), node, point, error_bound, step)
    finally:
        model.train(was_training)
    return SpatialSupport(point=tuple(float(p) for p in point), node=node, feature_size=feature_size,
                          response=float(response.detach()), erf=erf, layers=layers, saliency_box=box,
                          saliency_error=error, error_bound=error_bound)
