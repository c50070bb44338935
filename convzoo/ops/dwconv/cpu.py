"""The fast native path of ``dwconv2d`` (CPU, and CUDA without Triton).

What oneDNN 3.12 (``ONEDNN_VERBOSE=1``) and the timings on the development CPU (AVX-512,
B=8, C=128, 56x56, fp32) showed, and what this module does about it:

* Forward on a ``channels_last`` tensor runs oneDNN's ``brdgmm_dw`` kernel for every kernel size
  (31x31: ~22 ms on 2 threads).  On an NCHW tensor oneDNN reorders to its blocked layout and
  runs ``jit_dw`` when the kernel width is <= 13 (<= 9 on AVX2-only CPUs; as fast as
  channels_last plus the two layout conversions we would pay), but falls back to a generic gemm
  path for wider kernels (31x31: ~850 ms).  So the convs run in :func:`conv_memory_format`:
  channels_last for kernels wider than jit_dw takes, the caller's own layout otherwise, and the
  output comes back in the caller's layout.
  (``jit_dw`` is ~3x faster than ``brdgmm_dw`` at 13x13 in isolation, but converting a
  channels_last tensor there and back ate the gain under load, so channels_last inputs stay.)
* Grad-input for kernels wider than jit_dw takes is a conv of the output gradient with the
  flipped kernel (stride 1), in channels_last: ~25 ms at 31x31 vs ~50 ms for
  ``convolution_backward``; up to that width ``convolution_backward`` (oneDNN jit_dw, ~14 ms at
  13x13) beats it (~30 ms).
* On CPUs without AVX-512 oneDNN has no brdgmm_dw and its channels_last depthwise conv is ~6x
  slower at 31x31 (141 ms); there :func:`use_fft_conv` sends large kernels on large maps to
  :func:`forward_fft` / :func:`grad_input_fft`, Fourier-domain correlations (33 ms).
* Grad-weight through ``convolution_backward`` (fastest in channels_last) is fine for small
  kernels (~1 ms at 3x3, ~23 ms at 7x7) but collapses for large ones (~1.6 s at 31x31, a gemm
  path, either layout).  :func:`grad_weight_fft` computes it as a cross-correlation of the input
  with the output gradient in the Fourier domain (fp32 or fp64, ~50-80 ms at 56x56 whatever the
  kernel); :func:`use_fft_grad_weight` picks it from a work estimate.
"""
from __future__ import annotations

import functools
import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F

from .._checks import compute_dtype
from .reference import is_symmetric, output_shape

ONEDNN_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# oneDNN's jit_dw kernel (NCHW via its blocked layout) takes kernels up to this width; wider
# ones fall back to a gemm path 10-30x slower.  Measured with B=8, C=128, 56x56 fp32: width 13
# on AVX-512 CPUs; on an AVX2-only CPU width 9 (9x9: 28 ms NCHW vs 11 ms channels_last, 10x10:
# 289 ms vs 17 ms).  Other instruction sets are given the AVX2 limit.
JIT_DW_MAX_KERNEL_WIDTH_BY_CAPABILITY = {"AVX512": 13}
JIT_DW_MAX_KERNEL_WIDTH_OTHERWISE = 9
# Up to this kernel area grad-weight through convolution_backward is as fast in NCHW as in channels_last.
JIT_DW_ANY_LAYOUT_MAX_AREA = 9
# Grad-weight uses the FFT when the direct MACs exceed this many times the FFT's n*log(n) work.
FFT_WORK_RATIO = 3.0
# Forward and grad-input use the FFT when the direct MACs exceed this many times the FFT's work,
# per instruction set (None: never).  On an AVX2-only CPU oneDNN's channels_last depthwise conv
# runs ~20-50 GMAC/s, so the FFT wins from a ratio of ~30 (B=8, C=128, fp32, 2 threads: 56x56
# 31x31 141 ms direct vs 33 ms FFT at ratio 47; 56x56 27x27 100 vs 30 ms at 36; 28x28 29x29 38
# vs 32 ms at 30; 56x56 21x21 50 vs 48 ms at 22; 14x14 27x27 12 vs 64 ms at 21).  AVX-512 CPUs
# run brdgmm_dw (22 ms at 56x56 31x31), which the FFT does not beat.
FFT_CONV_WORK_RATIO_BY_CAPABILITY = {"AVX512": None}
FFT_CONV_WORK_RATIO_OTHERWISE = 30.0
# Complex elements of one FFT chunk (bounds the memory of the grad-weight FFT).
FFT_CHUNK_ELEMENTS = 1 << 23


