"""GPU benchmarks: convzoo's Triton kernels and models vs PyTorch's own kernels, side by side in one run.

Sections (all run by default, ``--only`` picks some), each printing a markdown table with fp32 and
bf16, forward and forward+backward:

* ``dwconv``: ``dwconv2d`` vs ``F.conv2d(groups=C)`` (cuDNN) at RepLKNet-31B's stage shapes (batch
  64, 224x224 input) with the stage's large kernel and k=7, 3, NCHW and channels_last; the large
  kernels again as "tf32" (fp32 at ``torch.set_float32_matmul_precision("high")``, which lets
  our row-band products run in one TF32 pass instead of three); plus the ratio of our
  large-kernel to our 3x3 forward time on the first stage's feature map.
* ``dcnv3``: ``dcnv3`` vs the grid_sample formulation (benchmarks/dcnv3.py) at InternImage-T's
  stage shapes (batch 64).
* ``deform_conv``: ``deform_conv2d`` vs ``torchvision.ops.deform_conv2d`` at ResNet-50 conv3-conv5
  shapes (DCNv2: 3x3, mask), batch 32 and 64.
* ``models``: RepLKNet-31B and InternImage-T, a training step (forward, cross-entropy, backward;
  fp32, and bf16 under autocast) and inference throughput (eval, reparameterized, no_grad); ours
  vs the same model with ``impl = "reference"`` set on every module that has an ``impl``
  (PyTorch's own conv for the depthwise convs, the reference DCNv3).

Usage:

    python benchmarks/gpu.py                      # everything, on the default CUDA device
    python benchmarks/gpu.py --only dwconv models --quick --output gpu.md

Times are medians of CUDA-event timings after warm-up (the warm-up also runs Triton's autotuner).
After its timings every kernel case is checked: ours against the baseline (for dcnv3, convzoo's
reference) run in fp32 on the same values, output and gradients; each section gives its worst
relative difference and the notes list any case past the tolerance.
``--device cpu --tiny`` runs every section at toy shapes to check the script itself; figures from
it mean nothing.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import datetime
import math
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import convzoo
from convzoo.ops import dcnv3, deform_conv2d, dwconv2d

from _timing import median_ms
from dcnv3 import dcnv3_grid_sample  # the CPU benchmark's baseline; device-agnostic

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TABLE_HEADER = ["| case | dtype | pass | ours ms | baseline ms | speed-up |", "|---|---|---|---:|---:|---:|"]


#: What a failed measurement or check raises (e.g. a dtype a kernel lacks): noted, not fatal.
MEASUREMENT_ERRORS = (RuntimeError, NotImplementedError, TypeError, ValueError)


@dataclass
class Bench:
    """What every section needs: device, sizes, timing settings, and notes on failed measurements."""

    device: torch.device
    quick: bool
    tiny: bool
    warmup: int
    repeats: int
    notes: List[str] = field(default_factory=list)
    #: Worst relative difference from the baseline per dtype in the section that runs (see :meth:`check`).
    worst_difference: Dict[str, float] = field(default_factory=dict)

    @property
    def ops_impl(self) -> str:
        """The ``impl`` our ops run with: Triton on CUDA, the default CPU path elsewhere."""
        return "triton" if self.device.type == "cuda" else "auto"

    def time_ms(self, label: str, run: Callable[[], object]) -> float:
        """Median ms of ``run``; NaN (and a note) when it raises, e.g. for a dtype a kernel lacks."""
        try:
            return median_ms(run, self.repeats, self.warmup, self.device)
        except MEASUREMENT_ERRORS as error:
            self.notes.append(f"{label}: failed: {str(error).splitlines()[0]}")
            return float("nan")
        finally:
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    def check(self, label: str, dtype_name: str, ours: Callable[..., torch.Tensor],
              baseline: Callable[..., torch.Tensor], leaves: Sequence[torch.Tensor]) -> None:
        """Compare ours with ``baseline`` run in fp32 on the same values (output and gradients, with
        the configs autotuning chose); keep the worst difference per dtype and note any past
        :data:`TOLERANCE`."""
        try:
            difference = relative_difference(ours, baseline, leaves)
        except MEASUREMENT_ERRORS as error:
            self.notes.append(f"{label}: check failed: {str(error).splitlines()[0]}")
            return
        self.worst_difference[dtype_name] = max(difference, self.worst_difference.get(dtype_name, 0.0))
        if not difference <= TOLERANCE[dtype_name]:
            self.notes.append(f"{label}: ours differs from the fp32 baseline by {difference:.1e} (relative)")


#: Largest relative difference (norm of the difference over the baseline's norm) accepted between
#: ours and the fp32 baseline: fp32 allows for a baseline on TF32 tensor cores, tf32 for ours on
#: them (fp32 at ``torch.set_float32_matmul_precision("high")``), bf16 for ours rounding its
#: output and gradients to bf16.
TOLERANCE = {"fp32": 2e-3, "tf32": 5e-3, "bf16": 3e-2}


def relative_difference(ours: Callable[..., torch.Tensor], baseline: Callable[..., torch.Tensor],
                        leaves: Sequence[torch.Tensor]) -> float:
    """Worst of ||ours - baseline|| / ||baseline|| over the output and the gradients, ours on
    ``leaves``, the baseline on fp32 copies of them (one backward each, from the same random
    output gradient)."""
    fp32_leaves = [leaf.detach().float().requires_grad_() for leaf in leaves]
    results = []
    for fn, inputs in ((ours, leaves), (baseline, fp32_leaves)):
        out = fn(*inputs)
        generator = torch.Generator(out.device).manual_seed(0)
        grad_out = torch.randn(out.shape, generator=generator, device=out.device).to(out.dtype)
        grads = torch.autograd.grad(out, inputs, grad_out, allow_unused=True)
        results.append([out.detach(), *grads])
    differences = [(a.float() - b.float()).norm().item() / max(b.float().norm().item(), 1e-30)
                   for a, b in zip(*results) if a is not None and b is not None]
    return max(differences)


def forward_only(fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    def run():
        with torch.no_grad():
            fn()
    return run


def forward_backward(fn: Callable[[], torch.Tensor], leaves: Sequence[torch.Tensor]) -> Callable[[], None]:
    def run():
        fn().float().sum().backward()
        for leaf in leaves:
            leaf.grad = None
    return run


def compare_passes(bench: Bench, case: str, dtype_name: str, ours: Callable[..., torch.Tensor],
                   baseline: Callable[..., torch.Tensor] | None, leaves: Sequence[torch.Tensor],
                   reference: Callable[..., torch.Tensor] | None = None) -> Dict[str, Tuple[float, float]]:
    """(ours ms, baseline ms) by pass, forward and forward+backward, each op called on ``leaves``;
    baseline None: NaN (not available).  Then ours is checked (:meth:`Bench.check`) against
    ``reference``, by default the baseline."""
    times = {}
    for name, wrap in (("fwd", forward_only), ("fwd+bwd", lambda fn: forward_backward(fn, leaves))):
        ours_ms = bench.time_ms(f"{case} {dtype_name} {name} ours", wrap(lambda: ours(*leaves)))
        base_ms = float("nan") if baseline is None else bench.time_ms(f"{case} {dtype_name} {name} baseline",
                                                                      wrap(lambda: baseline(*leaves)))
        times[name] = (ours_ms, base_ms)
    reference = reference or baseline
    if reference is not None:
        bench.check(f"{case} {dtype_name}", dtype_name, ours, reference, leaves)
    return times


def pass_rows(case: str, dtype_name: str, times: Dict[str, Tuple[float, float]]) -> List[str]:
    return [table_row(case, dtype_name, name, ours_ms, base_ms) for name, (ours_ms, base_ms) in times.items()]


def table_row(case: str, dtype_name: str, pass_name: str, ours_ms: float, base_ms: float) -> str:
    return (f"| {case} | {dtype_name} | {pass_name} | {ms_text(ours_ms)} | {ms_text(base_ms)} | "
            f"{ms_text(base_ms / ours_ms, '.2f', 'x')} |")


def ms_text(value: float, spec: str = ".3f", suffix: str = "") -> str:
    """``value`` formatted, or "n/a" for a measurement that failed or has no baseline (NaN)."""
    return "n/a" if math.isnan(value) else format(value, spec) + suffix


def randn(bench: Bench, *shape: int, dtype: torch.dtype, scale: float = 1.0) -> torch.Tensor:
    """A leaf of standard normal values times ``scale`` on the benchmark's device, requiring grad."""
    return (torch.randn(*shape, device=bench.device, dtype=torch.float32) * scale).to(dtype).requires_grad_()


