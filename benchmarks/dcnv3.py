"""CPU benchmark: convzoo's dcnv3 vs a straightforward F.grid_sample formulation of the same maths.

The baseline is written the way InternImage's own pure-PyTorch ``dcnv3_core_pytorch`` works (pad
the input, build normalised sampling grids, one ``F.grid_sample`` over ``N * group`` images,
multiply by the mask, sum over the points), with its two bugs fixed (H padded by pad_h, W by
pad_w; stride honoured) so that it computes exactly what ``convzoo.ops.dcnv3`` computes.

Usage: python benchmarks/dcnv3.py [--repeats 7] [--threads 2] [--case 8,28,4,16,3,1 --rounds 2] [--busy]
Prints the first call's time (Numba compiling the kernels, or loading them from its disk cache),
then a markdown table: median milliseconds of forward and forward+backward, ours vs baseline, and
the fraction of the machine's float32 limit ours reaches (InternImage's count of 5 multiply-adds
per point and channel, forward; 3x that for forward+backward, over a float32 matmul's GFLOP/s).
``--busy`` keeps one core busy with another process meanwhile.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from convzoo.ops import dcnv3
from convzoo.ops.dcnv3.reference import kernel_grid

from _timing import busy_core, median_ms, peak_gflops


def dcnv3_grid_sample(x, offset, mask, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w, dilation_h,
                      dilation_w, group, group_channels, offset_scale, remove_center=False):
    """DCNv3 by ``F.grid_sample``: (N, H, W, G*C) -> (N, H_out, W_out, G*C)."""
    n, _, _, channels = x.shape
    _, height_out, width_out, _ = offset.shape
    x = F.pad(x, [0, 0, pad_w, pad_w, pad_h, pad_h])
    height_in, width_in = x.shape[1], x.shape[2]
    half_h = (dilation_h * (kernel_h - 1)) // 2
    half_w = (dilation_w * (kernel_w - 1)) // 2
    # Window centres in padded pixel units, then kernel grid and offsets around them.
    centre_y = torch.arange(height_out, dtype=x.dtype, device=x.device) * stride_h + half_h
    centre_x = torch.arange(width_out, dtype=x.dtype, device=x.device) * stride_w + half_w
    grid_x, grid_y = kernel_grid(kernel_h, kernel_w, dilation_h, dilation_w, remove_center, x.device, x.dtype)
    points = grid_x.numel()
    off = offset.view(n, height_out, width_out, group, points, 2)
    loc_x = centre_x[None, None, :, None, None] + (grid_x + off[..., 0]) * offset_scale
    loc_y = centre_y[None, :, None, None, None] + (grid_y + off[..., 1]) * offset_scale
    # grid_sample with align_corners=False: normalised = (pixel + 0.5) / size * 2 - 1.
    norm = torch.stack(((loc_x + 0.5) / width_in * 2 - 1, (loc_y + 0.5) / height_in * 2 - 1), -1)
    norm = norm.view(n, height_out * width_out, group, points, 2).transpose(1, 2).flatten(0, 1)
    images = x.reshape(n, height_in * width_in, channels).transpose(1, 2).reshape(
        n * group, group_channels, height_in, width_in)
    sampled = F.grid_sample(images, norm, mode="bilinear", padding_mode="zeros", align_corners=False)
    weights = mask.view(n, height_out * width_out, group, points).transpose(1, 2).reshape(
        n * group, 1, height_out * width_out, points)
    out = (sampled * weights).sum(-1).view(n, channels, height_out * width_out)
    return out.transpose(1, 2).reshape(n, height_out, width_out, channels)


def bench_case(n, size, group, group_channels, kernel, stride, repeats):
    pad = kernel // 2
    height_out = (size + 2 * pad - kernel) // stride + 1
    points = kernel * kernel
    x = torch.randn(n, size, size, group * group_channels, requires_grad=True)
    offset = torch.randn(n, height_out, height_out, group * points * 2).mul(2).requires_grad_()
    mask = torch.rand(n, height_out, height_out, group * points).softmax(-1).requires_grad_()
    args = (kernel, kernel, stride, stride, pad, pad, 1, 1, group, group_channels, 1.0)
    grad = torch.randn(n, height_out, height_out, group * group_channels)

    def ours():
        return dcnv3(x, offset, mask, *args)

    def baseline():
        return dcnv3_grid_sample(x, offset, mask, *args)

    torch.testing.assert_close(ours(), baseline(), rtol=1e-4, atol=1e-4)

    def fwd(fn):
        def run():
            with torch.no_grad():
                fn()
        return run

    def fwd_bwd(fn):
        def run():
            fn().backward(grad)
        return run

    rows = []
    for mode, wrap in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
        # Interleave the two so both see the same background load.
        t_ours, t_base = [], []
        for _ in range(repeats):
            t_ours.append(median_ms(wrap(ours), 1, warmup=1))
            t_base.append(median_ms(wrap(baseline), 1, warmup=1))
        ours_ms, base_ms = statistics.median(t_ours), statistics.median(t_base)
        flops = 2 * 5 * n * height_out * height_out * points * group * group_channels * (1 if mode == "fwd" else 3)
        rows.append((f"N={n} {size}x{size} g={group} gc={group_channels} {kernel}x{kernel} s={stride}", mode,
                     ours_ms, base_ms, flops / ours_ms / 1e6))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--case", help="one case N,H,group,group_channels,kernel,stride (default: all four)")
    parser.add_argument("--rounds", type=int, default=1, help="run the cases this many times")
    parser.add_argument("--busy", action="store_true", help="keep one core busy with another process")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    start = time.perf_counter()
    x = torch.randn(1, 4, 4, 4, requires_grad=True)
    dcnv3(x, torch.zeros(1, 4, 4, 36), torch.rand(1, 4, 4, 18), 3, 3, 1, 1, 1, 1, 1, 1, 2, 2, 1.0).sum().backward()
    print(f"first call (fwd+bwd, float32; Numba compile or disk-cache load): {time.perf_counter() - start:.2f} s")
    # N=8 28x28 g4 gc16 (the case), then InternImage-T's stages at batch 1 and 8.
    stages = [(56, 4), (28, 8), (14, 16), (7, 32)]
    cases = [(8, 28, 4, 16, 3, 1)] + [(n, size, group, 16, 3, 1) for n in (1, 8) for size, group in stages]
    if args.case:
        cases = [tuple(int(v) for v in args.case.split(","))]
    cases = cases * args.rounds
    peak = peak_gflops(args.threads)
    busy = busy_core() if args.busy else None
    try:
        print(f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} (ms); float32 matmul "
              f"peak {peak:.0f} GFLOP/s; {'one other process keeps a core busy' if busy else 'quiet'}\n")
        print("| shape | pass | convzoo | grid_sample | speed-up | GFLOP/s | of peak |")
        print("|---|---|---:|---:|---:|---:|---:|")
        for case in cases:
            for shape, mode, ours_ms, base_ms, gflops in bench_case(*case, repeats=args.repeats):
                print(f"| {shape} | {mode} | {ours_ms:.2f} | {base_ms:.2f} | {base_ms / ours_ms:.2f}x | "
                      f"{gflops:.1f} | {gflops / peak:.0%} |")
    finally:
        if busy is not None:
            busy.terminate()


if __name__ == "__main__":
    main()
