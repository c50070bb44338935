"""Every Triton kernel compiles for Hopper (sm_90) through its real launcher, within the chip's limits.

No GPU needed: ``hopper_compile.py`` (beside this file) compiles through ptxas, which ships with
Triton, in a process of its own without ``TRITON_INTERPRET``.  This catches what the interpreter
tests cannot: code the GPU compiler rejects, shared memory over the limit, register spills.
"""
import inspect
import json
import os
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from convzoo.ops.dcnv3 import triton as dcnv3_triton
from convzoo.ops.deform_conv import triton as deform_conv_triton
from convzoo.ops.dwconv import triton as dwconv_triton

HOPPER_SHARED_LIMIT = 227 * 1024
SCRIPT = Path(__file__).with_name("hopper_compile.py")


@pytest.fixture(scope="module")
def records():
    """Both cores at once: fp32 and bf16 in one process, fp64 and tf32 (fp32 products in one TF32 pass) in
    another."""
    outputs = _compile(["--dtypes", "fp32", "bf16", "--configs", "extremes"],
                       ["--dtypes", "fp64", "tf32", "--configs", "extremes"])
    return [json.loads(line) for output in outputs for line in output]


def _compile(*argument_lists):
    """stdout lines of hopper_compile.py for each argument list, run side by side in processes that compile."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "CONVZOO_TRITON_AUTOTUNE")}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    processes = [subprocess.Popen([sys.executable, str(SCRIPT), *arguments], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env) for arguments in argument_lists]
    outputs = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=1200)
        assert process.returncode == 0, stderr[-4000:]
        outputs.append(stdout.splitlines())
    return outputs


def _launched_kernels(module):
    """Names of the module's launched kernels (``*_kernel``; the helpers they call are not launched)."""
    return {name for name, _ in inspect.getmembers(module) if name.endswith("_kernel")}


def test_every_kernel_compiles_for_every_case(records):
    compiled = defaultdict(set)
    for record in records:
        compiled[record["case"].split()[0]].add(record["kernel"])
    assert compiled["dwconv2d"] == _launched_kernels(dwconv_triton) != set()
    assert compiled["dcnv3"] == _launched_kernels(dcnv3_triton) != set()
    assert compiled["deform_conv2d"] == _launched_kernels(deform_conv_triton) != set()
    cases = {record["case"] for record in records}
    assert {"dwconv2d fp64 nchw", "dwconv2d bf16 nhwc", "dcnv3 bf16 gc24", "deform_conv2d fp32 v1"} <= cases
    assert not any(case.startswith("dcnv3 fp64") for case in cases)   # the dcnv3 Triton path refuses fp64


def test_autotuned_kernels_compile_their_smallest_and_largest_config(records):
    configs = defaultdict(set)
    for record in records:
        configs[record["case"], record["kernel"]].add(json.dumps(record["config"], sort_keys=True))
    assert len(configs["dwconv2d fp32 nhwc", "_forward_kernel"]) == 2
    assert len(configs["dwconv2d bf16 nchw", "_grad_weight_kernel"]) == 2


def test_within_hopper_limits_and_no_spills(records):
    for record in records:
        where = f"{record['kernel']} ({record['case']}, {record['config']})"
        assert record["shared_bytes"] <= HOPPER_SHARED_LIMIT, f"{where} needs {record['shared_bytes']} B shared"
        assert 0 < record["registers"] <= 255, where
        # A few stack bytes hold a saved register (seen: 8 with Triton 3.6); spilled tiles take hundreds.
        assert record["stack_bytes"] <= 16, f"{where} spills {record['stack_bytes']} B to local memory"


