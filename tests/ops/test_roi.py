"""Tests for convzoo.ops RoI operators against naive loops written from the kernels' definitions."""
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from convzoo import ops
from convzoo.ops.roi import reference

DT = torch.float64


# --------------------------------------------------------------------------------------
# Naive implementations: one RoI, one bin, one sample at a time, Python floats
# --------------------------------------------------------------------------------------
def c_round(v: float) -> float:
    return math.copysign(math.floor(abs(v) + 0.5), v)


def naive_bilinear_align(img, y, x):
    """torchvision/mmcv ``bilinear_interpolate``: zero outside [-1, H] x [-1, W]."""
    height, width = img.shape
    if not (y >= -1.0 and y <= height and x >= -1.0 and x <= width):
        return 0.0
    y = max(y, 0.0)
    x = max(x, 0.0)
    y_low, x_low = int(y), int(x)
    if y_low >= height - 1:
        y_low = y_high = height - 1
        y = float(y_low)
    else:
        y_high = y_low + 1
    if x_low >= width - 1:
        x_low = x_high = width - 1
        x = float(x_low)
    else:
        x_high = x_low + 1
    ly, lx = y - y_low, x - x_low
    hy, hx = 1 - ly, 1 - lx
    return (
        hy * hx * img[y_low, x_low] + hy * lx * img[y_low, x_high] + ly * hx * img[y_high, x_low] + ly * lx * img[y_high, x_high]
    )


def naive_roi_align(inp, rois, ph, pw, scale, sampling_ratio, aligned, offset=None, gamma=0.0, mmcv=False):
    inp = inp.double()
    out = torch.zeros(rois.shape[0], inp.shape[1], ph, pw, dtype=DT)
    for k in range(rois.shape[0]):
        b, x1, y1, x2, y2 = rois[k].tolist()
        shift = 0.5 if (aligned or mmcv) else 0.0
        sw, sh = x1 * scale - shift, y1 * scale - shift
        rw, rh = x2 * scale - shift - sw, y2 * scale - shift - sh
        if not aligned and not mmcv:
            rw, rh = max(rw, 1.0), max(rh, 1.0)
        bh, bw = rh / ph, rw / pw
        gh = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rh / ph), 0)
        gw = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rw / pw), 0)
        for c in range(inp.shape[1]):
            img = inp[int(b), c].tolist()
            img = torch.tensor(img, dtype=DT)
            for i in range(ph):
                for j in range(pw):
                    oh, ow = sh, sw
                    if offset is not None:
                        ow += gamma * rw * float(offset[k, 0, i, j])
                        oh += gamma * rh * float(offset[k, 1, i, j])
                    total = 0.0
                    for iy in range(gh):
                        y = oh + i * bh + (iy + 0.5) * bh / gh
                        for ix in range(gw):
                            x = ow + j * bw + (ix + 0.5) * bw / gw
                            total += float(naive_bilinear_align(img, y, x))
                    out[k, c, i, j] = total / max(gh * gw, 1)
    return out


def naive_ps_roi_pool(inp, rois, ph, pw, scale):
    inp = inp.double()
    height, width = inp.shape[-2:]
    c_out = inp.shape[1] // (ph * pw)
    out = torch.zeros(rois.shape[0], c_out, ph, pw, dtype=DT)
    for k in range(rois.shape[0]):
        b, x1, y1, x2, y2 = rois[k].tolist()
        sw, sh, ew, eh = (int(c_round(v * scale)) for v in (x1, y1, x2, y2))
        bh, bw = max(eh - sh, 1) / ph, max(ew - sw, 1) / pw
        for c in range(c_out):
            for i in range(ph):
                for j in range(pw):
                    h0 = min(max(math.floor(i * bh) + sh, 0), height - 1)
                    h1 = min(max(math.ceil((i + 1) * bh) + sh, 0), height - 1)
                    w0 = min(max(math.floor(j * bw) + sw, 0), width - 1)
                    w1 = min(max(math.ceil((j + 1) * bw) + sw, 0), width - 1)
                    if h1 <= h0 or w1 <= w0:
                        continue
                    ch = (c * ph + i) * pw + j
                    out[k, c, i, j] = inp[int(b), ch, h0:h1, w0:w1].sum() / ((h1 - h0) * (w1 - w0))
    return out


def naive_ps_roi_align(inp, rois, ph, pw, scale, sampling_ratio):
    """torchvision's ps_roi_align: half-pixel shift, no minimum size, channel (c*ph + i)*pw + j."""
    inp = inp.double()
    c_out = inp.shape[1] // (ph * pw)
    out = torch.zeros(rois.shape[0], c_out, ph, pw, dtype=DT)
    for k in range(rois.shape[0]):
        b, x1, y1, x2, y2 = rois[k].tolist()
        sw, sh = x1 * scale - 0.5, y1 * scale - 0.5
        rw, rh = x2 * scale - 0.5 - sw, y2 * scale - 0.5 - sh
        bh, bw = rh / ph, rw / pw
        gh = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rh / ph), 0)
        gw = sampling_ratio if sampling_ratio > 0 else max(math.ceil(rw / pw), 0)
        for c in range(c_out):
            for i in range(ph):
                for j in range(pw):
                    img = inp[int(b), (c * ph + i) * pw + j]
                    total = 0.0
                    for iy in range(gh):
                        for ix in range(gw):
                            y = sh + i * bh + (iy + 0.5) * bh / gh
                            x = sw + j * bw + (ix + 0.5) * bw / gw
                            total += float(naive_bilinear_align(img, y, x))
                    out[k, c, i, j] = total / max(gh * gw, 1)
    return out


FLT_MAX = 3.4028234663852886e38


