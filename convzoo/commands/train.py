"""``convzoo train``: train an image classifier on an image folder or on the built-in data set."""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import sys
import time
from typing import NamedTuple, Optional, Tuple

from . import UsageError, create_model_or_exit, parse_model_args
from ._tools import positive_int
from . import _qat
from . import _segmentation as _seg

DEFAULT_MODEL = "replknet_tiny"

_logger = logging.getLogger(__name__)

_DESCRIPTION = """\
Train an image classifier (default) or, with --task segmentation, a segmentation model.

With --data DIR, DIR must hold train/<class>/<images> and val/<class>/<images>
(JPEG, PNG or WebP). Without --data, the built-in data set is used: generated on the fly
(no files, no downloads). Its 2 classes tell whether two marks at opposite sides of a
noisy image sit at the same height (--data-arg relation=colour|shape|shape+colour asks
about other relations), so only a model that relates far-apart image parts can learn it.

--task segmentation trains a segmentation model (upernet_<backbone>, semfpn_<backbone>) on
a mask folder (ADE20K's images/{training,validation} + annotations/..., or images/{train,val}
+ masks/{train,val} paired by file stem; every file is checked before training), or without
--data on the built-in band set: thin lines cut each 32x256 noisy image into bands, and a
band's pixels take the colour of the one marker in the band, usually far away. AdamW with
warm-up and a poly schedule, cross-entropy with ignore index 255, validation by mIoU.

Each epoch appends its metrics to OUTPUT/metrics.jsonl and writes OUTPUT/checkpoint.pt
atomically; --resume continues a run from it with exactly the same result as an
uninterrupted run. The final weights go to OUTPUT/model.safetensors.
Distributed: torchrun --nproc_per_node N -m convzoo train ... (--batch-size is per process)."""

