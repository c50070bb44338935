"""CPU benchmark: deployed convzoo models vs the same networks built the way the official code is.

* RepLKNet-31B. Baseline: RepLKNet-pytorch's deployed form, i.e. after ``structural_reparam()``
  (each large kernel and its small kernel merged into one ``nn.Conv2d``), every conv a plain
  ``nn.Conv2d`` on NCHW tensors, BatchNorm layers kept (the official code leaves BN folding to the
  framework, and eager PyTorch does not fold). Ours: ``convzoo.reparameterize(model)`` (branches
  merged and every BatchNorm folded into its conv), depthwise convs through ``convzoo.ops.dwconv2d``.
* ConvNeXt-T. Baseline: facebookresearch/ConvNeXt's form, the 7x7 depthwise conv an
  ``nn.Conv2d(groups=C)`` on NCHW tensors. Ours: ``convzoo.create_model("convnext_tiny")``.

Both sides share the same weights (the baseline is converted from our model) and their outputs
are checked to agree before timing. Ours is timed on the NCHW input the baseline gets, and on a
``channels_last`` input with the model converted to ``channels_last`` (the conversion of the
input is inside the timed call). eval, ``torch.no_grad()``, fp32, batch 1, 224x224 by default.

Usage: python benchmarks/models_cpu.py [--repeats 7] [--warmup 2] [--threads 2] [--size 224]
Prints a markdown table of median milliseconds and the speed-up of ours over the baseline.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
import torch.nn as nn

import convzoo
from convzoo.layers.reparam import DepthwiseConv2d
from convzoo.models.replknet import merge_large_kernels


def with_plain_convs(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose depthwise convs are plain ``nn.Conv2d(groups=C)`` (NCHW, PyTorch's path)."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, DepthwiseConv2d):
                plain = nn.Conv2d(child.in_channels, child.out_channels, child.kernel_size, child.stride,
                                  child.padding, child.dilation, child.groups, bias=child.bias is not None)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain)
    return model


def randomize_norms(model: nn.Module) -> None:
    """Non-trivial BatchNorm statistics (so folding them changes the weights, as with trained ones)."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)


def replknet_pair(size: int):
    ours = convzoo.create_model("replknet_31b").eval()
    randomize_norms(ours)
    official = with_plain_convs(ours)
    merge_large_kernels(official)  # RepLKNet-pytorch's structural_reparam()
    convzoo.reparameterize(ours)
    return "RepLKNet-31B (deployed)", official.eval(), ours.eval()


def convnext_pair(size: int):
    ours = convzoo.create_model("convnext_tiny").eval()
    return "ConvNeXt-T", with_plain_convs(ours).eval(), ours


def median_ms(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def run(size: int, repeats: int, warmup: int):
    rows = []
    x = torch.randn(1, 3, size, size)
    for make in (replknet_pair, convnext_pair):
        name, official, ours = make(size)
        ours_cl = copy.deepcopy(ours).to(memory_format=torch.channels_last)
        with torch.no_grad():
            expected = official(x)
            for model in (ours, ours_cl):
                err = (model(x) - expected).abs().max() / expected.abs().max()
                if err > 1e-4:
                    raise RuntimeError(f"{name}: ours differs from the baseline by {err:.2e} (relative)")
            base_ms = median_ms(lambda: official(x), repeats, warmup)
            ours_ms = median_ms(lambda: ours(x), repeats, warmup)
            ours_cl_ms = median_ms(lambda: ours_cl(x.contiguous(memory_format=torch.channels_last)), repeats, warmup)
        rows.append((name, base_ms, ours_ms, ours_cl_ms))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    parser.add_argument("--size", type=int, default=224)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.size, args.repeats, args.warmup)
    print(f"batch 1, {args.size}x{args.size}, fp32, eval, no_grad, {torch.get_num_threads()} threads, "
          f"median of {args.repeats} after {args.warmup} warm-up runs, torch {torch.__version__}\n")
    print("| model | official-style nn.Conv2d NCHW (ms) | convzoo, NCHW input (ms) | convzoo, channels_last (ms) "
          "| speed-up NCHW | speed-up channels_last |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, base, ours, ours_cl in rows:
        print(f"| {name} | {base:.1f} | {ours:.1f} | {ours_cl:.1f} | {base / ours:.2f}x | {base / ours_cl:.2f}x |")


if __name__ == "__main__":
    main()
