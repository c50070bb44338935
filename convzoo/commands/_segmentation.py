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
DEFAULTS = {"model": DEFAULT_MODEL, "train_size": 2048, "val_size": 256, "batch_size": 16, "epochs": 5}
# The demo model, used when --model is left out: a narrow three-stage RepLKNet (kernels
# 31-29-27 at strides 4-8-16, 0.87 M parameters with the head) and a light Semantic FPN head.
# The 3x3 baseline adds --model-arg "kernel_sizes=(3,3,3)" --model-arg small_kernel=None.
DEMO_MODEL_ARGS = {"kernel_sizes": (31, 29, 27), "depths": (1, 1, 2), "channels": (32, 64, 128),
                   "head_channels": 32, "head_fpn_channels": 64}
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


def write_summary(args, output: str, history, elapsed: float, data_info: dict) -> str:
    """The segmentation run's ``summary.json`` (mIoU / aAcc); returns the table to print."""
    from .train import SummaryMetrics, write_summary

    metrics = SummaryMetrics("miou", "aacc", "val mIoU / aAcc", "best mIoU", "skipped files")
    unreadable = (data_info.get("unreadable_train", 0), data_info.get("unreadable_val", 0))
    return write_summary(args, output, history, elapsed, metrics, task_fields={"task": "segmentation"},
                         unreadable=unreadable)


# ------------------------------------------------------------------------------ convzoo eval

def add_eval_arguments(parser) -> None:
    group = parser.add_argument_group("segmentation (--task segmentation, or a segmentation training checkpoint)")
    group.add_argument("--task", choices=("classification", "segmentation"), default=None,
                       help="what the model does (default: the training checkpoint's task, else classification)")
    group.add_argument("--mode", choices=("whole", "slide"), default="whole",
                       help="inference on the whole image or by sliding --crop-size windows (default: whole)")
    group.add_argument("--crop-size", type=int, metavar="PX", help="--mode slide: window side (default: --image-size)")
    group.add_argument("--stride", type=int, metavar="PX", help="--mode slide: window step (default: 2/3 of the window)")
    group.add_argument("--flip", action="store_true", help="average with the horizontally flipped image")
    group.add_argument("--reduce-zero-label", action="store_true", help="ADE20K's convention (see convzoo train)")


def is_segmentation_eval(args, state) -> bool:
    task = args.task or (state or {}).get("meta", {}).get("task") or (
        "segmentation" if args.model.startswith(HEAD_PREFIXES) else "classification")
    if task == "segmentation":
        check_model(args.model)
    return task == "segmentation"


def _eval_dataset(args, state, num_classes: int):
    from ..train.data import DataError
    from ..train.segdata import BandsConfig, BandsDataset, segmentation_folder_splits

    data = dict((state or {}).get("meta", {}).get("data", {}))
    if args.data:
        if not os.path.isdir(args.data):
            raise UsageError(f"data folder not found: {args.data}")
        size = args.image_size or data.get("eval_size") or 512
        reduce = args.reduce_zero_label or bool(data.get("reduce_zero_label", False))
        try:
            return segmentation_folder_splits(args.data, size, num_classes, reduce, eval_size=size, splits=("val",))["val"]
        except DataError as err:
            raise UsageError(str(err)) from None
    if data.get("kind") != "builtin-bands":
        raise UsageError(f"{args.checkpoint} does not record a built-in band data set; pass --data DIR")
    data.pop("kind")
    try:
        return BandsDataset("val", BandsConfig(**data))
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None


def _class_names(dataset, num_classes: int):
    names = getattr(dataset, "classes", None)
    return list(names) if names and len(names) == num_classes else [str(k) for k in range(num_classes)]


def run_eval(args, state, device, load_model) -> int:
    """``convzoo eval`` of a segmentation model: mIoU, aAcc, mAcc and the per-class IoU table."""
    import torch
    from torch.utils.data import DataLoader

    from .. import reparameterize
    from ..train.data import EpochSampler
    from ..train.segdata import seg_collate
    from ..train.segmentation import evaluate_segmentation

    model, weights = load_model(args, None, state)
    num_classes = model.num_classes
    dataset = _eval_dataset(args, state, num_classes)
    if dataset.num_classes != num_classes:
        raise UsageError(f"the model has {num_classes} classes but the data has {dataset.num_classes}")
    if args.mode == "slide" and not (args.crop_size or args.image_size):
        raise UsageError("--mode slide needs --crop-size PX (or --image-size)")
    if args.reparam:
        reparameterize(model)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).eval()
    batch = 1 if args.data else args.batch_size  # folder images differ in size
    loader = DataLoader(dataset, batch_size=batch, sampler=EpochSampler(len(dataset), shuffle=False),
                        num_workers=args.workers or 0, collate_fn=seg_collate, pin_memory=device.type == "cuda")
    result = evaluate_segmentation(model, loader, device, num_classes, args.amp, args.channels_last, mode=args.mode,
                                   crop_size=args.crop_size or args.image_size, stride=args.stride, flip=args.flip)
    names = _class_names(dataset, num_classes)
    report = {
        "task": "segmentation", "model": args.model, "checkpoint": args.checkpoint, "weights": weights,
        "reparameterized": bool(args.reparam), "mode": args.mode, "flip": bool(args.flip),
        "miou": result.miou, "aacc": result.aacc, "macc": result.macc, "loss": result.loss,
        "iou": dict(zip(names, result.iou)), "images": result.num_images, "skipped_images": result.skipped,
        "seconds": result.seconds, "device": str(device),
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    form = "re-parameterized" if args.reparam else "as trained"
    print(f"{args.model} ({form}, {weights} weights) on {result.num_images} images, {args.mode} inference"
          + (" + flip" if args.flip else "") + (f" ({result.skipped} unreadable, skipped)" if result.skipped else ""))
    print(f"  mIoU        {result.miou:.2f}%")
    print(f"  aAcc        {result.aacc:.2f}%")
    print(f"  mAcc        {result.macc:.2f}%")
    print(f"  loss        {result.loss:.4f}")
    print(f"  throughput  {result.images_per_second:.1f} img/s on {device}")
    width = max(len("class"), *(len(n) for n in names))
    print(f"\n  {'class':<{width}}  IoU (%)")
    for name, iou in zip(names, result.iou):
        print(f"  {name:<{width}}  {'n/a' if iou != iou else f'{iou:6.2f}'}")
    if result.skipped:
        print(f"warning: {result.skipped} unreadable images were skipped", file=sys.stderr)
    return 0
