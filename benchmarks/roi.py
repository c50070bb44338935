"""RoI operators on a detection-like shape: convzoo vs the pure-PyTorch code a user would write.

Features 2x256x50x68 (a stride-16 map of an 800x1088 image), 512 RoIs, 7x7 bins, sampling
ratio 2. Baselines (there is no torchvision here):

* bilinear ops: one ``F.grid_sample`` per image over all of that image's sampling points
  (the usual pure-PyTorch RoIAlign), the bin mean taken afterwards; for deformable PS
  pooling every channel is sampled at every bin and the bin's own channel group picked
  afterwards (grid_sample cannot read a different channel per point);
* ``ps_roi_pool``: a loop over RoIs, ``F.adaptive_avg_pool2d`` of the crop and a pick of
  each bin's own channel.

Run: ``PYTHONPATH=. python benchmarks/roi.py [--repeats 5] [--rois 512] [--threads N]``. Prints a markdown table.
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from convzoo import ops

from _timing import median_ms

POOLED = 7
SAMPLING = 2


def make_rois(k: int, n: int, height: int, width: int, stride: int, generator: torch.Generator) -> torch.Tensor:
    img_h, img_w = height * stride, width * stride
    size = torch.rand(k, 2, generator=generator) * torch.tensor([img_w, img_h]) * 0.5 + 16
    centre = torch.rand(k, 2, generator=generator) * torch.tensor([img_w, img_h])
    batch = torch.randint(0, n, (k, 1), generator=generator).float()
    return torch.cat([batch, centre - size / 2, centre + size / 2], dim=1)


def align_points(rois: torch.Tensor, scale: float, offset: torch.Tensor | None = None, gamma: float = 0.1):
    """Sampling points (K, P, S) of RoIAlign (aligned, fixed sampling ratio), as a user writes them."""
    x1, y1, x2, y2 = (rois[:, i] * scale - 0.5 for i in range(1, 5))
    rw, rh = x2 - x1, y2 - y1
    steps = torch.arange(POOLED, dtype=rois.dtype)
    sub = (torch.arange(SAMPLING, dtype=rois.dtype) + 0.5) / SAMPLING
    ys = y1.view(-1, 1, 1, 1, 1) + (steps.view(1, -1, 1, 1, 1) + sub.view(1, 1, 1, -1, 1)) * (rh / POOLED).view(-1, 1, 1, 1, 1)
    xs = x1.view(-1, 1, 1, 1, 1) + (steps.view(1, 1, -1, 1, 1) + sub.view(1, 1, 1, 1, -1)) * (rw / POOLED).view(-1, 1, 1, 1, 1)
    if offset is not None:
        xs = xs + (gamma * rw).view(-1, 1, 1, 1, 1) * offset[:, 0].unsqueeze(-1).unsqueeze(-1)
        ys = ys + (gamma * rh).view(-1, 1, 1, 1, 1) * offset[:, 1].unsqueeze(-1).unsqueeze(-1)
    ys, xs = torch.broadcast_tensors(ys, xs)
    k = rois.shape[0]
    return ys.reshape(k, POOLED * POOLED, -1), xs.reshape(k, POOLED * POOLED, -1)


def grid_sample_pool(x: torch.Tensor, rois: torch.Tensor, ys: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
    """Mean over the samples of each bin, one grid_sample per image: (K, C, P)."""
    n, c, height, width = x.shape
    out = x.new_zeros(rois.shape[0], c, ys.shape[1])
    batch = rois[:, 0].long()
    for b in range(n):
        sel = (batch == b).nonzero().flatten()
        grid = torch.stack([(xs[sel] + 0.5) / width * 2 - 1, (ys[sel] + 0.5) / height * 2 - 1], dim=-1)
        sampled = F.grid_sample(x[b : b + 1], grid.reshape(1, -1, grid.shape[2], 2), align_corners=False)
        out = out.index_copy(0, sel, sampled.view(c, sel.numel(), -1, grid.shape[2]).mean(-1).transpose(0, 1))
    return out


def baseline_roi_align(x, rois, scale):
    ys, xs = align_points(rois, scale)
    return grid_sample_pool(x, rois, ys, xs).view(rois.shape[0], -1, POOLED, POOLED)


def baseline_deform_roi_pool(x, rois, offset, scale):
    ys, xs = align_points(rois, scale, offset)
    return grid_sample_pool(x, rois, ys, xs).view(rois.shape[0], -1, POOLED, POOLED)


def baseline_ps_roi_pool(x, rois, scale):
    height, width = x.shape[-2:]
    outs = []
    bins = POOLED * POOLED
    for roi in rois:
        b = int(roi[0])
        x1, y1, x2, y2 = (int(round(float(v) * scale)) for v in roi[1:])
        x1, y1 = min(max(x1, 0), width - 1), min(max(y1, 0), height - 1)
        x2, y2 = min(max(x2, x1 + 1), width), min(max(y2, y1 + 1), height)
        pooled = F.adaptive_avg_pool2d(x[b, :, y1:y2, x1:x2], POOLED)  # (C, 7, 7)
        pooled = pooled.view(-1, bins, bins)  # (Cout, bin channel, bin)
        outs.append(pooled.diagonal(dim1=1, dim2=2))  # each bin reads its own channel
    return torch.stack(outs).view(rois.shape[0], -1, POOLED, POOLED)


def baseline_deform_ps_roi_pool(x, rois, offset, scale, spp=4, trans_std=0.1):
    x1 = torch.round(rois[:, 1]) * scale - 0.5
    y1 = torch.round(rois[:, 2]) * scale - 0.5
    rw = ((torch.round(rois[:, 3]) + 1) * scale - 0.5 - x1).clamp(min=0.1)
    rh = ((torch.round(rois[:, 4]) + 1) * scale - 0.5 - y1).clamp(min=0.1)
    steps = torch.arange(POOLED, dtype=x.dtype)
    sub = torch.arange(spp, dtype=x.dtype) / spp
    ys = y1.view(-1, 1, 1, 1, 1) + (steps.view(1, -1, 1, 1, 1) + sub.view(1, 1, 1, -1, 1)) * (rh / POOLED).view(-1, 1, 1, 1, 1)
    xs = x1.view(-1, 1, 1, 1, 1) + (steps.view(1, 1, -1, 1, 1) + sub.view(1, 1, 1, 1, -1)) * (rw / POOLED).view(-1, 1, 1, 1, 1)
    xs = xs + (trans_std * rw).view(-1, 1, 1, 1, 1) * offset[:, 0].unsqueeze(-1).unsqueeze(-1)
    ys = ys + (trans_std * rh).view(-1, 1, 1, 1, 1) * offset[:, 1].unsqueeze(-1).unsqueeze(-1)
    ys, xs = torch.broadcast_tensors(ys, xs)
    k = rois.shape[0]
    pooled = grid_sample_pool(x, rois, ys.reshape(k, POOLED * POOLED, -1), xs.reshape(k, POOLED * POOLED, -1))
    pooled = pooled.view(k, -1, POOLED * POOLED, POOLED * POOLED)  # (K, Cout, bin channel, bin)
    return pooled.diagonal(dim1=2, dim2=3).reshape(k, -1, POOLED, POOLED)


def fwd_bwd(fn, *leaves):
    def run():
        out = fn()
        torch.autograd.grad(out.sum(), leaves)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rois", type=int, default=512)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: PyTorch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    n, c, height, width, stride = 2, 256, 50, 68, 16
    scale = 1.0 / stride
    x = torch.randn(n, c, height, width, generator=g).requires_grad_()
    x_ps = torch.randn(n, 10 * POOLED * POOLED, height, width, generator=g).requires_grad_()
    rois = make_rois(args.rois, n, height, width, stride, g)
    offset = (torch.randn(args.rois, 2, POOLED, POOLED, generator=g) * 0.5).requires_grad_()

    cases = [
        ("roi_align (aligned, sr=2)",
         lambda: ops.roi_align(x, rois, POOLED, scale, SAMPLING, True),
         lambda: baseline_roi_align(x, rois, scale), (x,)),
        ("deform_roi_pool (sr=2)",
         lambda: ops.deform_roi_pool(x, rois, offset, POOLED, scale, SAMPLING),
         lambda: baseline_deform_roi_pool(x, rois, offset, scale), (x, offset)),
        ("ps_roi_pool (490 ch -> 10)",
         lambda: ops.ps_roi_pool(x_ps, rois, POOLED, scale),
         lambda: baseline_ps_roi_pool(x_ps, rois, scale), (x_ps,)),
        ("deform_ps_roi_pool (490 ch -> 10, spp=4)",
         lambda: ops.deform_ps_roi_pool(x_ps, rois, offset, 10, POOLED, POOLED, POOLED, 4, 0.1, scale),
         lambda: baseline_deform_ps_roi_pool(x_ps, rois, offset, scale), (x_ps, offset)),
    ]
    print(f"threads={torch.get_num_threads()}, features {n}x{c}x{height}x{width} (ps: {n}x490), "
          f"{args.rois} RoIs, {POOLED}x{POOLED}, median of {args.repeats} after warm-up (ms)\n")
    print("| op | pass | convzoo | baseline | baseline / convzoo |")
    print("|---|---|---|---|---|")
    for name, ours, baseline, leaves in cases:
        for mode in ("fwd", "fwd+bwd"):
            if mode == "fwd":
                def run_ours(fn=ours):
                    with torch.no_grad():
                        fn()

                def run_base(fn=baseline):
                    with torch.no_grad():
                        fn()
            else:
                run_ours, run_base = fwd_bwd(ours, *leaves), fwd_bwd(baseline, *leaves)
            t_ours = median_ms(run_ours, args.repeats)
            t_base = median_ms(run_base, args.repeats)
            print(f"| {name} | {mode} | {t_ours:.1f} | {t_base:.1f} | {t_base / t_ours:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