_EPILOG = """\
examples:
  convzoo train                                   # replknet_tiny on the built-in data
  convzoo train --model replknet_tiny --model-arg "kernel_sizes=(3,3,3,3)" --model-arg small_kernel=None
  convzoo train --model convnext_tiny --data ~/imagenet --image-size 224 --epochs 100 \\
      --batch-size 128 --lr 4e-3 --drop-path 0.1 --model-ema 0.9999 --mixup 0.8 --cutmix 1.0
  convzoo train --model convnext_tiny --pretrained convnext_tiny_1k_224.pth --data ./flowers
  torchrun --nproc_per_node 4 -m convzoo train --model resnet50 --data ~/imagenet --sync-bn
  convzoo train --task segmentation                # the demo: 3-stage RepLKNet 31-29-27 + Semantic FPN, band set
  convzoo train --task segmentation --model-arg "kernel_sizes=(3,3,3)" --model-arg small_kernel=None   # 3x3 baseline
  convzoo train --task segmentation --model upernet_convnext_tiny --pretrained-backbone convnext_tiny_1k_224.pth \
      --data ~/ADEChallengeData2016 --reduce-zero-label --num-classes 150 --image-size 512 --lr 1e-4 --epochs 80"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "train", help="train a model on an image folder or the built-in data set",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    model = parser.add_argument_group("model")
    parser.add_argument("--task", choices=("classification", "segmentation"), default="classification",
                        help="what to train (default: classification; segmentation: see the segmentation options)")
    model.add_argument("--model", default=None, metavar="NAME",
                       help=f"registered model name (default: {DEFAULT_MODEL}, segmentation: {_seg.DEFAULT_MODEL}; see `convzoo list`)")
    model.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="override a field of the model's config, VALUE a Python literal (repeatable)")
    model.add_argument("--pretrained", metavar="PATH", help="fine-tune from this checkpoint (official or convzoo); the head is re-initialised for the data's classes")
    model.add_argument("--drop-path", type=float, default=0.0, metavar="RATE", help="stochastic depth rate (default: 0)")
    model.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward to save memory")

    data = parser.add_argument_group("data")
    data.add_argument("--data", metavar="DIR", help="image folder with train/ and val/ (default: the built-in data set)")
    data.add_argument("--image-size", type=positive_int, metavar="PX", help="training/eval resolution (default: 224 for --data, 32 for the built-in set)")
    data.add_argument("--train-size", type=int, default=None, metavar="N",
                      help=f"built-in set: training images (default: 8192, segmentation: {_seg.DEFAULTS['train_size']})")
    data.add_argument("--val-size", type=int, default=None, metavar="N",
                      help=f"built-in set: validation images (default: 2048, segmentation: {_seg.DEFAULTS['val_size']})")
    data.add_argument("--data-seed", type=int, default=0, metavar="S", help="built-in set: seed of the images (default: 0)")
    data.add_argument("--data-arg", action="append", default=[], metavar="KEY=VALUE",
                      help="built-in set: another option (num_shapes, num_colours, num_distractors, noise, "
                           "amplitude, fresh_train, fixed_places), VALUE a Python literal (repeatable)")
    data.add_argument("--randaugment", nargs=2, type=float, metavar=("OPS", "MAGNITUDE"), help="image folders: RandAugment-lite, e.g. 2 9")
    data.add_argument("--mixup", type=float, default=0.0, metavar="ALPHA", help="mixup alpha (0: off)")
    data.add_argument("--cutmix", type=float, default=0.0, metavar="ALPHA", help="cutmix alpha (0: off)")
    data.add_argument("--workers", type=int, default=None, metavar="N", help="data loader processes (default: 0 for the built-in set, 4 for --data)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--epochs", type=positive_int, default=None, help=f"epochs (default: 10, segmentation: {_seg.DEFAULTS['epochs']})")
    optim.add_argument("--batch-size", type=positive_int, default=None, metavar="N",
                       help=f"images per step per process (default: 64, segmentation: {_seg.DEFAULTS['batch_size']})")
    optim.add_argument("--lr", type=float, default=None, help="peak learning rate of AdamW (default: 1e-3, --qat: 1e-4)")
    optim.add_argument("--min-lr", type=float, default=1e-5, help="final learning rate of the cosine schedule (default: 1e-5)")
    optim.add_argument("--weight-decay", type=float, default=0.05, help="AdamW weight decay, not on norms/biases (default: 0.05)")
    optim.add_argument("--warmup-epochs", type=float, default=None, help="linear warm-up length (default: 1, --qat: 0)")
    optim.add_argument("--label-smoothing", type=float, default=0.1, help="(default: 0.1)")
    optim.add_argument("--accum-steps", type=int, default=1, metavar="N", help="gradient accumulation: micro-batches per optimizer step")
    optim.add_argument("--clip-grad", type=float, metavar="NORM", help="clip the gradient norm")
    optim.add_argument("--model-ema", type=float, default=0.0, metavar="DECAY", help="keep an EMA of the weights with this decay, e.g. 0.999 (0: off)")
    optim.add_argument("--bn-recalibrate", type=int, default=0, metavar="N",
                       help="BatchNorm models: before each validation, recompute the running statistics with the "
                            "current weights over N training batches (precise BN; 0: off, the default)")

    runtime = parser.add_argument_group("run")
    runtime.add_argument("--amp", choices=("auto", "none", "bf16", "fp16"), default="auto", help="autocast precision (auto: bf16 on GPU, none on CPU)")
    runtime.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    runtime.add_argument("--sync-bn", action="store_true", help="distributed: synchronise BatchNorm statistics across processes")
    runtime.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    runtime.add_argument("--seed", type=int, default=0, help="seed of initialisation, data order and augmentation (default: 0)")
    runtime.add_argument("--output", default=None, metavar="DIR", help="output folder (default: runs/<model>)")
    runtime.add_argument("--resume", nargs="?", const="auto", metavar="CHECKPOINT",
                     help="continue from OUTPUT/checkpoint.pt (or the given checkpoint)")
    runtime.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch")
    _seg.add_arguments(parser)
    _qat.add_arguments(parser)
    parser.set_defaults(func=run)


_CLASSIFICATION_DEFAULTS = {"model": DEFAULT_MODEL, "train_size": 8192, "val_size": 2048, "batch_size": 64, "epochs": 10}
_COMMON_DEFAULTS = {"lr": 1e-3, "warmup_epochs": 1.0}


def _fill_task_defaults(args) -> None:
    """The options left out get their task's default (see ``--help``)."""
    if args.task != "segmentation":
        _seg.reject_segmentation_options(args)
    defaults = _seg.DEFAULTS if args.task == "segmentation" else _CLASSIFICATION_DEFAULTS
    for key, value in {**_COMMON_DEFAULTS, **defaults, **(_qat.DEFAULTS if args.qat else {})}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.qat:
        _qat.fill_defaults(args)