@functools.lru_cache(maxsize=None)
def _read_cpu_capability() -> str:
    return torch.backends.cpu.get_cpu_capability()


@torch.compiler.assume_constant_result
def cpu_capability() -> str:
    """This CPU's instruction set as PyTorch names it ("AVX512", "AVX2", ...), read once.

    A constant for ``torch.compile``: dynamo calls it while tracing and bakes the string into the
    graph (the query itself, a torch function returning a string, would break the graph)."""
    return _read_cpu_capability()


def jit_dw_max_kernel_width() -> int:
    """The widest kernel oneDNN's jit_dw runs on this CPU (see JIT_DW_MAX_KERNEL_WIDTH_BY_CAPABILITY)."""
    return JIT_DW_MAX_KERNEL_WIDTH_BY_CAPABILITY.get(cpu_capability(), JIT_DW_MAX_KERNEL_WIDTH_OTHERWISE)


def output_memory_format(x: torch.Tensor) -> torch.memory_format:
    """The memory format ``dwconv2d`` returns for input ``x``: channels_last iff ``x`` is."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def in_format(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``t`` laid out densely in ``memory_format`` with the canonical strides of that format."""
    _, channels, height, width = t.shape
    canonical = ((1, width * channels, channels) if memory_format == torch.channels_last
                 else (height * width, width, 1))
    if t.is_contiguous(memory_format=memory_format) and t.stride()[1:] == canonical:
        return t
    return torch.empty(t.shape, dtype=t.dtype, device=t.device, memory_format=memory_format).copy_(t)


def _memory_format(t: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if t.is_contiguous(memory_format=torch.channels_last) else torch.contiguous_format


def conv_memory_format(x: torch.Tensor, kernel_size: Sequence[int]) -> torch.memory_format:
    """The memory format the native convs of a ``kernel_size`` depthwise conv on ``x`` run in."""
    if x.dtype in ONEDNN_DTYPES and x.device.type == "cpu":
        if kernel_size[1] > jit_dw_max_kernel_width():
            return torch.channels_last
    return output_memory_format(x)


def _pad_for_conv(x: torch.Tensor, padding: Sequence[int]) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Symmetric padding goes to the conv; asymmetric padding is applied to ``x`` explicitly."""
    if is_symmetric(padding):
        return x, (padding[0], padding[2])
    return F.pad(x, (padding[2], padding[3], padding[0], padding[1])), (0, 0)


def forward(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
            padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """Depthwise conv, Tensor[N, C, H, W] -> Tensor[N, C*m, Ho, Wo] in ``x``'s memory format."""
    memory_format = output_memory_format(x)
    if use_fft_conv(x, weight.shape, output_shape(x.shape, weight.shape, stride, padding, dilation)[2:],
                    stride, padding):
        return in_format(forward_fft(x, weight, bias, stride, padding, dilation), memory_format)
    work_format = conv_memory_format(x, weight.shape[2:])
    x_work, conv_padding = _pad_for_conv(x.contiguous(memory_format=work_format), padding)
    out = F.conv2d(x_work, weight, bias, tuple(stride), conv_padding, tuple(dilation), groups=x.shape[1])
    return in_format(out, memory_format)


def backward(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
             padding: Sequence[int], dilation: Sequence[int], output_mask: Sequence[bool]
             ) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor], Optional[torch.Tensor]]:
    """Gradients (x, weight, bias) of the depthwise conv; entries not in ``output_mask`` are None."""
    grad_x = grad_weight = grad_bias = None
    if output_mask[0]:
        if use_fft_conv(x, weight.shape, grad_out.shape[2:], stride, padding):
            grad_x = grad_input_fft(grad_out, x.shape, weight, stride, padding, dilation)
        else:
            work_format = conv_memory_format(x, weight.shape[2:])
            grad_x = _grad_input(grad_out.contiguous(memory_format=work_format), x, weight, stride, padding,
                                 dilation)
        grad_x = in_format(grad_x, output_memory_format(x))
    if output_mask[1]:
        if use_fft_grad_weight(x, grad_out, weight.shape, stride, padding):
            grad_weight = grad_weight_fft(grad_out, x, weight.shape, stride, padding, dilation)
        else:
            grad_weight = _grad_weight_direct(grad_out, x, weight, stride, padding, dilation)
    if output_mask[2]:
        grad_bias = grad_out.sum((0, 2, 3))
    return grad_x, None if grad_weight is None else grad_weight.contiguous(), grad_bias


