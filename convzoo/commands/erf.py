"""``convzoo erf``: effective receptive field heatmaps and high-contribution area ratios."""
from __future__ import annotations

import argparse
import textwrap
import json
import logging
import os
from typing import Iterator, List, Optional, Tuple

import numpy as np
import torch

from ..analysis.erf import THRESHOLDS, ERFResult, effective_receptive_field, recalibrate_batchnorm
from ..analysis.plotting import heatmap_image, panels_figure
from . import UsageError
from ._tools import check_input_size, check_model_names, image_size, load_model_or_exit, positive_int, resolve_device

_logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
_STD = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)

_EPILOG = """\
Method (RepLKNet, Ding et al. 2022): for each image, the gradient of the (ReLU'd) central point
of the last feature map with respect to the input; its positive part summed over channels and
averaged over the images; shown as log10(x + 1) scaled to [0, 1]. The high-contribution area
ratio at threshold t is the area of the smallest centred square holding more than t of the
total score, divided by the image area: larger = a larger effective receptive field. The
JSON also holds the ratios of the map without the log (area_ratios_linear), which do not
depend on the gradients' overall scale.

A randomly initialised model (no --checkpoint) still has the initial BatchNorm statistics
(mean 0, variance 1), which give its eval-mode activations arbitrary scales; they are first
re-estimated on 8 images (--recalibrate-bn; 0 turns this off).

Images: --data DIR reads the image files under DIR/val (or DIR when it has no val folder),
resized to --input-size and normalised with the ImageNet mean and std; without --data the
validation images of the built-in data set are used.

examples:
  convzoo erf --model replknet_31b --model resnet50 --input-size 224 --num-images 8 --out erf.png --json erf.json
  convzoo erf --model replknet_31b --checkpoint RepLKNet-31B_ImageNet-1K_224.pth --data ~/imagenet --num-images 50 --input-size 1024 --out erf.png"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "erf",
        help="effective receptive field heatmap (RepLKNet's method) of one or more models",
        description=textwrap.fill("Measure the effective receptive field of one or more models as the RepLKNet "
                    "paper does, draw the heatmaps side by side into a PNG and report the "
                    f"high-contribution area ratios at thresholds {', '.join(map(str, THRESHOLDS))}.", 92),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", action="append", required=True, metavar="NAME",
                        help="registered model name; repeat to compare several models in one figure")
    parser.add_argument("--checkpoint", action="append", metavar="PATH",
                        help="weights for the --model at the same position (repeat once per model, or leave out for random init)")
    parser.add_argument("--label", action="append", metavar="TEXT",
                        help="title of the panel of the --model at the same position (default: the model name)")
    parser.add_argument("--num-classes", type=int, default=None, metavar="N", help="classifier size of official checkpoints (default 1000)")
    parser.add_argument("--data", metavar="DIR", help="folder of images (DIR/val/... or DIR/...); default: the built-in data set")
    parser.add_argument("--builtin", choices=("relations", "bands"), default="relations",
                        help="without --data: the built-in set whose images are used: the classification relation set "
                             "or the segmentation band set (default: relations)")
    parser.add_argument("--num-images", type=positive_int, default=10, metavar="N", help="images to average over (default: 10)")
    parser.add_argument("--input-size", type=image_size, default=(224, 224), metavar="S|H,W", help="input resolution (default: 224)")
    parser.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="images per backward pass (default: 1)")
    parser.add_argument("--recalibrate-bn", type=int, default=None, metavar="N",
                        help="re-estimate BatchNorm statistics on N images before measuring (default: 8 for a model "
                             "without --checkpoint, whose statistics are still the initial ones; 0 for one with)")
    parser.add_argument("--out", required=True, metavar="PNG", help="where to write the heatmap figure (.png)")
    parser.add_argument("--json", metavar="OUT", help="also write the area ratios as JSON")
    parser.add_argument("--panel-size", type=positive_int, default=256, metavar="PX", help="side of each heatmap in the figure (default: 256)")
    parser.add_argument("--device", default="auto", metavar="DEV", help="auto, cpu, cuda or cuda:N (default: auto)")
    parser.set_defaults(func=run)


def list_images(root: str) -> List[str]:
    """Image files under ``root/val`` (when it exists) or ``root``, recursively, sorted."""
    folder = os.path.join(root, "val") if os.path.isdir(os.path.join(root, "val")) else root
    files = []
    for dirpath, _, names in os.walk(folder, followlinks=True):
        files.extend(os.path.join(dirpath, n) for n in names if n.lower().endswith(IMAGE_EXTENSIONS))
    return sorted(files)


def load_image(path: str, size: Tuple[int, int]) -> torch.Tensor:
    """The image at ``path`` resized to ``size`` (H, W), normalised: (3, H, W) float32."""
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB").resize((size[1], size[0]), Image.BICUBIC)
    tensor = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float() / 255
    return (tensor - _MEAN) / _STD


def folder_batches(files: List[str], size: Tuple[int, int], batch_size: int) -> Iterator[torch.Tensor]:
    """Batches (N, 3, H, W) of the readable images among ``files``; unreadable ones are skipped."""
    batch = []
    for path in files:
        try:
            batch.append(load_image(path, size))
        except (OSError, SyntaxError, ValueError) as error:
            _logger.warning("skipping unreadable image %s (%s)", path, error)
            continue
        if len(batch) == batch_size:
            yield torch.stack(batch)
            batch = []
    if batch:
        yield torch.stack(batch)


def builtin_batches(size: Tuple[int, int], batch_size: int, kind: str = "relations") -> Iterator[torch.Tensor]:
    """Batches of a built-in data set's validation images at ``size`` (H, W): the relation
    set (square, >= 24) or the segmentation band set (``kind="bands"``)."""
    from ..train.data import RelationConfig, RelationDataset
    from ..train.segdata import BandsConfig, BandsDataset

    if kind == "bands":
        dataset = BandsDataset("val", BandsConfig(height=size[0], width=size[1]))
    else:
        dataset = RelationDataset("val", RelationConfig(image_size=size[0]))
    for start in range(0, len(dataset), batch_size):
        yield torch.stack([dataset[i][0] for i in range(start, min(start + batch_size, len(dataset)))])


def _check_arguments(args) -> None:
    from ..train.segdata import BandsConfig

    if not args.out.lower().endswith(".png"):
        raise UsageError(f"--out must name a .png file, got {args.out!r}")
    for path in [args.out] + ([args.json] if args.json else []):
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise UsageError(f"the output folder does not exist: {folder}")
    if args.checkpoint and len(args.checkpoint) != len(args.model):
        raise UsageError(f"give one --checkpoint per --model ({len(args.model)} models, {len(args.checkpoint)} checkpoints), or none")
    if args.label and len(args.label) != len(args.model):
        raise UsageError(f"give one --label per --model ({len(args.model)} models, {len(args.label)} labels), or none")
    if args.recalibrate_bn is not None and args.recalibrate_bn < 0:
        raise UsageError(f"--recalibrate-bn must be >= 0, got {args.recalibrate_bn}")
    if args.data is not None and not os.path.isdir(args.data):
        raise UsageError(f"data folder not found: {args.data}")
    if args.data is None and args.builtin == "bands":
        try:
            BandsConfig(height=args.input_size[0], width=args.input_size[1])
        except ValueError as error:
            raise UsageError(f"--builtin bands: {error} (--input-size H,W)") from None
    elif args.data is None and (args.input_size[0] != args.input_size[1] or args.input_size[0] < 24):
        raise UsageError(f"the built-in data set needs a square --input-size >= 24, got {args.input_size}; or pass --data DIR")


def _batches(args, files) -> Iterator[torch.Tensor]:
    if files is None:
        return builtin_batches(args.input_size, args.batch_size, args.builtin)
    return folder_batches(files, args.input_size, args.batch_size)


def _caption(result: ERFResult) -> List[str]:
    lines = [f"{result.num_images} images, {result.input_size[0]}x{result.input_size[1]} input, "
             f"{result.feature_size[0]}x{result.feature_size[1]} map"]
    for t, ratio in result.area_ratios.items():
        lines.append(f"area ratio t={t:g}: " + ("n/a" if ratio is None else f"{ratio:.4f}"))
    return lines


def panel_names(names: List[str], checkpoints: List[Optional[str]]) -> List[str]:
    """One distinct title per model: a name given twice is told apart by its checkpoint's file
    name ("random init" without one), then by its position."""
    titles = []
    for name, checkpoint in zip(names, checkpoints):
        if names.count(name) > 1:
            name = f"{name} ({os.path.basename(checkpoint) if checkpoint else 'random init'})"
        titles.append(name)
    return [f"{t} #{i + 1}" if titles.count(t) > 1 else t for i, t in enumerate(titles)]


def run(args) -> int:
    _check_arguments(args)
    check_model_names(args.model)
    files = None
    if args.data is not None:
        files = list_images(args.data)
        if not files:
            raise UsageError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {args.data}")
    device = resolve_device(args.device)
    checkpoints = args.checkpoint or [None] * len(args.model)
    models = [load_model_or_exit(n, c, args.num_classes) for n, c in zip(args.model, checkpoints)]
    for model in models:
        check_input_size(model, args.input_size)
    results = []
    titles = args.label or panel_names(args.model, checkpoints)
    for name, title, checkpoint, model in zip(args.model, titles, checkpoints, models):
        calibration = args.recalibrate_bn if args.recalibrate_bn is not None else (8 if checkpoint is None else 0)
        if calibration > 0 and recalibrate_batchnorm(model, _batches(args, files), calibration, device=device):
            print(f"{name}: BatchNorm statistics re-estimated on {calibration} images (--recalibrate-bn)")
        try:
            results.append(effective_receptive_field(model, _batches(args, files), args.num_images, name=title, device=device))
        except ValueError as error:
            raise UsageError(f"{name}: {error}") from None
    panels = [(heatmap_image(r.scores(), args.panel_size), r.model, _caption(r)) for r in results]
    figure = panels_figure(panels, legend="log10(contribution + 1), scaled to [0, 1]")
    figure.save(args.out)
    header = "| model | images | " + " | ".join(f"ratio t={t:g}" for t in THRESHOLDS) + " |"
    print(header)
    print("|" + "---|" * (2 + len(THRESHOLDS)))
    for r in results:
        cells = ["n/a" if r.area_ratios[t] is None else f"{r.area_ratios[t]:.4f}" for t in THRESHOLDS]
        print(f"| {r.model} | {r.num_images} | " + " | ".join(cells) + " |")
    print(f"wrote {args.out} ({figure.width}x{figure.height})")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"thresholds": list(THRESHOLDS), "models": [r.to_dict() for r in results]}, f, indent=2)
        print(f"wrote {args.json}")
    return 0
