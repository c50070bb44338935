"""CPU benchmark: convzoo's deform_conv2d and RoI operators vs torchvision's C++ CPU kernels.

RoI cases: roi_align, ps_roi_align, roi_pool and ps_roi_pool (torchvision's four RoI operators).
``--only roi`` runs those alone. The last column is the fraction of the machine's float32 limit
(the measured matmul peak of ``_timing.peak_gflops``) that the forward's FLOPs
(``FlopCounterMode``'s count of our call) reach; "-" where no FLOP formula applies.

torchvision is not a dependency of convzoo (and the package is kept free of it): it runs in a
separate virtual environment, e.g.::

    python3 -m venv /work/venvs/tv && /work/venvs/tv/bin/pip install torch==2.14.1 torchvision==0.29.1

This script (run with convzoo's Python) starts that environment's Python once as a worker, saves
each case's inputs to a file both load, checks that the outputs agree, then times the two side by
side, alternating rounds (ours, torchvision, ours, ...) so that both see the same load. Each cell
is the median over rounds of a median of ``--repeats`` calls; both run with ``--threads`` threads.
``--busy`` keeps one core busy with one other process meanwhile. The first call of each of our
operators (Numba compiling its kernels, or loading them from the disk cache) is timed and printed.

    PYTHONPATH=. python benchmarks/torchvision_cpu.py --python /work/venvs/tv/bin/python [--busy]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from convzoo import ops

from _timing import busy_core, median_ms, peak_gflops

WORKER = r"""
import json, statistics, sys, time
import torch, torchvision.ops as tvops
torch.set_num_threads(int(sys.argv[1]))

def median_ms(run, repeats):
    run()
    times = []
    for _ in range(repeats):
        start = time.perf_counter(); run(); times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)

for line in sys.stdin:
    request = json.loads(line)
    inputs = torch.load(request["path"])
    op = getattr(tvops, request["op"])
    kwargs = request["kwargs"]
    if request["mode"] == "check":
        with torch.no_grad():
            out = op(*inputs, **kwargs)
        torch.save(out, request["path"] + ".out")
        print(json.dumps({"ok": True}), flush=True)
        continue
    leaves = [t.requires_grad_() if i in request["grad"] else t for i, t in enumerate(inputs)]
    if request["mode"] == "fwd":
        def run():
            with torch.no_grad():
                op(*leaves, **kwargs)
    else:
        def run():
            out = op(*leaves, **kwargs)
            out.backward(torch.ones_like(out))
    print(json.dumps({"ms": median_ms(run, request["repeats"])}), flush=True)
"""

POOLED = 7


def rois_for(k: int, n: int, height: int, width: int, stride: int, generator) -> torch.Tensor:
    img_h, img_w = height * stride, width * stride
    size = torch.rand(k, 2, generator=generator) * torch.tensor([img_w, img_h]) * 0.5 + 16
    centre = torch.rand(k, 2, generator=generator) * torch.tensor([img_w, img_h])
    batch = torch.randint(0, n, (k, 1), generator=generator).float()
    return torch.cat([batch, centre - size / 2, centre + size / 2], dim=1)


def cases():
    """(name, op name, inputs, indices of inputs that get gradients, torchvision kwargs, our call)."""
    generator = torch.Generator().manual_seed(0)
    out = []
    for label, n, c, size, mask in (("ResNet conv3 128ch 28x28 v2", 8, 128, 28, True),
                                    ("ResNet conv5 512ch 7x7 v2", 8, 512, 7, True),
                                    ("64ch 56x56 v1", 2, 64, 56, False)):
        x = torch.randn(n, c, size, size, generator=generator)
        offset = torch.randn(n, 18, size, size, generator=generator)
        weight = torch.randn(c, c, 3, 3, generator=generator) * 0.05
        # Both take (input, offset, weight, bias, stride, padding, dilation, mask).
        inputs = [x, offset, weight, None, (1, 1), (1, 1), (1, 1),
                  torch.rand(n, 9, size, size, generator=generator) if mask else None]
        grads = [0, 1, 2, 7] if mask else [0, 1, 2]
        out.append((f"deform_conv2d {label}", "deform_conv2d", inputs, grads, {}, ops.deform_conv2d))
    features = torch.randn(2, 256, 50, 68, generator=generator)
    rois = rois_for(512, 2, 50, 68, 16, generator)
    out.append(("roi_align 2x256x50x68, 512 RoIs, 7x7, ratio 2, aligned", "roi_align", [features, rois], [0],
                {"output_size": POOLED, "spatial_scale": 1 / 16, "sampling_ratio": 2, "aligned": True},
                lambda f, r: ops.roi_align(f, r, POOLED, 1 / 16, 2, aligned=True)))
    ps_features = torch.randn(2, 490, 50, 68, generator=generator)
    out.append(("ps_roi_pool 2x490x50x68, 512 RoIs, 7x7", "ps_roi_pool", [ps_features, rois], [0],
                {"output_size": POOLED, "spatial_scale": 1 / 16},
                lambda f, r: ops.ps_roi_pool(f, r, POOLED, 1 / 16)))
    out.append(("ps_roi_align 2x490x50x68, 512 RoIs, 7x7, ratio 2", "ps_roi_align", [ps_features, rois], [0],
                {"output_size": POOLED, "spatial_scale": 1 / 16, "sampling_ratio": 2},
                lambda f, r: ops.ps_roi_align(f, r, POOLED, 1 / 16, 2)))
    out.append(("roi_pool 2x256x50x68, 512 RoIs, 7x7", "roi_pool", [features, rois], [0],
                {"output_size": POOLED, "spatial_scale": 1 / 16},
                lambda f, r: ops.roi_pool(f, r, POOLED, 1 / 16)))
    return out


def forward_flops(call, inputs) -> int:
    """FLOPs of our forward as FlopCounterMode counts them (0 without a formula)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.no_grad():
        call(*inputs)
    return counter.get_total_flops()