# ------------------------------------------------------------------------------ data

def build_datasets(args):
    """(train set, val set, num_classes, description) from the command's arguments."""
    from ..train.data import DataError, RelationConfig, RelationDataset, image_folder_splits

    if args.data:
        if not os.path.isdir(args.data):
            raise UsageError(f"data folder not found: {args.data}")
        ra = None if args.randaugment is None else (int(args.randaugment[0]), float(args.randaugment[1]))
        try:
            train_set, val_set = image_folder_splits(args.data, args.image_size or 224, randaugment=ra)
        except DataError as err:
            raise UsageError(str(err)) from None
        return train_set, val_set, train_set.num_classes, train_set.describe()
    try:
        options = parse_model_args(args.data_arg)
        config = RelationConfig(image_size=args.image_size or 32, num_train=args.train_size, num_val=args.val_size,
                                seed=args.data_seed, **options)
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None
    train_set, val_set = RelationDataset("train", config), RelationDataset("val", config)
    return train_set, val_set, train_set.num_classes, train_set.describe()


# ------------------------------------------------------------------------------ display

def _duration(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 else f"{seconds // 60}:{seconds % 60:02d}"


class ProgressBar:
    """One plain-text line per epoch on stderr, redrawn in place on a terminal."""

    def __init__(self, stream=None, width: int = 20):
        self.stream, self.width = stream if stream is not None else sys.stderr, width
        self.interactive = hasattr(stream, "isatty") and stream.isatty()
        self._last_printed = -1

    def __call__(self, p) -> None:
        filled = int(self.width * p.step / p.steps)
        line = (f"epoch {p.epoch + 1}/{p.epochs} [{'#' * filled}{'.' * (self.width - filled)}] {p.step}/{p.steps} "
                f"loss {p.loss:.4f} acc {p.accuracy:5.1f}% {p.images_per_second:6.0f} img/s "
                f"lr {p.lr:.2e} ETA {_duration(p.eta_seconds)}")
        if self.interactive:
            self.stream.write("\r" + line + ("\n" if p.step == p.steps else ""))
        else:
            decile = 10 * p.step // p.steps
            if decile == self._last_printed and p.step != p.steps:
                return
            self._last_printed = decile if p.step != p.steps else -1
            self.stream.write(line + "\n")
        self.stream.flush()


def _epoch_line(record: dict) -> str:
    line = (f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} acc {record['train_acc']:.1f}% | "
            f"val top1 {record['val_top1']:.2f}% top5 {record['val_top5']:.2f}% loss {record['val_loss']:.4f}")
    if "ema_val_top1" in record:
        line += f" | EMA top1 {record['ema_val_top1']:.2f}%"
    return line + f" | {record['train_images_per_second']:.0f} img/s, {record['train_seconds']:.0f} s"


