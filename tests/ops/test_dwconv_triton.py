"""dwconv2d Triton kernels (run under TRITON_INTERPRET=1 on CPU) against the reference."""
from collections import OrderedDict

import pytest
import torch
import triton
from hypothesis import given, settings
from hypothesis import strategies as st

from convzoo.ops import dwconv2d
from convzoo.ops.dwconv import dwconv2d_reference
from convzoo.ops.dwconv import triton as dwconv_triton
from convzoo.ops.dwconv.reference import same_padding

NCHW, NHWC = torch.contiguous_format, torch.channels_last

CASES = [
    # (n, channels, multiplier, height, width, kernel, stride, padding, dilation)
    pytest.param(2, 3, 1, 7, 5, (5, 3), (1, 1), "same", (1, 1), id="rect-same"),
    pytest.param(2, 3, 1, 8, 7, (4, 4), (1, 1), "same", (1, 1), id="even-kernel-asym-pad"),
    pytest.param(2, 3, 1, 9, 6, (5, 5), (2, 2), "same", (1, 1), id="stride2-same"),
    pytest.param(1, 3, 2, 7, 8, (3, 2), (2, 1), (1, 2), (2, 1), id="mult2-stride-dilation"),
    pytest.param(2, 1, 1, 6, 5, (7, 7), (1, 1), (3, 3), (1, 1), id="kernel-larger-than-input"),
]


def _padding4(height, width, kernel, stride, padding, dilation):
    if padding == "same":
        return same_padding(height, kernel[0], stride[0], dilation[0]) + same_padding(width, kernel[1], stride[1],
                                                                                        dilation[1])
    return padding[0], padding[0], padding[1], padding[1]


def _run_both(n, channels, multiplier, height, width, kernel, stride, padding, dilation, memory_format, dtype,
              device, triton_kernel="auto"):
    """Ours (Triton kernel ``triton_kernel``, on ``device``, in ``dtype``) and the fp32 CPU reference:
    outputs and gradients, ours brought back to the CPU."""
    x = torch.randn(n, channels, height, width).contiguous(memory_format=memory_format)
    weight = torch.randn(channels * multiplier, 1, *kernel) / kernel[0]
    bias = torch.randn(channels * multiplier)
    ours = [t.to(device, dtype).requires_grad_() for t in (x, weight, bias)]
    ref = [t.to(dtype).detach().float().requires_grad_() for t in (x, weight, bias)]
    out = dwconv2d(*ours, stride=stride, padding=padding, dilation=dilation, impl="triton",
                   triton_kernel=triton_kernel)
    expected = dwconv2d_reference(*ref, stride, _padding4(height, width, kernel, stride, padding, dilation), dilation)
    grad_out = torch.randn(expected.shape)
    grads = torch.autograd.grad(out, ours, grad_out.to(device, dtype))
    ref_grads = torch.autograd.grad(expected, ref, grad_out)
    return out.cpu(), expected, [g.cpu() for g in grads], ref_grads, ours[0], grads[0]


@pytest.fixture(params=["direct", "band"])
def forward_kernel(request):
    """Each kernel (where the row-band kernel does not apply, the direct one runs)."""
    return request.param


LAYOUTS_AND_KERNELS = [  # the row-band kernels read channels_last inputs through an NCHW copy
    pytest.param(NCHW, "direct", id="nchw-direct"),
    pytest.param(NCHW, "band", id="nchw-band"),
    pytest.param(NHWC, "direct", id="nhwc-direct"),
    pytest.param(NHWC, "band", id="nhwc-band"),
]


