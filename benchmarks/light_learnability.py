"""Why the BatchNorm light models do not learn the built-in data: three small tasks on its images.

For each model, a short AdamW run (``--steps`` steps of ``--batch-size`` fresh images, lr
``--lr``, label smoothing 0.1, weight decay 0.05 on weights only, like ``convzoo train``) on:

- ``local``: the built-in images (colour relation), labelled by the colour of the mark in the
  LEFT quarter (red or green, read off the image: the sign of R - G summed over that quarter);
  no relation, only a colour at a random position;
- ``fixed``: the colour relation (same / other colour of the two marks), with the two marks
  always at the same place (rows 13-17, columns 1-5 and S-7..S-3), random shapes and colours;
- ``builtin``: the built-in colour relation itself (marks at random heights and columns).

Printed per task: the mean training accuracy of the last 20 steps (each batch scored before
its update, so on images never seen), and on 512 held-out images the accuracy with BatchNorm in
train mode (batch statistics), in eval mode (the running statistics training left), and in
eval mode after recalibrating the running statistics (cumulative average over 10 batches of
64 training images).

Usage: python benchmarks/light_learnability.py --model mobilenetv3_small_100 --task local fixed builtin
"""
from __future__ import annotations

import argparse
import ast
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from convzoo.models import create_model
from convzoo.train.data import COLOURS, SHAPES, RelationConfig, RelationDataset
from convzoo.train.loop import param_groups


def builtin_batch(data: RelationDataset, start: int, count: int, epoch_key=()):
    samples = [data.sample((start + i) % len(data), epoch_key) for i in range(count)]
    return torch.from_numpy(np.stack([s[0] for s in samples])), torch.tensor([s[1] for s in samples])


def left_colour(images: torch.Tensor) -> torch.Tensor:
    """1 where the mark in the left quarter is green, 0 where it is red (from R - G)."""
    quarter = images.shape[-1] // 4
    return ((images[:, 0, :, :quarter] - images[:, 1, :, :quarter]).sum((1, 2)) < 0).long()


def fixed_batch(cfg: RelationConfig, seed: int, count: int):
    """The colour relation with both marks at fixed places (see the module docstring)."""
    rng = np.random.default_rng([seed, 7])
    size = cfg.image_size
    images = rng.normal(0.0, cfg.noise, (count, 3, size, size)).astype(np.float32)
    labels = []
    for image in images:
        colours = rng.integers(cfg.num_colours, size=2)
        for x, colour in ((1, colours[0]), (size - 7, colours[1])):
            shape = SHAPES[rng.integers(cfg.num_shapes)]
            image[:, 13:18, x:x + 5] += shape[None] * COLOURS[colour][:, None, None] * cfg.amplitude
        labels.append(int(colours[0] != colours[1]))
    return torch.from_numpy(images), torch.tensor(labels)


def batches(task: str, cfg: RelationConfig, data: RelationDataset, step: int, count: int):
    if task == "fixed":
        return fixed_batch(cfg, step, count)
    images, labels = builtin_batch(data, step * count, count, (0, step))
    return images, (left_colour(images) if task == "local" else labels)


def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return 100.0 * float((model(images).argmax(1) == labels).double().mean())


def run(name: str, model_args: dict, task: str, cfg: RelationConfig, steps: int, batch_size: int, lr: float) -> str:
    torch.manual_seed(0)
    model = create_model(name, num_classes=2, **model_args)
    optimizer = torch.optim.AdamW(param_groups(model, 0.05), lr=lr)
    data = RelationDataset("train", cfg)
    held_out = (fixed_batch(cfg, 10**6, 512) if task == "fixed"
                else batches(task, cfg, RelationDataset("val", cfg), 0, 512))
    right, start = [], time.perf_counter()
    model.train()
    for step in range(steps):
        images, labels = batches(task, cfg, data, step, batch_size)
        logits = model(images)
        loss = F.cross_entropy(logits, labels, label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        right.append(float((logits.argmax(1) == labels).double().mean()))
    with torch.no_grad():
        train_mode = sum(accuracy(model, held_out[0][i:i + 64], held_out[1][i:i + 64]) for i in range(0, 512, 64)) / 8
        eval_mode = accuracy(model.eval(), *held_out)
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.reset_running_stats()
                module.momentum = None  # cumulative average
        model.train()
        for k in range(10):
            model(batches(task, cfg, data, 10**5 + k, 64)[0])
        recalibrated = accuracy(model.eval(), *held_out)
    return (f"| `{name}` {model_args or ''} | {task} | {steps} | {100 * np.mean(right[-20:]):.1f} | {train_mode:.1f} | "
            f"{eval_mode:.1f} | {recalibrated:.1f} | {time.perf_counter() - start:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", action="append", required=True)
    parser.add_argument("--model-arg", action="append", default=[], help="KEY=VALUE for every model")
    parser.add_argument("--task", nargs="+", default=["local", "fixed", "builtin"], choices=["local", "fixed", "builtin"])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--noise", type=float, default=0.1)
    parser.add_argument("--amplitude", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model_args = {k: ast.literal_eval(v) for k, v in (item.split("=", 1) for item in args.model_arg)}
    cfg = RelationConfig(image_size=args.image_size, relation="colour", noise=args.noise, amplitude=args.amplitude)
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size}, lr {args.lr}, "
          f"image {args.image_size} px, noise {args.noise}, amplitude {args.amplitude}, start {time.strftime('%H:%M:%S')}")
    print("| model | task | steps | train acc (last 20 steps) | held-out, BN train mode | BN eval mode | "
          "BN recalibrated | s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name in args.model:
        for task in args.task:
            print(run(name, model_args, task, cfg, args.steps, args.batch_size, args.lr), flush=True)


if __name__ == "__main__":
    main()