def naive_roi_pool(inp, rois, ph, pw, scale):
    """torchvision's roi_pool: the first value beating the running maximum (from -FLT_MAX), row-major."""
    inp = inp.double()
    height, width = inp.shape[-2:]
    out = torch.zeros(rois.shape[0], inp.shape[1], ph, pw, dtype=DT)
    for k in range(rois.shape[0]):
        b, x1, y1, x2, y2 = rois[k].tolist()
        sw, sh, ew, eh = (int(c_round(v * scale)) for v in (x1, y1, x2, y2))
        bh, bw = max(eh - sh + 1, 1) / ph, max(ew - sw + 1, 1) / pw
        for c in range(inp.shape[1]):
            img = inp[int(b), c].tolist()
            for i in range(ph):
                for j in range(pw):
                    h0 = min(max(math.floor(i * bh) + sh, 0), height)
                    h1 = min(max(math.ceil((i + 1) * bh) + sh, 0), height)
                    w0 = min(max(math.floor(j * bw) + sw, 0), width)
                    w1 = min(max(math.ceil((j + 1) * bw) + sw, 0), width)
                    best = -FLT_MAX if (h1 > h0 and w1 > w0) else 0.0
                    for y in range(h0, h1):
                        for x in range(w0, w1):
                            if img[y][x] > best:
                                best = img[y][x]
                    out[k, c, i, j] = best
    return out


def naive_dcn_bilinear(img, x, y):
    height, width = img.shape
    x1, x2, y1, y2 = math.floor(x), math.ceil(x), math.floor(y), math.ceil(y)
    dx, dy = x - x1, y - y1
    return (
        (1 - dx) * (1 - dy) * img[y1, x1] + (1 - dx) * dy * img[y2, x1] + dx * (1 - dy) * img[y1, x2] + dx * dy * img[y2, x2]
    )


def naive_deform_ps_roi_pool(inp, rois, trans, output_dim, group_size, pooled, part_size, spp, trans_std, scale):
    inp = inp.double()
    height, width = inp.shape[-2:]
    no_trans = trans is None
    num_classes = 1 if no_trans else trans.shape[1] // 2
    per_class = output_dim // num_classes
    out = torch.zeros(rois.shape[0], output_dim, pooled, pooled, dtype=DT)
    for n in range(rois.shape[0]):
        b, x1, y1, x2, y2 = rois[n].tolist()
        sw, sh = c_round(x1) * scale - 0.5, c_round(y1) * scale - 0.5
        ew, eh = (c_round(x2) + 1.0) * scale - 0.5, (c_round(y2) + 1.0) * scale - 0.5
        rw, rh = max(ew - sw, 0.1), max(eh - sh, 0.1)
        bh, bw = rh / pooled, rw / pooled
        for ctop in range(output_dim):
            cls = ctop // per_class
            for i in range(pooled):
                for j in range(pooled):
                    part_h, part_w = math.floor(i / pooled * part_size), math.floor(j / pooled * part_size)
                    tx = 0.0 if no_trans else float(trans[n, 2 * cls, part_h, part_w]) * trans_std
                    ty = 0.0 if no_trans else float(trans[n, 2 * cls + 1, part_h, part_w]) * trans_std
                    wstart = j * bw + sw + tx * rw
                    hstart = i * bh + sh + ty * rh
                    gh = min(max(math.floor(i * group_size / pooled), 0), group_size - 1)
                    gw = min(max(math.floor(j * group_size / pooled), 0), group_size - 1)
                    img = inp[int(b), (ctop * group_size + gh) * group_size + gw]
                    total, count = 0.0, 0
                    for ih in range(spp):
                        for iw in range(spp):
                            w = wstart + iw * bw / spp
                            h = hstart + ih * bh / spp
                            if not (-0.5 <= w <= width - 0.5 and -0.5 <= h <= height - 0.5):
                                continue
                            w = min(max(w, 0.0), width - 1.0)
                            h = min(max(h, 0.0), height - 1.0)
                            total += float(naive_dcn_bilinear(img, w, h))
                            count += 1
                    out[n, ctop, i, j] = total / count if count else 0.0
    return out


# --------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------
def make_rois(k, n, height, width, scale, generator=None, margin=3.0):
    """Random boxes in image coordinates, some crossing the border, some tiny."""
    g = generator
    img_h, img_w = height / scale, width / scale
    xy1 = torch.rand(k, 2, generator=g, dtype=DT) * torch.tensor([img_w, img_h], dtype=DT) * 1.2 - margin
    wh = torch.rand(k, 2, generator=g, dtype=DT) * torch.tensor([img_w, img_h], dtype=DT) * 0.8
    batch = torch.randint(0, max(n, 1), (k, 1), generator=g).to(DT)
    return torch.cat([batch, xy1, xy1 + wh], dim=1)


IMPLS = ["auto", "reference"]


# --------------------------------------------------------------------------------------
# Against the naive loops
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "sampling_ratio,aligned,scale",
    [pytest.param(-1, False, 1.0, id="adaptive"), pytest.param(2, True, 0.5, id="sr2-aligned"),
     pytest.param(0, True, 0.25, id="adaptive-aligned-quarter"), pytest.param(3, False, 0.7, id="sr3")],
)
def test_roi_align_matches_naive(impl, sampling_ratio, aligned, scale):
    x = torch.randn(2, 3, 7, 9, dtype=DT)
    rois = make_rois(6, 2, 7, 9, scale)
    rois[0, 1:] = torch.tensor([2.0, 2.0, 2.2, 2.1]) / scale  # smaller than one pixel
    got = ops.roi_align(x, rois, (2, 3), scale, sampling_ratio, aligned, impl=impl)
    want = naive_roi_align(x, rois, 2, 3, scale, sampling_ratio, aligned)
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sampling_ratio", [0, 2])
def test_deform_roi_pool_matches_naive(impl, sampling_ratio):
    x = torch.randn(2, 3, 8, 6, dtype=DT)
    rois = make_rois(5, 2, 8, 6, 0.5)
    offset = torch.randn(5, 2, 3, 2, dtype=DT) * 3  # large enough to leave the map
    got = ops.deform_roi_pool(x, rois, offset, (3, 2), 0.5, sampling_ratio, 0.3, impl=impl)
    want = naive_roi_align(x, rois, 3, 2, 0.5, sampling_ratio, False, offset, 0.3, mmcv=True)
    torch.testing.assert_close(got, want)
    no_offset = ops.deform_roi_pool(x, rois, None, (3, 2), 0.5, sampling_ratio, impl=impl)
    torch.testing.assert_close(no_offset, naive_roi_align(x, rois, 3, 2, 0.5, sampling_ratio, False, mmcv=True))