# ----------------------------------------------------------------------------- dwconv2d

# RepLKNet-31B at 224x224: (channels, feature map, large kernel) per stage.
REPLKNET_31B_STAGES = [(128, 56, 31), (256, 28, 29), (512, 14, 27), (1024, 7, 13)]


def bench_dwconv(bench: Bench) -> List[str]:
    batch, stages, layouts = 64, REPLKNET_31B_STAGES, ("nchw", "channels_last")
    if bench.quick:
        stages, layouts = stages[:1], ("nchw",)
    if bench.tiny:
        batch, stages = 2, [(8, 12, 7)]
    lines = [f"### dwconv2d vs F.conv2d(groups=C), batch {batch}", ""] + TABLE_HEADER
    ours_forward_ms: Dict[Tuple[str, str, int], float] = {}
    for dtype_name, dtype in DTYPES.items():
        for layout in layouts:
            for channels, size, large in stages:
                for kernel in sorted({large, 7, 3}, reverse=True):
                    case = f"{layout} {channels}@{size}x{size} k{kernel}"
                    times = compare_dwconv(bench, case, dtype_name, dtype, (batch, channels, size), kernel, layout)
                    lines += pass_rows(case, dtype_name, times)
                    if (channels, size) == stages[0][:2]:
                        ours_forward_ms[dtype_name, layout, kernel] = times["fwd"][0]
    with float32_matmul_precision("high"):   # fp32 with our products in one TF32 pass: the large kernels, NCHW
        for channels, size, large in stages:
            case = f"nchw {channels}@{size}x{size} k{large}"
            times = compare_dwconv(bench, case, "tf32", torch.float32, (batch, channels, size), large, "nchw")
            lines += pass_rows(case, "tf32", times)
    lines += ["", f"Ours, forward, large kernel / 3x3 on {stages[0][0]}@{stages[0][1]}x{stages[0][1]}:"]
    large = stages[0][2]
    for dtype_name in DTYPES:
        for layout in layouts:
            ratio = ours_forward_ms[dtype_name, layout, large] / ours_forward_ms[dtype_name, layout, 3]
            lines.append(f"- {dtype_name} {layout}: {large}x{large} / 3x3 = {ratio:.2f}")
    return lines + kernel_choices()