@pytest.mark.parametrize("memory_format,kernel_name", LAYOUTS_AND_KERNELS)
@pytest.mark.parametrize("n,channels,multiplier,height,width,kernel,stride,padding,dilation", CASES)
def test_triton_matches_reference(n, channels, multiplier, height, width, kernel, stride, padding, dilation,
                                  memory_format, kernel_name, triton_device):
    out, expected, grads, ref_grads, x, grad_x = _run_both(n, channels, multiplier, height, width, kernel, stride,
                                                           padding, dilation, memory_format, torch.float32,
                                                           triton_device, kernel_name)
    assert out.is_contiguous(memory_format=memory_format)
    assert grad_x.is_contiguous(memory_format=memory_format)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(("x", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-5, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("memory_format,dilation", [(NCHW, (1, 1)), (NHWC, (2, 1))], ids=["nchw", "nhwc-dilated"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_triton_half_precision_accumulates_in_float32(dtype, memory_format, dilation, triton_device, forward_kernel):
    out, expected, grads, ref_grads, _, _ = _run_both(2, 3, 1, 7, 6, (5, 5), (1, 1), "same", dilation,
                                                      memory_format, dtype, triton_device, forward_kernel)
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), expected, atol=1e-2, rtol=1e-2)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=1e-2)


def test_triton_non_contiguous_input_and_batch_zero(triton_device):
    base = torch.randn(2, 6, 5, 7)
    x = base.transpose(2, 3)[:, ::2].requires_grad_()  # (2, 3, 7, 5) strided view
    weight = torch.randn(3, 1, 3, 5, requires_grad=True)
    x_dev = base.to(triton_device).transpose(2, 3)[:, ::2].requires_grad_()  # the same view on the kernels' device
    weight_dev = weight.detach().to(triton_device).requires_grad_()
    out = dwconv2d(x_dev, weight_dev, padding="same", impl="triton")
    expected = dwconv2d_reference(x, weight, None, (1, 1), (1, 1, 2, 2), (1, 1))
    torch.testing.assert_close(out.cpu(), expected, atol=1e-5, rtol=1e-5)
    grad_out = torch.randn_like(expected)
    for got, want in zip(torch.autograd.grad(out, (x_dev, weight_dev), grad_out.to(triton_device)),
                         torch.autograd.grad(expected, (x, weight), grad_out)):
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-5)

    weight = weight_dev
    empty = torch.randn(0, 3, 7, 5, device=triton_device, requires_grad=True)
    out = dwconv2d(empty, weight, padding="same", impl="triton")
    assert out.shape == (0, 3, 7, 5)
    grad_x, grad_w = torch.autograd.grad(out.sum(), (empty, weight))
    assert grad_x.shape == empty.shape and torch.equal(grad_w, torch.zeros_like(weight))


@settings(max_examples=10)
@given(
    n=st.integers(1, 2), channels=st.integers(1, 5), multiplier=st.integers(1, 2), height=st.integers(1, 9),
    width=st.integers(1, 9), kernel_h=st.integers(1, 6), kernel_w=st.integers(1, 6), stride=st.integers(1, 2),
    dilation=st.integers(1, 2), same=st.booleans(), channels_last=st.booleans(),
    forward_kernel=st.sampled_from(["direct", "band"]),
)
def test_triton_random_shapes_match_reference(n, channels, multiplier, height, width, kernel_h, kernel_w, stride,
                                              dilation, same, channels_last, forward_kernel, triton_device):
    kernel, strides, dilations = (kernel_h, kernel_w), (stride, stride), (dilation, dilation)
    padding = (kernel_h // 2, kernel_w // 2)
    too_small = any(dilation * (k - 1) + 1 > size + 2 * pad for k, size, pad in zip(kernel, (height, width), padding))
    padding = "same" if same or too_small else padding
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    out, expected, grads, ref_grads, _, _ = _run_both(n, channels, multiplier, height, width, kernel, strides,
                                                      padding, dilations, memory_format, torch.float32,
                                                      triton_device, forward_kernel)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    for name, got, want in zip(("x", "weight", "bias"), grads, ref_grads):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=lambda m: f"grad {name}: {m}")


def test_large_kernel_through_the_row_band_kernel(triton_device):
    """31x31, stride 1 and 2, at sizes where the band spans several tiles (the direct kernel is too slow
    for this under the interpreter; it is compared with the reference): output and input gradient."""
    for stride in (1, 2):
        x = torch.randn(1, 2, 37, 35, requires_grad=True)
        weight, bias = torch.randn(2, 1, 31, 31) / 31, torch.randn(2)
        x_dev = x.detach().to(triton_device).requires_grad_()
        out = dwconv2d(x_dev, weight.to(triton_device), bias.to(triton_device), stride=stride, padding="same",
                       impl="triton", triton_kernel="band")
        padding = _padding4(37, 35, (31, 31), (stride, stride), "same", (1, 1))
        expected = dwconv2d_reference(x, weight, bias, (stride, stride), padding, (1, 1))
        torch.testing.assert_close(out.cpu(), expected, atol=1e-4, rtol=1e-4)
        grad_out = torch.randn(expected.shape)
        got, = torch.autograd.grad(out, x_dev, grad_out.to(triton_device))
        want, = torch.autograd.grad(expected, x, grad_out)
        torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("batch,stride,dilation,multiplier,channels,memory_format", [
    (2, 1, 1, 1, 1, NCHW), (2, 2, 1, 1, 1, NCHW), (1, 1, 1, 2, 1, NCHW), (1, 1, 1, 1, 2, NHWC), (2, 2, 2, 1, 1, NCHW)],
    ids=["stride1", "stride2", "multiplier2", "nhwc", "stride2-dilation2"])