@pytest.mark.parametrize("impl", IMPLS)
def test_modulated_deform_roi_pool_matches_naive(impl):
    x = torch.randn(1, 2, 6, 7, dtype=DT)
    rois = make_rois(3, 1, 6, 7, 1.0)
    offset = torch.randn(3, 2, 2, 2, dtype=DT)
    mask = torch.rand(3, 1, 2, 2, dtype=DT)
    got = ops.modulated_deform_roi_pool(x, rois, offset, mask, 2, 1.0, 2, 0.1, impl=impl)
    want = naive_roi_align(x, rois, 2, 2, 1.0, 2, False, offset, 0.1, mmcv=True) * mask
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("scale", [1.0, 0.5, 0.3])
def test_ps_roi_pool_matches_naive(impl, scale):
    x = torch.randn(2, 2 * 2 * 3, 7, 8, dtype=DT)
    rois = make_rois(7, 2, 7, 8, scale)
    rois[0, 1:] = torch.tensor([0.5, 2.5, -0.5, 1.5])  # halves: round away from zero, x2 < x1
    got = ops.ps_roi_pool(x, rois, (2, 3), scale, impl=impl)
    torch.testing.assert_close(got, naive_ps_roi_pool(x, rois, 2, 3, scale))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("sampling_ratio,scale", [pytest.param(-1, 1.0, id="adaptive"),
                                                  pytest.param(2, 0.5, id="sr2-half")])
def test_ps_roi_align_matches_naive(impl, sampling_ratio, scale):
    x = torch.randn(2, 2 * 2 * 3, 7, 8, dtype=DT)
    rois = make_rois(6, 2, 7, 8, scale)
    rois[0, 1:] = torch.tensor([3.0, 3.0, 3.0, 3.0]) / scale  # an empty box
    got = ops.ps_roi_align(x, rois, (2, 3), scale, sampling_ratio, impl=impl)
    torch.testing.assert_close(got, naive_ps_roi_align(x, rois, 2, 3, scale, sampling_ratio))


@pytest.mark.parametrize("impl", IMPLS)
def test_roi_pool_matches_naive(impl):
    x = torch.randn(2, 3, 7, 8, dtype=DT)
    x[0, 0, :3, :3] = float("nan")  # NaN never wins; a bin of NaN only is -FLT_MAX
    x[1, 2, 3:5, 1:4] = float("-inf")
    rois = make_rois(7, 2, 7, 8, 0.5)
    rois[0] = torch.tensor([0, 0.0, 0.0, 1.0, 1.0])  # inside the NaN corner
    rois[1, 1:] = torch.tensor([40.0, 40.0, 50.0, 50.0])  # outside the map: empty bins are 0
    got = ops.roi_pool(x, rois, (2, 3), 0.5, impl=impl)
    want = naive_roi_pool(x, rois, 2, 3, 0.5)
    assert (got[0, 0] == -FLT_MAX).all() and (got[1] == 0).all()
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("impl", IMPLS)
def test_roi_pool_gradient_goes_to_the_first_maximum(impl):
    x = torch.ones(1, 2, 4, 5, dtype=DT, requires_grad=True)
    out = ops.roi_pool(x, torch.tensor([[0, 0.0, 0.0, 4.0, 3.0]], dtype=DT), 1, impl=impl)
    (grad,) = torch.autograd.grad(out.sum(), x)
    want = torch.zeros_like(x)
    want[0, :, 0, 0] = 1.0  # all tie: the first in row-major order
    assert torch.equal(grad, want)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize(
    "output_dim,group_size,pooled,part,spp,classes",
    [pytest.param(2, 2, 3, 3, 2, 1, id="g2-p3"), pytest.param(4, 3, 3, 2, 3, 2, id="g3-part2-2classes"),
     pytest.param(3, 1, 2, 2, 4, 3, id="g1-3classes")],
)
def test_deform_ps_roi_pool_matches_naive(impl, output_dim, group_size, pooled, part, spp, classes):
    x = torch.randn(2, output_dim * group_size**2, 6, 7, dtype=DT)
    rois = make_rois(4, 2, 6, 7, 0.5)
    rois[0, 1:] = torch.tensor([2.5, -0.5, 1.5, 3.5])
    trans = torch.randn(4, 2 * classes, part, part, dtype=DT)
    got = ops.deform_ps_roi_pool(x, rois, trans, output_dim, group_size, pooled, part, spp, 0.3, 0.5, impl=impl)
    want = naive_deform_ps_roi_pool(x, rois, trans, output_dim, group_size, pooled, part, spp, 0.3, 0.5)
    torch.testing.assert_close(got, want)
    plain = ops.deform_ps_roi_pool(x, rois, None, output_dim, group_size, pooled, part, spp, 0.3, 0.5, no_trans=True,
                                   impl=impl)
    torch.testing.assert_close(plain, naive_deform_ps_roi_pool(x, rois, None, output_dim, group_size, pooled, part,
                                                               spp, 0.3, 0.5))


def test_boxes_as_list_equal_rois_tensor():
    x = torch.randn(2, 4, 6, 6)
    per_image = [torch.tensor([[0.0, 0.0, 4.0, 3.0]]), torch.tensor([[1.0, 1.0, 5.0, 5.0], [2.0, 0.0, 3.0, 6.0]])]
    rois = torch.tensor([[0, 0.0, 0.0, 4.0, 3.0], [1, 1.0, 1.0, 5.0, 5.0], [1, 2.0, 0.0, 3.0, 6.0]])
    torch.testing.assert_close(ops.roi_align(x, per_image, 2), ops.roi_align(x, rois, 2))
    torch.testing.assert_close(ops.ps_roi_pool(x, per_image, 1), ops.ps_roi_pool(x, rois, 1))
    torch.testing.assert_close(ops.ps_roi_align(x, per_image, 2), ops.ps_roi_align(x, rois, 2))
    torch.testing.assert_close(ops.roi_pool(x, per_image, 2), ops.roi_pool(x, rois, 2))


