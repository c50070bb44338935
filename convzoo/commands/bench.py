"""``convzoo bench``: parameters, FLOPs, latency, throughput and peak memory of a model."""
from __future__ import annotations

import argparse
import json
import logging
import textwrap
import time
from typing import List

import torch

from ..analysis.latency import MODES, BenchResult, benchmark
from ..deploy.optimize import optimize_for_inference
from . import UsageError
from ._tools import (
    add_device_argument, add_model_arguments, check_input_size, check_output_file, image_size, load_model_or_exit,
    positive_int, resolve_device,
)

_logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}

_EPILOG = """\
Inference mode: eval(), torch.inference_mode(), forward only.
Train mode: train(), forward + backward of the summed outputs (no optimizer step).
--optimize: inference is timed on convzoo.optimize_for_inference(model, batch): re-parameterized,
memory layout chosen by timing, torch.compile with inductor freezing (eager with a warning when
no C++ compiler is found), output checked against the eager model. The compile happens before
the warm-up runs and is reported, not timed.
Latency is the median of --repeats timed iterations after --warmup untimed ones (one
iteration = one batch; CUDA is synchronised around each); throughput = batch / latency.
Peak memory: CUDA max_memory_allocated on GPU; on CPU the growth of the sampled resident set
size during one iteration (an estimate).

examples:
  convzoo bench --model replknet_31b --reparam --batch-size 8
  convzoo bench --model convnext_tiny --optimize --mode inference
  convzoo bench --model resnet50 --compare resnet50_dcnv2 --input-size 224 --json bench.json"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="parameters, FLOPs, latency, throughput and peak memory of a model",
        description=textwrap.fill("Measure parameters, forward FLOPs, latency, throughput and peak memory of a "
                    "model in inference and training modes; print a table (and optionally JSON).", 92),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument("--compare", metavar="NAME2", help="a second registered model, measured the same way and shown beside the first")
    parser.add_argument("--reparam", action="store_true", help="measure inference on the re-parameterized (deployed) form")
    parser.add_argument("--optimize", action="store_true",
                        help="measure inference on convzoo.optimize_for_inference's result (re-parameterized, layout, compiled)")
    parser.add_argument("--batch-size", type=positive_int, default=1, metavar="N", help="images per iteration (default: 1)")
    parser.add_argument("--input-size", type=image_size, default=(224, 224), metavar="S|H,W", help="input resolution (default: 224)")
    parser.add_argument("--mode", choices=("both",) + MODES, default="both", help="what to measure (default: both)")
    parser.add_argument("--warmup", type=int, default=3, metavar="N", help="untimed iterations first (default: 3)")
    parser.add_argument("--repeats", type=positive_int, default=10, metavar="N", help="timed iterations (default: 10)")
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="parameter and input dtype (default: float32)")
    parser.add_argument("--channels-last", action="store_true", help="run in channels_last memory format")
    add_device_argument(parser)
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON to OUT")
    parser.set_defaults(func=run)


def _format_count(count: int) -> str:
    return f"{count / 1e6:.2f} M" if count >= 100_000 else f"{count:,}"


def _format_rate(images_per_second: float) -> str:
    return f"{images_per_second:.1f} img/s" if images_per_second >= 10 else f"{images_per_second:.3g} img/s"


def _format_flops(flops) -> str:
    return "n/a" if flops is None else f"{flops / 2 / 1e9:.3f} GMACs ({flops / 1e9:.3f} GFLOPs)"


def _format_memory(mb) -> str:
    return "n/a" if mb is None else f"{mb:.1f} MiB"


def format_table(results: List[BenchResult]) -> str:
    """A markdown table, one column per model."""
    rows = [("model", [r.model + (" (optimized)" if r.optimized else " (reparam)" if r.reparameterized else "")
                       for r in results])]
    rows.append(("params", [_format_count(r.params) + (f" (train {_format_count(r.params_train)})" if r.params != r.params_train else "") for r in results]))
    rows.append(("FLOPs / image", [_format_flops(r.flops) for r in results]))
    for mode in MODES:
        if not any(mode in r.results for r in results):
            continue
        picks = [r.results.get(mode) for r in results]
        rows.append((f"{mode} latency (median)", [f"{m.latency_ms:.2f} ms" if m else "-" for m in picks]))
        rows.append((f"{mode} throughput", [_format_rate(m.throughput) if m else "-" for m in picks]))
        rows.append((f"{mode} peak memory", [_format_memory(m.peak_memory_mb) if m else "-" for m in picks]))
    first = results[0]
    header = f"batch {first.batch_size}, input {first.input_size[0]}x{first.input_size[1]}, " \
             f"{first.device}, {first.dtype}" + (", channels_last" if first.channels_last else "")
    methods = sorted({m.memory_method for r in results for m in r.results.values()})
    widths = [max(len(label) for label, _ in rows)] + [max(len(cells[i]) for _, cells in rows) for i in range(len(results))]
    lines = [header, ""]
    for k, (label, cells) in enumerate(rows):
        lines.append("| " + " | ".join(c.ljust(w) for c, w in zip([label] + cells, widths)) + " |")
        if k == 0:
            lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    lines.append("")
    lines.append(f"peak memory measured with: {', '.join(methods)}")
    return "\n".join(lines)


def _optimize(model: torch.nn.Module, x: torch.Tensor) -> torch.nn.Module:
    """convzoo.optimize_for_inference on bench's re-parameterized copy, with progress reports."""
    start = time.perf_counter()
    _logger.info("  optimizing for inference (re-parameterize, choose the layout, torch.compile with freezing) ...")
    optimized = optimize_for_inference(model, x, inplace=True)
    _logger.info("  optimized in %.1f s: %s layout, %s, max relative difference to eager %.1e",
                 time.perf_counter() - start, optimized.memory_format,
                 f"compiled in {optimized.compile_seconds:.1f} s" if optimized.compiled else "not compiled (eager)",
                 optimized.max_rel_error)
    return optimized


