"""``convzoo support``: DCNv2's spatial-support analyses of one output node, drawn over an image."""
from __future__ import annotations

import argparse
import json
import textwrap
from typing import Tuple

import numpy as np
import torch

from ..analysis.erf import log_scores
from ..analysis.plotting import draw_points, heatmap_image, panels_figure
from ..analysis.support import spatial_support
from . import UsageError
from ._tools import add_model_arguments, check_model_names, image_size, load_model_or_exit, positive_int
from .offsets import _check_arguments, _read_image, _to_input

_EPILOG = """\
Method (Zhu et al., "Deformable ConvNets v2", 2019, section 2). The node is the position of the
model's last feature map under --point; its response is the sum of that position's channels.
  effective receptive field: |d response / d pixel|, summed over colours (log-scaled heatmap);
  effective sampling locations: the gradient of the response with respect to every location a
    deformable layer samples (deform_conv2d and dcnv3 calls), drawn over the image for --layer
    (default: the last deformable layer): its --top locations with the largest gradient, dot
    size ~ gradient; a model with zero offsets shows a regular grid;
  error-bounded saliency region: the smallest square centred on the point (growing by --step
    input pixels) such that the image masked outside it gives the node's feature vector within
    --error-bound (relative L2 error) of the full image's.

examples:
  convzoo support --model resnet50_dcnv2 --checkpoint r50dcn.pth --image cat.jpg --point 120,96 --out support.png
  convzoo support --model internimage_t --image cat.jpg --point 100,100 --out s.png --error-bound 0.05 --json s.json"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "support",
        help="DCNv2's spatial support of one node: ERF, effective sampling locations, saliency region",
        description=textwrap.fill("Compute, for the node of the last feature map under a point of an image, "
                                  "its effective receptive field, the effective sampling locations of "
                                  "its deformable layers and its error-bounded saliency region, and draw "
                                  "them side by side.", 92),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, metavar="PATH", help="the picture (JPEG/PNG/WebP)")
    parser.add_argument("--point", required=True, metavar="Y,X", help="the node's position, in image pixels (row, column)")
    parser.add_argument("--out", required=True, metavar="PNG", help="where to write the figure (.png)")
    parser.add_argument("--layer", metavar="NAME", help="deformable layer to draw (default: the last one); a wrong name lists them")
    parser.add_argument("--input-size", type=image_size, default=(224, 224), metavar="S|H,W", help="model input resolution (default: 224)")
    parser.add_argument("--error-bound", type=float, default=0.1, metavar="E", help="relative error of the saliency region (default: 0.1)")
    parser.add_argument("--step", type=positive_int, default=4, metavar="PX", help="growth of the saliency window per try, in input pixels (default: 4)")
    parser.add_argument("--top", type=positive_int, default=64, metavar="K", help="sampling locations drawn and listed per layer (default: 64)")
    parser.add_argument("--display-size", type=positive_int, default=320, metavar="PX", help="longest side of each panel (default: 320)")
    parser.add_argument("--json", metavar="OUT", help="also write the figures' numbers as JSON")
    parser.set_defaults(func=run)


def parse_point(text: str) -> Tuple[float, float]:
    """``"Y,X"`` -> (y, x) floats; a :class:`UsageError` otherwise."""
    try:
        y, x = (float(p) for p in text.split(","))
    except ValueError:
        raise UsageError(f"--point takes Y,X in image pixels (e.g. 120,80), got {text!r}") from None
    return y, x


def run(args) -> int:
    _check_arguments(args)
    check_model_names([args.model])
    if not 0 <= args.error_bound < 1:
        raise UsageError(f"--error-bound must be in [0, 1), got {args.error_bound}")
    image = _read_image(args.image)
    width, height = image.size
    y, x = parse_point(args.point)
    if not (0 <= y < height and 0 <= x < width):
        raise UsageError(f"--point {args.point} is outside the {width}x{height} image (Y,X: row, column)")
    model = load_model_or_exit(args.model, args.checkpoint, args.num_classes)
    in_h, in_w = args.input_size
    point = ((y + 0.5) * in_h / height - 0.5, (x + 0.5) * in_w / width - 0.5)
    result = spatial_support(model, _to_input(image, args.input_size), point, args.error_bound, args.step)
    if args.layer is not None and args.layer not in result.layers:
        known = ", ".join(result.layers) or "none (no deform_conv2d or dcnv3 call)"
        raise UsageError(f"no deformable layer named {args.layer!r}; the layers are: {known}")
    layer = args.layer if args.layer is not None else (list(result.layers)[-1] if result.layers else None)

    scale = args.display_size / max(in_h, in_w)
    shown = image.resize((max(1, round(in_w * scale)), max(1, round(in_h * scale))))
    centre = ((point[0] + 0.5) * scale - 0.5, (point[1] + 0.5) * scale - 0.5)
    erf_panel = draw_points(heatmap_image(log_scores(result.erf), args.display_size), [centre], [np.zeros((0, 2))], [None])
    if layer is not None:
        locations, gradient = result.layers[layer].effective(args.top)
        drawn = ((locations + 0.5) * scale - 0.5).numpy()
        sampling_panel = draw_points(shown, [centre], [drawn], [gradient.numpy()])
        sampling_caption = [f"{layer} ({result.layers[layer].op}): {int((result.layers[layer].gradient > 0).sum())} locations",
                            f"with a gradient; the {len(drawn)} largest drawn"]
    else:
        sampling_panel, sampling_caption = shown.copy(), ["no deformable layer in this model"]
    top, left, bottom, right = result.saliency_box
    dimmed = np.asarray(shown, dtype=np.float64) * 0.25
    rows = slice(round(top * scale), round(bottom * scale))
    cols = slice(round(left * scale), round(right * scale))
    dimmed[rows, cols] = np.asarray(shown, dtype=np.float64)[rows, cols]
    from PIL import Image

    saliency_panel = Image.fromarray(dimmed.round().astype(np.uint8), "RGB")
    figure = panels_figure([
        (erf_panel, "effective receptive field", [f"node {result.node} of a {result.feature_size[0]}x{result.feature_size[1]} map",
                                                  f"{int((result.erf > 0).sum())} pixels with a gradient"]),
        (sampling_panel, "effective sampling locations", sampling_caption),
        (saliency_panel, "error-bounded saliency region", [f"{bottom - top}x{right - left} input pixels",
                                                           f"error {result.saliency_error:.3g} <= {args.error_bound:g}"
                                                           if result.saliency_error <= args.error_bound else
                                                           f"error {result.saliency_error:.3g}: no smaller region"]),
    ], legend="ERF: log10(|gradient| + 1), scaled")
    figure.save(args.out)
    print(f"{args.model}: node {result.node} of the {result.feature_size[0]}x{result.feature_size[1]} last feature map, "
          f"response {result.response:.4g}")
    print(f"effective receptive field: {int((result.erf > 0).sum())} input pixels with a non-zero gradient")
    for name, support in result.layers.items():
        print(f"  {name} ({support.op}): {int((support.gradient > 0).sum())} of {len(support.gradient)} sampling locations support the node")
    print(f"saliency region: {bottom - top}x{right - left} input pixels (rows {top}-{bottom - 1}, columns {left}-{right - 1}), "
          f"relative error {result.saliency_error:.3g} (bound {args.error_bound:g})")
    print(f"wrote {args.out} ({figure.width}x{figure.height})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(model=args.model, image_size=[height, width], input_size=[in_h, in_w], drawn_layer=layer,
                           **result.to_dict(args.top)), f, indent=2)
        print(f"wrote {args.json}")
    return 0
