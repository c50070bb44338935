"""CPU benchmark: INT8 (``convzoo.deploy.quantize``) vs FP32 of the light family, in the same runtime.

For each model (random weights, ImageNet size: 1000 classes, 224x224) and backend, the float
model and its INT8 form are written the way ``convzoo quantize`` writes them (onnxruntime: the
ONNX export and its QDQ quantization; inductor: the ``torch.export`` program and its torchao PT2E
quantization, both run through ``torch.compile`` with freezing), and timed side by side in that
runtime: median ms at each batch size (warm-up first, at least 3 runs or about a second).
Calibration: 32 images of the built-in data set at 224 px (speed and size do not depend on them).
File sizes are those of the two files.

Usage: python benchmarks/quantize_cpu.py --model mobilenetv2_100 [--backend onnxruntime inductor] [--batch 1 32]
Prints one markdown row per model and backend and appends the rows as JSON to --json.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

import torch

import convzoo
from convzoo.deploy import quantize
from convzoo.train.data import RelationConfig, RelationDataset


def calibration_images(count: int, size: int) -> torch.Tensor:
    data = RelationDataset("train", RelationConfig(image_size=size, num_train=count))
    return torch.stack([data[i][0] for i in range(count)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--backend", nargs="+", default=["onnxruntime", "inductor"])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = calibration_images(32, args.size)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}, {args.size}x{args.size}, start {time.strftime('%H:%M:%S')}, "
          f"load {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("| model | backend | FP32 MiB | INT8 MiB | smaller | " + " | ".join(
        f"B={b} FP32 ms | B={b} INT8 ms | B={b} speed-up" for b in args.batch) + " |")
    print("|---|---|---:|---:|---:|" + "---:|---:|---:|" * len(args.batch))
    for name in args.model:
        torch.manual_seed(0)
        model = convzoo.create_model(name).eval()
        for backend in args.backend:
            suffix = ".onnx" if backend == "onnxruntime" else ".pt2"
            with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
                warnings.simplefilter("ignore")
                report = quantize(model, images, os.path.join(folder, name + suffix), backend=backend,
                                  eval_images=images[:1], speed_batches=args.batch)
            cells = " | ".join(f"{report.speed_ms[b][0]:.1f} | {report.speed_ms[b][1]:.1f} | {report.speedup(b):.2f}x"
                               for b in args.batch)
            print(f"| `{name}` | {backend} | {report.fp32_bytes / 2**20:.1f} | {report.int8_bytes / 2**20:.1f} | "
                  f"{report.size_ratio:.2f}x | {cells} |", flush=True)
            if args.json:
                with open(args.json, "a") as handle:
                    handle.write(json.dumps({"model": name, **report.to_dict()}) + "\n")
    print(f"(end {time.strftime('%H:%M:%S')}, load {' '.join(f'{x:.2f}' for x in os.getloadavg())})")


if __name__ == "__main__":
    main()