def run(args) -> int:
    device = resolve_device(args.device)
    dtype = _DTYPES[args.dtype]
    if args.warmup < 0:
        raise UsageError(f"--warmup must be >= 0, got {args.warmup}")
    if dtype in (torch.float16, torch.bfloat16) and device.type == "cpu" and args.mode != "inference":
        raise UsageError(f"training in {args.dtype} on CPU is not supported by all kernels; add --mode inference or use --dtype float32")
    if args.optimize and args.mode == "train":
        raise UsageError("--optimize applies to inference; use --mode inference or both")
    if args.json:
        check_output_file(args.json, "--json")
    names = [args.model] + ([args.compare] if args.compare else [])
    checkpoints = [args.checkpoint, None]
    models = [load_model_or_exit(n, c, args.num_classes) for n, c in zip(names, checkpoints)]
    for model in models:
        check_input_size(model, args.input_size)
    modes = MODES if args.mode == "both" else (args.mode,)
    results = []
    for index, (name, model) in enumerate(zip(names, models), 1):
        start = time.perf_counter()
        _logger.info("measuring %s (%d/%d): %s, %d warm-up + %d timed runs of batch %d at %dx%d on %s ...",
                     name, index, len(models), " and ".join(modes), args.warmup, args.repeats, args.batch_size,
                     args.input_size[0], args.input_size[1], device)
        results.append(benchmark(
            model, input_size=args.input_size, batch_size=args.batch_size, modes=modes, reparam=args.reparam,
            warmup=args.warmup, repeats=args.repeats, device=device, dtype=dtype,
            channels_last=args.channels_last, name=name, optimize=_optimize if args.optimize else None,
        ))
        _logger.info("  %s done in %.1f s", name, time.perf_counter() - start)
    print(format_table(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"results": [r.to_dict() for r in results]}, f, indent=2)
        print(f"wrote {args.json}")
    return 0
