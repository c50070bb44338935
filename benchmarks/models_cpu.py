"""CPU benchmark: deployed convzoo models vs the same networks built the way the official code is,
and convzoo's optimized path (``convzoo.optimize_for_inference``) vs onnxruntime on convzoo's export.

* RepLKNet-31B. Baseline: RepLKNet-pytorch's deployed form, i.e. after ``structural_reparam()``
  (each large kernel and its small kernel merged into one ``nn.Conv2d``), every conv a plain
  ``nn.Conv2d`` on NCHW tensors, BatchNorm layers kept (the official code leaves BN folding to the
  framework, and eager PyTorch does not fold). Ours: ``convzoo.reparameterize(model)`` (branches
  merged and every BatchNorm folded into its conv), depthwise convs through ``convzoo.ops.dwconv2d``,
  1x1 convs ``PointwiseConv2d`` (one matrix product on channels_last maps).
* ConvNeXt-T. Baseline: facebookresearch/ConvNeXt's form, the 7x7 depthwise conv an
  ``nn.Conv2d(groups=C)`` on NCHW tensors, layer scale a separate multiply. Ours:
  ``convzoo.reparameterize(convzoo.create_model("convnext_tiny"))`` (layer scale folded into the
  second linear of each block), depthwise convs through ``convzoo.ops.dwconv2d``, the linears
  ``PackedLinear`` (weights pre-packed for oneDNN in eager inference; plain ``nn.Linear`` on the
  official side).
* InternImage-T. Baseline: OpenGVLab/InternImage's classification model with its pure-PyTorch
  DCNv3 module (``DCNv3_pytorch``, whose core ``dcnv3_core_pytorch`` samples with
  ``F.grid_sample``; here ``dcnv3_grid_sample`` of benchmarks/dcnv3.py, the same formulation), the
  head's BatchNorm kept. Ours: ``convzoo.reparameterize(model)`` (that BatchNorm folded), DCNv3
  through ``convzoo.ops.dcnv3`` (Numba on the CPU), the linears ``PackedLinear`` (plain
  ``nn.Linear`` on the official side).

Every side of a case runs the same weights (the baselines are converted from our model and run
the official forward) and its output is checked against the baseline's before timing. Sides:
the official-style model (eager), convzoo eager, convzoo optimized (``optimize_for_inference``:
layout chosen by timing, ``torch.compile`` with inductor freezing; the compile time is printed,
not timed) and onnxruntime (CPU provider, ``intra_op_num_threads`` = the PyTorch thread count, idle
threads not spinning)
running ``convzoo.export.export_onnx`` of the same model (static shape; written to ``--onnx-dir``
and reused when present, since the export takes minutes). All sides are timed interleaved, the
order rotating every round, eval, no_grad, fp32; the table gives medians. "of peak" = the model's
FLOPs (2 x MACs, counted by ``convzoo.analysis.count_flops``) per second of the optimized
side over a float32 1024^3 matmul measured in the same run.

RESULTS.md's tables before 2026-12-03 come from an earlier version of this script (two sides, ours
also with channels_last weights, ``--size``).

Usage: python benchmarks/models_cpu.py [--models internimage_t,replknet_31b,convnext_tiny] [--repeats 7]
       [--warmup 2] [--threads 2] [--clock wall|cpu] [--onnx-dir DIR] [--export-only]
Cases: InternImage-T batch 1 at 224; RepLKNet-31B batch 1 at 128 and 224; ConvNeXt-T batch 4 at 128
and batch 1 at 224. ``--export-only`` writes the ONNX files and exits (no timing).
"""
from __future__ import annotations

import argparse
import copy
import os
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import convzoo
from convzoo.analysis.complexity import count_flops
from convzoo.export import export_onnx
from convzoo.layers import DCNv3
from convzoo.layers.prepacked import PackedConv2d, PackedLinear
from convzoo.layers.reparam import DepthwiseConv2d
from convzoo.models.replknet import merge_large_kernels

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import peak_gflops  # noqa: E402
from dcnv3 import dcnv3_grid_sample  # noqa: E402


