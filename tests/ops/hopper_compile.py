"""Compile every Triton kernel of convzoo for a Hopper GPU (sm_90) on a machine without one.

The interpreter tests check what the kernels compute; they cannot see what only the GPU compiler
sees: code Triton cannot lower, too much shared memory, register spills.  This script runs the
real launchers of :mod:`convzoo.ops` on CPU tensors with Triton's active driver replaced by one
that only *targets* sm_90: every launch compiles (through ptxas, which ships with Triton) and
returns without running, and every autotuning config is compiled instead of timed.  It prints one
JSON line per compiled kernel (name, dtype case, config, registers, stack bytes, local-memory
instructions, 64/128-bit global loads and stores, tensor-core instructions, shared memory).

Run it in a process of its own without ``TRITON_INTERPRET=1`` (kernels are compiled or
interpreted from the moment they are defined)::

    python tests/ops/hopper_compile.py [--arch 90] [--dtypes fp32 bf16] [--configs extremes]
    python tests/ops/hopper_compile.py --batch-sizes 1 2 3 64
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import subprocess
import sys
import tempfile
from collections import defaultdict
from typing import Dict, List, Sequence

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("hopper_compile.py: unset TRITON_INTERPRET; it compiles the kernels instead of interpreting them")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402


class CompileOnlyDriver:
    """A Triton driver that targets a CUDA architecture but has no device: enough for compiling."""

    def __init__(self, arch: int):
        self.target = GPUTarget("cuda", arch, 32)

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def _resource_usage(cubin: bytes) -> Dict[str, int]:
    """Registers, stack frame bytes, local-memory instructions (spills), 64/128-bit global loads and
    stores (vectorized accesses) and tensor-core instructions (Hopper's warpgroup HGMMA, the older
    per-warp HMMA) of a cubin, by cuobjdump."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        usage, sass = (subprocess.run([tool, flag, handle.name], capture_output=True, text=True, check=True).stdout
                       for flag in ("--dump-resource-usage", "--dump-sass"))
    fields = dict(re.findall(r"(REG|STACK):(\d+)", usage))
    return {"registers": int(fields.get("REG", 0)), "stack_bytes": int(fields.get("STACK", 0)),
            "local_memory_instructions": len(re.findall(r"\b(?:LDL|STL)(?:\.\w+)*\s", sass)),
            "vector_global_instructions": len(re.findall(r"\b(?:LDG|STG)(?:\.\w+)*\.(?:64|128)\s", sass)),
            "warpgroup_mma_instructions": len(re.findall(r"\bHGMMA(?:\.\w+)*\s", sass)),
            "warp_mma_instructions": len(re.findall(r"\bHMMA(?:\.\w+)*\s", sass))}


#: Which autotuning configs to compile: each, the first and the last (in convzoo's lists the default
#: and the one with the most values per thread), or the first alone.
CONFIG_CHOICES = {"all": lambda configs: configs, "extremes": lambda configs: {configs[0], configs[-1]},
                  "default": lambda configs: configs[:1]}


class CompileRecorder:
    """Patches Triton so launches compile without running; keeps one record per compiled kernel
    (``records``) and the distinct binaries compiled for each kernel (``binaries``)."""

    def __init__(self, arch: int, configs: str = "all"):
        self.arch = arch
        self.choose_configs = CONFIG_CHOICES[configs]
        self.case = ""
        self.records: Dict[tuple, dict] = {}
        self.binaries: Dict[str, set] = defaultdict(set)

    def __enter__(self):
        self._jit_run, self._tune_run = JITFunction.run, Autotuner.run
        self._driver = driver._active  # None when no driver was made yet (no GPU here)
        recorder = self

        def compile_only(fn, *args, grid, warmup, **kwargs):
            kernel = recorder._jit_run(fn, *args, grid=grid, warmup=True, **kwargs)
            recorder.binaries[fn.fn.__name__].add(id(kernel))   # Triton's cache holds it: ids stay unique
            recorder._record(fn, kernel, kwargs)
            return kernel

        def compile_configs(tuner, *args, warmup=False, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            configs = tuner.prune_configs(kwargs)
            for config in recorder.choose_configs(configs):
                tuner.fn.warmup(*args, **kwargs, **config.all_kwargs())
            tuner.nargs = None

        JITFunction.run, Autotuner.run = compile_only, compile_configs
        driver.set_active(CompileOnlyDriver(self.arch))
        return self

    def __exit__(self, *exc):
        JITFunction.run, Autotuner.run = self._jit_run, self._tune_run
        driver._active = self._driver

    def _record(self, fn, kernel, kwargs):
        config = {k: v if isinstance(v, (int, float, bool)) else str(v) for k, v in kwargs.items()
                  if k.isupper() or k in ("num_warps", "num_stages")}
        key = (fn.fn.__name__, self.case, json.dumps(config, sort_keys=True))
        if key not in self.records:
            self.records[key] = {
                "kernel": key[0], "case": self.case, "config": config, "num_warps": kernel.metadata.num_warps,
                "shared_bytes": kernel.metadata.shared, **_resource_usage(kernel.asm["cubin"])}


# ----------------------------------------------------------------------------- launches


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64,
          "tf32": torch.float32}
