"""GPU benchmark: convzoo's Triton ``deform_conv2d`` vs ``torchvision.ops.deform_conv2d``.

ResNet-50 conv3-conv5 shapes with DCNv2 (3x3, stride 1, padding 1, one offset group, mask),
batch 32 and 64, fp32 and bf16, forward and forward+backward. Medians of CUDA-event timings
after warm-up, both measured side by side in one run; a markdown table is printed.

    python benchmarks/gpu_deform_conv.py

Needs a CUDA device, Triton and torchvision; exits with a message (status 0) otherwise.
"""
from __future__ import annotations

import statistics
import sys

import torch

# (name, channels, size)
SHAPES = [("conv3", 128, 28), ("conv4", 256, 14), ("conv5", 512, 7)]
BATCHES = (32, 64)
DTYPES = (torch.float32, torch.bfloat16)


def _requirements_message():
    if not torch.cuda.is_available():
        return "no CUDA device: this benchmark measures the Triton kernels on a GPU"
    try:
        import torchvision.ops  # noqa: F401
    except ImportError:
        return "torchvision is not installed: it is the baseline of this benchmark"
    try:
        import triton  # noqa: F401
    except ImportError:
        return "triton is not installed"
    return None


def _inputs(batch, channels, size, dtype, requires_grad):
    gen = torch.Generator(device="cuda").manual_seed(0)
    kw = dict(device="cuda", dtype=dtype)
    x = torch.randn(batch, channels, size, size, generator=gen, **kw)
    offset = torch.randn(batch, 18, size, size, generator=gen, **kw)
    mask = torch.rand(batch, 9, size, size, generator=gen, **kw)
    weight = torch.randn(channels, channels, 3, 3, generator=gen, **kw) * 0.02
    bias = torch.randn(channels, generator=gen, **kw)
    tensors = (x, offset, weight, bias, mask)
    for t in tensors:
        t.requires_grad_(requires_grad)
    return tensors


def _time_ms(fn, repeats=20, warmup=5):
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def _runner(impl, tensors, backward):
    import torchvision.ops

    from convzoo.ops import deform_conv2d

    x, offset, weight, bias, mask = tensors

    def run():
        if impl == "ours":
            out = deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask=mask, impl="triton")
        else:
            out = torchvision.ops.deform_conv2d(x, offset, weight, bias, 1, 1, 1, mask=mask)
        if backward:
            out.float().sum().backward()
            for t in tensors:
                t.grad = None

    return run


def main() -> int:
    message = _requirements_message()
    if message:
        print(f"benchmarks/gpu_deform_conv.py: skipped: {message}")
        return 0
    import torchvision

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, torchvision {torchvision.__version__}")
    print()
    print("| shape | batch | dtype | mode | torchvision ms | ours ms | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for name, channels, size in SHAPES:
        for batch in BATCHES:
            for dtype in DTYPES:
                for backward in (False, True):
                    times = {}
                    for impl in ("torchvision", "ours"):
                        tensors = _inputs(batch, channels, size, dtype, backward)
                        try:
                            times[impl] = _time_ms(_runner(impl, tensors, backward))
                        except RuntimeError as error:  # e.g. a dtype the baseline does not support
                            times[impl] = float("nan")
                            print(f"<!-- {impl} failed: {str(error).splitlines()[0]} -->")
                    mode = "fwd+bwd" if backward else "fwd"
                    dtype_name = str(dtype).replace("torch.", "")
                    print(
                        f"| {name} {channels}ch@{size}x{size} | {batch} | {dtype_name} | {mode} | "
                        f"{times['torchvision']:.2f} | {times['ours']:.2f} | {times['torchvision'] / times['ours']:.2f}x |",
                        flush=True,
                    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