def test_weight_gradient_through_the_row_band_kernel(batch, stride, dilation, multiplier, channels, memory_format,
                                                     triton_device, monkeypatch):
    """31x31 over a map narrower than the kernel and wider than one 16-column tile: the weight gradient
    is the band kernel's (the direct one must not run) and matches the reference; batch 2 where the
    kernel must also sum over images, batch 1 where the case is about channels."""
    monkeypatch.setattr(dwconv_triton, "_launch_direct_grad_weight", pytest.fail)
    x = torch.randn(batch, channels, 23, 37).contiguous(memory_format=memory_format)
    weight = torch.randn(channels * multiplier, 1, 31, 31) / 31
    geometry = (stride, stride), _padding4(23, 37, (31, 31), (stride, stride), "same", (dilation, dilation)), \
        (dilation, dilation)
    expected = dwconv2d_reference(x, weight.requires_grad_(), None, *geometry)
    grad_out = torch.randn(expected.shape).contiguous(memory_format=memory_format)
    want, = torch.autograd.grad(expected, weight, grad_out)
    _, got, _ = dwconv_triton.dwconv2d_backward(grad_out.to(triton_device), x.to(triton_device),
                                                weight.detach().to(triton_device), *geometry, (False, True, False),
                                                kernel="band")
    torch.testing.assert_close(got.cpu(), want, atol=1e-4, rtol=1e-4)


def test_band_tiles_fit_the_output_map_and_the_registers():
    prune = dwconv_triton._band_prune(dwconv_triton._forward_band_fits, {"BLOCK_H": "Ho", "BLOCK_W": "Wo"})
    configs = [triton.Config({"BLOCK_H": h, "BLOCK_W": w}, num_warps=warps)
               for h, w, warps in [(64, 32, 4), (16, 16, 2), (32, 16, 4), (64, 64, 4), (128, 32, 8), (64, 32, 8)]]

    def kept(sizes, precision, among=configs, kernel=31, stride=1):
        args = {**sizes, "KW": kernel, "SW": stride}
        return [(c.kwargs["BLOCK_H"], c.kwargs["BLOCK_W"], c.num_warps)
                for c in prune(among, args, PRECISION=precision)]

    assert kept({"Ho": 7, "Wo": 7}, "ieee") == [(16, 16, 2)]
    assert kept({"Ho": 28, "Wo": 20}, "ieee") == [(16, 16, 2), (32, 16, 4)]
    # fp32 tiles 64 wide spill
    assert kept({"Ho": 56, "Wo": 56}, "tf32x3") == [(64, 32, 4), (16, 16, 2), (32, 16, 4), (64, 32, 8)]
    assert kept({"Ho": 65, "Wo": 56}, "ieee") == [(64, 32, 4), (16, 16, 2), (32, 16, 4), (64, 64, 4), (128, 32, 8),
                                                 (64, 32, 8)]
    assert kept({"Ho": 7, "Wo": 7}, "ieee", [configs[4], configs[0]]) == [(64, 32, 4)]   # the smallest stays
    # bands of more than 64 input columns (128 in 16-bit) only in tiles of at most 64 rows on 8 warps
    assert kept({"Ho": 72, "Wo": 72}, "tf32x3", kernel=63) == [(64, 32, 8)]
    assert kept({"Ho": 72, "Wo": 72}, "ieee", kernel=63, stride=2) == [(64, 32, 4), (16, 16, 2), (32, 16, 4),
                                                                     (128, 32, 8), (64, 32, 8)]   # 64x64: 256
    assert kept({"Ho": 56, "Wo": 56}, "tf32x3", [configs[1], configs[0]], kernel=63) == [(16, 16, 2)]   # the first
    # 13 taps dilated 3 span 37 columns (the kernel the band kernels see): 68 under 32 outputs, 52 under 16
    assert kept({"Ho": 72, "Wo": 72}, "tf32x3", kernel=37) == [(16, 16, 2), (32, 16, 4), (64, 32, 8)]
    # one-pass fp32 products: 64 columns wide too, their band of 94 columns on 8 warps
    with_64x64_8 = configs + [triton.Config({"BLOCK_H": 64, "BLOCK_W": 64}, num_warps=8)]
    assert kept({"Ho": 56, "Wo": 56}, "tf32", with_64x64_8) == [(64, 32, 4), (16, 16, 2), (32, 16, 4), (64, 32, 8),
                                                                (64, 64, 8)]
    assert kept({"Ho": 56, "Wo": 56}, "tf32x3", with_64x64_8) == kept({"Ho": 56, "Wo": 56}, "tf32x3")