class TensorBoardLogger:
    """Epoch scalars to TensorBoard when the ``tensorboard`` package is installed."""

    def __init__(self, log_dir: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except (ImportError, ModuleNotFoundError):
            self.writer = None
        else:
            self.writer = SummaryWriter(log_dir)

    def __call__(self, record: dict) -> None:
        if self.writer is None:
            return
        for key, value in record.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in ("epoch", "step"):
                self.writer.add_scalar(key, value, record["epoch"])
        self.writer.flush()


# ------------------------------------------------------------------------------ command

def _train_config(args, info):
    from ..train.loop import TrainConfig

    amp = args.amp
    if amp == "auto":
        amp = "bf16" if info.device.type == "cuda" else "none"
    workers = args.workers if args.workers is not None else (4 if args.data else 0)
    try:
        return TrainConfig(
            epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, min_lr=args.min_lr,
            weight_decay=args.weight_decay, warmup_epochs=args.warmup_epochs, label_smoothing=args.label_smoothing,
            accum_steps=args.accum_steps, clip_grad=args.clip_grad, ema_decay=args.model_ema,
            mixup_alpha=args.mixup, cutmix_alpha=args.cutmix, amp=amp, channels_last=args.channels_last,
            sync_bn=args.sync_bn, workers=workers, seed=args.seed, bn_recalibrate=args.bn_recalibrate,
            eval_batch_size=1 if args.task == "segmentation" and args.data else None,  # images of any size
        )
    except ValueError as err:
        raise UsageError(str(err)) from None


def _resume_path(args, output: str):
    if args.resume is None:
        return None
    path = os.path.join(output, "checkpoint.pt") if args.resume == "auto" else args.resume
    if not os.path.isfile(path):
        raise UsageError(f"no checkpoint to resume from: {path} does not exist")
    return path


def _write_metrics_history(output: str, history) -> None:
    """Rewrite metrics.jsonl from the checkpoint's history (drops lines of a lost epoch)."""
    from ..train.loop import METRICS_NAME

    tmp = os.path.join(output, METRICS_NAME + ".tmp")
    with open(tmp, "w") as handle:
        handle.writelines(json.dumps(record) + "\n" for record in history)
    os.replace(tmp, os.path.join(output, METRICS_NAME))


def run(args) -> int:
    import torch

    from ..train.distributed import init_distributed, shutdown

    if args.threads:
        torch.set_num_threads(args.threads)
    demo = args.task == "segmentation" and args.model is None
    _qat.check_arguments(args)
    _fill_task_defaults(args)
    model_args = {**(_seg.DEMO_MODEL_ARGS if demo else {}), **parse_model_args(args.model_arg)}
    output = args.output or os.path.join("runs", args.model)
    datasets = _seg.build_datasets(args) if args.task == "segmentation" else build_datasets(args)
    resume_path = _resume_path(args, output)
    try:
        info = init_distributed(args.device)
    except ValueError as err:
        raise UsageError(str(err)) from None
    if args.qat and info.enabled:
        shutdown(info)
        raise UsageError("--qat runs in one process: start it without torchrun")
    try:
        return _train(args, info, model_args, output, datasets, resume_path)
    finally:
        # _train has returned, so the DDP model holding the process group is gone: the
        # group is torn down here, not by a destructor during interpreter shutdown.
        shutdown(info)


def _train(args, info, model_args, output, datasets, resume_path) -> int:
    import torch

    train_set, val_set, num_classes, data_info = datasets
    if args.sync_bn and info.enabled and info.device.type == "cpu":
        raise UsageError("--sync-bn needs GPUs: PyTorch's SyncBatchNorm has no CPU implementation")
    _fit_batch_size(args, len(train_set), info)
    config = _train_config(args, info)
    torch.manual_seed(args.seed)
    segmentation = args.task == "segmentation"
    extra = _seg.model_kwargs(args) if segmentation else {}
    float_model = None
    if args.qat:
        float_model, model = _qat.build_models(args, num_classes, val_set)
    else:
        model = create_model_or_exit(args.model, pretrained=args.pretrained, num_classes=num_classes,
                                     drop_path_rate=args.drop_path, **extra, **model_args)
    if args.grad_checkpointing:
        if not hasattr(model, "set_grad_checkpointing"):
            raise UsageError(f"{args.model} does not support --grad-checkpointing")
        model.set_grad_checkpointing(True)
    if not segmentation and not args.qat:
        model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}),
                                **_trained_input_cfg(args, data_info, getattr(model, "in_chans", 3))}
    metadata = {"model_name": args.model, "model_args": {k: v for k, v in model_args.items()},
                "num_classes": num_classes, "data": data_info, "task": args.task,
                "pretrained_cfg": getattr(model, "pretrained_cfg", {})}
    if args.qat:
        metadata["qat"] = _qat.metadata(args)
    created = info.is_main and not os.path.isdir(output)
    try:
        return _run_training(args, info, model, config, output, datasets, resume_path, metadata, float_model)
    except BaseException:
        # a run that stops before its first checkpoint leaves no folder behind
        if created and not os.path.exists(os.path.join(output, "checkpoint.pt")):
            shutil.rmtree(output, ignore_errors=True)
        raise


