"""``convzoo study NAME``: one of RepLKNet's guidelines as a small training experiment."""
from __future__ import annotations

import argparse
import json
import os
import textwrap

from . import UsageError
from ._tools import positive_int

_EPILOG = """\
Every variant of the study is the demo segmentation model of `convzoo train --task segmentation`
(a narrow 3-stage RepLKNet, kernels 31-29-27, with a light Semantic FPN head) changed in one
respect, trained on the built-in band data set (each band's class is the colour of a marker up
to the image width away) for the same budget, once per seed. The table reports the validation
mIoU of the last epoch. Results go to OUT/study-NAME.md, .json and .png.

studies:
  kernel-size        stage kernels 3-3-3, 7-7-7, 13-13-13, 31-29-27
  shortcut           31-29-27 with and without the RepLK blocks' identity shortcut (guideline 2)
  reparam            31-29-27 with and without the parallel 5x5 kernel (guideline 3)
  small-maps         a 3x3 or a 13x13 kernel in the last stage, on maps 2 rows high (guideline 5)
  dilated-vs-dense   dense 31x31 kernels against 7x7 kernels with dilation 5 (the same span)

examples:
  convzoo study kernel-size --epochs 4 --train-size 1024 --seeds 0 1 --out studies/
  convzoo study shortcut --epochs 1 --train-size 64 --val-size 32 --out /tmp/quick"""


def register(subparsers) -> None:
    from ..train.studies import STUDIES

    parser = subparsers.add_parser(
        "study", help="run one of RepLKNet's guideline studies (small training runs), write a table and a figure",
        description=textwrap.fill("Train the variants of a named study on the built-in dense task for a "
                                  "fixed budget and write a markdown table, a JSON file and a bar chart.", 92),
        epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("name", choices=sorted(STUDIES), metavar="NAME", help=f"one of {', '.join(STUDIES)}")
    parser.add_argument("--epochs", type=positive_int, default=4, help="epochs per run (default: 4)")
    parser.add_argument("--train-size", type=positive_int, default=1024, metavar="N", help="training images per epoch (default: 1024)")
    parser.add_argument("--val-size", type=positive_int, default=256, metavar="N", help="validation images (default: 256)")
    parser.add_argument("--batch-size", type=positive_int, default=16, metavar="N", help="images per step (default: 16)")
    parser.add_argument("--lr", type=float, default=2e-3, help="peak AdamW learning rate (default: 2e-3)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="S", help="one run per seed (default: 0)")
    parser.add_argument("--width", type=positive_int, default=256, metavar="PX", help="band image width (default: 256)")
    parser.add_argument("--threads", type=positive_int, metavar="N", help="torch threads (default: torch's)")
    parser.add_argument("--out", default="studies", metavar="DIR", help="output folder (default: ./studies)")
    parser.set_defaults(func=run)


def run(args) -> int:
    import torch

    from ..analysis.plotting import bar_chart
    from ..train.studies import StudyBudget, markdown_table, run_study, to_json

    if args.lr <= 0:
        raise UsageError(f"--lr must be > 0, got {args.lr}")
    try:
        budget = StudyBudget(epochs=args.epochs, train_size=args.train_size, val_size=args.val_size,
                             batch_size=args.batch_size, lr=args.lr, seeds=tuple(args.seeds), width=args.width)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out must be a folder, got the file {args.out}")
    os.makedirs(args.out, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_study(args.name, budget, on_run=lambda label, seed, miou: print(f"{label} (seed {seed}): val mIoU {miou:.2f}%", flush=True))
    base = os.path.join(args.out, f"study-{args.name}")
    table = markdown_table(args.name, budget, results)
    with open(base + ".md", "w") as f:
        f.write(table)
    with open(base + ".json", "w") as f:
        json.dump(to_json(args.name, budget, results), f, indent=2)
    bar_chart([r.label for r in results], [r.miou for r in results],
              f"convzoo study {args.name}: val mIoU after {budget.epochs} epoch(s)", "%").save(base + ".png")
    print(table)
    print(f"wrote {base}.md, {base}.json, {base}.png")
    return 0