def compare_dwconv(bench: Bench, case: str, dtype_name: str, dtype: torch.dtype, sizes: Tuple[int, int, int],
                   kernel: int, layout: str) -> Dict[str, Tuple[float, float]]:
    """:func:`compare_passes` of ``dwconv2d`` and ``F.conv2d(groups=C)`` on random (batch, channels, size,
    size) inputs in ``layout`` with a ``kernel`` x ``kernel`` filter and 'same' padding."""
    batch, channels, size = sizes
    memory_format = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = randn(bench, batch, channels, size, size, dtype=dtype)
    x = x.detach().contiguous(memory_format=memory_format).requires_grad_()
    weight = randn(bench, channels, 1, kernel, kernel, dtype=dtype, scale=1.0 / kernel)
    pad = kernel // 2
    return compare_passes(bench, case, dtype_name, lambda x, w: dwconv2d(x, w, padding=pad, impl=bench.ops_impl),
                          lambda x, w: F.conv2d(x, w, None, 1, pad, 1, channels), (x, weight))


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    """``torch.set_float32_matmul_precision(precision)`` while in the block."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def kernel_choices() -> List[str]:
    """Which dwconv2d kernel (direct or row-band) the first call of each layer shape timed faster."""
    try:
        from convzoo.ops.dwconv.triton import _KERNEL_CHOICE
    except ImportError:   # no Triton
        return []
    if not _KERNEL_CHOICE:
        return []
    lines = ["", "dwconv2d kernel kept per layer shape (timed at the first call):"]
    for key, kernel in sorted(_KERNEL_CHOICE.items(), key=str):
        layout = "nchw" if key.rows_contiguous else "channels_last"
        products = "" if key.precision == "ieee" else f" ({key.precision})"
        lines.append(f"- {key.role} {str(key.dtype)[6:]}{products} {layout} x{list(key.shape)} "
                     f"k{key.weight_shape[2]} stride {key.stride[0]}: {kernel}")
    return lines


# ----------------------------------------------------------------------------- dcnv3

# InternImage-T at 224x224: (channels, feature map, groups) per stage.
INTERNIMAGE_T_STAGES = [(64, 56, 4), (128, 28, 8), (256, 14, 16), (512, 7, 32)]


def bench_dcnv3(bench: Bench) -> List[str]:
    batch, stages = 64, INTERNIMAGE_T_STAGES
    if bench.quick:
        stages = stages[:2]
    if bench.tiny:
        batch, stages = 2, [(8, 6, 2)]
    lines = [f"### dcnv3 vs the grid_sample reference, batch {batch}, 3x3, stride 1, pad 1", ""] + TABLE_HEADER
    for dtype_name, dtype in DTYPES.items():
        for channels, size, group in stages:
            x = randn(bench, batch, size, size, channels, dtype=dtype)
            offset = randn(bench, batch, size, size, group * 18, dtype=dtype, scale=2.0)
            mask = torch.rand(batch, size, size, group, 9, device=bench.device).softmax(-1)
            mask = mask.reshape(batch, size, size, -1).to(dtype).requires_grad_()
            args = (3, 3, 1, 1, 1, 1, 1, 1, group, channels // group, 1.0)
            case = f"{channels}ch@{size}x{size} g{group}"
            # Checked against convzoo's reference, not grid_sample: where a bf16 offset puts a sample
            # exactly on a pixel row or column, grid_sample's normalised coordinates can round it to
            # the other side, and the offset gradient (one-sided there) differs by ~2% in norm.
            times = compare_passes(bench, case, dtype_name,
                                   lambda *leaves: dcnv3(*leaves, *args, impl=bench.ops_impl),
                                   lambda *leaves: dcnv3_grid_sample(*leaves, *args), (x, offset, mask),
                                   reference=lambda *leaves: dcnv3(*leaves, *args, impl="reference"))
            lines += pass_rows(case, dtype_name, times)
    return lines


# ----------------------------------------------------------------------------- deform_conv2d

# ResNet-50 stages with DCNv2: (name, channels, feature map).
RESNET50_SHAPES = [("conv3", 128, 28), ("conv4", 256, 14), ("conv5", 512, 7)]


def bench_deform_conv(bench: Bench) -> List[str]:
    shapes, batches = RESNET50_SHAPES, (32, 64)
    if bench.quick:
        batches = (32,)
    if bench.tiny:
        shapes, batches = [("tiny", 8, 6)], (2,)
    try:
        import torchvision.ops
        baseline_op = torchvision.ops.deform_conv2d
    except ImportError:
        baseline_op = None
        bench.notes.append("deform_conv: torchvision is not installed, so the baseline column is empty")
    lines = ["### deform_conv2d vs torchvision.ops.deform_conv2d (3x3, stride 1, pad 1, mask)", ""] + TABLE_HEADER
    for dtype_name, dtype in DTYPES.items():
        for name, channels, size in shapes:
            for batch in batches:
                x = randn(bench, batch, channels, size, size, dtype=dtype)
                offset = randn(bench, batch, 18, size, size, dtype=dtype)
                mask = torch.rand(batch, 9, size, size, device=bench.device).to(dtype).requires_grad_()
                weight = randn(bench, channels, channels, 3, 3, dtype=dtype, scale=0.02)
                bias = randn(bench, channels, dtype=dtype)
                geometry = (1, 1, 1)   # stride, padding, dilation

                def ours(x, offset, weight, bias, mask):
                    return deform_conv2d(x, offset, weight, bias, *geometry, mask=mask, impl=bench.ops_impl)

                def baseline(x, offset, weight, bias, mask):
                    return baseline_op(x, offset, weight, bias, *geometry, mask=mask)

                case = f"{name} {channels}ch@{size}x{size} batch {batch}"
                times = compare_passes(bench, case, dtype_name, ours, baseline if baseline_op else None,
                                       (x, offset, weight, bias, mask))
                lines += pass_rows(case, dtype_name, times)
    return lines


# ----------------------------------------------------------------------------- whole models

MODELS = ("replknet_31b", "internimage_t")


def with_reference_impl(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with ``impl = "reference"`` on every module that has an ``impl``."""
    model = copy.deepcopy(model)
    for module in model.modules():
        if hasattr(module, "impl"):
            module.impl = "reference"
    return model


