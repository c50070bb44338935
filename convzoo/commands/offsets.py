"""``convzoo offsets``: where a deformable layer samples, drawn over an image."""
from __future__ import annotations

import argparse
import textwrap
import json
import os
from typing import List, Tuple

import numpy as np
import torch

from ..analysis.offsets import capture_sampling, samples_at
from ..analysis.plotting import draw_points, panels_figure
from . import UsageError
from ._tools import add_model_arguments, check_model_names, image_size, load_model_or_exit, positive_int

_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

_EPILOG = """\
The image is resized to --input-size and run through the model once; every call of a
deformable operator (deform_conv2d of ModulatedDeformConv2d / DeformConv2d, dcnv3 of DCNv3) is
recorded with its offsets and mask. For each chosen point the figure shows the point (a cross)
and the locations the layer samples for the output position under it (dots, larger = higher
mask weight, one colour per point), mapped back onto the image. A freshly initialised model
has zero offsets (a regular grid); load trained weights with --checkpoint to see them move.

examples:
  convzoo offsets --model resnet50_dcnv2 --checkpoint r50dcn.pth --image cat.jpg --out offsets.png
  convzoo offsets --model internimage_t --image cat.jpg --out o.png --layer levels.3.blocks.0.dcn --points 100,80 --points 40,120"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "offsets",
        help="draw where a deformable layer samples for chosen points of an image",
        description=textwrap.fill("Run a model on an image, capture the offsets and masks of a deformable "
                    "layer and draw its sampling locations for chosen output points over the image.", 92),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--image", required=True, metavar="PATH", help="the picture (JPEG/PNG/WebP)")
    parser.add_argument("--out", required=True, metavar="PNG", help="where to write the figure (.png)")
    parser.add_argument("--layer", metavar="NAME", help="module name of the deformable layer (default: the last one); a wrong name lists them")
    parser.add_argument("--points", action="append", metavar="X,Y",
                        help="a point in image pixels (repeatable; default: the centre and four points around it)")
    parser.add_argument("--input-size", type=image_size, default=(224, 224), metavar="S|H,W", help="model input resolution (default: 224)")
    parser.add_argument("--display-size", type=positive_int, default=512, metavar="PX", help="longest side of the drawn image (default: 512)")
    parser.add_argument("--json", metavar="OUT", help="also write the points and their sampling locations as JSON")
    parser.set_defaults(func=run)


def parse_point(text: str) -> Tuple[float, float]:
    """``"X,Y"`` -> (x, y) floats; a :class:`UsageError` otherwise."""
    parts = text.split(",")
    try:
        x, y = (float(p) for p in parts)
    except ValueError:
        raise UsageError(f"--points takes X,Y in image pixels (e.g. 120,80), got {text!r}") from None
    return x, y


def default_points(width: int, height: int) -> List[Tuple[float, float]]:
    """The centre and the four points half-way to the edges, as (x, y)."""
    return [(width / 2, height / 2), (width / 4, height / 2), (3 * width / 4, height / 2),
            (width / 2, height / 4), (width / 2, 3 * height / 4)]


def _check_arguments(args) -> None:
    if not os.path.isfile(args.image):
        raise UsageError(f"image not found: {args.image}")
    if not args.out.lower().endswith(".png"):
        raise UsageError(f"--out must name a .png file, got {args.out!r}")
    for path in [args.out] + ([args.json] if args.json else []):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UsageError(f"the output folder does not exist: {folder}")


def _read_image(path: str):
    from PIL import Image

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise UsageError(f"cannot read the image {path}: {error}") from None


def _to_input(image, size: Tuple[int, int]) -> torch.Tensor:
    from PIL import Image

    resized = image.resize((size[1], size[0]), Image.BICUBIC)
    tensor = torch.from_numpy(np.asarray(resized, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return ((tensor - _MEAN) / _STD).unsqueeze(0)


def run(args) -> int:
    _check_arguments(args)
    check_model_names([args.model])
    image = _read_image(args.image)
    width, height = image.size
    points = [parse_point(p) for p in args.points] if args.points else default_points(width, height)
    outside = [p for p in points if not (0 <= p[0] < width and 0 <= p[1] < height)]
    if outside:
        raise UsageError(f"points outside the {width}x{height} image: {', '.join(f'{x:g},{y:g}' for x, y in outside)}")
    model = load_model_or_exit(args.model, args.checkpoint, args.num_classes)
    maps = capture_sampling(model, _to_input(image, args.input_size))
    if not maps:
        raise UsageError(f"{args.model} has no deformable layer (no deform_conv2d or dcnv3 call in its forward pass)")
    layer = args.layer if args.layer is not None else list(maps)[-1]
    if layer not in maps:
        raise UsageError(f"no deformable layer named {layer!r}; the layers are: {', '.join(maps)}")
    sampling = maps[layer]
    in_h, in_w = args.input_size
    # image pixel (x, y) -> model input coordinates (y, x), and back for drawing at display size
    to_input = [((y + 0.5) * in_h / height - 0.5, (x + 0.5) * in_w / width - 0.5) for x, y in points]
    samples = samples_at(sampling, to_input, args.input_size)
    display = args.display_size / max(width, height)
    shown = image.resize((max(1, round(width * display)), max(1, round(height * display))))
    sy, sx = shown.height / in_h, shown.width / in_w
    centres = [((s.centre[0] + 0.5) * sy - 0.5, (s.centre[1] + 0.5) * sx - 0.5) for s in samples]
    locations = [((s.locations + 0.5) * torch.tensor([sy, sx], dtype=torch.float64) - 0.5).numpy() for s in samples]
    weights = [s.weights.numpy() for s in samples]
    picture = draw_points(shown, centres, locations, weights)
    per_group = sampling.locations.shape[3] // sampling.groups
    caption = [
        f"{sampling.op}: {sampling.groups} group(s) x {per_group} points, layer input "
        f"{sampling.input_size[0]}x{sampling.input_size[1]}, output {sampling.output_size[0]}x{sampling.output_size[1]}",
        "cross: output point; dots: its sampling locations (size ~ mask weight)",
    ]
    figure = panels_figure([(picture, f"{args.model}: {layer}", caption)])
    figure.save(args.out)
    spread = [float((s.locations - torch.tensor(s.centre, dtype=torch.float64)).norm(dim=1).mean()) for s in samples]
    print(f"{args.model}: deformable layers: {', '.join(maps)}")
    print(f"drew layer {layer} ({sampling.op}) for {len(points)} point(s); mean distance of the sampling "
          f"locations from their point: {', '.join(f'{d:.1f}' for d in spread)} input pixels")
    print(f"wrote {args.out} ({figure.width}x{figure.height})")
    if args.json:
        scale = torch.tensor([height / in_h, width / in_w], dtype=torch.float64)
        entries = [{
            "point": [x, y],
            "output_index": list(s.output_index),
            "locations_xy": ((s.locations + 0.5) * scale - 0.5).flip(-1).tolist(),
            "weights": s.weights.tolist(),
        } for (x, y), s in zip(points, samples)]
        with open(args.json, "w") as f:
            json.dump({"model": args.model, "layer": layer, "op": sampling.op, "layers": list(maps),
                       "image_size": [width, height], "points": entries}, f, indent=2)
        print(f"wrote {args.json}")
    return 0
