"""CPU benchmark: deployed convzoo models vs the same networks built the way the official code is.

* RepLKNet-31B. Baseline: RepLKNet-pytorch's deployed form, i.e. after ``structural_reparam()``
  (each large kernel and its small kernel merged into one ``nn.Conv2d``), every conv a plain
  ``nn.Conv2d`` on NCHW tensors, BatchNorm layers kept (the official code leaves BN folding to the
  framework, and eager PyTorch does not fold). Ours: ``convzoo.reparameterize(model)`` (branches
  merged and every BatchNorm folded into its conv), depthwise convs through ``convzoo.ops.dwconv2d``.
* ConvNeXt-T. Baseline: facebookresearch/ConvNeXt's form, the 7x7 depthwise conv an
  ``nn.Conv2d(groups=C)`` on NCHW tensors, layer scale a separate multiply. Ours:
  ``convzoo.reparameterize(convzoo.create_model("convnext_tiny"))`` (layer scale folded into the
  second linear of each block), depthwise convs through ``convzoo.ops.dwconv2d``.

Both sides share the same weights (the baseline is converted from our model and runs the official
forward, NCHW throughout) and their outputs are checked to agree before timing. Ours is timed on
the NCHW input the baseline gets (our models switch to ``channels_last`` inside), and with the
weights converted to ``channels_last`` too. Runs of the sides are interleaved (the order rotating
every round), so that a change of the machine's load hits all of them; ``--clock cpu`` times CPU
seconds of the process instead of wall seconds, which a shared machine disturbs less. eval, ``torch.no_grad()``, fp32, batch 1, 224x224 by default.

Usage: python benchmarks/models_cpu.py [--repeats 7] [--warmup 2] [--threads 2] [--size 224] [--clock wall|cpu]
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


class OfficialRepLKNet(nn.Module):
    """RepLKNet-pytorch's forward on NCHW tensors, over the (plain-conv) modules of ``model``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        for layer in m.stem:
            x = layer(x)
        for i, stage in enumerate(m.stages):
            for block in stage.blocks:
                x = block(x)
            if i < len(m.transitions):
                x = m.transitions[i](x)
        return m.head(torch.flatten(m.avgpool(m.norm(x)), 1))


class OfficialConvNeXt(nn.Module):
    """facebookresearch/ConvNeXt's forward on NCHW tensors, over the (plain-conv) modules of ``model``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.stem(x)
        for stage in m.stages:
            x = stage.blocks(stage.downsample(x))
        return m.head.fc(m.head.norm(x.mean((-2, -1))))


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
    return "RepLKNet-31B (deployed)", OfficialRepLKNet(official).eval(), ours.eval()


def convnext_pair(size: int):
    ours = convzoo.create_model("convnext_tiny").eval()
    official = OfficialConvNeXt(with_plain_convs(ours)).eval()
    convzoo.reparameterize(ours)  # layer scale folded into the second linear of each block
    return "ConvNeXt-T (deployed)", official, ours


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def interleaved_median_ms(fns, repeats: int, warmup: int, clock=time.perf_counter):
    """Median milliseconds of each of ``fns``, timed in turn, the order rotated every round."""
    for _ in range(warmup):
        for fn in fns:
            fn()
    times = [[] for _ in fns]
    for r in range(repeats):
        for k in range(len(fns)):
            i = (k + r) % len(fns)
            start = clock()
            fns[i]()
            times[i].append(clock() - start)
    return [1000 * statistics.median(t) for t in times]


def run(size: int, repeats: int, warmup: int, clock=time.perf_counter):
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
            base_ms, ours_ms, ours_cl_ms = interleaved_median_ms(
                [lambda: official(x), lambda: ours(x), lambda: ours_cl(x)], repeats, warmup, clock)
        rows.append((name, base_ms, ours_ms, ours_cl_ms))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: PyTorch's)")
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or CPU time of the process (steadier on a shared machine with --threads 1)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = run(args.size, args.repeats, args.warmup, CLOCKS[args.clock])
    print(f"batch 1, {args.size}x{args.size}, fp32, eval, no_grad, {torch.get_num_threads()} threads, "
          f"{args.clock} clock, median of {args.repeats} after {args.warmup} warm-up runs, torch {torch.__version__}\n")
    print("| model | official-style nn.Conv2d NCHW (ms) | convzoo (ms) | convzoo, channels_last weights (ms) "
          "| speed-up | speed-up, channels_last weights |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, base, ours, ours_cl in rows:
        print(f"| {name} | {base:.1f} | {ours:.1f} | {ours_cl:.1f} | {base / ours:.2f}x | {base / ours_cl:.2f}x |")


if __name__ == "__main__":
    main()