def autocast_to(bench: Bench, dtype: torch.dtype):
    """bf16/fp16 autocast on the benchmark's device; a no-op context for fp32."""
    return torch.autocast(bench.device.type, dtype=dtype, enabled=dtype != torch.float32)


def training_step(bench: Bench, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                  dtype: torch.dtype) -> Callable[[], None]:
    def run():
        with autocast_to(bench, dtype):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        model.zero_grad(set_to_none=True)
    return run


def inference(bench: Bench, model: nn.Module, images: torch.Tensor, dtype: torch.dtype) -> Callable[[], None]:
    def run():
        with torch.no_grad(), autocast_to(bench, dtype):
            model(images)
    return run


def bench_models(bench: Bench) -> List[str]:
    train_batch, infer_batch, size = 32, 64, 224
    if bench.tiny:
        train_batch, infer_batch, size = 2, 2, 32
    lines = [f"### Whole models, {size}x{size}: training step (batch {train_batch}) and inference (batch "
             f"{infer_batch}), ours vs impl='reference'", "",
             "| model | dtype | pass | ours ms | baseline ms | speed-up | ours img/s | baseline img/s |",
             "|---|---|---|---:|---:|---:|---:|---:|"]
    for model_name in MODELS:
        torch.manual_seed(0)
        ours = convzoo.create_model(model_name).to(bench.device)
        models = {"train": (ours.train(), with_reference_impl(ours).train())}
        deployed = convzoo.reparameterize(copy.deepcopy(ours).eval())
        models["inference"] = (deployed, with_reference_impl(deployed))
        labels = torch.randint(0, 1000, (train_batch,), device=bench.device)
        for dtype_name, dtype in DTYPES.items():
            for pass_name, batch in (("train", train_batch), ("inference", infer_batch)):
                images = torch.randn(batch, 3, size, size, device=bench.device)
                times = []
                for side, model in zip(("ours", "baseline"), models[pass_name]):
                    run = (training_step(bench, model, images, labels, dtype) if pass_name == "train"
                           else inference(bench, model, images, dtype))
                    times.append(bench.time_ms(f"{model_name} {dtype_name} {pass_name} {side}", run))
                ours_ms, base_ms = times
                lines.append(f"{table_row(model_name, dtype_name, pass_name, ours_ms, base_ms)} "
                             f"{ms_text(1000 * batch / ours_ms, '.1f')} | {ms_text(1000 * batch / base_ms, '.1f')} |")
        del models, deployed, ours
    return lines