def test_torchvision_keyword_names_and_keyword_only_impl():
    x = torch.randn(2, 8, 6, 6)
    boxes = torch.tensor([[0, 0.0, 0.0, 4.0, 3.0], [1, 1.0, 1.0, 5.0, 5.0]])
    pairs = [
        (ops.roi_align(input=x, boxes=boxes, output_size=2, spatial_scale=0.5, sampling_ratio=2, aligned=True),
         ops.roi_align(x, boxes, 2, 0.5, 2, True)),
        (ops.ps_roi_align(input=x, boxes=boxes, output_size=2, spatial_scale=0.5, sampling_ratio=2),
         ops.ps_roi_align(x, boxes, 2, 0.5, 2)),
        (ops.roi_pool(input=x, boxes=boxes, output_size=2, spatial_scale=0.5), ops.roi_pool(x, boxes, 2, 0.5)),
        (ops.ps_roi_pool(input=x, boxes=boxes, output_size=2, spatial_scale=0.5), ops.ps_roi_pool(x, boxes, 2, 0.5)),
    ]
    for got, want in pairs:
        torch.testing.assert_close(got, want)
    for op in (ops.roi_pool, ops.ps_roi_pool):
        with pytest.raises(TypeError):
            op(x, boxes, 2, 0.5, "reference")  # impl is keyword-only


# --------------------------------------------------------------------------------------
# Random shapes: the custom op against the autograd reference, forward and gradients
# --------------------------------------------------------------------------------------
@given(
    n=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7), k=st.integers(0, 4),
    ph=st.integers(1, 3), pw=st.integers(1, 3), sampling_ratio=st.integers(-1, 2), scale=st.sampled_from([1.0, 0.5]),
    gamma=st.sampled_from([0.1, 0.5]), seed=st.integers(0, 2**16),
)
def test_deform_roi_pool_auto_equals_reference(n, c, h, w, k, ph, pw, sampling_ratio, scale, gamma, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, h, w, dtype=DT, generator=g, requires_grad=True)
    rois = make_rois(k, n, h, w, scale, g)
    offset = (torch.randn(k, 2, ph, pw, dtype=DT, generator=g) * 2).requires_grad_()
    results = []
    for impl in IMPLS:
        out = ops.deform_roi_pool(x, rois, offset, (ph, pw), scale, sampling_ratio, gamma, impl=impl)
        grads = torch.autograd.grad((out * torch.arange(out.numel(), dtype=DT).view_as(out)).sum(), [x, offset],
                                    allow_unused=True)
        results.append((out, grads))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b)
    for u, v, like in zip(ga, gb, (x, offset)):
        # without any sample the reference leaves the offset out of the graph
        torch.testing.assert_close(u, v if v is not None else torch.zeros_like(like))


@given(
    n=st.integers(1, 2), c=st.integers(1, 3), h=st.integers(1, 7), w=st.integers(1, 7), k=st.integers(0, 4),
    p=st.integers(1, 3), sampling_ratio=st.integers(-1, 2), aligned=st.booleans(), seed=st.integers(0, 2**16),
)
def test_torchvision_ops_auto_equal_reference(n, c, h, w, k, p, sampling_ratio, aligned, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c * p * p, h, w, dtype=DT, generator=g, requires_grad=True)
    rois = make_rois(k, n, h, w, 0.5, g)
    for fn in (lambda impl: ops.roi_align(x, rois, p, 0.5, sampling_ratio, aligned, impl=impl),
               lambda impl: ops.ps_roi_align(x, rois, p, 0.5, sampling_ratio, impl=impl),
               lambda impl: ops.roi_pool(x, rois, p, 0.5, impl=impl),
               lambda impl: ops.ps_roi_pool(x, rois, p, 0.5, impl=impl)):
        outs, grads = [], []
        for impl in IMPLS:
            out = fn(impl)
            outs.append(out)
            grads.append(torch.autograd.grad((out * out.detach().sin()).sum(), x)[0] if out.numel() else None)
        torch.testing.assert_close(outs[0], outs[1])
        if grads[0] is not None:
            torch.testing.assert_close(grads[0], grads[1])


@given(
    n=st.integers(1, 2), c=st.integers(1, 2), g_size=st.integers(1, 3), h=st.integers(1, 6), w=st.integers(1, 6),
    k=st.integers(0, 3), pooled=st.integers(1, 3), part=st.integers(1, 3), spp=st.integers(1, 3),
    seed=st.integers(0, 2**16),
)
def test_deform_ps_roi_pool_auto_equals_reference(n, c, g_size, h, w, k, pooled, part, spp, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c * g_size**2, h, w, dtype=DT, generator=gen, requires_grad=True)
    rois = make_rois(k, n, h, w, 0.5, gen)
    trans = torch.randn(k, 2, part, part, dtype=DT, generator=gen).requires_grad_()
    results = []
    for impl in IMPLS:
        out = ops.deform_ps_roi_pool(x, rois, trans, c, g_size, pooled, part, spp, 0.2, 0.5, impl=impl)
        weight = torch.arange(out.numel(), dtype=DT).view_as(out)
        results.append((out, torch.autograd.grad((out * weight).sum(), [x, trans])))
    (a, ga), (b, gb) = results
    torch.testing.assert_close(a, b)
    for u, v in zip(ga, gb):
        torch.testing.assert_close(u, v)


# --------------------------------------------------------------------------------------
# gradcheck (float64)
# --------------------------------------------------------------------------------------
def _rois_away_from_kinks():
    # boxes whose samples stay off whole-pixel coordinates, where bilinear weights have kinks
    return torch.tensor([[0, 0.3, 0.45, 5.15, 4.35], [1, 1.2, 0.75, 3.9, 5.6]], dtype=DT)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_roi_align(impl):
    x = torch.randn(2, 2, 6, 7, dtype=DT, requires_grad=True)
    rois = _rois_away_from_kinks()
    assert torch.autograd.gradcheck(lambda t: ops.roi_align(t, rois, 2, 1.0, 2, True, impl=impl), (x,))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_modulated_deform_roi_pool(impl):
    x = torch.randn(2, 2, 6, 7, dtype=DT, requires_grad=True)
    rois = _rois_away_from_kinks()
    offset = (torch.rand(2, 2, 2, 2, dtype=DT) * 0.4 - 0.2).requires_grad_()
    mask = torch.rand(2, 1, 2, 2, dtype=DT, requires_grad=True)

    def fn(t, o, m):
        return ops.modulated_deform_roi_pool(t, rois, o, m, 2, 1.0, 2, 0.1, impl=impl)

    assert torch.autograd.gradcheck(fn, (x, offset, mask))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_ps_roi_pool(impl):
    x = torch.randn(2, 8, 6, 7, dtype=DT, requires_grad=True)
    rois = _rois_away_from_kinks()
    assert torch.autograd.gradcheck(lambda t: ops.ps_roi_pool(t, rois, 2, 1.0, impl=impl), (x,))


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_ps_roi_align_and_roi_pool(impl):
    x = torch.randn(2, 4, 6, 7, dtype=DT, requires_grad=True)
    rois = _rois_away_from_kinks()
    assert torch.autograd.gradcheck(lambda t: ops.ps_roi_align(t, rois, 2, 1.0, 2, impl=impl), (x,))
    # max pooling is piecewise linear: random directions (fast mode) test it as well
    assert torch.autograd.gradcheck(lambda t: ops.roi_pool(t, rois, 2, 1.0, impl=impl), (x,), fast_mode=True)


