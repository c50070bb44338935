"""GPU benchmark: convzoo's Triton dcnv3 vs the reference (F.grid_sample formulation) on CUDA.

Shapes: InternImage-T's four stages at batch 64 (224x224 input): 64ch@56x56 g4, 128ch@28x28 g8,
256ch@14x14 g16, 512ch@7x7 g32; 3x3 kernel, stride 1, pad 1. Forward and forward+backward,
fp32 and bf16, median of several runs after warm-up (CUDA events), side by side in one run.

Usage: python benchmarks/gpu_dcnv3.py [--repeats 20] [--batch 64]
Needs a CUDA device and Triton; without them it says so and exits with status 0.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

STAGES = [(64, 56, 4), (128, 28, 8), (256, 14, 16), (512, 7, 32)]


def _time_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        stop = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times)


def bench_stage(batch, channels, size, group, dtype, repeats):
    from convzoo.ops import dcnv3
    from dcnv3 import dcnv3_grid_sample  # the CPU benchmark's baseline, device-agnostic

    group_channels = channels // group
    device = "cuda"
    x = torch.randn(batch, size, size, channels, device=device, dtype=dtype, requires_grad=True)
    offset = torch.randn(batch, size, size, group * 18, device=device, dtype=dtype).mul(2).requires_grad_()
    mask = torch.rand(batch, size, size, group, 9, device=device).softmax(-1).reshape(batch, size, size, -1)
    mask = mask.to(dtype).requires_grad_()
    grad = torch.randn(batch, size, size, channels, device=device, dtype=dtype)
    args = (3, 3, 1, 1, 1, 1, 1, 1, group, group_channels, 1.0)

    def ours():
        return dcnv3(x, offset, mask, *args, impl="triton")

    def baseline():
        return dcnv3_grid_sample(x, offset, mask, *args)

    # Correctness first: against the reference computed in fp32 on the same (rounded) inputs.
    exact = dcnv3_grid_sample(x.detach().float(), offset.detach().float(), mask.detach().float(), *args)
    tol = 1e-3 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(ours().float(), exact, rtol=tol, atol=tol)
    rows = []
    for mode in ("fwd", "fwd+bwd"):
        def run(fn):
            if mode == "fwd":
                with torch.no_grad():
                    fn()
            else:
                fn().backward(grad)
        ours_ms = _time_ms(lambda: run(ours), repeats)
        base_ms = _time_ms(lambda: run(baseline), repeats)
        rows.append((mode, ours_ms, base_ms))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("benchmarks/gpu_dcnv3.py: no CUDA device here; this benchmark needs an NVIDIA GPU. Nothing measured.")
        return 0
    try:
        import triton  # noqa: F401
    except ImportError:
        print("benchmarks/gpu_dcnv3.py: triton is not installed (pip install triton). Nothing measured.")
        return 0
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}, "
          f"batch {args.batch}, median of {args.repeats} (ms)\n")
    print("| stage | dtype | pass | convzoo (Triton) | grid_sample reference | speed-up |")
    print("|---|---|---|---:|---:|---:|")
    for dtype in (torch.float32, torch.bfloat16):
        for channels, size, group in STAGES:
            for mode, ours_ms, base_ms in bench_stage(args.batch, channels, size, group, dtype, args.repeats):
                name = str(dtype).replace("torch.", "")
                print(f"| {channels}ch@{size}x{size} g{group} | {name} | {mode} | {ours_ms:.3f} | {base_ms:.3f} | "
                      f"{base_ms / ours_ms:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
