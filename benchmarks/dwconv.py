"""CPU benchmark: convzoo.ops.dwconv2d vs F.conv2d(groups=C) on NCHW and on channels_last input.

For each kernel size it times, side by side in one run (median after one warm-up):

* ours on an NCHW input (the caller's layout is kept: output and grad-input come back NCHW),
* ours on a channels_last input,
* F.conv2d(groups=C) on the NCHW input, and on a channels_last copy of it (the conversion is not
  timed: that is PyTorch's best case),

forward only and forward+backward (gradients for the input and the weight), and prints a
markdown table with the ratios.  Slow baselines get fewer repeats (``--budget`` seconds each).

    python benchmarks/dwconv.py                      # B=8, C=128, 56x56, fp32, k=3..31
    python benchmarks/dwconv.py --kernels 3 31 --repeats 3
"""
from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from convzoo.ops import dwconv2d


def median_ms(run: Callable[[], None], repeats: int, budget_s: float) -> float:
    """Median wall time of ``run`` in ms after one warm-up; stops early past ``budget_s`` (>= 2 runs)."""
    run()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < repeats and (len(times) < 2 or time.perf_counter() - start < budget_s):
        begin = time.perf_counter()
        run()
        times.append(time.perf_counter() - begin)
    return statistics.median(times) * 1e3


def make_runs(batch: int, channels: int, size: int, kernel: int, dtype: torch.dtype) -> Dict[str, Callable]:
    """The six timed closures for one kernel size: {ours,nchw,cl} x {fwd,fwdbwd}."""
    x_nchw = torch.randn(batch, channels, size, size, dtype=dtype)
    x_cl = x_nchw.contiguous(memory_format=torch.channels_last)
    weight = torch.randn(channels, 1, kernel, kernel, dtype=dtype) / kernel
    grad_out = torch.randn(batch, channels, size, size, dtype=dtype)
    pad = kernel // 2

    def ours(x, w):
        return dwconv2d(x, w, padding=pad)

    def torch_conv(x, w):
        return F.conv2d(x, w, None, 1, pad, 1, channels)

    def forward(fn, x):
        def run():
            with torch.no_grad():
                fn(x, weight)
        return run

    def forward_backward(fn, x):
        x_leaf = x.detach().requires_grad_()
        w_leaf = weight.detach().requires_grad_()

        def run():
            out = fn(x_leaf, w_leaf)
            out.backward(grad_out.contiguous(memory_format=_format(out)))
        return run

    return {
        "fwd ours nchw": forward(ours, x_nchw), "fwd ours cl": forward(ours, x_cl),
        "fwd torch nchw": forward(torch_conv, x_nchw), "fwd torch cl": forward(torch_conv, x_cl),
        "fb ours nchw": forward_backward(ours, x_nchw), "fb ours cl": forward_backward(ours, x_cl),
        "fb torch nchw": forward_backward(torch_conv, x_nchw), "fb torch cl": forward_backward(torch_conv, x_cl),
    }


def _format(t: torch.Tensor) -> torch.memory_format:
    if t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--size", type=int, default=56)
    parser.add_argument("--kernels", type=int, nargs="+", default=[3, 7, 13, 27, 29, 31])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--budget", type=float, default=6.0, help="seconds per measurement before stopping early")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float64"])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    print(f"dwconv2d, B={args.batch}, C={args.channels}, {args.size}x{args.size}, {args.dtype}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}; times in ms (median)\n")
    print("| k | pass | ours NCHW in | ours CL in | torch NCHW | torch CL | torch NCHW / ours NCHW "
          "| ours NCHW / torch CL | ours CL / torch CL |")
    print("|---|---|---|---|---|---|---|---|---|")
    for kernel in args.kernels:
        runs = make_runs(args.batch, args.channels, args.size, kernel, dtype)
        for tag, name in (("fwd", "fwd"), ("fb", "fwd+bwd")):
            t = {key: median_ms(runs[f"{tag} {key}"], args.repeats, args.budget)
                 for key in ("ours nchw", "ours cl", "torch nchw", "torch cl")}
            print(f"| {kernel} | {name} | {t['ours nchw']:.1f} | {t['ours cl']:.1f} | {t['torch nchw']:.1f} "
                  f"| {t['torch cl']:.1f} | {t['torch nchw'] / t['ours nchw']:.1f}x "
                  f"| {t['ours nchw'] / t['torch cl']:.2f} | {t['ours cl'] / t['torch cl']:.2f} |", flush=True)


if __name__ == "__main__":
    main()