@pytest.mark.parametrize("impl", IMPLS)
def test_gradcheck_deform_ps_roi_pool(impl):
    x = torch.randn(2, 2, 6, 7, dtype=DT, requires_grad=True)
    rois = torch.tensor([[0, 0.0, 1.0, 4.0, 4.0], [1, 1.0, 0.0, 3.0, 5.0]], dtype=DT)
    trans = (torch.rand(2, 4, 2, 2, dtype=DT) * 0.2 + 0.13).requires_grad_()  # two coordinate sets
    assert torch.autograd.gradcheck(
        lambda t, o: ops.deform_ps_roi_pool(t, rois, o, 2, 1, 2, 2, 2, 0.1, 1.0, impl=impl), (x, trans)
    )


# --------------------------------------------------------------------------------------
# Edge cases
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", IMPLS)
def test_zero_rois(impl):
    x = torch.randn(2, 4, 5, 5, requires_grad=True)
    rois = torch.zeros(0, 5)
    outs = [
        ops.roi_align(x, rois, 2, impl=impl),
        ops.deform_roi_pool(x, rois, torch.zeros(0, 2, 2, 2), 2, impl=impl),
        ops.modulated_deform_roi_pool(x, rois, torch.zeros(0, 2, 2, 2), torch.zeros(0, 1, 2, 2), 2, impl=impl),
        ops.ps_roi_pool(x, rois, 2, impl=impl),
        ops.deform_ps_roi_pool(x, rois, torch.zeros(0, 2, 2, 2), 1, 2, 2, impl=impl),
        ops.roi_pool(x, rois, 2, impl=impl),
        ops.ps_roi_align(x, rois, 2, impl=impl),
    ]
    assert [tuple(o.shape) for o in outs] == [(0, 4, 2, 2)] * 3 + [(0, 1, 2, 2)] * 2 + [(0, 4, 2, 2), (0, 1, 2, 2)]
    (grad,) = torch.autograd.grad(sum(o.sum() for o in outs), x)
    assert torch.equal(grad, torch.zeros_like(x))
    for op in (ops.roi_align, ops.roi_pool):
        assert op(torch.zeros(0, 4, 5, 5), torch.zeros(0, 5), 2, impl=impl).shape == (0, 4, 2, 2)
    for op in (ops.ps_roi_align, ops.ps_roi_pool):
        assert op(torch.zeros(0, 4, 5, 5), torch.zeros(0, 5), 2, impl=impl).shape == (0, 1, 2, 2)


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_offsets_contribute_zero(impl):
    x = torch.rand(1, 2, 6, 6) + 1.0  # positive, so a sample that reads anything shows up
    rois = torch.tensor([[0, 1.0, 1.0, 5.0, 5.0]])
    offset = torch.zeros(1, 2, 2, 2)
    offset[0, 0, 0, 0] = float("nan")
    offset[0, 1, 1, 1] = float("inf")
    offset.requires_grad_()
    out = ops.deform_roi_pool(x, rois, offset, 2, 1.0, 2, impl=impl)
    assert torch.isfinite(out).all()
    assert (out[0, :, 0, 0] == 0).all() and (out[0, :, 1, 1] == 0).all()
    assert (out[0, :, 0, 1] > 0).all()
    (grad,) = torch.autograd.grad(out.sum(), offset)
    assert torch.isfinite(grad).all()
    trans = torch.zeros(1, 2, 2, 2)
    trans[0, 0, 1, 0] = float("-inf")
    ps = ops.deform_ps_roi_pool(x, rois, trans, 2, 1, 2, 2, 2, 0.1, 1.0, impl=impl)
    assert (ps[0, :, 1, 0] == 0).all() and (ps[0, :, 0, 0] > 0).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_non_finite_inputs_and_boxes(impl):
    """A NaN/inf box gives a defined (finite) answer; NaN features stay where they are read."""
    x = torch.randn(2, 8, 6, 7, dtype=DT)
    rois = torch.tensor([[0, float("nan"), 1.0, 4.0, 4.0], [1, 0.0, float("inf"), 5.0, 3.0],
                         [1, 1.0, 1.0, float("-inf"), 5.0]], dtype=DT)
    for fn in (lambda: ops.roi_align(x, rois, 2, impl=impl), lambda: ops.ps_roi_align(x, rois, 2, impl=impl),
               lambda: ops.deform_roi_pool(x, rois, None, 2, impl=impl),
               lambda: ops.roi_pool(x, rois, 2, impl=impl), lambda: ops.ps_roi_pool(x, rois, 2, impl=impl)):
        assert torch.isfinite(fn()).all()
    poisoned = x.clone()
    poisoned[1, :, 0, 0] = float("nan")
    box = torch.tensor([[1, 0.0, 0.0, 2.0, 2.0], [0, 0.0, 0.0, 2.0, 2.0]], dtype=DT)
    for op in (ops.roi_align, ops.ps_roi_align):
        out = op(poisoned, box, 1, 1.0, 2, impl=impl)
        assert torch.isnan(out[0]).all() and torch.isfinite(out[1]).all()


def _huge_box_calls(x, box, offset, impl):
    return [
        ops.roi_align(x, box, 2, impl=impl),
        ops.roi_align(x, box, 2, 0.5, 0, True, impl=impl),
        ops.ps_roi_align(x, box, 2, impl=impl),
        ops.deform_roi_pool(x, box, offset, 2, impl=impl),
        ops.roi_pool(x, box, 2, impl=impl),
        ops.ps_roi_pool(x, box, 2, impl=impl),
        ops.deform_ps_roi_pool(x, box, offset, 2, 2, 2, impl=impl),
    ]


