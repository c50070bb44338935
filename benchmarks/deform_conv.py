"""CPU benchmark of ``convzoo.ops.deform_conv2d`` against the formulation a user would otherwise write.

There is no torchvision on the development machine, so the baseline is the straightforward plain
PyTorch formulation: one ``F.grid_sample`` per kernel position (bilinear, zero padding,
``align_corners=True`` so that normalised coordinates map onto pixel centres), the samples
multiplied by the mask, stacked into an im2col matrix and contracted with the weight by one
matmul; autograd gives its backward. Ours is the chunked gather + matmul kernel behind the custom
op with its hand-written backward.

Timings are medians of several runs after a warm-up. Peak memory is the growth of the peak resident
set (Linux VmHWM, reset just before the call) of a fresh child process running one forward (or
forward+backward) of that case, after one on a tiny input of the same kind has paged the code in.

    python benchmarks/deform_conv.py            # full table
    python benchmarks/deform_conv.py --quick    # fewer repeats
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys

import torch
import torch.nn.functional as F

from convzoo.ops import deform_conv2d

from _timing import median_ms

# (name, batch, in_channels, out_channels, size, kernel, stride, padding, offset_groups, with mask)
CASES = [
    ("64ch 128x128 v2", 2, 64, 64, 128, 3, 1, 1, 1, True),
    ("64ch 128x128 v1", 2, 64, 64, 128, 3, 1, 1, 1, False),
    ("128ch 28x28 v2 (ResNet conv3)", 8, 128, 128, 28, 3, 1, 1, 1, True),
    ("256ch 14x14 v2 (ResNet conv4)", 8, 256, 256, 14, 3, 1, 1, 1, True),
    ("512ch 7x7 v2 (ResNet conv5)", 8, 512, 512, 7, 3, 1, 1, 1, True),
    ("64ch 56x56 v2, 4 offset groups, stride 2", 4, 64, 64, 56, 3, 2, 1, 4, True),
]


def grid_sample_deform_conv2d(x, offset, weight, bias, stride, padding, dilation, mask):
    """Baseline: one ``F.grid_sample`` per kernel position, then one matmul (autograd backward)."""
    n, channels, in_h, in_w = x.shape
    out_channels, group_channels, kernel_h, kernel_w = weight.shape
    kernel_size = kernel_h * kernel_w
    offset_groups = offset.shape[1] // (2 * kernel_size)
    out_h, out_w = offset.shape[2:]
    grouped = x.reshape(n * offset_groups, channels // offset_groups, in_h, in_w)
    offset = offset.reshape(n * offset_groups, kernel_size, 2, out_h, out_w)
    if mask is not None:
        mask = mask.reshape(n * offset_groups, kernel_size, 1, out_h, out_w)
    rows = torch.arange(out_h, dtype=x.dtype).view(-1, 1) * stride[0] - padding[0]
    cols = torch.arange(out_w, dtype=x.dtype).view(1, -1) * stride[1] - padding[1]
    samples = []
    for k in range(kernel_size):
        i, j = divmod(k, kernel_w)
        y = rows + i * dilation[0] + offset[:, k, 0]
        xx = cols + j * dilation[1] + offset[:, k, 1]
        grid = torch.stack((2 * xx / (in_w - 1) - 1, 2 * y / (in_h - 1) - 1), dim=-1)
        sample = F.grid_sample(grouped, grid, mode="bilinear", padding_mode="zeros", align_corners=True)
        if mask is not None:
            sample = sample * mask[:, k]
        samples.append(sample.reshape(n, channels, out_h * out_w))
    columns = torch.stack(samples, dim=2)  # (N, C, K, L)
    weight_groups = channels // group_channels
    columns = columns.reshape(n, weight_groups, group_channels * kernel_size, out_h * out_w)
    weights = weight.reshape(weight_groups, out_channels // weight_groups, group_channels * kernel_size)
    out = torch.matmul(weights, columns).reshape(n, out_channels, out_h, out_w)
    if bias is not None:
        out = out + bias.view(1, -1, 1, 1)
    return out


def make_inputs(case, requires_grad):
    _, batch, cin, cout, size, kernel, stride, padding, offset_groups, with_mask = case
    out_size = (size + 2 * padding - kernel) // stride + 1
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, cin, size, size, generator=gen)
    offset = torch.randn(batch, 2 * offset_groups * kernel * kernel, out_size, out_size, generator=gen) * 2
    mask = torch.rand(batch, offset_groups * kernel * kernel, out_size, out_size, generator=gen) if with_mask else None
    weight = torch.randn(cout, cin, kernel, kernel, generator=gen) * 0.05
    bias = torch.randn(cout, generator=gen)
    tensors = [x, offset, weight, bias] + ([mask] if with_mask else [])
    for t in tensors:
        t.requires_grad_(requires_grad)
    return x, offset, weight, bias, mask, (stride, stride), (padding, padding)


def runner(case, impl, mode):
    x, offset, weight, bias, mask, stride, padding = make_inputs(case, mode == "fwd+bwd")

    def run():
        if impl == "ours":
            out = deform_conv2d(x, offset, weight, bias, stride, padding, 1, mask=mask)
        else:
            out = grid_sample_deform_conv2d(x, offset, weight, bias, stride, padding, (1, 1), mask)
        if mode == "fwd+bwd":
            out.sum().backward()
            for t in (x, offset, weight, bias, mask):
                if t is not None:
                    t.grad = None
        return out

    return run


def peak_memory_mb(case_index: int, impl: str, mode: str) -> float:
    """Resident-set growth of a child process running the case once (MiB)."""
    out = subprocess.run(
        [sys.executable, __file__, "--memory-child", str(case_index), impl, mode],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)["peak_mb"]


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _memory_child(case_index: int, impl: str, mode: str) -> None:
    name, _, cin, cout, _, kernel, stride, padding, offset_groups, with_mask = CASES[case_index]
    runner((name, 1, cin, cout, 8, kernel, stride, padding, offset_groups, with_mask), impl, mode)()  # page in code
    run = runner(CASES[case_index], impl, mode)
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # reset the peak resident set size (VmHWM) to the current one
    run()
    print(json.dumps({"peak_mb": (_status_kib("VmHWM") - before) / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 repeats instead of 7")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--memory-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        _memory_child(int(args.memory_child[0]), args.memory_child[1], args.memory_child[2])
        return
    repeats = 3 if args.quick else 7
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, fp32, median of {repeats} after warm-up")
    print()
    print("| case | mode | baseline (grid_sample per tap) ms | ours ms | speed-up | baseline peak MiB | ours peak MiB |")
    print("|---|---|---|---|---|---|---|")
    for index, case in enumerate(CASES):
        for mode in ("fwd", "fwd+bwd"):
            times = {}
            for impl in ("baseline", "ours"):
                times[impl] = median_ms(runner(case, impl, mode), repeats)
            if args.no_memory:
                memory = {"baseline": float("nan"), "ours": float("nan")}
            else:
                memory = {impl: peak_memory_mb(index, impl, mode) for impl in ("baseline", "ours")}
            print(
                f"| {case[0]}, batch {case[1]} | {mode} | {times['baseline']:.1f} | {times['ours']:.1f} | "
                f"{times['baseline'] / times['ours']:.2f}x | {memory['baseline']:.0f} | {memory['ours']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