def _grad_input(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """d loss / d x, Tensor[N, C, H, W], computed in the layout of ``grad_out``."""
    n, channels, height, width = x.shape
    kh, kw = weight.shape[2:]
    if tuple(stride) == (1, 1) and kw > jit_dw_max_kernel_width():
        # oneDNN's jit_dw backward-data is fast up to its width limit; past it, a forward conv with the
        # flipped kernel (brdgmm_dw in channels_last) is ~2x faster.  The output
        # gradient is padded by (span - padding) on each side (negative = crop).
        span_h, span_w = dilation[0] * (kh - 1), dilation[1] * (kw - 1)
        flipped_padding = (span_h - padding[0], span_h - padding[1], span_w - padding[2], span_w - padding[3])
        if is_symmetric(flipped_padding) and min(flipped_padding) >= 0:
            conv_padding = (flipped_padding[0], flipped_padding[2])
        else:
            grad_out = F.pad(grad_out, flipped_padding[2:] + flipped_padding[:2])
            conv_padding = (0, 0)
        flipped = weight.flip(-2, -1).reshape(channels, -1, kh, kw)
        return F.conv2d(grad_out, flipped, None, 1, conv_padding, tuple(dilation), groups=channels)
    # Backward-data reads only the input's shape and layout: pass an unwritten stand-in.
    if is_symmetric(padding):
        stand_in_shape, conv_padding = x.shape, (padding[0], padding[2])
    else:
        stand_in_shape = (n, channels, height + padding[0] + padding[1], width + padding[2] + padding[3])
        conv_padding = (0, 0)
    stand_in = torch.empty(stand_in_shape, dtype=x.dtype, device=x.device, memory_format=_memory_format(grad_out))
    grad = torch.ops.aten.convolution_backward(
        grad_out, stand_in, weight, None, list(stride), list(conv_padding), list(dilation), False, [0, 0],
        channels, [True, False, False])[0]
    if not is_symmetric(padding):
        grad = grad[:, :, padding[0]:padding[0] + height, padding[2]:padding[2] + width]
    return grad


def _grad_weight_direct(grad_out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, stride: Sequence[int],
                        padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """d loss / d weight through ``convolution_backward`` (fast for small kernels).

    oneDNN's jit_dw takes 3x3 kernels in any layout; larger ones run much faster in channels_last
    (5x5: ~25 ms vs ~47 ms), which pays for converting both tensors.
    """
    if x.dtype in ONEDNN_DTYPES and weight.shape[2] * weight.shape[3] > JIT_DW_ANY_LAYOUT_MAX_AREA:
        x = x.contiguous(memory_format=torch.channels_last)
        grad_out = grad_out.contiguous(memory_format=torch.channels_last)
    x_work, conv_padding = _pad_for_conv(x, padding)
    return torch.ops.aten.convolution_backward(
        grad_out, x_work, weight, None, list(stride), list(conv_padding), list(dilation), False, [0, 0],
        x.shape[1], [False, True, False])[1]


def _fft_size(n: int) -> int:
    """Smallest 2^a 3^b 5^c >= n (sizes pocketfft transforms fastest)."""
    size = n
    while True:
        rest = size
        for prime in (2, 3, 5):
            while rest % prime == 0:
                rest //= prime
        if rest == 1:
            return size
        size += 1


def _fft_sizes(x_shape, grad_shape, stride, padding) -> Tuple[int, int]:
    """Sizes of the circular correlation that equals the linear one (see grad_weight_fft)."""
    span_h, span_w = (grad_shape[2] - 1) * stride[0] + 1, (grad_shape[3] - 1) * stride[1] + 1
    return (_fft_size(max(x_shape[2] + max(padding[0], padding[1]), span_h)),
            _fft_size(max(x_shape[3] + max(padding[2], padding[3]), span_w)))


def use_fft_conv(x: torch.Tensor, weight_shape: Sequence[int], out_size: Sequence[int], stride: Sequence[int],
                 padding: Sequence[int]) -> bool:
    """Whether the forward (and grad-input) should run as an FFT convolution on this CPU.

    Compares the direct MACs per (image, output channel) with the FFT's ``S log S`` work, against
    the instruction set's ratio (FFT_CONV_WORK_RATIO_BY_CAPABILITY).  float64 stays direct.
    """
    ratio = FFT_CONV_WORK_RATIO_BY_CAPABILITY.get(cpu_capability(), FFT_CONV_WORK_RATIO_OTHERWISE)
    if ratio is None or x.device.type != "cpu" or x.dtype not in ONEDNN_DTYPES or x.shape[0] == 0:
        return False
    out_h, out_w = out_size
    if out_h <= 0 or out_w <= 0:
        return False
    # The FFT is at least as large as the output: small kernels never qualify.
    if weight_shape[2] * weight_shape[3] < ratio * math.log2(max(2, out_h * out_w)):
        return False
    size_h, size_w = _fft_sizes(x.shape, (0, 0, out_h, out_w), stride, padding)
    direct = out_h * out_w * weight_shape[2] * weight_shape[3]
    return direct >= ratio * size_h * size_w * math.log2(max(2, size_h * size_w))


def _spread_on_stride_grid(grad_out: torch.Tensor, stride: Sequence[int]) -> torch.Tensor:
    """The output gradient placed on the input's stride grid, zeros between:
    ``(N, C*m, Ho, Wo) -> (N, C*m, (Ho - 1) * sh + 1, (Wo - 1) * sw + 1)``."""
    if tuple(stride) == (1, 1):
        return grad_out
    n, c_out, out_h, out_w = grad_out.shape
    spread = grad_out.new_zeros(n, c_out, (out_h - 1) * stride[0] + 1, (out_w - 1) * stride[1] + 1)
    spread[:, :, ::stride[0], ::stride[1]] = grad_out
    return spread


def _kernel_spectra(weight: torch.Tensor, size: Tuple[int, int], padding: Sequence[int], dilation: Sequence[int],
                    dtype: torch.dtype) -> torch.Tensor:
    """rfft2 of each kernel placed at ``(i*dh - top, j*dw - left) mod size``: ``(C*m, S_h, S_w // 2 + 1)``.

    Taps that land on the same place (a kernel wider than the FFT, possible with large padding)
    add up, as in the circular correlation they stand for (within the sizes of :func:`_fft_sizes`
    such taps only ever read padding).
    """
    c_out, _, kh, kw = weight.shape
    rows = (torch.arange(kh, device=weight.device) * dilation[0] - padding[0]) % size[0]
    cols = (torch.arange(kw, device=weight.device) * dilation[1] - padding[2]) % size[1]
    placed = weight.new_zeros((c_out,) + tuple(size), dtype=dtype)
    channel = torch.arange(c_out, device=weight.device).view(-1, 1, 1)
    placed.index_put_((channel, rows.view(1, -1, 1), cols.view(1, 1, -1)), weight[:, 0].to(dtype), accumulate=True)
    return torch.fft.rfft2(placed)


def _channel_chunks(n: int, channels: int, multiplier: int, size: Tuple[int, int]):
    """Input-channel ranges whose complex spectra stay within FFT_CHUNK_ELEMENTS."""
    per_channel = max(1, n * (1 + multiplier) * size[0] * (size[1] // 2 + 1))
    chunk = max(1, FFT_CHUNK_ELEMENTS // per_channel)
    return [(start, min(channels, start + chunk)) for start in range(0, channels, chunk)]


def forward_fft(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], stride: Sequence[int],
                padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """Depthwise conv as a Fourier-domain correlation, Tensor[N, C, H, W] -> Tensor[N, C*m, Ho, Wo] (NCHW).

    ``y[n, o, p, q] = sum_{i, j} w[o, i, j] x[n, o // m, p*sh + i*dh - top, q*sw + j*dw - left]``: the
    circular correlation of ``x`` (zero tail) with the kernel placed at ``(i*dh - top) mod S`` equals
    it for ``S >= H + max(top, bottom)`` (see grad_weight_fft), read on the stride grid.  Computed in
    float32 (float64 for float64 input) and cast back to ``x``'s dtype.
    """
    n, channels, _, _ = x.shape
    multiplier = weight.shape[0] // channels
    out_h, out_w = output_shape(x.shape, weight.shape, stride, padding, dilation)[2:]
    size = _fft_sizes(x.shape, (0, 0, out_h, out_w), stride, padding)
    dtype = compute_dtype(x.dtype)
    kernels = _kernel_spectra(weight, size, padding, dilation, dtype)
    pieces: List[torch.Tensor] = []
    for start, stop in _channel_chunks(n, channels, multiplier, size):
        x_spec = torch.fft.rfft2(x[:, start:stop].to(dtype), s=size)
        x_spec = x_spec.repeat_interleave(multiplier, dim=1) if multiplier > 1 else x_spec
        corr = torch.fft.irfft2(x_spec * kernels[start * multiplier:stop * multiplier].conj(), s=size)
        pieces.append(corr[:, :, : (out_h - 1) * stride[0] + 1: stride[0], : (out_w - 1) * stride[1] + 1: stride[1]])
    out = torch.cat(pieces, 1)
    if bias is not None:
        out = out + bias.to(out.dtype).view(1, -1, 1, 1)
    return out.to(x.dtype)


def grad_input_fft(grad_out: torch.Tensor, x_shape: Sequence[int], weight: torch.Tensor, stride: Sequence[int],
                   padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """d loss / d x of the depthwise conv as a Fourier-domain convolution, Tensor[N, C, H, W] (NCHW).

    ``gx[n, c, t, s] = sum_{o of c} sum_{i, j} g[n, o, p, q] w[o, i, j]`` over ``p*sh + i*dh - top = t``
    (likewise for columns): the output gradient spread on the stride grid, convolved with the kernel
    placed as in :func:`forward_fft`; no wrap-around for the same sizes.
    """
    n, channels, height, width = x_shape
    c_out = weight.shape[0]
    multiplier = c_out // channels
    size = _fft_sizes(x_shape, grad_out.shape, stride, padding)
    grad_out = _spread_on_stride_grid(grad_out, stride)
    dtype = compute_dtype(grad_out.dtype)
    kernels = _kernel_spectra(weight, size, padding, dilation, dtype)
    pieces: List[torch.Tensor] = []
    for start, stop in _channel_chunks(n, channels, multiplier, size):
        outputs = slice(start * multiplier, stop * multiplier)
        g_spec = torch.fft.rfft2(grad_out[:, outputs].to(dtype), s=size) * kernels[outputs]
        if multiplier > 1:
            g_spec = g_spec.view(n, stop - start, multiplier, *g_spec.shape[2:]).sum(2)
        pieces.append(torch.fft.irfft2(g_spec, s=size)[:, :, :height, :width])
    return torch.cat(pieces, 1).to(grad_out.dtype)


def use_fft_grad_weight(x: torch.Tensor, grad_out: torch.Tensor, weight_shape: Sequence[int],
                        stride: Sequence[int], padding: Sequence[int]) -> bool:
    """Whether the FFT grad-weight is cheaper than ``convolution_backward``.

    Kernels wider than oneDNN's jit_dw limit always are (the direct path is a gemm then);
    otherwise compare the direct MACs with the FFT's ``n log n`` work per (image, channel).
    """
    c_out, _, kh, kw = weight_shape
    if x.dtype in ONEDNN_DTYPES and kw > jit_dw_max_kernel_width():
        return True
    multiplier = c_out // x.shape[1]
    size_h, size_w = _fft_sizes(x.shape, grad_out.shape, stride, padding)
    direct = multiplier * grad_out.shape[2] * grad_out.shape[3] * kh * kw
    fft = (1 + multiplier) * size_h * size_w * math.log2(max(2, size_h * size_w))
    return direct >= FFT_WORK_RATIO * fft


def grad_weight_fft(grad_out: torch.Tensor, x: torch.Tensor, weight_shape: Sequence[int], stride: Sequence[int],
                    padding: Sequence[int], dilation: Sequence[int]) -> torch.Tensor:
    """d loss / d weight as a Fourier-domain cross-correlation, Tensor[C*m, 1, kh, kw].

    ``gw[o, i, j] = sum_{n, p, q} go[n, o, p, q] * xpad[n, o // m, p*sh + i*dh, q*sw + j*dw]``.
    With ``g`` the output gradient spread on the stride grid (zeros between), this is the
    correlation ``r[u, v] = sum_{t, s} g[t, s] x[t + u - top, s + v - left]`` read at
    ``u = i*dh, v = j*dw``.  A circular correlation of size ``S >= H + max(top, bottom)`` (and
    ``>= len(g)``) equals the linear one there: wrapped indices land in the zero tail of ``x``.
    """
    n, channels, height, width = x.shape
    c_out, _, kh, kw = weight_shape
    multiplier = c_out // channels
    if n == 0:
        return grad_out.new_zeros(weight_shape)
    dtype = compute_dtype(x.dtype)
    size_h, size_w = _fft_sizes(x.shape, grad_out.shape, stride, padding)
    grad_out = _spread_on_stride_grid(grad_out, stride)
    rows = (torch.arange(kh, device=x.device) * dilation[0] - padding[0]) % size_h
    cols = (torch.arange(kw, device=x.device) * dilation[1] - padding[2]) % size_w
    pieces: List[torch.Tensor] = []
    for start, stop in _channel_chunks(n, channels, multiplier, (size_h, size_w)):
        x_spec = torch.fft.rfft2(x[:, start:stop].to(dtype), s=(size_h, size_w))
        g_spec = torch.fft.rfft2(grad_out[:, start * multiplier:stop * multiplier].to(dtype),
                                 s=(size_h, size_w))
        x_spec = x_spec.repeat_interleave(multiplier, dim=1) if multiplier > 1 else x_spec
        corr = torch.fft.irfft2((g_spec.conj() * x_spec).sum(0), s=(size_h, size_w))
        pieces.append(corr.index_select(1, rows).index_select(2, cols))
    return torch.cat(pieces, 0).unsqueeze(1).to(grad_out.dtype)