@pytest.mark.parametrize("size", [1e9, 1e30])
def test_huge_boxes_are_bounded_and_defined(size):
    """Issue 17: a 1e9 box grew to 22 GB. Only the samples that can read the map are visited."""
    height, width = 16, 16
    for geometry in (reference.roi_align_geometry((2, 2), 1.0, -1, False),
                     reference.ps_roi_align_geometry((2, 2), 0.5, 0),
                     reference.deform_roi_pool_geometry((2, 2), 1.0, 0, 0.1)):
        box = torch.tensor([[0.0, -size, -size, size, size]], dtype=DT)
        offset = torch.randn(1, 2, 2, 2, dtype=DT) if geometry.gamma else None
        _, y, _, weight = reference.align_samples(box, height, width, geometry, offset)
        assert y.shape[-1] <= (2 * height + 8) * (2 * width + 8)  # samples per bin, whatever the box
        assert torch.isfinite(weight).all()
    x = torch.randn(1, 8, height, width, dtype=DT)
    box = torch.tensor([[0.0, -size, -size, size, size]], dtype=DT)
    offset = torch.randn(1, 2, 2, 2, dtype=DT)
    for got, want in zip(_huge_box_calls(x, box, offset, "auto"), _huge_box_calls(x, box, offset, "reference")):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_huge_box_roi_align_value(dtype):
    """The issue's case, against the answer worked out by hand: bin (0, 0) is 5e8 pixels wide with
    5e8 samples per axis at t + 0.5; the 16 that read the map give rows 0..15 the weights 0.5, 1,
    ..., 1, 1.5 (row 15 also takes the clamped sample at 15.5); the other bins read nothing."""
    x = torch.randn(2, 4, 16, 16, dtype=dtype)
    box = torch.tensor([[0.0, 0, 0, 1e9, 1e9]], dtype=dtype)
    wy = torch.ones(16, dtype=DT)
    wy[0], wy[-1] = 0.5, 1.5
    want = torch.zeros(1, 4, 2, 2, dtype=DT)
    want[0, :, 0, 0] = torch.einsum("h,chw,w->c", wy, x[0].double(), wy) / 2.5e17
    for impl in IMPLS:
        got = ops.roi_align(x, box, 2, impl=impl)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-22)


@pytest.mark.parametrize("impl", IMPLS)
def test_ps_roi_pool_gradient_is_the_adjoint(impl):
    """ps_roi_pool is linear in its input, so its input gradient must satisfy <dy, y> = <dx, x>;
    the forward never reads the last row/column, so they get no gradient (torchvision's do)."""
    x = torch.randn(2, 12, 7, 9, dtype=DT, requires_grad=True)
    rois = make_rois(8, 2, 7, 9, 1.0)
    rois[0, 1:] = torch.tensor([3.0, 4.0, 9.0, 7.0])  # bins touching the last row and column
    y = ops.ps_roi_pool(x, rois, (2, 3), impl=impl)
    dy = torch.randn_like(y)
    (dx,) = torch.autograd.grad(y, x, dy)
    torch.testing.assert_close((dy * y).sum(), (dx * x).sum(), rtol=1e-12, atol=1e-12)
    assert (dx[..., -1, :] == 0).all() and (dx[..., :, -1] == 0).all()
    assert dx[..., -2, :].abs().sum() > 0


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_and_channels_last(impl):
    base = torch.randn(2, 8, 9, 10, dtype=DT)
    rois = make_rois(5, 2, 9, 10, 1.0)
    offset = torch.randn(5, 2, 2, 2, dtype=DT)
    variants = [base.contiguous(memory_format=torch.channels_last), base.transpose(2, 3).contiguous().transpose(2, 3),
                torch.randn(2, 16, 9, 10, dtype=DT)[:, ::2].copy_(base)]
    for fn in (
        lambda t: ops.roi_align(t, rois, 2, 1.0, 2, True, impl=impl),
        lambda t: ops.deform_roi_pool(t, rois, offset, 2, impl=impl),
        lambda t: ops.ps_roi_pool(t, rois, 2, impl=impl),
        lambda t: ops.deform_ps_roi_pool(t, rois, offset, 2, 2, 2, impl=impl),
        lambda t: ops.ps_roi_align(t, rois, 2, 1.0, 2, impl=impl),
        lambda t: ops.roi_pool(t, rois, 2, impl=impl),
    ):
        base_leaf = base.clone().requires_grad_()
        want = fn(base_leaf)
        (want_grad,) = torch.autograd.grad((want * want.detach().cos()).sum(), base_leaf)
        for variant in variants:
            leaf = variant.detach().requires_grad_()
            got = fn(leaf)
            torch.testing.assert_close(got, want.detach())
            (grad,) = torch.autograd.grad((got * got.detach().cos()).sum(), leaf)
            torch.testing.assert_close(grad, want_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_low_precision_dtypes(dtype):
    x = torch.randn(1, 4, 6, 6, dtype=DT)
    rois = torch.tensor([[0, 0.5, 1.0, 4.5, 5.0]], dtype=DT)
    offset = torch.randn(1, 2, 2, 2, dtype=DT)
    tol = dict(atol=2e-2, rtol=2e-2) if dtype != torch.float32 else dict(atol=1e-5, rtol=1e-5)
    pairs = [
        (ops.roi_align(x.to(dtype), rois.to(dtype), 2), ops.roi_align(x, rois, 2)),
        (ops.deform_roi_pool(x.to(dtype), rois.to(dtype), offset.to(dtype), 2), ops.deform_roi_pool(x, rois, offset, 2)),
        (ops.ps_roi_pool(x.to(dtype), rois.to(dtype), 2), ops.ps_roi_pool(x, rois, 2)),
        (ops.deform_ps_roi_pool(x.to(dtype), rois.to(dtype), offset.to(dtype), 1, 2, 2),
         ops.deform_ps_roi_pool(x, rois, offset, 1, 2, 2)),
    ]
    for got, want in pairs:
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), want, **tol)
    leaf = x.to(dtype).requires_grad_()
    (grad,) = torch.autograd.grad(ops.deform_roi_pool(leaf, rois.to(dtype), offset.to(dtype), 2).sum(), leaf)
    x64 = x.clone().requires_grad_()
    (want_grad,) = torch.autograd.grad(ops.deform_roi_pool(x64, rois, offset, 2).sum(), x64)
    assert grad.dtype == dtype
    torch.testing.assert_close(grad.double(), want_grad, **tol)