#: Dtype cases run at another ``torch.set_float32_matmul_precision`` than "highest": fp32 whose
#: products may run in one TF32 pass.  Only the row-band kernels take it into account.
MATMUL_PRECISIONS = {"tf32": "high"}


@contextlib.contextmanager
def float32_matmul_precision(precision: str):
    """``torch.set_float32_matmul_precision(precision)`` while in the block (as in benchmarks/gpu.py)."""
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _dwconv_cases(dtypes, batch=2):
    from convzoo.ops.dwconv import triton as dwconv_triton

    def case(dtype_name, kernel, launch, *args):
        """``launch(*args, kernel=kernel)`` at the dtype case's matmul precision."""
        def run():
            with float32_matmul_precision(MATMUL_PRECISIONS.get(dtype_name, "highest")):
                return launch(*args, kernel=kernel)
        return run

    forward, backward = dwconv_triton.dwconv2d_forward, dwconv_triton.dwconv2d_backward
    geometry = ((1, 1), (15, 15, 15, 15), (1, 1))
    for dtype_name in dtypes:
        dtype = DTYPES[dtype_name]
        # where "band" does not apply (fp64) it is "direct"; a matmul precision changes only the band kernels
        kernels = ("band",) if dtype_name in MATMUL_PRECISIONS else ("direct", "band")
        for layout in (torch.contiguous_format, torch.channels_last):
            x = torch.zeros(batch, 64, 72, 72, dtype=dtype).contiguous(memory_format=layout)   # 128-row tiles apply
            weight = torch.zeros(64, 1, 31, 31, dtype=dtype)
            name = f"dwconv2d {dtype_name} {'nhwc' if layout == torch.channels_last else 'nchw'}"
            for kernel in kernels:
                yield name, case(dtype_name, kernel, forward, x, weight, weight[:, 0, 0, 0], *geometry)
                yield name, case(dtype_name, kernel, backward, torch.zeros_like(x), x, weight, *geometry,
                                 (True, True, False))
                # stride 2: the band input gradient runs per phase into strided views of grad_x
                grad_out = torch.zeros(batch, 64, 36, 36, dtype=dtype).contiguous(memory_format=layout)
                yield name, case(dtype_name, kernel, backward, grad_out, x, weight, (2, 2), *geometry[1:],
                                 (True, True, False))
    for dtype_name in [name for name in dtypes if name != "fp64"]:   # 63x63, dilated: band kernels (no fp64)
        dtype = DTYPES[dtype_name]
        x = torch.zeros(batch, 16, 72, 72, dtype=dtype)
        weight = torch.zeros(16, 1, 63, 63, dtype=dtype)
        name = f"dwconv2d {dtype_name} nchw k63"
        for stride in ((1, 1), (2, 2)):
            yield name, case(dtype_name, "band", forward, x, weight, None, stride, (31, 31, 31, 31), (1, 1))
        yield name, case(dtype_name, "band", backward, torch.zeros(batch, 16, 36, 36, dtype=dtype), x, weight,
                         (2, 2), (31, 31, 31, 31), (1, 1), (True, True, False))
        dilated = torch.zeros(16, 1, 13, 13, dtype=dtype)   # 13 taps 3 apart: 37 wide
        dilated_geometry = ((1, 1), (18, 18, 18, 18), (3, 3))
        name = f"dwconv2d {dtype_name} nchw k13 dilated"
        yield name, case(dtype_name, "band", forward, x, dilated, None, *dilated_geometry)
        yield name, case(dtype_name, "band", backward, torch.zeros_like(x), x, dilated, *dilated_geometry,
                         (True, True, False))


def _dcnv3_cases(dtypes, batch=2):
    from convzoo.ops.dcnv3.triton import dcnv3_backward_triton, dcnv3_forward_triton

    group = 4
    for dtype_name in set(dtypes) - {"fp64"} - set(MATMUL_PRECISIONS):   # no fp64 path; no products to set
        for group_channels in (16, 32, 24):
            dtype = DTYPES[dtype_name]
            x = torch.zeros(batch, 14, 14, group * group_channels, dtype=dtype)
            offset = torch.zeros(batch, 14, 14, group * 9 * 2, dtype=dtype)
            mask = torch.zeros(batch, 14, 14, group * 9, dtype=dtype)
            params = (3, 3, 1, 1, 1, 1, 1, 1, group, group_channels, 1.0, False)
            name = f"dcnv3 {dtype_name} gc{group_channels}"
            yield name, lambda: dcnv3_forward_triton(x, offset, mask, *params)
            yield name, lambda: dcnv3_backward_triton(torch.zeros_like(x), x, offset, mask, *params)


