"""The segmentation side of ``convzoo train --task segmentation``: options, data, report lines.

Data: ``--data DIR`` in ADE20K's layout (``images/{training,validation}``,
``annotations/{training,validation}``) or the generic one (``images/{train,val}``,
``masks/{train,val}``, masks named like their images), checked file by file before training;
without ``--data`` the built-in band data set (:class:`convzoo.train.segdata.BandsDataset`).
"""
from __future__ import annotations

import json
import os
import sys

from . import UsageError, parse_model_args

DEFAULT_MODEL = "semfpn_replknet_tiny"
DEFAULTS = {"model": DEFAULT_MODEL, "train_size": 2048, "val_size": 256, "batch_size": 16}
HEAD_PREFIXES = ("upernet_", "semfpn_")
_SEG_ONLY = ("num_classes", "reduce_zero_label", "eval_size", "pretrained_backbone")


def add_arguments(parser) -> None:
    group = parser.add_argument_group("segmentation (--task segmentation)")
    group.add_argument("--num-classes", type=int, metavar="N",
                       help="mask folders: number of classes (default: the largest id in the training masks + 1; ADE20K: 150)")
    group.add_argument("--reduce-zero-label", action="store_true",
                       help="ADE20K's convention: mask id 0 ('other') is ignored and ids k > 0 become k - 1")
    group.add_argument("--eval-size", type=int, metavar="PX",
                       help="mask folders: short side of the validation images (default: --image-size)")
    group.add_argument("--pretrained-backbone", metavar="PATH",
                       help="backbone checkpoint (the family's official layout or convzoo's) for the model's backbone")


def reject_segmentation_options(args) -> None:
    """A :class:`UsageError` for segmentation options given to another task, and for a
    segmentation model trained as a classifier."""
    given = [f"--{name.replace('_', '-')}" for name in _SEG_ONLY if getattr(args, name, None) not in (None, False)]
    if given:
        raise UsageError(f"{', '.join(given)} only apply to --task segmentation")
    if args.model is not None and args.model.startswith(HEAD_PREFIXES):
        raise UsageError(f"{args.model} is a segmentation model; add --task segmentation")


def check_model(name: str) -> None:
    if not name.startswith(HEAD_PREFIXES):
        raise UsageError(f"--task segmentation needs a segmentation model (upernet_<backbone> or semfpn_<backbone>, "
                         f"see `convzoo list 'semfpn_*'`), got {name}")


def build_datasets(args):
    """(train set, val set, num_classes, description) of ``--task segmentation``."""
    from ..train.data import DataError
    from ..train.segdata import BandsConfig, BandsDataset, segmentation_folder_splits

    check_model(args.model)
    if args.mixup or args.cutmix or args.randaugment:
        raise UsageError("--mixup, --cutmix and --randaugment are classification options; segmentation uses its own "
                         "joint resize/crop/flip/photometric augmentation")
    if args.data:
        if not os.path.isdir(args.data):
            raise UsageError(f"data folder not found: {args.data}")
        size = args.image_size or 512
        try:
            splits = segmentation_folder_splits(args.data, size, args.num_classes, args.reduce_zero_label,
                                                eval_size=args.eval_size or size)
        except DataError as err:
            raise UsageError(str(err)) from None
        train_set, val_set = splits["train"], splits["val"]
        info = {**train_set.describe(), "image_size": size, "eval_size": args.eval_size or size,
                "unreadable_train": len(train_set.unreadable), "unreadable_val": len(val_set.unreadable)}
        return train_set, val_set, train_set.num_classes, info
    if args.image_size:
        raise UsageError("the built-in band data set's size is set by --data-arg height=H --data-arg width=W, not --image-size")
    if args.num_classes is not None:
        raise UsageError("the built-in band data set's classes are its marker colours: use --data-arg num_colours=N")
    try:
        config = BandsConfig(num_train=args.train_size, num_val=args.val_size, seed=args.data_seed,
                             **parse_model_args(args.data_arg))
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    train_set, val_set = BandsDataset("train", config), BandsDataset("val", config)
    return train_set, val_set, train_set.num_classes, train_set.describe()


def model_kwargs(args) -> dict:
    if args.pretrained_backbone is None:
        return {}
    if not os.path.isfile(args.pretrained_backbone):
        raise UsageError(f"backbone checkpoint not found: {args.pretrained_backbone}")
    return {"pretrained_backbone": args.pretrained_backbone}


def trainer_class():
    from ..train.segmentation import SegmentationTrainer

    return SegmentationTrainer


def epoch_line(record: dict) -> str:
    line = (f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} pixel acc {record['train_acc']:.1f}% | "
            f"val mIoU {record['val_miou']:.2f}% aAcc {record['val_aacc']:.2f}% loss {record['val_loss']:.4f}")
    if "ema_val_miou" in record:
        line += f" | EMA mIoU {record['ema_val_miou']:.2f}%"
    return line + f" | {record['train_images_per_second']:.1f} img/s, {record['train_seconds']:.0f} s"


def print_summary(args, output: str, history, elapsed: float, data_info: dict) -> None:
    from ..train.loop import best_epoch
    from .train import _duration

    final = history[-1] if history else {}
    key = "ema_val_miou" if "ema_val_miou" in final else "val_miou"
    best = best_epoch(history, key)
    summary = {
        "task": "segmentation",
        "model": args.model,
        "epochs": len(history),
        "final_val_miou": final.get(key),
        "final_val_aacc": final.get(key.replace("miou", "aacc")),
        "best_val_miou": best[key] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "weights": "ema" if key.startswith("ema") else "model",
        "skipped_train_images": final.get("train_skipped_total", 0) + data_info.get("unreadable_train", 0),
        "skipped_val_images": final.get("val_skipped", 0) + data_info.get("unreadable_val", 0),
        "seconds_this_run": round(elapsed, 1),
        "checkpoint": os.path.join(output, "checkpoint.pt"),
        "model_file": os.path.join(output, "model.safetensors"),
    }
    with open(os.path.join(output, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    print("\nsummary", file=sys.stdout)
    print(f"  model           {args.model} ({summary['weights']} weights)")
    print(f"  val mIoU / aAcc {summary['final_val_miou']:.2f}% / {summary['final_val_aacc']:.2f}% after {summary['epochs']} epochs"
          f" (best mIoU {summary['best_val_miou']:.2f}% at epoch {summary['best_epoch']})")
    print(f"  skipped files   {summary['skipped_train_images']} train, {summary['skipped_val_images']} val (unreadable)")
    print(f"  time            {_duration(elapsed)} this run")
    print(f"  written         {summary['model_file']}, {summary['checkpoint']}, {os.path.join(output, 'metrics.jsonl')}")
