"""Triton kernels for ``dwconv2d`` (CUDA; CPU tensors under ``TRITON_INTERPRET=1``).

Three direct kernels (no im2col) and two of matrix products, all accumulating in fp32 (the
direct ones in fp64 for fp64 inputs), reading and writing tensors through their strides so NCHW,
channels_last and strided views work without copies (the row-band kernels read rows: they take an
NCHW copy of a channels_last input, and write any layout):

* forward: one program = (a tile of ``BLOCK_P`` output pixels) x (``BLOCK_C`` output channels)
  of one image; it loops over the kernel rows and columns and reads the input tile plus its halo
  (served from L1/L2 after the first tap).  The channel block is wide for channels_last tensors
  (contiguous channels give coalesced loads) and 1 for NCHW (contiguous pixels).
* grad-input: the same tiling over *input* pixels; each tap gathers the output gradient at
  ``(h + top - i*dh) / sh`` when that is a whole in-range row (a conv of the output gradient
  with the flipped kernel at stride 1, the transposed conv in general), summing the ``m``
  output channels of each input channel.
* grad-weight: one program = (``BLOCK_C`` channels, one kernel row ``i``, one slice of the
  ``N * Ho`` output rows).  For each output row it loads the gradient row once and correlates it
  with the ``kw`` shifted input rows, keeping the ``[BLOCK_C, BLOCK_KW]`` partial sums in
  registers.  Each program writes its own partial sums; the slices are then summed by one
  ``torch.sum`` (no atomics, deterministic).
* row band (fp32/fp16/bf16): one program = a ``BLOCK_H x BLOCK_W`` output tile of one channel;
  kernel row ``i`` is the product of the input rows it reads (``BLOCK_T`` columns) with the banded
  matrix ``T[t, o] = w[i, t - o*SW]``, on the tensor cores (fp32 as ``tf32x3``, or ``tf32`` where
  ``torch.get_float32_matmul_precision()`` allows it, as for ``torch.matmul``), in chunks of
  ``BLOCK_K`` input columns; a dilation along the width is taken as zero kernel columns between
  the taps.  It computes the forward and the input gradient: at stride 1 the 'full' conv of the
  output gradient with the flipped kernel, at stride ``s`` one such conv per phase of the input
  rows and columns with the flipped taps that reach it, summing the ``m`` output channels of an
  input channel in the same program.
* row-band weight gradient (fp32/fp16/bf16): one program = (one channel, one kernel row ``i``,
  ``BLOCK_W`` output columns, one slice of the row tiles).  Per tile of
  ``BLOCK_H`` output rows it adds ``rows^T @ go`` (``[BLOCK_T, BLOCK_H] @ [BLOCK_H, BLOCK_W]``, tensor
  cores) into ``S``; at the end weight column ``j`` is the sum of the band ``S[o*SW + j, o]``.
  Slices write their own partial sums, summed by ``torch.sum`` as for the direct kernel.

Where a row-band kernel applies, which of it and the direct kernel runs is the caller's explicit
``kernel`` argument (:data:`KERNELS`); ``"auto"`` times both once per layer shape, layout and role
on the GPU and keeps the faster in a bounded cache (:data:`MAX_KERNEL_CHOICES` entries).

Autotuning keys hold the layer's channels, spatial sizes and kernel, never the batch size, and
the batch-dependent integers are not specialised, so a new batch size reuses the compiled
kernels.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from typing import Callable, Dict, NamedTuple, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from .._triton_tuning import INTERPRETED, time_ms, tuning_configs
from .cpu import output_memory_format
from .reference import output_shape


def _configs(block_name: str, default: Tuple[int, int], sizes, warps):
    """Autotuning configs: ``default`` (size, warps) first, then the rest by values per thread, most last
    (the config with the most register pressure); one 64-wide block under the interpreter."""
    others = sorted(((size, w) for size in sizes for w in warps if (size, w) != default), key=lambda c: c[0] / c[1])
    configs = [triton.Config({block_name: size}, num_warps=w) for size, w in [default] + others]
    return tuning_configs(configs, interpreted=triton.Config({block_name: 64}, num_warps=1))


#: Most accumulator registers per thread a pixel-tile config may need (a 32-bit register each for
#: fp32, two for fp64); beyond it ptxas spills on sm_90 (seen with Triton 3.6: 128 fp32 values).
MAX_ACCUMULATOR_REGISTERS = 64


def _fit_in_registers(configs, named_args, **kwargs):
    """Autotuner pruning: drop pixel-tile configs whose (BLOCK_C, BLOCK_P) accumulators would spill."""
    words = 2 if kwargs["ACC"] == tl.float64 else 1

    def registers(config):
        return config.kwargs["BLOCK_P"] * kwargs["BLOCK_C"] * words / (32 * config.num_warps)
    return [c for c in configs if registers(c) <= MAX_ACCUMULATOR_REGISTERS] or [min(configs, key=registers)]


def _acc_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


@triton.autotune(configs=_configs("BLOCK_P", (128, 4), (64, 128, 256), (2, 4, 8)), do_bench=time_ms,
                 key=["C_out", "H", "W", "Ho", "Wo", "KH", "KW", "SH", "SW", "BLOCK_C"],
                 prune_configs_by={"early_config_prune": _fit_in_registers})
@triton.jit(do_not_specialize=["N"])
def _forward_kernel(
    # x (N, C, H, W), w (C_out, 1, KH, KW) contiguous, b (C_out,), y (N, C_out, Ho, Wo)
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, C_out, H, W, Ho, Wo, MULT,
    sxn, sxc, sxh, sxw,                  # x strides
    syn, syc, syh, syw,                  # y strides
    KH, KW, SH, SW, PT, PL, DH, DW,
    HAS_BIAS: tl.constexpr, ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < Ho * Wo
    mask_c = offs_c < C_out
    oh = offs_p // Wo
    ow = offs_p % Wo
    x_base = x_ptr + n * sxn + (offs_c // MULT)[:, None] * sxc
    w_base = w_ptr + offs_c * (KH * KW)
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for i in range(KH):
        ih = oh * SH + i * DH - PT
        row_ok = mask_p & (ih >= 0) & (ih < H)
        for j in range(KW):
            iw = ow * SW + j * DW - PL
            ok = row_ok & (iw >= 0) & (iw < W)
            xv = tl.load(x_base + (ih * sxh + iw * sxw)[None, :], mask=mask_c[:, None] & ok[None, :], other=0.0)
            wv = tl.load(w_base + (i * KW + j), mask=mask_c, other=0.0)
            acc += xv.to(ACC) * wv.to(ACC)[:, None]
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_c, mask=mask_c, other=0.0).to(ACC)[:, None]
    y_off = n * syn + offs_c[:, None] * syc + (oh * syh + ow * syw)[None, :]
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


@triton.autotune(configs=_configs("BLOCK_P", (128, 4), (64, 128, 256), (2, 4, 8)), do_bench=time_ms,
                 key=["C", "H", "W", "Ho", "Wo", "KH", "KW", "SH", "SW", "BLOCK_C"],
                 prune_configs_by={"early_config_prune": _fit_in_registers})
@triton.jit(do_not_specialize=["N"])
def _grad_input_kernel(
    go_ptr, w_ptr, gx_ptr,               # go (N, C*MULT, Ho, Wo), w (C*MULT, 1, KH, KW) contiguous, gx (N, C, H, W)
    N, C, H, W, Ho, Wo, MULT,
    sgn, sgc, sgh, sgw,                  # go strides
    sxn, sxc, sxh, sxw,                  # gx strides
    KH, KW, SH, SW, PT, PL, DH, DW,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    pid_p = tl.program_id(0)
    pid_c = tl.program_id(1)
    n = tl.program_id(2).to(tl.int64)
    offs_p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_p = offs_p < H * W
    mask_c = offs_c < C
    h = offs_p // W
    w = offs_p % W
    acc = tl.zeros([BLOCK_C, BLOCK_P], dtype=ACC)
    for k in range(MULT):
        c_out = offs_c * MULT + k
        go_base = go_ptr + n * sgn + c_out[:, None] * sgc
        w_base = w_ptr + c_out * (KH * KW)
        for i in range(KH):
            th = h + PT - i * DH                      # = oh * SH when this tap reaches h
            oh = th // SH
            row_ok = mask_p & (th >= 0) & (oh * SH == th) & (oh < Ho)
            for j in range(KW):
                tw = w + PL - j * DW
                ow = tw // SW
                ok = row_ok & (tw >= 0) & (ow * SW == tw) & (ow < Wo)
                gv = tl.load(go_base + (oh * sgh + ow * sgw)[None, :], mask=mask_c[:, None] & ok[None, :], other=0.0)
                wv = tl.load(w_base + (i * KW + j), mask=mask_c, other=0.0)
                acc += gv.to(ACC) * wv.to(ACC)[:, None]
    gx_off = n * sxn + offs_c[:, None] * sxc + (h * sxh + w * sxw)[None, :]
    tl.store(gx_ptr + gx_off, acc.to(gx_ptr.dtype.element_ty), mask=mask_c[:, None] & mask_p[None, :])


@triton.autotune(configs=_configs("BLOCK_W", (64, 4), (32, 64), (2, 4)), do_bench=time_ms,
                 key=["C_out", "H", "W", "Ho", "Wo", "KH", "KW", "SH", "SW", "BLOCK_C"])
@triton.jit(do_not_specialize=["N", "ROWS_PER_SLICE"])
def _grad_weight_kernel(
    # go (N, C_out, Ho, Wo), x (N, C, H, W), part (SLICES, C_out, KH, BLOCK_KW) in the accumulator dtype
    go_ptr, x_ptr, part_ptr,
    N, C_out, H, W, Ho, Wo, MULT, ROWS_PER_SLICE,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    KH, KW, SH, SW, PT, PL, DH, DW,
    ACC: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    pid_c = tl.program_id(0)
    i = tl.program_id(1)                 # kernel row
    pid_s = tl.program_id(2)             # slice of the N * Ho output rows
    offs_c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    mask_c = offs_c < C_out
    offs_j = tl.arange(0, BLOCK_KW)
    acc = tl.zeros([BLOCK_C, BLOCK_KW], dtype=ACC)
    row_start = pid_s * ROWS_PER_SLICE
    for r in range(row_start, tl.minimum(row_start + ROWS_PER_SLICE, N * Ho)):
        n = (r // Ho).to(tl.int64)
        oh = r % Ho
        ih = oh * SH + i * DH - PT
        if (ih >= 0) & (ih < H):
            go_row = go_ptr + n * sgn + offs_c[:, None] * sgc + oh * sgh
            x_row = x_ptr + n * sxn + (offs_c // MULT)[:, None] * sxc + ih * sxh
            for w0 in range(0, Wo, BLOCK_W):
                ow = w0 + tl.arange(0, BLOCK_W)
                mask_w = ow < Wo
                gv = tl.load(go_row + (ow * sgw)[None, :], mask=mask_c[:, None] & mask_w[None, :], other=0.0).to(ACC)
                for j in range(KW):
                    iw = ow * SW + j * DW - PL
                    ok = mask_w & (iw >= 0) & (iw < W)
                    xv = tl.load(x_row + (iw * sxw)[None, :], mask=mask_c[:, None] & ok[None, :], other=0.0)
                    tap = tl.sum(gv * xv.to(ACC), axis=1)
                    acc += tl.where(offs_j[None, :] == j, tap[:, None], 0.0)
    part_off = ((pid_s * C_out + offs_c[:, None]) * KH + i) * BLOCK_KW + offs_j[None, :]
    tl.store(part_ptr + part_off, acc, mask=mask_c[:, None] & (offs_j[None, :] < KW))


#: ``input_precision`` values of the band kernels' products with fp32 operands (:func:`_dot_settings`).
FP32_PRECISIONS = ("tf32x3", "tf32")


def _band_configs():
    """(BLOCK_H, BLOCK_W, warps) of the row-band kernel: the default first, the most values per thread
    last, one 16x16 tile under the interpreter."""
    sizes = [(64, 32, 4), (32, 32, 4), (16, 16, 2), (32, 16, 4), (64, 32, 8), (128, 32, 8), (64, 64, 8), (64, 64, 4)]
    configs = [triton.Config({"BLOCK_H": h, "BLOCK_W": w}, num_warps=warps) for h, w, warps in sizes]
    return tuning_configs(configs, interpreted=triton.Config({"BLOCK_H": 16, "BLOCK_W": 16}, num_warps=1))


def _band_prune(fits: Callable[[triton.Config, dict, str], bool], map_sizes: Dict[str, str]):
    """Autotuner pruning for the row-band kernels: only configs that ``fits(config, launch arguments,
    precision)`` (the others spill on sm_90), and no tile that passes the output map (``map_sizes``:
    tile name -> size argument, rounded up to a power of two, at least 16): it would only compute
    padding.  The first config, then the smallest tile, stays if none is left."""
    def prune(configs, named_args, **kwargs):
        arguments = {**named_args, **kwargs}
        configs = [c for c in configs if fits(c, arguments, kwargs["PRECISION"])] or configs[:1]

        def within_map(config):
            return all(config.kwargs[block] <= max(16, triton.next_power_of_2(named_args[size]))
                       for block, size in map_sizes.items())

        def tile_size(config):
            return math.prod(config.kwargs[block] for block in map_sizes)
        return [c for c in configs if within_map(c)] or [min(configs, key=tile_size)]
    return prune


def _band_width(block_w: int, stride: int, kernel: int) -> int:
    """BLOCK_T of the row-band kernels: the input columns that ``block_w`` output columns read, to a power of two."""
    return triton.next_power_of_2((block_w - 1) * stride + kernel)


_band_columns = triton.heuristics({"BLOCK_T": lambda meta: _band_width(meta["BLOCK_W"], meta["SW"], meta["KW"])})


def _forward_band_fits(config: triton.Config, args: dict, precision: str) -> bool:
    """Forward band configs that compile without spills on sm_90 (``tests/ops/hopper_compile.py``,
    Triton 3.9 and 3.6, kernels 7 to 63 wide at stride 1 and 2, dilated ones): with three-pass fp32
    products ("tf32x3") tiles at most 32 columns wide; and a band of more than 64 input columns in
    fp32 (128 in fp16/bf16: kernels wider than about 33 or 65) only in tiles of at most 64 rows on
    8 warps (a 64x64 one-pass fp32 tile on 4 warps sat at 244 registers at 31x31)."""
    if precision == "tf32x3" and config.kwargs["BLOCK_W"] > 32:
        return False
    band = _band_width(config.kwargs["BLOCK_W"], args["SW"], args["KW"])
    wide = band > (64 if precision in FP32_PRECISIONS else 128)
    return not wide or (config.num_warps >= 8 and config.kwargs["BLOCK_H"] <= 64)


def _band_k_chunk(dtype: torch.dtype) -> int:
    """Most input columns per product of the forward band kernel (the K side of its ``tl.dot``): 64 for
    fp32 (three-pass products of 128 columns spill on sm_90, seen at 63x63), 128 for fp16/bf16; 32
    under the interpreter, so that the tests' small tiles take several chunks too."""
    if INTERPRETED:
        return 32
    return 64 if dtype == torch.float32 else 128