def _deform_conv_cases(dtypes, batch=2):
    from convzoo.ops.deform_conv.triton import deform_conv2d_backward, deform_conv2d_forward

    from convzoo.ops.deform_conv.reference import Conv

    conv = Conv()
    for dtype_name in [name for name in dtypes if name not in MATMUL_PRECISIONS]:   # products by torch
        for modulated in (True, False):
            dtype = DTYPES[dtype_name]
            x = torch.zeros(batch, 64, 14, 14, dtype=dtype)
            weight = torch.zeros(64, 64, 3, 3, dtype=dtype)
            offset = torch.zeros(batch, 18, 14, 14, dtype=dtype)
            mask = torch.zeros(batch, 9, 14, 14, dtype=dtype) if modulated else None
            name = f"deform_conv2d {dtype_name} {'v2' if modulated else 'v1'}"
            yield name, lambda: deform_conv2d_forward(x, offset, weight, None, mask, conv)
            yield name, lambda: deform_conv2d_backward(torch.zeros_like(x), x, offset, weight, mask, conv)


CASES = (_dwconv_cases, _dcnv3_cases, _deform_conv_cases)


def compile_all(arch: int = 90, dtypes=tuple(DTYPES), configs: str = "all") -> List[dict]:
    """Compile every kernel for ``sm_<arch>`` through the real launchers; one record per compiled kernel.

    ``dtypes``: names from :data:`DTYPES`; ``configs``: a key of :data:`CONFIG_CHOICES`.
    """
    with CompileRecorder(arch, configs) as recorder:
        for cases in CASES:
            for name, launch in cases(dtypes):
                recorder.case = name
                launch()
    return list(recorder.records.values())


def binaries_over_batches(batch_sizes: Sequence[int], arch: int = 90) -> Dict[str, List[int]]:
    """Distinct binaries compiled per kernel so far after each of ``batch_sizes``, every fp32 case
    run at each (default configs only): what a new batch size costs in compiles."""
    counts: Dict[str, List[int]] = defaultdict(list)
    with CompileRecorder(arch, "default") as recorder:
        for batch in batch_sizes:
            for cases in CASES:
                for name, launch in cases(["fp32"], batch):
                    recorder.case = name
                    launch()
            for kernel, ids in recorder.binaries.items():
                counts[kernel].append(len(ids))
    return dict(counts)


def markdown_table(records: Sequence[dict]) -> str:
    """One row per (case, kernel): binaries, register range, the worst stack, spill instructions and
    shared memory over its configs, the fewest vector accesses and the most tensor-core instructions
    (the table in benchmarks/RESULTS.md)."""
    groups: Dict[tuple, List[dict]] = defaultdict(list)
    for record in records:
        groups[record["case"], record["kernel"]].append(record)
    lines = ["| case | kernel | binaries | registers | max stack B | max LDL/STL | max shared B | "
             "min vector LDG/STG | max HGMMA/HMMA |", "|---|---|---:|---|---:|---:|---:|---:|---|"]
    for (case, kernel), group in groups.items():
        def worst(field, pick=max):
            return pick(r[field] for r in group)
        registers = [r["registers"] for r in group]
        lines.append(f"| {case} | `{kernel}` | {len(group)} | {min(registers)}-{max(registers)} | "
                     f"{worst('stack_bytes')} | {worst('local_memory_instructions')} | {worst('shared_bytes')} | "
                     f"{worst('vector_global_instructions', min)} | "
                     f"{worst('warpgroup_mma_instructions')}/{worst('warp_mma_instructions')} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability as one number (90 = sm_90)")
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DTYPES))
    parser.add_argument("--configs", choices=list(CONFIG_CHOICES), default="all",
                        help="autotuning configs to compile: all, the first and the last, or the default")
    parser.add_argument("--batch-sizes", nargs="+", type=int,
                        help="instead: the binaries each kernel has after each of these batch sizes (fp32)")
    parser.add_argument("--markdown", action="store_true", help="print a table per case and kernel, not JSON lines")
    args = parser.parse_args(argv)
    if args.batch_sizes:
        print(json.dumps(binaries_over_batches(args.batch_sizes, args.arch), sort_keys=True))
        return 0
    records = compile_all(args.arch, args.dtypes, args.configs)
    if args.markdown:
        print(markdown_table(records))
        return 0
    for record in records:
        print(json.dumps(record, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())
