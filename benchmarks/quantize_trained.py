"""Accuracy of INT8 (``convzoo.deploy.quantize``) on models trained by ``convzoo train`` on the built-in data.

For each ``RUNS/<model>/model.safetensors``: calibration on 300 images of the built-in training
split, evaluation on the validation split (``--val-size`` images, the ones training reported
on), both with the data options the run was trained with (read from its ``checkpoint.pt``), plain PTQ and ``keep_float="auto"`` in each backend; FP32 and INT8 top-1, top-1 agreement,
output SQNR, the layers kept float. Also the model's top-1 before and after
``convzoo.deploy.hardware_friendly`` (LUT style) and how many activations it swapped.

Usage: python benchmarks/quantize_trained.py --runs /tmp/runs --model mobilenetv2_100 [--backend onnxruntime inductor]
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
import warnings

import torch

from convzoo.deploy import hardware_friendly, quantize
from convzoo.models import load_model
from convzoo.train.data import RelationConfig, RelationDataset


def data_options(run: str) -> dict:
    """The built-in data set's options the run in folder ``run`` was trained with."""
    meta = torch.load(os.path.join(run, "checkpoint.pt"), map_location="cpu", weights_only=False)["meta"]
    return {k: v for k, v in meta["data"].items() if k not in ("kind", "num_train", "num_val")}


def split(name: str, count: int, options: dict):
    data = RelationDataset(name, RelationConfig(num_train=max(count, 1), num_val=max(count, 1), **options))
    samples = [data[i] for i in range(count)]
    return torch.stack([s[0] for s in samples]), torch.tensor([s[1] for s in samples])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", required=True)
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--backend", nargs="+", default=["onnxruntime"])
    parser.add_argument("--keep-float", nargs="+", default=["none", "auto"])
    parser.add_argument("--val-size", type=int, default=1024)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), start {time.strftime('%H:%M:%S')}")
    print("| model | backend | keep float | FP32 top-1 | INT8 top-1 | change | agreement | SQNR dB | kept float |")
    print("|---|---|---|---:|---:|---:|---:|---:|---|")
    for name in args.model:
        options = data_options(os.path.join(args.runs, name))
        calibration, _ = split("train", 300, options)
        images, labels = split("val", args.val_size, options)
        print(f"data of `{name}`: {options}")
        model = load_model(os.path.join(args.runs, name, "model.safetensors")).eval()
        for backend in args.backend:
            for keep in args.keep_float:
                suffix = ".onnx" if backend == "onnxruntime" else ".pt2"
                with tempfile.TemporaryDirectory() as folder, warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    report = quantize(model, calibration, os.path.join(folder, name + suffix), backend=backend,
                                      keep_float="auto" if keep == "auto" else (), eval_images=images,
                                      eval_labels=labels, speed_batches=())
                kept = ", ".join(report.kept_float) or "-"
                print(f"| `{name}` | {backend} | {keep} | {report.fp32_top1:.2f} | {report.int8_top1:.2f} | "
                      f"{report.int8_top1 - report.fp32_top1:+.2f} | {100 * report.top1_agreement:.1f}% | "
                      f"{report.sqnr_db:.1f} | {kept} |", flush=True)
                if args.json:
                    with open(args.json, "a") as handle:
                        handle.write(json.dumps({"model": name, "keep": keep, **report.to_dict()}) + "\n")
        with torch.no_grad():
            before = 100 * float((model(images).argmax(1) == labels).double().mean())
            swap = hardware_friendly(model, images)
            after = 100 * float((model(images).argmax(1) == labels).double().mean())
        print(f"activation swap `{name}`: {len(swap.swapped)} swapped, top-1 {before:.2f} -> {after:.2f}", flush=True)
    print(f"(end {time.strftime('%H:%M:%S')})")


if __name__ == "__main__":
    main()