def test_dcnv3_channels_move_as_vectors_at_every_group_width(records):
    """group_channels 24 (not a multiple of 16) too: without the kernels' alignment hint its loads
    and stores compiled to one 32-bit (fp32) or 16-bit (bf16) access per channel."""
    forward = [r for r in records if r["kernel"] == "_dcnv3_fwd_kernel"]
    assert {r["case"] for r in forward} >= {"dcnv3 fp32 gc24", "dcnv3 bf16 gc24"}
    for record in forward:
        assert record["vector_global_instructions"] >= 4, f"{record['case']} {record['config']}"


def test_row_band_kernels_run_on_the_tensor_cores(records):
    """Their products compile to MMA instructions in fp32 (as tf32x3 or tf32) and bf16, to Hopper's warpgroup
    HGMMA wherever the product's M side is 64 or more (BLOCK_H for the forward, BLOCK_T for the
    weight gradient), to per-warp HMMA on the smaller tiles."""
    band = [r for r in records if "band" in r["kernel"]]
    assert {(r["kernel"], r["case"]) for r in band} == {
        (kernel, f"dwconv2d {dtype} {layout}") for kernel in ("_forward_band_kernel", "_grad_weight_band_kernel")
        for dtype in ("fp32", "tf32", "bf16") for layout in ("nchw", "nhwc", "nchw k63", "nchw k13 dilated")}
    for record in band:
        where = f"{record['kernel']} {record['case']} {record['config']}"
        m_side = record["config"]["BLOCK_H" if record["kernel"] == "_forward_band_kernel" else "BLOCK_T"]
        if m_side >= 64:
            assert record["warpgroup_mma_instructions"] > 0, where
        else:
            assert record["warp_mma_instructions"] > 0, where


def test_fp32_band_products_take_one_tf32_pass_where_the_matmul_precision_allows(records):
    """At torch.set_float32_matmul_precision("high") the same tiles run a third of the MMA instructions
    of the default's three-pass products; the direct kernels (no products) are not compiled again."""
    mma = {}
    for record in records:
        dtype, case = record["case"].split()[1], " ".join(record["case"].split()[2:])
        tile = json.dumps({k: v for k, v in record["config"].items() if k != "PRECISION"}, sort_keys=True)
        mma[dtype, case, record["kernel"], tile] = record["warpgroup_mma_instructions"] + \
            record["warp_mma_instructions"]
    tf32 = {key[1:]: count for key, count in mma.items() if key[0] == "tf32"}
    assert {kernel for _, kernel, _ in tf32} == {"_forward_band_kernel", "_grad_weight_band_kernel"}
    compared = [(key, count, mma["fp32", *key]) for key, count in tf32.items() if ("fp32", *key) in mma]
    assert len(compared) >= len(tf32) // 2
    for key, one_pass, three_passes in compared:
        assert 0 < 2 * one_pass < three_passes, (key, one_pass, three_passes)


def test_a_new_batch_size_compiles_nothing_new(records):   # after `records`: its binaries are cached
    (output,) = _compile(["--batch-sizes", "2", "1", "3", "16", "17", "64"])
    counts = json.loads(output[0])
    assert set(counts) == {name for module in (dwconv_triton, dcnv3_triton, deform_conv_triton)
                           for name in _launched_kernels(module)}
    for kernel, after_each_batch in counts.items():
        assert after_each_batch == after_each_batch[:1] * 6, kernel


def test_markdown_table_has_a_row_per_case_and_kernel(records):   # after `records`: its binaries are cached
    (output,) = _compile(["--dtypes", "fp64", "--configs", "default", "--markdown"])
    header, rule, *rows = output
    assert header.startswith("| case | kernel | binaries | registers |") and rule.startswith("|---|")
    fp64_pairs = {(r["case"], r["kernel"]) for r in records if " fp64 " in r["case"]}
    cells = [row.strip("|").split(" | ") for row in rows]
    assert {(case.strip(), kernel.strip("`")) for case, kernel, *_ in cells} == fp64_pairs
    assert all(binaries == "1" and int(stack) <= 16 for _, _, binaries, _, stack, *_ in cells)
    assert all(len(row) == 9 for row in cells)