def _trained_input_cfg(args, data_info, in_chans: int) -> dict:
    """What evaluation must reproduce: the training resolution, normalisation and classes."""
    if data_info.get("kind") == "image-folder":
        from ..models._builder import default_pretrained_cfg

        size = args.image_size or 224  # validated with image_folder_splits' defaults: ImageNet normalisation, 0.875 bicubic crop
        return dict(default_pretrained_cfg(in_chans, size), label_names=list(data_info["classes"]), dataset=data_info)
    size = args.image_size or 32
    return dict(input_size=(in_chans, size, size), mean=(0.0,) * in_chans, std=(1.0,) * in_chans, dataset=data_info)


def _fit_batch_size(args, num_images: int, info) -> None:
    """Lower ``--batch-size`` (with a notice) when the training set holds less than one step."""
    per_process = num_images // info.world_size
    if args.batch_size * args.accum_steps <= per_process:
        return
    lowered = per_process // args.accum_steps
    if lowered < 1:
        raise UsageError(f"the training set has {num_images} images, fewer than one per process and "
                         f"accumulation step ({info.world_size} x {args.accum_steps}); add images")
    if info.is_main:
        _logger.warning("the training set has %d images, fewer than one step of --batch-size %d: using "
                        "--batch-size %d", num_images, args.batch_size, lowered)
    args.batch_size = lowered


def _run_training(args, info, model, config, output, datasets, resume_path, metadata, float_model=None) -> int:
    from .. import save_checkpoint
    from ..train.distributed import barrier
    from ..train.loop import Trainer, load_training_checkpoint

    train_set, val_set, num_classes, data_info = datasets
    segmentation = args.task == "segmentation"
    if info.is_main:
        os.makedirs(output, exist_ok=True)
    trainer_cls = _seg.trainer_class() if segmentation else _qat.trainer_class(args) if args.qat else Trainer
    trainer = trainer_cls(model, train_set, val_set, num_classes, config, info, output_dir=output, metadata=metadata)
    stale = []
    if resume_path is None and info.is_main and os.path.exists(os.path.join(output, "checkpoint.pt")):
        _logger.warning("starting a new run in %s; its old files will be replaced at the end of the first "
                        "epoch (use --resume to continue it instead)", output)
        stale = [os.path.join(output, name) for name in ("summary.json", "model.safetensors", _qat.INT8_NAME)]
    if resume_path is not None:
        try:
            state = load_training_checkpoint(resume_path)
        except ValueError as err:
            raise UsageError(str(err)) from None
        if state["meta"].get("task", "classification") != args.task:
            raise UsageError(f"{resume_path} is a {state['meta'].get('task', 'classification')} run; pass --task "
                             f"{state['meta'].get('task', 'classification')}")
        if bool(state["meta"].get("qat")) != args.qat:
            raise UsageError(f"{resume_path} is {'a' if state['meta'].get('qat') else 'no'} --qat run; "
                             f"{'add' if state['meta'].get('qat') else 'drop'} --qat")
        if state["meta"].get("model_name") != args.model:
            raise UsageError(f"{resume_path} was trained with --model {state['meta'].get('model_name')}, not {args.model}")
        trainer.load_state_dict(state)
        if info.is_main:
            _write_metrics_history(output, trainer.history)
            _logger.info("resumed from %s after epoch %d", resume_path, trainer.epoch)
    if info.is_main:
        data_name = args.data or ("built-in band data set" if segmentation else "built-in relation data set")
        _logger.info("training %s on %s: %d train / %d val images, %d classes, %d process(es) on %s, output %s",
                     args.model, data_name, len(train_set), len(val_set), num_classes, info.world_size,
                     info.device, output)
    on_step = ProgressBar() if info.is_main else None
    tensorboard = TensorBoardLogger(os.path.join(output, "tensorboard")) if info.is_main else None

    def on_epoch(record):
        for path in stale:  # the old run's results, now that this run has its first checkpoint
            if os.path.exists(path):
                os.remove(path)
        stale.clear()
        if info.is_main:
            _logger.info("%s", _seg.epoch_line(record) if segmentation else _epoch_line(record))
            tensorboard(record)

    start = time.perf_counter()
    history = trainer.fit(on_step=on_step, on_epoch=on_epoch)
    elapsed = time.perf_counter() - start
    if info.is_main and args.qat:
        report, report_text = _qat.finish(args, trainer, float_model, output)
        print(report_text)
        print(write_summary(args, output, history, elapsed, task_fields={"qat": report},
                            model_file=os.path.join(output, _qat.INT8_NAME)))
    elif info.is_main:
        save_checkpoint(trainer.final_model(), os.path.join(output, "model.safetensors"))
        if segmentation:
            print(_seg.write_summary(args, output, history, elapsed, data_info))
        else:
            print(write_summary(args, output, history, elapsed))
    barrier(info)  # no rank tears the process group down while rank 0 still writes the model
    return 0