def test_weight_gradient_band_tiles_fit_the_registers():
    prune = dwconv_triton._band_prune(dwconv_triton._grad_weight_band_fits, {"BLOCK_H": "Ho"})
    configs = [triton.Config({"BLOCK_H": h}, num_warps=warps) for h, warps in [(32, 4), (64, 4), (16, 4), (128, 8),
                                                                               (64, 8)]]

    def kept(precision, kernel):
        # BLOCK_W is the launcher's (a keyword of the launch), the rest positional arguments
        kept_configs = prune(configs, {"Ho": 72, "KW": kernel, "SW": 1}, PRECISION=precision, BLOCK_W=32)
        return [(c.kwargs["BLOCK_H"], c.num_warps) for c in kept_configs]

    assert kept("ieee", 63) == [(32, 4), (64, 4), (16, 4), (128, 8), (64, 8)]
    assert kept("tf32x3", 31) == [(32, 4), (64, 4), (16, 4), (64, 8)]   # 128 fp32 rows spill
    assert kept("tf32x3", 37) == [(32, 4), (16, 4), (64, 8)]            # a band of 68 columns: 8 rows per warp
    assert kept("tf32", 37) == kept("tf32x3", 31)   # one-pass: 8 rows per warp not needed; 128 rows: shared memory


def test_kernel_choice():
    run = pytest.fail   # "auto" must not time anything on the CPU
    nchw, nhwc = torch.zeros(1, 4, 8, 8), torch.zeros(1, 4, 8, 8).contiguous(memory_format=torch.channels_last)
    weight = torch.zeros(4, 1, 3, 3)
    geometry = ((1, 1), (1, 1, 1, 1), (1, 1))
    assert dwconv_triton._kernel_choice("forward", nchw, weight, *geometry, run, "auto") == "direct"
    for kernel in ("direct", "band"):
        assert dwconv_triton._kernel_choice("forward", nchw, weight, *geometry, run, kernel) == kernel
        assert dwconv_triton._kernel_choice("grad_input", nchw.double(), weight, *geometry, run, kernel) == "direct"
    with pytest.raises(ValueError, match="kernel must be one of"):
        dwconv_triton._kernel_choice("forward", nchw, weight, *geometry, run, "fast")
    with pytest.raises(ValueError, match="triton_kernel must be one of"):
        dwconv2d(nchw, weight, triton_kernel="fast")
    assert dwconv_triton._band_applies(nchw) and dwconv_triton._band_applies(nchw.bfloat16())
    assert dwconv_triton._band_applies(nhwc)                 # through an NCHW copy
    assert dwconv_triton._rows(nchw) is nchw and dwconv_triton._rows(nhwc).stride(3) == 1
    assert torch.equal(dwconv_triton._rows(nhwc), nhwc)
    assert not dwconv_triton._band_applies(nchw.double())    # no fp64 tl.dot