SECTIONS: Dict[str, Callable[[Bench], List[str]]] = {
    "dwconv": bench_dwconv, "dcnv3": bench_dcnv3, "deform_conv": bench_deform_conv, "models": bench_models}


def require_device(device: torch.device) -> None:
    """Exit with a clear message when a CUDA run lacks a GPU or Triton."""
    if device.type != "cuda":
        return
    if not torch.cuda.is_available():
        sys.exit(f"benchmarks/gpu.py: --device {device} needs an NVIDIA GPU, but torch.cuda.is_available() is "
                 f"False here (torch {torch.__version__}). Nothing measured. (--device cpu --tiny only checks "
                 "that the script runs.)")
    try:
        import triton  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/gpu.py: Triton is not installed (pip install triton); it runs convzoo's kernels.")


def describe(device: torch.device) -> str:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU (script check only)"
    versions = [f"torch {torch.__version__}"]
    for package in ("triton", "torchvision"):
        try:
            versions.append(f"{package} {__import__(package).__version__}")
        except ImportError:
            pass
    return f"{name}, {', '.join(versions)}, {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC"


def run_sections(bench: Bench, names: Iterable[str], output: str | None = None) -> str:
    """Run the named sections, printing each table as it completes (and rewriting ``output``, if
    given, so that a run cut short keeps the finished tables); return the whole markdown."""
    from convzoo.ops._triton_tuning import AUTOTUNE, INTERPRETED

    tuning = ("none, interpreted (TRITON_INTERPRET=1)" if INTERPRETED else "every config timed" if AUTOTUNE
              else "default configs only (CONVZOO_TRITON_AUTOTUNE=0)")
    lines = [f"## benchmarks/gpu.py: {describe(bench.device)}", "",
             f"`python {' '.join(sys.argv)}`; median of {bench.repeats} after {bench.warmup} warm-up runs (ms); "
             f"Triton autotuning: {tuning}."]
    print("\n".join(lines), flush=True)
    for name in names:
        started = time.perf_counter()
        bench.worst_difference = {}
        section = ["", *SECTIONS[name](bench)]
        if bench.worst_difference:
            section.append(difference_line(bench.worst_difference))
        elapsed = time.perf_counter() - started
        section.append(f"\n(section {name}: {elapsed:.0f} s wall, compiles and autotuning included)")
        print("\n".join(section), flush=True)
        lines += section
        write_markdown(output, lines)
    if bench.notes:
        notes = ["", "Notes:"] + [f"- {note}" for note in bench.notes]
        print("\n".join(notes), flush=True)
        lines += notes
        write_markdown(output, lines)
    return "\n".join(lines)