class SummaryMetrics(NamedTuple):
    """What a task's training summary reports: validation metrics ``val_<main>`` and
    ``val_<second>`` (e.g. "top1", "top5") and the labels of its printed lines."""

    main: str
    second: str
    label: str
    best_label: str
    skipped_label: str


CLASSIFICATION_SUMMARY = SummaryMetrics("top1", "top5", "val top-1/top-5", "best", "skipped images")


def write_summary(args, output: str, history, elapsed: float, metrics: SummaryMetrics = CLASSIFICATION_SUMMARY,
                  *, task_fields: Optional[dict] = None, unreadable: Tuple[int, int] = (0, 0),
                  model_file: Optional[str] = None) -> str:
    """Writes ``output/summary.json`` from the run's epoch records; returns it as a table for the
    command to print.

    ``unreadable`` (train, val) adds files the data readers skipped before training to the
    counts the epochs recorded; ``task_fields`` go into the JSON first; ``model_file`` is the file
    the run wrote its model to (default: OUTPUT/model.safetensors).
    """
    from ..train.loop import best_epoch

    main, second = metrics.main, metrics.second
    final = history[-1] if history else {}
    key = f"ema_val_{main}" if f"ema_val_{main}" in final else f"val_{main}"
    best = best_epoch(history, key)
    summary = {
        **(task_fields or {}),
        "model": args.model,
        "epochs": len(history),
        f"final_val_{main}": final.get(key),
        f"final_val_{second}": final.get(key.replace(main, second)),
        f"best_val_{main}": best[key] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "weights": "ema" if key.startswith("ema") else "model",
        "skipped_train_images": final.get("train_skipped_total", 0) + unreadable[0],
        "skipped_val_images": final.get("val_skipped", 0) + unreadable[1],
        "seconds_this_run": round(elapsed, 1),
        "checkpoint": os.path.join(output, "checkpoint.pt"),
        "model_file": model_file or os.path.join(output, "model.safetensors"),
    }
    with open(os.path.join(output, "summary.json"), "w") as handle:
        json.dump(summary, handle, indent=2)
    return "\n".join([
        "\nsummary",
        f"  model           {args.model} ({summary['weights']} weights)",
        f"  {metrics.label:<15} {summary[f'final_val_{main}']:.2f}% / {summary[f'final_val_{second}']:.2f}%"
        f" after {summary['epochs']} epochs"
        f" ({metrics.best_label} {summary[f'best_val_{main}']:.2f}% at epoch {summary['best_epoch']})",
        f"  {metrics.skipped_label:<15} {summary['skipped_train_images']} train, "
        f"{summary['skipped_val_images']} val (unreadable)",
        f"  time            {_duration(elapsed)} this run",
        f"  written         {summary['model_file']}, {summary['checkpoint']}, {os.path.join(output, 'metrics.jsonl')}",
    ])