def with_plain_convs(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose depthwise, 1x1 and pre-packed convs are plain ``nn.Conv2d`` (PyTorch's
    path) and whose pre-packed linears are plain ``nn.Linear``."""
    model = copy.deepcopy(model)
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear):
                plain = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None)
                plain.load_state_dict(child.state_dict())
                setattr(parent, name, plain)
            elif isinstance(child, (DepthwiseConv2d, PackedConv2d)):
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


def official_dcnv3(dcn: DCNv3, x: torch.Tensor) -> torch.Tensor:
    """InternImage's ``DCNv3_pytorch.forward`` over the modules of our ``dcn``: (N, H, W, C) -> same."""
    n, height, width, _ = x.shape
    projected = dcn.input_proj(x)
    features = dcn.dw_conv(x.permute(0, 3, 1, 2))
    offset = dcn.offset(features)
    mask = F.softmax(dcn.mask(features).reshape(n, height, width, dcn.group, -1), -1).reshape(n, height, width, -1)
    k = dcn.kernel_size
    out = dcnv3_grid_sample(projected, offset, mask, k, k, dcn.stride, dcn.stride, dcn.pad, dcn.pad, dcn.dilation,
                            dcn.dilation, dcn.group, dcn.group_channels, dcn.offset_scale, bool(dcn.remove_center))
    return dcn.output_proj(out)


class OfficialInternImage(nn.Module):
    """OpenGVLab/InternImage's classification forward (pre-norm, no layer scale: the T config) with
    the pure-PyTorch DCNv3 core, over the modules of ``model``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        m = self.model
        x = m.patch_embed(x)
        for level in m.levels:
            for layer in level.blocks:
                x = x + official_dcnv3(layer.dcn, layer.norm1(x))
                x = x + layer.mlp(layer.norm2(x))
            x = level.norm(x)
            if level.downsample is not None:
                x = level.downsample(x)
        x = m.conv_head(x.permute(0, 3, 1, 2))
        return m.head(torch.flatten(m.avgpool(x), 1))


def randomize_dcnv3(model: nn.Module) -> None:
    """Non-zero offset and mask projections (InternImage initialises them to zero, which a trained
    model is not): the sampling then leaves the regular grid, as it does after training."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, DCNv3):
                m.offset.weight.normal_(0, 0.02)
                m.offset.bias.uniform_(-1, 1)
                m.mask.weight.normal_(0, 0.02)


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


def internimage_pair(size: int):
    ours = convzoo.create_model("internimage_t").eval()
    randomize_norms(ours)
    randomize_dcnv3(ours)
    official = OfficialInternImage(with_plain_convs(ours)).eval()
    convzoo.reparameterize(ours)  # the head's BatchNorm folded into its 1x1 conv
    return "InternImage-T", official, ours


PAIRS = {"internimage_t": internimage_pair, "replknet_31b": replknet_pair, "convnext_tiny": convnext_pair}
CASES = {"internimage_t": [(1, 224)], "replknet_31b": [(1, 128), (1, 224)], "convnext_tiny": [(4, 128), (1, 224)]}


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


def onnx_path(onnx_dir: str, key: str, batch: int, size: int) -> str:
    return os.path.join(onnx_dir, f"{key}_b{batch}_{size}.onnx")


def export_case(ours: nn.Module, path: str, batch: int, size: int) -> None:
    """convzoo's own ONNX export of ``ours`` (a copy; static shape), unless ``path`` exists."""
    if os.path.exists(path):
        return
    start = time.perf_counter()
    export_onnx(copy.deepcopy(ours), path + ".tmp", input_size=(size, size), batch_size=batch, dynamic_batch=False,
                check=False)
    os.replace(path + ".tmp", path)
    print(f"exported {path} in {time.perf_counter() - start:.0f} s", flush=True)


def ort_session(path: str):
    import numpy as np
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # Idle intra-op threads sleep instead of spinning: spinning ones kept a core busy after each run
    # and slowed the side timed next (the official one in 3 rounds of 4: ConvNeXt-T batch 4 official
    # 240 ms against 142 ms without spinning, in one process, 2026-12-03).
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return lambda x: torch.from_numpy(session.run(None, {name: np.ascontiguousarray(x.numpy())})[0])


def rel_error(got: torch.Tensor, expected: torch.Tensor) -> float:
    return float((got - expected).abs().max() / expected.abs().max())


def run_case(key: str, batch: int, size: int, repeats: int, warmup: int, clock, onnx_dir: str):
    """One row: (label, batch, official, eager, optimized, onnxruntime ms, GFLOPs/image, compile s)."""
    torch.manual_seed(0)
    name, official, ours = PAIRS[key](size)
    x = torch.randn(batch, 3, size, size)
    path = onnx_path(onnx_dir, key, batch, size)
    export_case(ours, path, batch, size)
    start = time.perf_counter()
    optimized = convzoo.optimize_for_inference(ours, x)
    compile_s = time.perf_counter() - start
    ort_run = ort_session(path)
    sides = {"official": official, "eager": ours, "optimized": optimized, "onnxruntime": ort_run}
    with torch.no_grad():
        expected = official(x)
        for side, fn in sides.items():
            err = rel_error(fn(x), expected)
            if err > 1e-4:
                raise RuntimeError(f"{name} b{batch} {size}: {side} differs from the official-style model by {err:.2e}")
        ms = interleaved_median_ms([lambda fn=fn: fn(x) for fn in sides.values()], repeats, warmup, clock)
    flops = count_flops(ours, (1, 3, size, size)).flops
    label = (f"{name}, batch {batch}, {size}x{size} (optimized: {optimized.memory_format}, "
             f"{'compiled' if optimized.compiled else 'eager kept'})")
    return (label, batch, *ms, flops / 1e9, compile_s)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(PAIRS), help="comma-separated, from " + ", ".join(PAIRS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2, help="torch.set_num_threads and onnxruntime's intra-op threads")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall time, or CPU time of the process (steadier on a shared machine with --threads 1)")
    parser.add_argument("--onnx-dir", default="onnx_models", help="where the ONNX exports are written and reused")
    parser.add_argument("--export-only", action="store_true", help="write the ONNX files, time nothing")
    args = parser.parse_args()
    keys = [k for k in args.models.split(",") if k]
    unknown = [k for k in keys if k not in PAIRS]
    if unknown:
        parser.error(f"unknown --models {unknown}; choose from {', '.join(PAIRS)}")
    torch.set_num_threads(args.threads)
    os.makedirs(args.onnx_dir, exist_ok=True)
    if args.export_only:
        for key in keys:
            for batch, size in CASES[key]:
                torch.manual_seed(0)
                export_case(PAIRS[key](size)[2], onnx_path(args.onnx_dir, key, batch, size), batch, size)
        return
    peak = peak_gflops(args.threads)
    print(f"fp32, eval, no_grad, {torch.get_num_threads()} threads (onnxruntime intra-op {args.threads}), "
          f"{args.clock} clock, median of {args.repeats} after {args.warmup} warm-up runs, torch {torch.__version__}; "
          f"float32 matmul peak {peak:.0f} GFLOP/s\n", flush=True)
    rows = []
    for key in keys:
        for batch, size in CASES[key]:
            rows.append(run_case(key, batch, size, args.repeats, args.warmup, CLOCKS[args.clock], args.onnx_dir))
            print(f"done: {rows[-1][0]} (optimize_for_inference took {rows[-1][-1]:.0f} s)", flush=True)
    print("\n| case | official (ms) | convzoo eager (ms) | convzoo optimized (ms) | onnxruntime (ms) "
          "| eager vs official | optimized vs official | optimized vs onnxruntime | optimized GFLOP/s (of peak) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for label, batch, base, eager, opt, ort_ms, gflops, _ in rows:
        rate = gflops * batch / (opt / 1e3)
        print(f"| {label} | {base:.1f} | {eager:.1f} | {opt:.1f} | {ort_ms:.1f} | {base / eager:.2f}x | {base / opt:.2f}x "
              f"| {ort_ms / opt:.2f}x | {rate:.0f} ({rate / peak:.0%}) |")


if __name__ == "__main__":
    main()
