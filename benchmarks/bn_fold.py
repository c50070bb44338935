"""CPU benchmark: BatchNorm folding by ``convzoo.reparameterize`` on the BatchNorm families.

For each model: the trained form (conv -> BatchNorm in eval mode) against the deployed form
(BatchNorm folded into the conv), timed alternately in one run, batch 1, 224x224, fp32, eval,
``torch.inference_mode()``. The two forms are also checked to give the same logits.

Usage: python benchmarks/bn_fold.py [--repeats 15] [--threads 2] [--models resnet50 ...]
Prints a markdown table: parameters and median milliseconds before/after, and the speed-up.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import convzoo

DEFAULT_MODELS = (
    "resnet50",
    "mobilenetv1_100",
    "mobilenetv2_100",
    "mobilenetv3_large_100",
    "mobilenetv3_small_100",
    "shufflenetv2_x1_0",
)


def paired_median_ms(first: torch.nn.Module, second: torch.nn.Module, x: torch.Tensor, warmup: int, repeats: int):
    """Median wall times (ms) of one forward pass of each model, timed alternately so that
    both see the same machine load."""
    times = ([], [])
    with torch.inference_mode():
        for _ in range(warmup):
            first(x)
            second(x)
        for _ in range(repeats):
            for model, bucket in zip((first, second), times):
                start = time.perf_counter()
                model(x)
                bucket.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times[0]), statistics.median(times[1])


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    x = torch.randn(1, 3, 224, 224)

    print(f"torch {torch.__version__}, {args.threads} threads, batch 1, 224x224, fp32, median of {args.repeats}")
    print()
    print("| model | params (BN) | params (folded) | ms (BN) | ms (folded) | speed-up | max rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        trained = convzoo.create_model(name).eval()
        deployed = convzoo.reparameterize(copy.deepcopy(trained))
        with torch.inference_mode():
            ref, out = trained(x), deployed(x)
        rel = float((out - ref).abs().max() / ref.abs().max())
        ms_bn, ms_folded = paired_median_ms(trained, deployed, x, args.warmup, args.repeats)
        print(
            f"| {name} | {num_params(trained):,} | {num_params(deployed):,} | {ms_bn:.2f} | {ms_folded:.2f} "
            f"| {ms_bn / ms_folded:.2f}x | {rel:.1e} |"
        )


if __name__ == "__main__":
    main()