@triton.autotune(configs=_band_configs(), do_bench=time_ms,
                 key=["C_out", "H", "W", "Ho", "Wo", "KH", "KW", "SH", "SW", "DH", "PRECISION"],
                 prune_configs_by={"early_config_prune": _band_prune(_forward_band_fits,
                                                                     {"BLOCK_H": "Ho", "BLOCK_W": "Wo"})})
@_band_columns
@triton.heuristics({"BLOCK_K": lambda meta: min(meta["BLOCK_T"], meta["K_CHUNK"])})
@triton.jit(do_not_specialize=["N"])
def _forward_band_kernel(
    # x (N, C, H, W) with unit column stride, w (C_out * IN_PER_OUT, 1, KH, KW) contiguous, b (C_out,),
    # y (N, C_out, Ho, Wo); output channel c sums input channels (c // MULT) * IN_PER_OUT + k, k < IN_PER_OUT,
    # with weights c * IN_PER_OUT + k (the forward: IN_PER_OUT = 1; the input gradient: MULT = 1)
    x_ptr, w_ptr, b_ptr, y_ptr,
    N, C_out, H, W, Ho, Wo, MULT, IN_PER_OUT,
    sxn, sxc, sxh, sxw,
    syn, syc, syh, syw,
    KH, KW, SH, SW, PT, PL, DH,
    HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr, K_CHUNK: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # Kernel row i of a depthwise conv is a matrix product: the BLOCK_H input rows the output rows
    # read, BLOCK_T columns wide, times the banded (Toeplitz) matrix T[t, o] = w[i, t - o*SW], taken
    # in chunks of BLOCK_K columns.  (A column dilation is in the weight: zero columns between taps.)
    pid_nc = tl.program_id(0)             # first: N * C_out can pass the 65535 limit of the other axes
    pid_h = tl.program_id(1)
    pid_w = tl.program_id(2)
    n = (pid_nc // C_out).to(tl.int64)
    c = pid_nc % C_out
    oh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    col = tl.arange(0, BLOCK_W)
    ow = pid_w * BLOCK_W + col
    acc = tl.zeros([BLOCK_H, BLOCK_W], dtype=tl.float32)
    for t0 in tl.static_range(0, BLOCK_T, BLOCK_K):   # one loop nest per chunk: one chunk's indices live at a time
        t = t0 + tl.arange(0, BLOCK_K)
        iw = pid_w * BLOCK_W * SW - PL + t
        col_ok = (iw >= 0) & (iw < W)
        tap = t[:, None] - col[None, :] * SW     # kernel column joining input column t to output o
        tap_ok = (tap >= 0) & (tap < KW)
        for k in range(IN_PER_OUT):
            x_base = x_ptr + n * sxn + ((c // MULT) * IN_PER_OUT + k) * sxc + iw[None, :] * sxw
            w_base = w_ptr + (c * IN_PER_OUT + k) * (KH * KW)
            for i in range(KH):
                ih = oh * SH + i * DH - PT
                rows = tl.load(x_base + ih[:, None] * sxh, mask=((ih >= 0) & (ih < H))[:, None] & col_ok[None, :],
                               other=0.0)
                band = tl.load(w_base + i * KW + tap, mask=tap_ok, other=0.0)
                if UPCAST:
                    rows = rows.to(tl.float32)
                acc = tl.dot(rows, band.to(rows.dtype), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + c).to(tl.float32)
    y_off = n * syn + c * syc + oh[:, None] * syh + ow[None, :] * syw
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=(oh < Ho)[:, None] & (ow < Wo)[None, :])


def _grad_weight_band_fits(config: triton.Config, args: dict, precision: str) -> bool:
    """Weight-gradient band configs that compile within sm_90's registers and shared memory (Triton 3.6
    and 3.9): in fp32 at most 64 rows (128 rows of a 128-column band take 240 KB of shared memory in
    three pipeline stages, over the 227 KB limit), and with three-pass products, where the band passes
    64 input columns, at most 8 rows per warp (64 rows on 4 warps sit at 254 registers there, and
    spilled 112 B with Triton 3.6 at 13 taps dilated 3)."""
    if precision not in FP32_PRECISIONS:
        return True
    rows = config.kwargs["BLOCK_H"]
    wide = _band_width(args["BLOCK_W"], args["SW"], args["KW"]) > 64
    return rows <= 64 and (precision != "tf32x3" or not wide or rows <= 8 * config.num_warps)


def _band_grad_weight_configs():
    """(BLOCK_H, warps) of the row-band weight-gradient kernel: the default first, 16 rows under the interpreter."""
    sizes = [(32, 4), (64, 4), (16, 4), (128, 8), (64, 8)]
    configs = [triton.Config({"BLOCK_H": h}, num_warps=warps) for h, warps in sizes]
    return tuning_configs(configs, interpreted=triton.Config({"BLOCK_H": 16}, num_warps=1))


@triton.autotune(configs=_band_grad_weight_configs(), do_bench=time_ms,
                 key=["C_out", "H", "W", "Ho", "Wo", "KH", "KW", "SH", "SW", "DH", "BLOCK_W", "PRECISION"],
                 prune_configs_by={"early_config_prune": _band_prune(_grad_weight_band_fits, {"BLOCK_H": "Ho"})})
@_band_columns
@triton.jit(do_not_specialize=["N", "SLICES"])
def _grad_weight_band_kernel(
    # go (N, C_out, Ho, Wo) and x (N, C, H, W) with unit column strides,
    # part (SLICES, C_out, KH, column tiles, BLOCK_KW) in fp32
    go_ptr, x_ptr, part_ptr,
    N, C_out, H, W, Ho, Wo, MULT, SLICES,
    sgn, sgc, sgh, sgw,
    sxn, sxc, sxh, sxw,
    KH, KW, SH, SW, PT, PL, DH,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_KW: tl.constexpr,
):
    # For kernel row i and the BLOCK_W output columns of this program, the products
    # S[t, o] = sum over output rows of x[row*SH + i*DH - PT, t] * go[row, o] are one matrix product
    # per tile of BLOCK_H rows, rows^T @ go, on the tensor cores (BLOCK_T, the larger side, as M:
    # Hopper's warpgroup MMA wants M >= 64); S accumulates over the slice's tiles and weight column j
    # is then the sum of S's band t - o*SW == j.  (For a column dilation d the launcher asks for the
    # gradient of the kernel with zero columns between the taps, and keeps every d-th column.)
    pid_ci = tl.program_id(0)             # channel * KH + kernel row
    pid_w = tl.program_id(1)              # tile of BLOCK_W output columns
    pid_s = tl.program_id(2)              # slice of the N * ceil(Ho / BLOCK_H) row tiles
    c = pid_ci // KH
    i = pid_ci % KH
    col = tl.arange(0, BLOCK_W)
    ow = pid_w * BLOCK_W + col
    t = tl.arange(0, BLOCK_T)
    iw = pid_w * BLOCK_W * SW - PL + t
    col_ok = (iw >= 0) & (iw < W)
    row_tiles = tl.cdiv(Ho, BLOCK_H)
    tiles_per_slice = tl.cdiv(N * row_tiles, SLICES)
    acc = tl.zeros([BLOCK_T, BLOCK_W], dtype=tl.float32)
    tile_start = pid_s * tiles_per_slice
    for tile in range(tile_start, tl.minimum(tile_start + tiles_per_slice, N * row_tiles)):
        n = (tile // row_tiles).to(tl.int64)
        oh = (tile % row_tiles) * BLOCK_H + tl.arange(0, BLOCK_H)
        ih = oh * SH + i * DH - PT
        rows_t = tl.load(x_ptr + n * sxn + (c // MULT) * sxc + iw[:, None] * sxw + ih[None, :] * sxh,
                         mask=col_ok[:, None] & ((ih >= 0) & (ih < H))[None, :], other=0.0)
        go = tl.load(go_ptr + n * sgn + c * sgc + oh[:, None] * sgh + ow[None, :] * sgw,
                     mask=(oh < Ho)[:, None] & (ow < Wo)[None, :], other=0.0)
        if UPCAST:
            rows_t = rows_t.to(tl.float32)
            go = go.to(tl.float32)
        acc = tl.dot(rows_t, go.to(rows_t.dtype), acc, input_precision=PRECISION)
    offs_j = tl.arange(0, BLOCK_KW)
    band = offs_j[:, None] + col[None, :] * SW           # S[o*SW + j, o] holds column o's share of w[i, j]
    in_band = (offs_j < KW)[:, None] & (band < BLOCK_T)
    diagonals = tl.gather(acc, tl.where(in_band, band, 0), axis=0)
    columns = tl.sum(tl.where(in_band, diagonals, 0.0), axis=1)
    part_off = (((pid_s * C_out + c) * KH + i) * tl.num_programs(1) + pid_w) * BLOCK_KW + offs_j
    tl.store(part_ptr + part_off, columns, mask=offs_j < KW)


# ----------------------------------------------------------------------------- launchers


def _block_c(t: torch.Tensor, channels: int) -> int:
    """Channels per program: wide when channels are contiguous in memory, else 1."""
    if t.stride(1) == 1 and channels > 1:
        return 16 if INTERPRETED else min(32, triton.next_power_of_2(channels))
    return 1


#: The values of the launchers' ``kernel`` argument: which kernel computes each pass (forward,
#: input gradient, weight gradient) where the row-band kernels apply (fp32/fp16/bf16). "auto" times
#: both once per layer shape, layout and pass on the GPU and keeps the faster (the direct kernels
#: elsewhere); "direct" or "band" forces one.
KERNELS = ("auto", "direct", "band")

#: The most (layer, pass) choices "auto" keeps; beyond it the least recently used one is dropped
#: (and timed again if its layer comes back), so a process that sees ever new shapes stays bounded.
MAX_KERNEL_CHOICES = 1024


class ChoiceKey(NamedTuple):
    """What the kernel choice of "auto" is kept for: one pass of one layer on one device (never the batch)."""
    role: str                 # "forward", "grad_input" or "grad_weight"
    shape: Tuple[int, ...]    # (C, H, W) of the pass's input (the output gradient for "grad_input")
    rows_contiguous: bool     # False for channels_last (the band kernels read an NCHW copy)
    weight_shape: Tuple[int, ...]
    dtype: torch.dtype
    precision: str            # the band kernels' tl.dot input_precision (see _dot_settings)
    stride: Tuple[int, ...]
    padding: Tuple[int, ...]
    dilation: Tuple[int, ...]
    device: torch.device


_KERNEL_CHOICE: "OrderedDict[ChoiceKey, str]" = OrderedDict()  # least recently used first


def dwconv2d_forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
                     padding: Sequence[int], dilation: Sequence[int], kernel: str = "auto") -> torch.Tensor:
    """Tensor[N, C, H, W] -> Tensor[N, C*m, Ho, Wo] in ``x``'s memory format; ``kernel`` in :data:`KERNELS`."""
    shape = output_shape(x.shape, weight.shape, stride, padding, dilation)
    out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    if out.numel() == 0:
        return out
    w = weight.contiguous()

    def run(name: str) -> None:
        launch = _launch_band if name == "band" else _launch_direct
        launch(x, w, bias, out, stride, padding, dilation)

    run(_kernel_choice("forward", x, w, stride, padding, dilation, run, kernel))
    return out


def _band_applies(x: torch.Tensor) -> bool:
    """The row-band kernels need a dtype ``tl.dot`` takes."""
    return x.dtype in (torch.float32, torch.float16, torch.bfloat16)


def _dilate_columns(w: torch.Tensor, dilation: int) -> torch.Tensor:
    """Kernels (C, 1, KH, KW) -> (C, 1, KH, (KW - 1) * dilation + 1) with zero columns between the taps:
    a conv dilated ``dilation`` along the width is the conv with these, undilated along the width."""
    if dilation == 1:
        return w
    dilated = w.new_zeros(*w.shape[:3], (w.shape[3] - 1) * dilation + 1)
    dilated[..., ::dilation] = w
    return dilated


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``t`` (N, C, H, W) with contiguous rows, as the row-band kernels read it: ``t`` itself, or an NCHW
    copy (of a channels_last tensor).  Each input row is read once per kernel row, so the copy costs
    little beside the kernel; :func:`_kernel_choice` times it with the band kernel."""
    return t if t.stride(3) == 1 else t.contiguous()


def check_kernel_name(kernel: str) -> str:
    """Check the launchers' ``kernel`` argument (one of :data:`KERNELS`)."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return kernel


def _kernel_choice(role: str, x, weight, stride, padding, dilation, run, kernel: str) -> str:
    """"direct" or "band" for ``role`` on input ``x`` given the caller's ``kernel`` (see :data:`KERNELS`);
    ``run(name)`` launches one."""
    check_kernel_name(kernel)
    if not _band_applies(x):
        return "direct"
    if kernel != "auto":
        return kernel
    if x.device.type != "cuda" or torch.cuda.is_current_stream_capturing():
        return "direct"
    key = ChoiceKey(role, tuple(x.shape[1:]), x.stride(3) == 1, tuple(weight.shape), x.dtype,
                    _dot_settings(x.dtype)[0], tuple(stride), tuple(padding), tuple(dilation), x.device)
    if key in _KERNEL_CHOICE:
        _KERNEL_CHOICE.move_to_end(key)
        return _KERNEL_CHOICE[key]
    times = {name: time_ms(lambda: run(name)) for name in ("direct", "band")}
    _KERNEL_CHOICE[key] = min(times, key=times.get)
    while len(_KERNEL_CHOICE) > MAX_KERNEL_CHOICES:
        _KERNEL_CHOICE.popitem(last=False)
    return _KERNEL_CHOICE[key]


def _launch_direct(x, w, bias, out, stride, padding, dilation) -> None:
    n, channels, height, width = x.shape
    c_out, _, kh, kw = w.shape
    block_c = _block_c(x, c_out)

    def grid(meta):
        return triton.cdiv(out.shape[2] * out.shape[3], meta["BLOCK_P"]), triton.cdiv(c_out, block_c), n

    _forward_kernel[grid](
        x, w, bias if bias is not None else w, out, n, c_out, height, width, out.shape[2], out.shape[3],
        c_out // channels, *x.stride(), *out.stride(), kh, kw, stride[0], stride[1], padding[0], padding[2],
        dilation[0], dilation[1], HAS_BIAS=bias is not None, ACC=_acc_dtype(x.dtype), BLOCK_C=block_c)


def _dot_settings(dtype: torch.dtype) -> Tuple[str, bool]:
    """(``input_precision``, whether to upcast to fp32) for the row-band kernels' ``tl.dot``.

    fp32 follows ``torch.get_float32_matmul_precision()``, as ``torch.matmul`` does (and with it
    ``deform_conv2d``'s products): at "highest", PyTorch's default, three TF32 products per step
    ("tf32x3"), about fp32's accuracy on the tensor cores; at "high" or "medium" one ("tf32": a
    third of the tensor-core work, inputs rounded to 10-bit mantissas).  Triton 3.9's interpreter
    multiplies bf16 matrices wrongly (raw bits), so there bf16 tiles are upcast; it runs every
    product in fp32 ("ieee").
    """
    if dtype != torch.float32 or INTERPRETED:
        precision = "ieee"
    else:
        precision = "tf32x3" if torch.get_float32_matmul_precision() == "highest" else "tf32"
    return precision, INTERPRETED and dtype == torch.bfloat16


def _launch_band(x, w, bias, out, stride, padding, dilation) -> None:
    """``out`` (N, C_out, Ho, Wo) = the depthwise conv of ``x`` (N, C, H, W) by the row-band kernel.
    ``C_out = C * m``: output channel ``o`` reads input channel ``o // m`` with weight row ``o`` (the
    forward).  ``C = C_out * m``: output channel ``o`` sums input channels ``o*m + k`` convolved with
    weight rows ``o*m + k`` (the input gradient with a channel multiplier)."""
    x, w = _rows(x), _dilate_columns(w, dilation[1])
    n, channels, height, width = x.shape
    _, _, kh, kw = w.shape
    out_channels, out_h, out_w = out.shape[1:]

    def grid(meta):
        return n * out_channels, triton.cdiv(out_h, meta["BLOCK_H"]), triton.cdiv(out_w, meta["BLOCK_W"])

    precision, upcast = _dot_settings(x.dtype)
    _forward_band_kernel[grid](
        x, w, bias if bias is not None else w, out, n, out_channels, height, width, out_h, out_w,
        max(1, out_channels // channels), max(1, channels // out_channels), *x.stride(), *out.stride(), kh, kw,
        stride[0], stride[1], padding[0], padding[2], dilation[0], HAS_BIAS=bias is not None,
        PRECISION=precision, UPCAST=upcast, K_CHUNK=_band_k_chunk(x.dtype))


def dwconv2d_backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                      padding: Sequence[int], dilation: Sequence[int], output_mask: Sequence[bool],
                      kernel: str = "auto"
                      ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients (x, weight, bias); entries not in ``output_mask`` are None; ``kernel`` in :data:`KERNELS`."""
    grad_x = _grad_input(grad_out, x, weight, stride, padding, dilation, kernel) if output_mask[0] else None
    grad_weight = _grad_weight(grad_out, x, weight, stride, padding, dilation, kernel) if output_mask[1] else None
    grad_bias = grad_out.sum((0, 2, 3)) if output_mask[2] else None
    return grad_x, grad_weight, grad_bias


def _grad_input(grad_out, x, weight, stride, padding, dilation, kernel: str) -> torch.Tensor:
    grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=output_memory_format(x))
    if grad_x.numel() == 0:
        return grad_x
    w = weight.contiguous()

    def run(name: str) -> None:
        if name == "band":
            _launch_band_grad_input(grad_out, w, grad_x, stride, padding, dilation)
        else:
            _launch_direct_grad_input(grad_out, w, grad_x, stride, padding, dilation)

    run(_kernel_choice("grad_input", grad_out, w, stride, padding, dilation, run, kernel))
    return grad_x


def _launch_band_grad_input(grad_out, w, grad_x, stride, padding, dilation) -> None:
    """The input gradient (a transposed conv of ``grad_out``) by the row-band forward kernel.  The input
    rows and columns of one phase (``h % SH``, ``w % SW``) get a stride-1 conv of ``grad_out`` with the
    flipped sub-kernel of the taps that reach them (``SH * SW`` launches, each into a strided view of
    ``grad_x``; at stride 1, one with the whole flipped kernel: the 'full' conv), summing the ``m``
    output channels of each input channel."""
    grad_out = _rows(grad_out)   # once for all phases (_launch_band would copy a channels_last one each time)
    for phase_h in range(stride[0]):
        rows = _phase_taps(phase_h, w.shape[2], stride[0], padding[0], dilation[0])
        for phase_w in range(stride[1]):
            columns = _phase_taps(phase_w, w.shape[3], stride[1], padding[2], dilation[1])
            out = grad_x[:, :, phase_h::stride[0], phase_w::stride[1]]
            if out.numel() == 0:
                continue
            if rows.taps == 0 or columns.taps == 0:   # no tap reaches this phase
                out.zero_()
                continue
            taps = w[:, :, rows.first::rows.step, columns.first::columns.step]
            _launch_band(grad_out, taps.flip(2, 3).contiguous(), None, out, (1, 1),
                         (rows.pad, 0, columns.pad, 0), (rows.dilation, columns.dilation))


class PhaseTaps(NamedTuple):
    """The taps of a strided, dilated conv that reach one phase of the input along one axis, and the
    stride-1 conv of the output gradient with them flipped that gives that phase's gradient."""
    first: int      # the first kernel tap that reaches the phase
    step: int       # the taps that do are first, first + step, ...
    taps: int       # how many
    pad: int        # padding of the stride-1 conv (negative: an offset)
    dilation: int   # its dilation


def _phase_taps(phase: int, kernel: int, stride: int, pad: int, dilation: int) -> PhaseTaps:
    """:class:`PhaseTaps` of the input positions ``h = phase + stride * a`` along one axis.

    Position ``h`` gets ``go[o] * w[k]`` where ``o * stride + k * dilation - pad == h``.  With
    ``g = gcd(stride, dilation)``, the taps for which ``o`` is whole are ``k = first + m * stride / g``,
    at ``o = a + shift - m * dilation / g`` where ``shift = (phase + pad - first * dilation) / stride``:
    a stride-1 conv over ``a``, dilated ``dilation / g``, of ``go`` with those taps flipped.
    """
    common = math.gcd(stride, dilation)
    step, conv_dilation = stride // common, dilation // common
    first = next((k for k in range(min(step, kernel)) if (phase + pad - k * dilation) % stride == 0), None)
    if first is None:
        return PhaseTaps(0, step, 0, 0, conv_dilation)
    taps = -(-(kernel - first) // step)
    shift = (phase + pad - first * dilation) // stride
    return PhaseTaps(first, step, taps, (taps - 1) * conv_dilation - shift, conv_dilation)


def _launch_direct_grad_input(grad_out, w, grad_x, stride, padding, dilation) -> None:
    n, channels, height, width = grad_x.shape
    c_out, _, kh, kw = w.shape
    block_c = _block_c(grad_out, channels)

    def grid(meta):
        return triton.cdiv(height * width, meta["BLOCK_P"]), triton.cdiv(channels, block_c), n

    _grad_input_kernel[grid](
        grad_out, w, grad_x, n, channels, height, width, grad_out.shape[2], grad_out.shape[3],
        c_out // channels, *grad_out.stride(), *grad_x.stride(), kh, kw, stride[0], stride[1], padding[0],
        padding[2], dilation[0], dilation[1], ACC=_acc_dtype(grad_x.dtype), BLOCK_C=block_c)


def _grad_weight(grad_out, x, weight, stride, padding, dilation, kernel: str) -> torch.Tensor:
    """The weight gradient (C_out, 1, KH, KW) in the weight's dtype, by the kernel ``kernel`` picks."""
    if grad_out.shape[0] * grad_out.shape[2] == 0:
        return torch.zeros_like(weight, memory_format=torch.contiguous_format)
    results = {}

    def run(name: str) -> None:
        launch = _launch_band_grad_weight if name == "band" else _launch_direct_grad_weight
        results[name] = launch(grad_out, x, weight.shape, stride, padding, dilation)

    chosen = _kernel_choice("grad_weight", x, weight, stride, padding, dilation, run, kernel)
    run(chosen)
    return results[chosen].to(weight.dtype)


def _launch_direct_grad_weight(grad_out, x, weight_shape, stride, padding, dilation) -> torch.Tensor:
    """The weight gradient (C_out, 1, KH, KW) in the accumulator dtype, by the direct kernel."""
    n, channels, height, width = x.shape
    c_out, _, kh, kw = weight_shape
    out_h, out_w = grad_out.shape[2:]
    block_c = _block_c(grad_out, c_out) if grad_out.stride(1) == 1 else min(4, triton.next_power_of_2(c_out))
    block_kw = triton.next_power_of_2(kw)
    c_blocks = triton.cdiv(c_out, block_c)
    rows = n * out_h
    slices = _grad_weight_slices(rows, c_blocks * kh, x.device)
    rows_per_slice = triton.cdiv(rows, slices)
    slices = triton.cdiv(rows, rows_per_slice)
    acc_dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    partial = torch.empty((slices, c_out, kh, block_kw), dtype=acc_dtype, device=x.device)
    _grad_weight_kernel[(c_blocks, kh, slices)](
        grad_out, x, partial, n, c_out, height, width, out_h, out_w, c_out // channels, rows_per_slice,
        *grad_out.stride(), *x.stride(), kh, kw, stride[0], stride[1], padding[0], padding[2], dilation[0],
        dilation[1], ACC=_acc_dtype(x.dtype), BLOCK_C=block_c, BLOCK_KW=block_kw)
    return partial[..., :kw].sum(0).unsqueeze(1)


def _launch_band_grad_weight(grad_out, x, weight_shape, stride, padding, dilation) -> torch.Tensor:
    """The weight gradient (C_out, 1, KH, KW) in fp32, by the row-band kernel.  For a column dilation
    ``d`` it computes the gradient of the kernel with zero columns between the taps
    (:func:`_dilate_columns`) and keeps every ``d``-th column."""
    grad_out, x = _rows(grad_out), _rows(x)
    n, channels, height, width = x.shape
    c_out, _, kh, taps = weight_shape
    kw = (taps - 1) * dilation[1] + 1
    out_h, out_w = grad_out.shape[2:]
    block_kw = triton.next_power_of_2(kw)
    # The output-column tile and the number of row slices fix the partial sums' shape, so they are
    # chosen here and only the row tile and warps are autotuned.
    block_w = 16 if INTERPRETED or out_w <= 16 else 32
    column_tiles = triton.cdiv(out_w, block_w)
    slices = _grad_weight_slices(n * triton.cdiv(out_h, 16), c_out * kh * column_tiles, x.device)
    partial = torch.empty((slices, c_out, kh, column_tiles, block_kw), dtype=torch.float32, device=x.device)
    precision, upcast = _dot_settings(x.dtype)
    _grad_weight_band_kernel[(c_out * kh, column_tiles, slices)](
        grad_out, x, partial, n, c_out, height, width, out_h, out_w, c_out // channels, slices,
        *grad_out.stride(), *x.stride(), kh, kw, stride[0], stride[1], padding[0], padding[2], dilation[0],
        PRECISION=precision, UPCAST=upcast, BLOCK_W=block_w, BLOCK_KW=block_kw)
    return partial[..., :kw:dilation[1]].sum((0, 3)).unsqueeze(1)


def _grad_weight_slices(rows: int, programs_per_slice: int, device: torch.device) -> int:
    """How many slices of the output rows: enough programs to fill the GPU a few times over."""
    if device.type != "cuda":
        return min(rows, 2)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(rows, triton.cdiv(4 * sms, programs_per_slice)))