def test_kernel_choice_on_the_gpu_times_both_once_per_layer_shape_and_role(monkeypatch):
    """The CUDA branch of "auto", with the timer replaced: the faster kernel is kept per (role, layer
    shape, layout), and a later call of the same shape, at any batch size, times nothing."""
    timed, speeds = [], {"direct": 2.0, "band": 1.0}

    def fake_time_ms(fn):
        return speeds[fn()]

    def run(name):
        timed.append(name)
        return name

    class CudaTensor:   # what _kernel_choice reads of a tensor, on a device this machine may not have
        def __init__(self, batch, memory_format=torch.contiguous_format):
            layout = torch.empty(batch, 4, 30, 30, device="meta", memory_format=memory_format)
            self.shape, self.stride, self.dtype, self.device = layout.shape, layout.stride, torch.float32, \
                torch.device("cuda")

    monkeypatch.setattr(dwconv_triton, "time_ms", fake_time_ms)
    monkeypatch.setattr(dwconv_triton, "_KERNEL_CHOICE", OrderedDict())
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    weight, geometry = torch.zeros(4, 1, 31, 31), ((1, 1), (15, 15, 15, 15), (1, 1))
    assert dwconv_triton._kernel_choice("forward", CudaTensor(8), weight, *geometry, run, "auto") == "band"
    assert sorted(timed) == ["band", "direct"]
    speeds["band"] = 3.0   # a cached choice is not re-timed
    assert dwconv_triton._kernel_choice("forward", CudaTensor(64), weight, *geometry, run, "auto") == "band"
    assert len(timed) == 2
    assert dwconv_triton._kernel_choice("grad_weight", CudaTensor(8), weight, *geometry, run, "auto") == "direct"
    assert len(timed) == 4 and len(dwconv_triton._KERNEL_CHOICE) == 2
    nhwc = CudaTensor(8, torch.channels_last)
    assert dwconv_triton._kernel_choice("grad_weight", nhwc, weight, *geometry, run, "auto") == "direct"
    assert len(timed) == 6 and len(dwconv_triton._KERNEL_CHOICE) == 3   # another layout, timed on its own
    # fp32 products allowed one TF32 pass (on the GPU, not interpreted): another kernel pair, timed on its own
    monkeypatch.setattr(dwconv_triton, "INTERPRETED", False)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: "high")
    assert dwconv_triton._kernel_choice("grad_weight", nhwc, weight, *geometry, run, "auto") == "direct"
    assert len(timed) == 8 and {key.precision for key in dwconv_triton._KERNEL_CHOICE} == {"ieee", "tf32"}
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)   # no timing in a graph capture
    assert dwconv_triton._kernel_choice("grad_input", CudaTensor(8), weight, *geometry, run, "auto") == "direct"
    assert len(timed) == 8


def test_kernel_choices_are_bounded_least_recently_used_first(monkeypatch):
    """The process-wide cache of "auto"'s choices keeps at most MAX_KERNEL_CHOICES layers: the least
    recently used goes first, and is timed again when its layer comes back."""
    timed = []

    def run(name):
        timed.append(name)
        return name

    class CudaTensor:   # what _kernel_choice reads of a tensor, on a device this machine may not have
        shape, dtype, device = torch.Size((8, 4, 30, 30)), torch.float32, torch.device("cuda")
        stride = torch.empty(8, 4, 30, 30, device="meta").stride

    monkeypatch.setattr(dwconv_triton, "time_ms", lambda fn: {"direct": 2.0, "band": 1.0}[fn()])
    monkeypatch.setattr(dwconv_triton, "_KERNEL_CHOICE", OrderedDict())
    monkeypatch.setattr(dwconv_triton, "MAX_KERNEL_CHOICES", 2)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    weight = torch.zeros(4, 1, 31, 31)

    def choose(pad):
        return dwconv_triton._kernel_choice("forward", CudaTensor(), weight, (1, 1), (pad,) * 4, (1, 1), run, "auto")

    def kept():
        return [key.padding[0] for key in dwconv_triton._KERNEL_CHOICE]

    assert choose(15) == choose(14) == "band" and len(timed) == 4
    choose(15)                                   # cached (not timed), now the most recent
    choose(13)                                   # a third layer: 14, the least recently used, goes
    assert kept() == [15, 13] and len(timed) == 6
    choose(14)                                   # timed again
    assert kept() == [13, 14] and len(timed) == 8


