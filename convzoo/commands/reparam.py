"""``convzoo reparam IN OUT``: turn a training checkpoint into its inference (deployed) form."""
from __future__ import annotations

import argparse
import textwrap
import copy
import os

import torch

from ..analysis.complexity import count_params
from ..analysis.latency import compare_inference
from ..layers.reparam import is_reparameterized, reparameterize
from ..models import save_checkpoint
from . import UsageError
from ._tools import check_input_size, image_size, is_convzoo_checkpoint, load_model_or_exit, model_name

_EPILOG = """\
IN is a convzoo .safetensors checkpoint (it names its model), or an official .pth checkpoint
together with --model NAME. OUT is a .safetensors file that `convzoo eval/export/bench
--checkpoint OUT` and convzoo.models.load_model(OUT) read back in the inference form.

The outputs of both forms are compared on a random batch (eval mode); a mismatch larger than
--tolerance (relative to the largest output magnitude) fails with exit code 1 and writes nothing.

examples:
  convzoo reparam runs/replknet/last.safetensors replknet_deploy.safetensors
  convzoo reparam RepLKNet-31B_ImageNet-1K_224.pth replknet_31b_deploy.safetensors --model replknet_31b"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "reparam",
        help="turn a training checkpoint into its re-parameterized inference form",
        description=textwrap.fill("Merge the parallel branches and BatchNorms of every re-parameterizable block "
                    "(convzoo.reparameterize) and save the inference form; check that the outputs "
                    "match and report the parameter and latency reduction.", 92),
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("input", metavar="IN", help="training checkpoint (.safetensors from convzoo, or an official .pth with --model)")
    parser.add_argument("output", metavar="OUT", help="where to write the inference form (.safetensors)")
    parser.add_argument("--model", metavar="NAME", help="model name, needed when IN is not a convzoo .safetensors file")
    parser.add_argument("--num-classes", type=int, default=None, metavar="N", help="classifier size of an official checkpoint (default 1000)")
    parser.add_argument("--input-size", type=image_size, default=(224, 224), metavar="S|H,W", help="input size of the check and the timing (default: 224)")
    parser.add_argument("--tolerance", type=float, default=1e-4, metavar="TOL", help="largest accepted relative output difference (default: 1e-4)")
    parser.add_argument("--repeats", type=int, default=5, metavar="N", help="timed iterations per form for the latency figure (default: 5; 0 skips timing)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random check input (default: 0)")
    parser.set_defaults(func=run)


def _check_paths(args) -> None:
    if not os.path.isfile(args.input):
        raise UsageError(f"input checkpoint not found: {args.input}")
    if not args.output.endswith(".safetensors"):
        raise UsageError(f"OUT must be a .safetensors file, got {args.output!r}")
    if os.path.abspath(args.input) == os.path.abspath(args.output):
        raise UsageError("OUT must differ from IN (the training checkpoint is kept)")
    folder = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(folder):
        raise UsageError(f"the folder of OUT does not exist: {folder}")
    if args.model is None and not is_convzoo_checkpoint(args.input):
        raise UsageError(f"{args.input} is not a convzoo .safetensors checkpoint; name its model with --model NAME")


def _relative_difference(reference: torch.Tensor, other: torch.Tensor) -> float:
    scale = reference.abs().max().clamp_min(1e-12)
    return float((reference - other).abs().max() / scale)


def run(args) -> int:
    _check_paths(args)
    model = load_model_or_exit(args.model, args.input, args.num_classes).eval()
    check_input_size(model, args.input_size)
    mergeable = sum(callable(getattr(m, "reparameterize", None)) for m in model.modules())
    if mergeable and is_reparameterized(model):
        raise UsageError(f"{args.input} is already in the inference form; nothing to do")
    name = model_name(model)
    generator = torch.Generator().manual_seed(args.seed)
    x = torch.randn(2, getattr(model, "in_chans", 3), *args.input_size, generator=generator)
    with torch.no_grad():
        before = model(x)
    params_before = count_params(model)
    training_form = copy.deepcopy(model) if args.repeats > 0 else None
    reparameterize(model)
    with torch.no_grad():
        after = model(x)
    difference = _relative_difference(before, after)
    if not difference <= args.tolerance:
        print(f"{name}: the inference form differs from the training form by {difference:.3g} "
              f"(relative), more than --tolerance {args.tolerance:g}; nothing written")
        return 1
    save_checkpoint(model, args.output)
    params_after = count_params(model)
    print(f"{name}: wrote the inference form to {args.output}")
    if not mergeable:
        print(f"  note: {name} has no re-parameterizable block; the inference form equals the training form")
    print(f"  outputs match: max relative difference {difference:.2e} on a random {tuple(x.shape)} batch")
    print(f"  parameters: {params_before:,} -> {params_after:,} "
          f"({100 * (params_before - params_after) / max(params_before, 1):.1f}% fewer)")
    if training_form is not None:
        timing = compare_inference(training_form, model, x[:1], repeats=args.repeats)
        slow, fast = timing.latency_ms
        where = f"batch 1, {args.input_size[0]}x{args.input_size[1]}, CPU, medians of {args.repeats} interleaved runs"
        if timing.decided:
            change = f"{100 * (slow - fast) / slow:.1f}% less" if fast <= slow else f"{100 * (fast - slow) / slow:.1f}% more"
            print(f"  latency ({where}): {slow:.2f} ms -> {fast:.2f} ms ({change})")
        else:
            print(f"  latency ({where}): {slow:.2f} ms -> {fast:.2f} ms; the machine is too noisy to tell "
                  f"(the times of each form spread over {max(timing.spread_ms):.2f} ms; try more --repeats)")
    return 0
