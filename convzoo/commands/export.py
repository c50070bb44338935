"""``convzoo export``: ONNX export of the deployed model, checked with onnxruntime."""
from __future__ import annotations

import argparse
import textwrap
import importlib.util
import json
import os

from ..export import DEFAULT_OPSET, EXPORTERS, export_onnx
from . import UsageError
from ._tools import (
    add_model_arguments, check_input_size, check_output_file, image_size, load_model_or_exit, model_name, positive_int,
)

_EPILOG = f"""\
The model is re-parameterized and put in eval mode, and its convzoo operators run their
plain-PyTorch reference path, so deformable convolutions come out as standard ONNX operators
(GridSample / Gather, MatMul, ...) that any ONNX runtime executes. The file is then run with
onnxruntime on the CPU on a fresh random input and compared with PyTorch; a relative error
above --tolerance is a failure (exit code 1, the file is kept for inspection).

Exporters: dynamo (torch.export based, needs `pip install onnxscript`), torchscript (the older
tracer, deprecated in PyTorch but dependency-free); auto picks dynamo when onnxscript is
installed. Default opset: {DEFAULT_OPSET}.

examples:
  convzoo export --model resnet50_dcnv2 --checkpoint r50dcn.safetensors --onnx r50dcn.onnx
  convzoo export --model internimage_t --onnx internimage_t.onnx --input-size 224 --dynamic-size"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "export",
        help="export the deployed model to ONNX and check it with onnxruntime",
        description=textwrap.fill("Export the re-parameterized (deployed) model to ONNX, deformable operators "
                    "included, and check the file with onnxruntime against PyTorch.", 92),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser, model_required=False)
    parser.add_argument("--onnx", required=True, metavar="OUT.onnx", help="where to write the ONNX file")
    parser.add_argument("--input-size", type=image_size, default=(224, 224), metavar="S|H,W", help="input resolution of the graph (default: 224)")
    parser.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="batch size of the traced input (default: 1)")
    parser.add_argument("--static-batch", action="store_true",
                        help="fix the batch to --batch-size (default: the batch is dynamic)")
    parser.add_argument("--dynamic-batch", action="store_true", help=argparse.SUPPRESS)  # the default now; kept for old scripts
    parser.add_argument("--dynamic-size", action="store_true",
                        help="leave H and W free too (convolutional and deformable models: any size at least the "
                             "model's smallest; the check runs 16 pixels larger)")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, metavar="N", help=f"ONNX opset (default: {DEFAULT_OPSET}; GridSample needs >= 16)")
    parser.add_argument("--exporter", choices=EXPORTERS, default="auto", help="which PyTorch ONNX exporter (default: auto)")
    parser.add_argument("--tolerance", type=float, default=1e-4, metavar="TOL", help="largest accepted relative error of onnxruntime vs PyTorch (default: 1e-4)")
    parser.add_argument("--no-check", action="store_true", help="skip the onnxruntime check")
    parser.add_argument("--json", metavar="OUT", help="also write the export report as JSON")
    parser.set_defaults(func=run)


def _check_arguments(args) -> None:
    if not args.onnx.endswith(".onnx"):
        raise UsageError(f"--onnx must name a .onnx file, got {args.onnx!r}")
    folder = os.path.dirname(os.path.abspath(args.onnx))
    if not os.path.isdir(folder):
        raise UsageError(f"the folder of --onnx does not exist: {folder}")
    if args.json:
        check_output_file(args.json, "--json")
    if args.opset < 16:
        raise UsageError(f"--opset {args.opset} is too old: the deformable operators need GridSample (opset >= 16)")
    if args.exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        raise UsageError("--exporter dynamo needs onnxscript: pip install onnxscript (or use --exporter torchscript)")
    missing = [m for m in ("onnx",) + (() if args.no_check else ("onnxruntime",)) if importlib.util.find_spec(m) is None]
    if missing:
        raise UsageError(f"{' and '.join(missing)} not installed: pip install 'convzoo[onnx]'")


def run(args) -> int:
    _check_arguments(args)
    model = load_model_or_exit(args.model, args.checkpoint, args.num_classes)
    check_input_size(model, args.input_size)
    name = model_name(model)
    result = export_onnx(
        model, args.onnx, input_size=args.input_size, batch_size=args.batch_size, opset=args.opset,
        exporter=args.exporter, dynamic_batch=not args.static_batch, dynamic_size=args.dynamic_size,
        check=not args.no_check,
    )
    print(f"{name}: wrote {result.path} ({os.path.getsize(result.path) / 2**20:.1f} MiB, {result.exporter} exporter, opset {result.opset})")
    free = [what for what, on in (("batch", result.dynamic_batch), ("height and width", result.dynamic_size)) if on]
    print(f"  input {result.input_shape}{' (dynamic ' + ', '.join(free) + ')' if free else ''} -> output {result.output_shape}")
    print(f"  ONNX operators: {', '.join(result.onnx_ops)}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result.to_dict(), f, indent=2)
    if result.max_rel_error is None:
        print("  not checked (--no-check)")
        return 0
    verdict = "ok" if result.max_rel_error <= args.tolerance else "TOO LARGE"
    print(f"  onnxruntime (CPU) vs PyTorch on {result.checked_shape}: max abs error {result.max_abs_error:.2e}, "
          f"max relative error {result.max_rel_error:.2e} (tolerance {args.tolerance:g}): {verdict}")
    return 0 if verdict == "ok" else 1
