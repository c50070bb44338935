"""GPU benchmarks: convzoo's Triton kernels vs PyTorch's own CUDA kernels, side by side in one run.

Needs an NVIDIA GPU and Triton.  Each section is a function registered in ``SECTIONS`` that
prints a markdown table; run all of them or pick some:

    python benchmarks/gpu.py                           # every section
    python benchmarks/gpu.py --sections dwconv --dtypes float32 bfloat16

Times are medians of CUDA-event timings after warm-up (the warm-up also runs Triton's autotuner).
"""
from __future__ import annotations

import argparse
import statistics
import sys
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

from convzoo.ops import dwconv2d


def require_cuda() -> None:
    """Exit with a clear message when there is no CUDA device or no Triton."""
    if not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs an NVIDIA GPU: torch.cuda.is_available() is False on this machine "
                 f"(torch {torch.__version__}). Run it on a CUDA machine; the CPU benchmarks are in benchmarks/*.py.")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/gpu.py needs Triton (pip install triton) to run convzoo's kernels.")


def cuda_median_ms(run: Callable[[], None], warmup: int = 5, repeats: int = 20) -> float:
    """Median time of ``run`` in ms, from CUDA events, after ``warmup`` calls."""
    for _ in range(warmup):
        run()
    torch.cuda.synchronize()
    times: List[float] = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


# ----------------------------------------------------------------------------- dwconv2d

# RepLKNet-31B at 224x224, batch 64: (channels, feature map, large kernel) per stage.
REPLKNET_31B_STAGES = [(128, 56, 31), (256, 28, 29), (512, 14, 27), (1024, 7, 13)]


def _dwconv_runs(batch: int, channels: int, size: int, kernel: int, dtype: torch.dtype,
                 memory_format: torch.memory_format) -> Dict[str, Callable[[], None]]:
    device = torch.device("cuda")
    x = torch.randn(batch, channels, size, size, device=device, dtype=dtype).contiguous(memory_format=memory_format)
    weight = torch.randn(channels, 1, kernel, kernel, device=device, dtype=dtype) / kernel
    x_leaf, w_leaf = x.clone().requires_grad_(), weight.clone().requires_grad_()
    grad_out = torch.randn_like(x)
    pad = kernel // 2

    def ours(inp, w):
        return dwconv2d(inp, w, padding=pad, impl="triton")

    def cudnn(inp, w):
        return F.conv2d(inp, w, None, 1, pad, 1, channels)

    def forward(fn):
        def run():
            with torch.no_grad():
                fn(x, weight)
        return run

    def forward_backward(fn):
        def run():
            fn(x_leaf, w_leaf).backward(grad_out)
        return run

    return {"fwd ours": forward(ours), "fwd cudnn": forward(cudnn),
            "fb ours": forward_backward(ours), "fb cudnn": forward_backward(cudnn)}


def bench_dwconv(args) -> None:
    """Our Triton dwconv2d vs F.conv2d(groups=C) (cuDNN) at RepLKNet-31B's shapes and at k=3, 7."""
    print(f"\n### dwconv2d vs F.conv2d(groups=C), batch {args.batch}, {torch.cuda.get_device_name()}, "
          f"torch {torch.__version__}; ms (median)\n")
    print("| dtype | layout | C@HxW | k | fwd ours | fwd cuDNN | fwd speedup | fwd+bwd ours | fwd+bwd cuDNN "
          "| fwd+bwd speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        for layout in args.layouts:
            memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            ours_by_kernel: Dict[int, float] = {}
            for channels, size, large in REPLKNET_31B_STAGES:
                for kernel in sorted({large, 7, 3}, reverse=True):
                    runs = _dwconv_runs(args.batch, channels, size, kernel, dtype, memory_format)
                    t = {name: cuda_median_ms(run, args.warmup, args.repeats) for name, run in runs.items()}
                    if size == 56:
                        ours_by_kernel[kernel] = t["fwd ours"]
                    print(f"| {dtype_name} | {layout} | {channels}@{size}x{size} | {kernel} | {t['fwd ours']:.3f} "
                          f"| {t['fwd cudnn']:.3f} | {t['fwd cudnn'] / t['fwd ours']:.2f}x | {t['fb ours']:.3f} "
                          f"| {t['fb cudnn']:.3f} | {t['fb cudnn'] / t['fb ours']:.2f}x |", flush=True)
                    del runs
                    torch.cuda.empty_cache()
            if 31 in ours_by_kernel and 3 in ours_by_kernel:
                print(f"| {dtype_name} | {layout} | 128@56x56 | 31 vs 3 | ours forward 31x31 / 3x3 = "
                      f"{ours_by_kernel[31] / ours_by_kernel[3]:.2f} | | | | | |", flush=True)


SECTIONS: Dict[str, Callable] = {"dwconv": bench_dwconv}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--layouts", nargs="+", default=["nchw", "channels_last"], choices=["nchw", "channels_last"])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    require_cuda()
    torch.manual_seed(0)
    for name in args.sections:
        SECTIONS[name](args)


if __name__ == "__main__":
    main()