class Worker:
    def __init__(self, python: str, threads: int):
        self.process = subprocess.Popen([python, "-c", WORKER, str(threads)], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True)

    def ask(self, **request) -> dict:
        self.process.stdin.write(json.dumps(request) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError("the torchvision worker died")
        return json.loads(line)

    def close(self):
        self.process.stdin.close()
        self.process.wait()


def ours_runner(call, inputs, grads, mode):
    leaves = [t.clone().requires_grad_() if t is not None and i in grads else t for i, t in enumerate(inputs)]
    if mode == "fwd":
        def run():
            with torch.no_grad():
                call(*leaves)
    else:
        def run():
            out = call(*leaves)
            out.backward(torch.ones_like(out))
    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", default="/work/venvs/tv/bin/python", help="a Python with torchvision")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--busy", action="store_true", help="keep one core busy with another process")
    parser.add_argument("--only", choices=("all", "roi"), default="all", help="roi: the RoI operators only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    peak = peak_gflops(args.threads)
    worker = Worker(args.python, args.threads)
    busy = None
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            for index, (name, op, inputs, grads, kwargs, call) in enumerate(cases()):
                if args.only == "roi" and op == "deform_conv2d":
                    continue
                flops = forward_flops(call, inputs)
                path = str(Path(tmp) / f"case{index}.pt")
                torch.save(inputs, path)
                start = time.perf_counter()
                with torch.no_grad():
                    ours = call(*inputs)
                first = time.perf_counter() - start
                worker.ask(path=path, op=op, kwargs=kwargs, mode="check")
                torch.testing.assert_close(ours, torch.load(path + ".out"), rtol=1e-3, atol=1e-3)
                print(f"{name}: first call {first:.2f} s; outputs agree", file=sys.stderr)
                if args.busy and busy is None:
                    busy = busy_core()
                for mode in ("fwd", "fwd+bwd"):
                    t_ours, t_tv = [], []
                    for _ in range(args.rounds):
                        t_ours.append(median_ms(ours_runner(call, inputs, grads, mode), args.repeats))
                        t_tv.append(worker.ask(path=path, op=op, kwargs=kwargs, mode=mode, grad=grads,
                                               repeats=args.repeats)["ms"])
                    rows.append((name, mode, statistics.median(t_ours), statistics.median(t_tv),
                                 flops if mode == "fwd" else 0))
        finally:
            if busy is not None:
                busy.terminate()
            worker.close()
    load = "one other process keeps a core busy" if args.busy else "quiet"
    print(f"convzoo on torch {torch.__version__} vs torchvision in {args.python}; {args.threads} threads; {load}; "
          f"median of {args.rounds} rounds x {args.repeats} calls (ms); float32 peak {peak:.0f} GFLOP/s\n")
    print("| case | pass | convzoo | torchvision | speed-up | of the float32 peak |")
    print("|---|---|---:|---:|---:|---:|")
    for name, mode, ours_ms, tv_ms, flops in rows:
        fraction = f"{flops / ours_ms / 1e6 / peak:.1%}" if flops else "-"
        print(f"| {name} | {mode} | {ours_ms:.2f} | {tv_ms:.2f} | {tv_ms / ours_ms:.2f}x | {fraction} |")


if __name__ == "__main__":
    main()
