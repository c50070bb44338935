"""``convzoo eval``: top-1/top-5 accuracy and throughput of a checkpoint on a validation set."""
from __future__ import annotations

import argparse
import json
import os
import sys

from . import UsageError, create_model_or_exit, parse_model_args
from . import _segmentation as _seg
from ._tools import check_output_file, positive_int

_DESCRIPTION = """\
Evaluate a model checkpoint: top-1 and top-5 accuracy, mean loss, images per second.

CHECKPOINT may be a training checkpoint of `convzoo train` (OUTPUT/checkpoint.pt; its
EMA weights when it has them), a convzoo .safetensors file (OUTPUT/model.safetensors), or
an official checkpoint of the model's family. With --data DIR the images of DIR/val are
used (classes numbered as in DIR/train when it exists); without it, the validation split
of the built-in data set the checkpoint was trained on. --reparam evaluates the deployed
(re-parameterized) form of the model, which must give the same accuracy."""

_EPILOG = """\
examples:
  convzoo eval --model replknet_tiny --checkpoint runs/replknet_tiny/checkpoint.pt
  convzoo eval --model replknet_tiny --checkpoint runs/replknet_tiny/model.safetensors --reparam
  convzoo eval --model convnext_tiny --checkpoint convnext_tiny_1k_224.pth --data ~/imagenet --image-size 224
  convzoo eval --task segmentation --model semfpn_replknet_tiny --checkpoint runs/semfpn_replknet_tiny/checkpoint.pt
  convzoo eval --task segmentation --model upernet_convnext_tiny --checkpoint model.safetensors --data ~/ADEChallengeData2016 \
      --reduce-zero-label --image-size 512 --mode slide --crop-size 512 --flip"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="accuracy and throughput of a checkpoint on a validation set",
        description=_DESCRIPTION, epilog=_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="NAME", help="registered model name (see `convzoo list`)")
    parser.add_argument("--checkpoint", required=True, metavar="PATH", help="weights to evaluate")
    parser.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                        help="override a field of the model's config (as in training), VALUE a Python literal")
    parser.add_argument("--data", metavar="DIR", help="image folder with val/<class>/<images> (default: the built-in data set)")
    parser.add_argument("--image-size", type=positive_int, metavar="PX",
                        help="resolution (default: the one stored in the checkpoint, else the model's pretrained_cfg on image folders)")
    parser.add_argument("--crop-pct", type=float, default=None,
                        help="image folders: centre crop fraction (default: the checkpoint's, else the model's pretrained_cfg)")
    parser.add_argument("--weights", choices=("auto", "model", "ema"), default="auto",
                        help="training checkpoints: which weights (auto: EMA when present)")
    parser.add_argument("--reparam", action="store_true", help="evaluate the re-parameterized (deployed) model")
    parser.add_argument("--batch-size", type=int, default=128, metavar="N", help="(default: 128)")
    parser.add_argument("--workers", type=int, default=None, metavar="N", help="data loader processes (default: 0 built-in, 4 --data)")
    parser.add_argument("--amp", choices=("none", "bf16", "fp16"), default="none", help="autocast precision (default: none)")
    parser.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda (default: auto)")
    parser.add_argument("--threads", type=int, metavar="N", help="CPU threads for PyTorch")
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON to PATH")
    _seg.add_eval_arguments(parser)
    parser.set_defaults(func=run)


def _training_state(path: str):
    """The training checkpoint at ``path``, or None when it is another kind of file."""
    if path.endswith(".safetensors"):
        return None
    from ..train.loop import load_training_checkpoint

    try:
        return load_training_checkpoint(path)
    except Exception:  # noqa: BLE001 - not ours (official .pth, other file): the model loader reads it and says why not
        return None


def _load_model(args, num_classes_from_data, state):
    """(model, where the weights came from) for the checkpoint kinds eval accepts."""
    import torch

    from ..models._checkpoint import load_state_dict_strict, read_metadata

    model_args = parse_model_args(args.model_arg)
    if state is not None:
        meta = state["meta"]
        if meta.get("model_name") != args.model:
            raise UsageError(f"{args.checkpoint} holds a {meta.get('model_name')} model, not {args.model}")
        model_args = {**meta.get("model_args", {}), **model_args}
        model = create_model_or_exit(args.model, num_classes=int(meta["num_classes"]), **model_args)
        use_ema = args.weights == "ema" or (args.weights == "auto" and state.get("model_ema") is not None)
        if use_ema and state.get("model_ema") is None:
            raise UsageError(f"{args.checkpoint} has no EMA weights (trained without --model-ema)")
        weights = state["model_ema"]["module"] if use_ema else state["model"]
        load_state_dict_strict(model, dict(weights), source=args.checkpoint)
        return model, "ema" if use_ema else "model"
    metadata = read_metadata(args.checkpoint)
    kwargs = dict(model_args)
    if metadata.get("format") == "convzoo":
        if metadata.get("model_name") and metadata["model_name"] != args.model:
            raise UsageError(f"{args.checkpoint} holds a {metadata['model_name']} model, not {args.model}")
        config = json.loads(metadata.get("config") or "{}")
        kwargs = {**{k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}, **kwargs}
        if metadata.get("num_classes", "").isdigit():
            kwargs["num_classes"] = int(metadata["num_classes"])
    elif num_classes_from_data is not None:
        kwargs["num_classes"] = num_classes_from_data
    torch.manual_seed(0)
    return create_model_or_exit(args.model, pretrained=args.checkpoint, **kwargs), "file"


def _input_cfg(args, state) -> tuple:
    """(the input configuration, where it came from): the one the checkpoint was trained with
    (``pretrained_cfg``: resolution, normalisation, crop, class names, data set); for a file
    that stores none (an official checkpoint) evaluated on an image folder, the model's
    registered configuration (its official weights' evaluation settings)."""
    from ..models._builder import pretrained_cfg_of
    from ..models._checkpoint import read_metadata, stored_pretrained_cfg

    if state is not None:
        cfg = dict(state["meta"].get("pretrained_cfg") or {})
        cfg.setdefault("dataset", state["meta"].get("data", {}))
        return cfg, "stored in the checkpoint"
    try:
        cfg = stored_pretrained_cfg(read_metadata(args.checkpoint))
    except ValueError as err:
        raise UsageError(str(err)) from None
    if cfg or not args.data:
        return cfg, "stored in the checkpoint"
    return pretrained_cfg_of(args.model), f"{args.model}'s pretrained_cfg"


def _resolution(args, cfg, source: str) -> tuple:
    """(image size, where it came from)."""
    if args.image_size:
        return args.image_size, "--image-size"
    if cfg.get("input_size"):
        return int(cfg["input_size"][-1]), source
    return None, "default"


def _dataset(args, cfg, source):
    from ..models._builder import IMAGENET_MEAN, IMAGENET_STD
    from ..train.data import DataError, ImageFolder, RelationConfig, RelationDataset, eval_transform, find_classes

    size, _ = _resolution(args, cfg, source)
    if args.data:
        val_dir = os.path.join(args.data, "val")
        if not os.path.isdir(args.data):
            raise UsageError(f"data folder not found: {args.data}")
        if not os.path.isdir(val_dir):
            raise UsageError(f"{args.data} has no 'val' folder (expected {val_dir}/<class>/<images>)")
        try:
            train_dir = os.path.join(args.data, "train")
            classes = find_classes(train_dir) if os.path.isdir(train_dir) else find_classes(val_dir)
            trained = cfg.get("label_names")
            if trained and list(trained) != classes:
                raise UsageError(
                    f"{args.data} has the classes {', '.join(classes)}, but {args.checkpoint} was trained on "
                    f"{', '.join(trained)}; evaluate it on a folder with the same classes"
                )
            crop_pct = args.crop_pct if args.crop_pct is not None else cfg.get("crop_pct", 0.875)
            transform = eval_transform(size or 224, crop_pct, cfg.get("mean", IMAGENET_MEAN), cfg.get("std", IMAGENET_STD),
                                       cfg.get("interpolation", "bicubic"),
                                       "center" if args.crop_pct is not None else cfg.get("crop_mode", "center"))
            return ImageFolder(val_dir, transform, {c: i for i, c in enumerate(classes)}, skip_policy="drop")
        except DataError as err:
            raise UsageError(str(err)) from None
    data = dict(cfg.get("dataset") or {})
    if data and data.get("kind") != "builtin-relations":
        raise UsageError(f"{args.checkpoint} was trained on an image folder ({data.get('root')}); pass --data")
    data.pop("kind", None)
    if size:
        data["image_size"] = size
    try:
        return RelationDataset("val", RelationConfig(**data))
    except (TypeError, ValueError) as err:
        raise UsageError(str(err)) from None


def _image_size_of(dataset) -> int:
    config = getattr(dataset, "config", None)  # the built-in set; an image folder's first step crops
    return int(config.image_size) if config is not None else int(dataset.transform.transforms[0].size)


def run(args) -> int:
    import torch
    from torch.utils.data import DataLoader

    from .. import reparameterize
    from ..train.data import EpochSampler, collate
    from ..train.distributed import pick_device
    from ..train.loop import evaluate

    if args.threads:
        torch.set_num_threads(args.threads)
    if not os.path.isfile(args.checkpoint):
        raise UsageError(f"checkpoint file not found: {args.checkpoint}")
    if args.json:
        check_output_file(args.json, "--json")
    try:
        device = pick_device(args.device)
    except ValueError as err:
        raise UsageError(str(err)) from None
    state = _training_state(args.checkpoint)
    if _seg.is_segmentation_eval(args, state):
        return _seg.run_eval(args, state, device, _load_model)
    cfg, cfg_source = _input_cfg(args, state)
    dataset = _dataset(args, cfg, cfg_source)
    model, weights = _load_model(args, getattr(dataset, "num_classes", None), state)
    num_classes = getattr(model, "num_classes", None)
    if num_classes is not None and num_classes != dataset.num_classes:
        raise UsageError(f"the model has {num_classes} classes but the data has {dataset.num_classes}")
    params_before = sum(p.numel() for p in model.parameters())
    if args.reparam:
        reparameterize(model)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format).eval()
    workers = args.workers if args.workers is not None else (4 if args.data else 0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=EpochSampler(len(dataset), shuffle=False),
                        num_workers=workers, collate_fn=collate, pin_memory=device.type == "cuda")
    result = evaluate(model, loader, device, args.amp, args.channels_last)
    report = {
        "model": args.model, "checkpoint": args.checkpoint, "weights": weights, "reparameterized": bool(args.reparam),
        "top1": result.top1, "top5": result.top5, "loss": result.loss, "images": result.num_images,
        "skipped_images": result.skipped, "seconds": result.seconds, "images_per_second": result.images_per_second,
        "parameters": sum(p.numel() for p in model.parameters()), "parameters_before_reparam": params_before,
        "device": str(device), "image_size": _image_size_of(dataset),
    }
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(report, handle, indent=2)
    form = "re-parameterized" if args.reparam else "as trained"
    print(f"{args.model} ({form}, {weights} weights) on {report['images']} images"
          + (f" ({report['skipped_images']} unreadable, skipped)" if report["skipped_images"] else ""))
    size_source = _resolution(args, cfg, cfg_source)[1]
    print(f"  resolution  {report['image_size']}x{report['image_size']} ({size_source})")
    print(f"  top-1       {result.top1:.2f}%")
    print(f"  top-5       {result.top5:.2f}%")
    print(f"  loss        {result.loss:.4f}")
    print(f"  throughput  {result.images_per_second:.1f} img/s on {device} (batch {args.batch_size}, incl. data loading)")
    print(f"  parameters  {report['parameters']:,}" + (f" (from {params_before:,})" if args.reparam else ""))
    if result.skipped:
        print(f"warning: {result.skipped} unreadable images were skipped", file=sys.stderr)
    return 0