def difference_line(worst: Dict[str, float]) -> str:
    """The section's summary of :meth:`Bench.check`."""
    values = ", ".join(f"{dtype} {value:.1e} (tolerance {TOLERANCE[dtype]:.0e})" for dtype, value in worst.items())
    return f"\nChecked after the timings against fp32 (output and gradients), worst relative difference: {values}."


def write_markdown(path: str | None, lines: List[str]) -> None:
    if path:
        with open(path, "w") as handle:
            handle.write("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=list(SECTIONS), default=list(SECTIONS), metavar="SECTION",
                        help=f"sections to run, of {', '.join(SECTIONS)} (default: all)")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and repeats")
    parser.add_argument("--tiny", action="store_true", help="toy shapes, to check the script (e.g. with --device cpu)")
    parser.add_argument("--device", default="cuda", help="torch device (default: cuda; refused without a GPU)")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up runs (default 5, --quick 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (default 20, --quick 5)")
    parser.add_argument("--output", help="also write the markdown to this file")
    args = parser.parse_args()
    device = torch.device(args.device)
    require_device(device)
    bench = Bench(device, args.quick, args.tiny,
                  warmup=args.warmup if args.warmup is not None else (2 if args.quick else 5),
                  repeats=args.repeats if args.repeats is not None else (5 if args.quick else 20))
    torch.manual_seed(0)
    run_sections(bench, args.only, args.output)


if __name__ == "__main__":
    main()