def test_flop_counter_sees_the_ops():
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, 4, 6, 6)
    rois = torch.tensor([[0, 0.5, 1.0, 4.5, 5.0]])
    with FlopCounterMode(display=False) as counter:
        ops.roi_align(x, rois, 2, 1.0, 2)
    assert counter.get_total_flops() == 2 * 4 * 4 * (1 * 4 * 2 * 2)


def test_torch_compile_fullgraph():
    class Head(torch.nn.Module):
        def forward(self, feats, rois, offset, trans):
            a = ops.roi_align(feats, rois, 2, 0.5, 2, True)
            b = ops.deform_roi_pool(feats, rois, offset, 2, 0.5, 2)
            c = ops.ps_roi_pool(feats, rois, 2, 0.5)
            d = ops.deform_ps_roi_pool(feats, rois, trans, 1, 2, 2, 2, 2, 0.1, 0.5)
            return a.sum() + b.sum() + c.sum() + d.sum()

    torch._dynamo.reset()
    feats = torch.randn(2, 4, 6, 7, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 2.0, 9.0, 10.0], [1, 0.0, 0.0, 13.0, 11.0]])
    offset = torch.randn(2, 2, 2, 2, requires_grad=True)
    trans = torch.randn(2, 2, 2, 2, requires_grad=True)
    compiled = torch.compile(Head(), fullgraph=True, backend="aot_eager")
    got = compiled(feats, rois, offset, trans)
    want = Head()(feats, rois, offset, trans)
    torch.testing.assert_close(got, want)
    grads = torch.autograd.grad(got, [feats, offset, trans])
    want_grads = torch.autograd.grad(want, [feats, offset, trans])
    for u, v in zip(grads, want_grads):
        torch.testing.assert_close(u, v)


def test_opcheck_custom_ops():
    x = torch.randn(2, 4, 6, 7, dtype=DT, requires_grad=True)
    rois = torch.tensor([[0, 1.0, 2.0, 5.0, 6.0], [1, 0.0, 0.0, 6.0, 5.0]], dtype=DT)
    offset = torch.randn(2, 2, 2, 2, dtype=DT, requires_grad=True)
    checks = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.convzoo.roi_align.default, (x, rois, 2, 2, 1.0, 2, True), test_utils=checks)
    torch.library.opcheck(torch.ops.convzoo.deform_roi_pool.default, (x, rois, offset, 2, 2, 1.0, 0, 0.1),
                          test_utils=checks)
    torch.library.opcheck(torch.ops.convzoo.ps_roi_pool.default, (x, rois, 2, 2, 1.0), test_utils=checks)
    torch.library.opcheck(torch.ops.convzoo.ps_roi_align.default, (x, rois, 2, 1, 1.0, 2), test_utils=checks)
    torch.library.opcheck(torch.ops.convzoo.roi_pool.default, (x, rois, 2, 2, 1.0), test_utils=checks)
    torch.library.opcheck(torch.ops.convzoo.deform_ps_roi_pool.default,
                          (x, rois, offset, 1, 2, 2, 2, 2, 0.1, 1.0), test_utils=checks)


# --------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------
X = torch.randn(2, 8, 5, 5)
ROIS = torch.tensor([[0, 0.0, 0.0, 3.0, 3.0]])
BAD_CALLS = [
    pytest.param(TypeError, "input must be a torch.Tensor",
                 lambda: ops.roi_align([1], ROIS, 2), id="input-not-tensor"),
    pytest.param(ValueError, "input must be a 4-D tensor", lambda: ops.roi_align(X[0], ROIS, 2), id="input-3d"),
    pytest.param(TypeError, "input must have dtype", lambda: ops.roi_align(X.long(), ROIS, 2), id="input-long"),
    pytest.param(ValueError, r"boxes must have shape \(K, 5\)",
                 lambda: ops.roi_align(X, ROIS[:, :4], 2), id="boxes-4-columns"),
    pytest.param(ValueError, r"boxes\[:, 0\] must hold integer batch indices",
                 lambda: ops.roi_align(X, torch.tensor([[2, 0.0, 0.0, 3.0, 3.0]]), 2), id="boxes-bad-batch-index"),
    pytest.param(ValueError, "boxes given as a list must hold one",
                 lambda: ops.roi_align(X, [ROIS[:, 1:]], 2), id="box-list-length"),
    pytest.param(ValueError, r"boxes\[1\] must have shape \(L, 4\)",
                 lambda: ops.roi_align(X, [ROIS[:, 1:], ROIS], 2), id="box-list-shape"),
    pytest.param(ValueError, "output_size must be >= 1", lambda: ops.roi_align(X, ROIS, 0), id="output-size-0"),
    pytest.param(ValueError, "spatial_scale must be a finite number > 0",
                 lambda: ops.roi_align(X, ROIS, 2, spatial_scale=0.0), id="spatial-scale-0"),
    pytest.param(TypeError, "sampling_ratio must be an int",
                 lambda: ops.roi_align(X, ROIS, 2, sampling_ratio=2.0), id="sampling-ratio-float"),
    pytest.param(TypeError, "aligned must be a bool",
                 lambda: ops.roi_align(X, ROIS, 2, aligned="yes"), id="aligned-str"),
    pytest.param(ValueError, "impl='triton' is not available",
                 lambda: ops.roi_align(X, ROIS, 2, impl="triton"), id="impl-triton"),
    pytest.param(ValueError, "impl must be one of",
                 lambda: ops.ps_roi_pool(X, ROIS, 2, impl="cuda"), id="impl-unknown"),
    pytest.param(ValueError, r"offset must have shape \(1, 2, 2, 2\)",
                 lambda: ops.deform_roi_pool(X, ROIS, torch.zeros(1, 2, 3, 3), 2), id="offset-shape"),
    pytest.param(TypeError, "offset must have the dtype of input",
                 lambda: ops.deform_roi_pool(X, ROIS, torch.zeros(1, 2, 2, 2, dtype=DT), 2), id="offset-dtype"),
    pytest.param(TypeError, "gamma must be a finite float",
                 lambda: ops.deform_roi_pool(X, ROIS, None, 2, gamma=float("nan")), id="gamma-nan"),
    pytest.param(ValueError, r"mask must have shape \(1, 1, 2, 2\)",
                 lambda: ops.modulated_deform_roi_pool(X, ROIS, torch.zeros(1, 2, 2, 2), torch.zeros(1, 2, 2, 2), 2), id="mask-shape"),
    pytest.param(ValueError, "input channels must be a multiple of",
                 lambda: ops.ps_roi_pool(X, ROIS, 3), id="ps-channels"),
    pytest.param(ValueError, "input must have output_dim",
                 lambda: ops.deform_ps_roi_pool(X, ROIS, None, 3, 2, 2, no_trans=True), id="deform-ps-channels"),
    pytest.param(ValueError, "offset must be a Tensor",
                 lambda: ops.deform_ps_roi_pool(X, ROIS, None, 2, 2, 2), id="deform-ps-offset-missing"),
    pytest.param(ValueError, r"offset must have shape \(1, 2\*Q, 3, 3\)",
                 lambda: ops.deform_ps_roi_pool(X, ROIS, torch.zeros(1, 2, 2, 2), 2, 2, 3, 3), id="deform-ps-offset-shape"),
    pytest.param(ValueError, "output_dim .* must be divisible",
                 lambda: ops.deform_ps_roi_pool(X, ROIS, torch.zeros(1, 6, 2, 2), 2, 2, 2), id="deform-ps-output-dim"),
    pytest.param(ValueError, "sample_per_part must be >= 1",
                 lambda: ops.deform_ps_roi_pool(X, ROIS, None, 2, 2, 2, sample_per_part=0, no_trans=True), id="deform-ps-sample-per-part"),
]


