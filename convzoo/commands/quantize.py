"""``convzoo quantize``: post-training static INT8 quantization for onnxruntime or inductor."""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import warnings

from . import UsageError, parse_model_args
from ._tools import add_model_arguments, load_model_or_exit, model_name, positive_int

DEFAULT_CALIBRATION_IMAGES = 300
DEFAULT_EVAL_IMAGES = 500

_EPILOG = """\
The model's BatchNorms are folded first (convzoo.reparameterize). Calibration images come from
--data (DIR/train/<class>/<images> when DIR has a train folder, else DIR/<class>/<images>) or,
without --data, from the training split of the built-in data set; the INT8 model is then
compared with the float one on DIR/val (or the same folder) or the built-in validation split.

Backends:
  onnxruntime  convzoo's ONNX export, quantized by onnxruntime (QDQ, int8 weights per channel,
               uint8 activations) -> OUT.onnx, run by onnxruntime's CPU provider
  inductor     torchao PT2E with the X86InductorQuantizer -> OUT.pt2 (a torch.export program;
               convzoo.deploy.load_quantized(OUT.pt2) runs it through torch.compile)

--keep-float auto measures each conv/linear layer's effect on the output (simulated INT8, one
layer at a time) and keeps the worst ones in float until the simulated model reaches 30 dB
output SQNR (at most 10% of the layers); --keep-float NAME,NAME names them (module names).

The report: file size against the float model saved the same way, median latency of both in
the same runtime, and on the evaluation images top-1 agreement, output SQNR and top-1 accuracy.

examples:
  convzoo quantize --model mobilenetv2_100 --checkpoint runs/mbv2/model.safetensors --out mbv2_int8.onnx
  convzoo quantize --model resnet50 --checkpoint r50.pth --data ~/imagenet --backend inductor \\
      --out r50_int8.pt2 --keep-float auto --speed-batch 1 --speed-batch 32"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "quantize",
        help="post-training INT8 quantization (onnxruntime QDQ or inductor PT2E) with a report",
        description=textwrap.fill("Quantize a model to INT8 after training (static, calibrated on images) for "
                                  "onnxruntime or inductor on the CPU, and report size, speed and agreement "
                                  "with the float model.", 92),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser, model_required=False)
    parser.add_argument("--backend", choices=("onnxruntime", "inductor"), default="onnxruntime",
                        help="runtime to quantize for (default: onnxruntime)")
    parser.add_argument("--out", required=True, metavar="OUT", help="file to write: .onnx (onnxruntime) or .pt2 (inductor)")
    parser.add_argument("--data", metavar="DIR", help="image folder to calibrate on (default: the built-in data set)")
    parser.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="built-in data set option, as for `convzoo train` (e.g. relation=colour)")
    parser.add_argument("--image-size", type=positive_int, metavar="PX", help="resolution (default: 224 for --data, 32 built-in)")
    parser.add_argument("--calibration-images", type=positive_int, default=DEFAULT_CALIBRATION_IMAGES, metavar="N",
                        help=f"images to calibrate on (default: {DEFAULT_CALIBRATION_IMAGES})")
    parser.add_argument("--eval-images", type=positive_int, default=DEFAULT_EVAL_IMAGES, metavar="N",
                        help=f"images to compare INT8 with float on (default: {DEFAULT_EVAL_IMAGES})")
    parser.add_argument("--keep-float", default="", metavar="auto|NAMES",
                        help="layers left in float: 'auto', or comma-separated module names (default: none)")
    parser.add_argument("--batch-size", type=positive_int, default=32, metavar="N", help="calibration batch size (default: 32)")
    parser.add_argument("--speed-batch", type=positive_int, action="append", metavar="N",
                        help="batch size to time FP32 and INT8 at (repeatable; default: 1)")
    parser.add_argument("--no-speed", action="store_true", help="skip the speed comparison")
    parser.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    parser.set_defaults(func=run)


def _folder_images(args, count: int, split: str):
    """(images, labels) of up to ``count`` images of the image folder, spread over the classes."""
    import torch

    from ..train.data import DataError, ImageFolder, eval_transform, find_classes

    root = os.path.join(args.data, split) if os.path.isdir(os.path.join(args.data, split)) else args.data
    try:
        train_root = os.path.join(args.data, "train")
        classes = find_classes(train_root if os.path.isdir(train_root) else root)
        dataset = ImageFolder(root, eval_transform(args.image_size or 224), {c: i for i, c in enumerate(classes)},
                              skip_policy="drop")
    except DataError as err:
        raise UsageError(str(err)) from None
    step = max(1, len(dataset) // count)
    picked = [dataset[i] for i in range(0, len(dataset), step)][:count]
    picked = [(image, label) for image, label, skipped in picked if not skipped]
    return torch.stack([p[0] for p in picked]), torch.tensor([p[1] for p in picked])


def _builtin_images(args, count: int, split: str):
    import torch

    from ..train.data import RelationConfig, RelationDataset

    try:
        config = RelationConfig(image_size=args.image_size or 32, **parse_model_args(args.data_arg))
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    dataset = RelationDataset(split, config)
    samples = [dataset[i] for i in range(min(count, len(dataset)))]
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])


def _check_arguments(args) -> None:
    from ..deploy.int8 import check_backend

    if args.data is not None and not os.path.isdir(args.data):
        raise UsageError(f"data folder not found: {args.data}")
    suffix = ".onnx" if args.backend == "onnxruntime" else ".pt2"
    if not args.out.endswith(suffix):
        raise UsageError(f"--backend {args.backend} writes a {suffix} file; --out must end in {suffix}, got {args.out!r}")
    folder = os.path.dirname(os.path.abspath(args.out))
    if not os.path.isdir(folder):
        raise UsageError(f"the folder of --out does not exist: {folder}")
    try:
        check_backend(args.backend)
    except ImportError as err:
        raise UsageError(str(err)) from None


class _Progress:
    """``calibrating [#####.....] 96/300`` on stderr, redrawn in place on a terminal."""

    def __init__(self, stream=None, width: int = 20):
        self.stream, self.width = stream if stream is not None else sys.stderr, width
        self.interactive = hasattr(self.stream, "isatty") and self.stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        filled = self.width * done // total
        line = f"calibrating [{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} images"
        end = "\n" if done == total or not self.interactive else ""
        self.stream.write(("\r" if self.interactive else "") + line + end)
        self.stream.flush()


def _keep_float(text: str):
    if text == "auto":
        return "auto"
    return [name.strip() for name in text.split(",") if name.strip()]


def run(args) -> int:
    from ..deploy import quantize

    _check_arguments(args)
    model = load_model_or_exit(args.model, args.checkpoint, args.num_classes)
    if args.data:
        calibration, _ = _folder_images(args, args.calibration_images, "train")
        eval_images, eval_labels = _folder_images(args, args.eval_images, "val")
    else:
        calibration, _ = _builtin_images(args, args.calibration_images, "train")
        eval_images, eval_labels = _builtin_images(args, args.eval_images, "val")
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and int(eval_labels.max()) >= num_classes:
        raise UsageError(f"the data has labels up to {int(eval_labels.max())} but the model has {num_classes} classes")
    speed_batches = () if args.no_speed else tuple(args.speed_batch or (1,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            report = quantize(model, calibration, args.out, backend=args.backend, keep_float=_keep_float(args.keep_float),
                              eval_images=eval_images, eval_labels=eval_labels, batch_size=args.batch_size,
                              speed_batches=speed_batches, progress=_Progress())
        except (ValueError, TypeError) as err:
            raise UsageError(str(err)) from None
    for warning in caught:
        if issubclass(warning.category, UserWarning) and "convzoo" in warning.filename:
            print(f"warning: {warning.message}", file=sys.stderr)
    _print_report(model_name(model), report)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report.to_dict(), handle, indent=2)
    return 0


def _print_report(name: str, report) -> None:
    print(f"{name}: wrote {report.path} (INT8, {report.backend}, calibrated on {report.calibration_images} images)")
    print("\n".join(report_lines(report)))


def report_lines(report) -> list:
    """The report's lines after the first (shared with ``convzoo train --qat``)."""
    lines = [f"  size        {report.int8_bytes / 2**20:.2f} MiB vs {report.fp32_bytes / 2**20:.2f} MiB FP32 "
             f"({report.size_ratio:.2f}x smaller)"]
    for batch, (fp32, int8) in sorted(report.speed_ms.items()):
        lines.append(f"  speed       batch {batch}: {int8:.2f} ms vs {fp32:.2f} ms FP32 ({fp32 / int8:.2f}x) in {report.backend}")
    lines.append(f"  agreement   top-1 {100 * report.top1_agreement:.1f}% of {report.eval_images} images, output SQNR {report.sqnr_db:.1f} dB")
    if report.fp32_top1 is not None:
        lines.append(f"  top-1       INT8 {report.int8_top1:.2f}% vs FP32 {report.fp32_top1:.2f}% ({report.int8_top1 - report.fp32_top1:+.2f})")
    if report.kept_float:
        lines.append(f"  kept float  {', '.join(report.kept_float)}")
    return lines