@pytest.mark.parametrize("interpreted", [False, True])
def test_band_products_follow_the_float32_matmul_precision(monkeypatch, interpreted):
    """fp32 band products take torch.matmul's setting: three TF32 passes at "highest" (the default), one
    at "high" or "medium"; 16-bit ones are exact products; the interpreter computes all in fp32."""
    monkeypatch.setattr(dwconv_triton, "INTERPRETED", interpreted)
    for setting, fp32_products in (("highest", "tf32x3"), ("high", "tf32"), ("medium", "tf32")):
        monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: setting)
        assert dwconv_triton._dot_settings(torch.float32) == ("ieee" if interpreted else fp32_products, False)
        assert dwconv_triton._dot_settings(torch.float16) == ("ieee", False)
        assert dwconv_triton._dot_settings(torch.bfloat16) == ("ieee", interpreted)   # upcast where interpreted


@pytest.mark.parametrize("stride,dilation,multiplier,memory_format", [
    ((1, 1), (1, 1), 1, NCHW), ((2, 2), (1, 1), 1, NCHW), ((2, 1), (1, 1), 1, NCHW), ((3, 2), (1, 1), 1, NCHW),
    ((1, 1), (1, 1), 2, NCHW), ((2, 1), (1, 1), 3, NCHW), ((2, 2), (1, 1), 2, NHWC), ((1, 1), (2, 3), 1, NCHW),
    ((2, 2), (2, 3), 1, NCHW), ((3, 2), (2, 2), 2, NHWC)],
    ids=["stride1", "stride2", "stride2x1", "stride3x2", "multiplier2", "multiplier3-stride2x1", "nhwc-multiplier2",
         "dilation2x3", "stride2-dilation2x3", "nhwc-stride3x2-dilation2-multiplier2"])
def test_input_gradient_through_the_row_band_kernel(stride, dilation, multiplier, memory_format, triton_device,
                                                    monkeypatch):
    """The input gradient is the band kernel's (the direct one must not run): one stride-1 conv of the
    output gradient with flipped taps per phase of the stride (dilated where the kernel is), summing
    the ``m`` output channels of each input channel; a channels_last gradient is read through an NCHW
    copy."""
    monkeypatch.setattr(dwconv_triton, "_launch_direct_grad_input", pytest.fail)
    out, expected, grads, ref_grads, _, grad_x = _run_both(2, 3, multiplier, 13, 11, (5, 4), stride, "same", dilation,
                                                           memory_format, torch.float32, triton_device, "band")
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads[0], ref_grads[0], atol=1e-4, rtol=1e-4)
    assert grad_x.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("setting,tolerance", [("highest", 1e-4), ("high", 2e-2)])
def test_row_band_kernels_at_each_float32_matmul_precision(setting, tolerance, triton_device, monkeypatch):
    """fp32 through the band kernels in every pass at either setting: on a GPU "high" takes one TF32 pass
    (10-bit mantissas), "highest" three (about fp32); the interpreter multiplies in fp32 at both."""
    for direct in ("_launch_direct", "_launch_direct_grad_input", "_launch_direct_grad_weight"):
        monkeypatch.setattr(dwconv_triton, direct, pytest.fail)
    monkeypatch.setattr(torch, "get_float32_matmul_precision", lambda: setting)
    out, expected, grads, ref_grads, _, _ = _run_both(2, 3, 1, 13, 17, (9, 9), (1, 1), "same", (1, 1), NCHW,
                                                      torch.float32, triton_device, "band")
    torch.testing.assert_close(out, expected, atol=tolerance, rtol=tolerance)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, atol=tolerance * 10, rtol=tolerance)


def test_phase_taps_match_a_loop_over_the_taps():
    """Input position phase + stride*a receives go[o] * w[k] exactly where o*stride + k*dilation - pad
    equals it."""
    cases = [(s, k, p, d) for s in (1, 2, 3, 4) for k in (1, 2, 4, 5) for p in (0, 1, 2, 5) for d in (1, 2, 3)]
    for stride, kernel, pad, dilation in cases:
        for phase in range(stride):
            first, step, taps, pad_1, dilation_1 = dwconv_triton._phase_taps(phase, kernel, stride, pad, dilation)
            for a in range(4):
                h = phase + stride * a
                want = {(o, k) for o in range(-20, 20) for k in range(kernel) if o * stride + k * dilation - pad == h}
                # the stride-1 conv with flipped taps v[t] = w[first + step*(taps-1-t)]
                # reads go[a + t*dilation_1 - pad_1]
                got = {(a + t * dilation_1 - pad_1, first + step * (taps - 1 - t)) for t in range(taps)}
                assert got == want, (stride, kernel, pad, dilation, phase, a)