@pytest.mark.parametrize("error, message, call", BAD_CALLS)
def test_errors_name_the_argument(error, message, call):
    with pytest.raises(error, match=message):
        call()


@pytest.mark.parametrize("engine", ["numba", "pytorch-without-numba"])
def test_engines_match_reference(engine, monkeypatch):
    """The custom ops' CPU engines (the Numba kernels, every thread even on small inputs; or, without
    Numba, their PyTorch fallbacks) against the autograd reference, gradients included."""
    from convzoo.ops import _bilinear_rows, _numba
    from convzoo.ops import roi as roi_module

    monkeypatch.setattr(_numba, "GRAIN", 1)
    if engine != "numba":
        monkeypatch.setattr(_bilinear_rows, "kernels", lambda name: None)
        monkeypatch.setattr(roi_module, "_cpu_kernels", lambda tensor: None)
        monkeypatch.setattr(reference, "kernels", lambda name: None)  # the position-sensitive kernels
    x = torch.randn(2, 8, 7, 9, dtype=DT, requires_grad=True)
    rois = make_rois(6, 2, 7, 9, 0.5)
    offset = (torch.randn(6, 2, 2, 2, dtype=DT) * 2).requires_grad_()
    for fn, leaves in (
        (lambda impl: ops.roi_align(x, rois, 2, 0.5, -1, True, impl=impl), [x]),
        (lambda impl: ops.ps_roi_align(x, rois, 2, 0.5, 2, impl=impl), [x]),
        (lambda impl: ops.roi_pool(x, rois, 2, 0.5, impl=impl), [x]),
        (lambda impl: ops.ps_roi_pool(x, rois, 2, 0.5, impl=impl), [x]),
        (lambda impl: ops.deform_roi_pool(x, rois, offset, 2, 0.5, 0, 0.3, impl=impl), [x, offset]),
        (lambda impl: ops.deform_ps_roi_pool(x, rois, offset, 2, 2, 2, 2, 3, 0.3, 0.5, impl=impl), [x, offset]),
    ):
        results = []
        for impl in IMPLS:
            out = fn(impl)
            weight = torch.arange(out.numel(), dtype=DT).view_as(out)
            results.append((out, torch.autograd.grad((out * weight).sum(), leaves)))
        (a, ga), (b, gb) = results
        torch.testing.assert_close(a, b)
        for u, v in zip(ga, gb):
            torch.testing.assert_close(u, v)


def test_cpu_ops_run_the_numba_kernels(monkeypatch):
    """On CPU tensors the operators and their backwards run the Numba kernels (ops/roi/cpu.py and
    the row-gather engine), never the reference's autograd pooling or summed-area table."""
    from convzoo.ops import _numba
    from convzoo.ops.roi import cpu

    assert _numba.kernels(cpu.__name__) is cpu
    x = torch.randn(2, 12, 7, 9, dtype=DT, requires_grad=True)
    rois = make_rois(5, 2, 7, 9, 0.5)
    offset = torch.randn(5, 2, 2, 3, dtype=DT, requires_grad=True)
    calls = [
        (lambda impl: ops.roi_align(x, rois, (2, 3), 0.5, 2, impl=impl), [x]),
        (lambda impl: ops.ps_roi_align(x, rois, (2, 3), 0.5, 2, impl=impl), [x]),
        (lambda impl: ops.deform_roi_pool(x, rois, offset, (2, 3), 0.5, 2, impl=impl), [x, offset]),
        (lambda impl: ops.ps_roi_pool(x, rois, (2, 3), 0.5, impl=impl), [x]),
        (lambda impl: ops.roi_pool(x, rois, (2, 3), 0.5, impl=impl), [x]),
    ]
    wants = []
    for fn, leaves in calls:
        want = fn("reference")
        wants.append((want, torch.autograd.grad(want.sum(), leaves)))

    def fail(*args, **kwargs):
        raise AssertionError("the reference ran")

    for name in ("bilinear_pool", "ps_roi_pool", "ps_roi_pool_backward", "roi_pool_argmax", "roi_pool_backward"):
        monkeypatch.setattr(reference, name, fail)
    from convzoo.ops import _bilinear_rows

    monkeypatch.setattr(_bilinear_rows.torch, "bmm", fail)  # the gather's PyTorch fallback
    for (fn, leaves), (want, want_grads) in zip(calls, wants):
        got = fn("auto")
        torch.testing.assert_close(got, want)
        for u, v in zip(torch.autograd.grad(got.sum(), leaves), want_grads):
            torch.testing.assert_close(u, v)
