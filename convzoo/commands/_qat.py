"""The quantization-aware side of ``convzoo train --qat``: options, checks, the model, the INT8 file.

A trained float checkpoint (``--pretrained``) is fine-tuned with INT8 fake quantization
(:mod:`convzoo.deploy.qat`, torchao's PT2E QAT flow for the inductor backend) by the ordinary
trainer (:class:`convzoo.train.qat.QATTrainer`); at the end the model is converted and saved
as OUTPUT/model_int8.pt2, the file ``convzoo quantize --backend inductor`` writes, and compared
with the float model on the validation split.
"""
from __future__ import annotations

import functools
import os
from typing import Tuple

from . import UsageError

INT8_NAME = "model_int8.pt2"
# a short schedule at a low learning rate: the model is trained already
DEFAULTS = {"epochs": 3, "lr": 1e-4, "warmup_epochs": 0.0}
_REJECTED = {  # options that do not fit fine-tuning an exported graph, and why
    "model_ema": "--model-ema (fake-quantize ranges cannot be averaged)",
    "sync_bn": "--sync-bn (QAT runs in one process)",
    "drop_path": "--drop-path (stochastic depth would be frozen into the exported graph)",
    "grad_checkpointing": "--grad-checkpointing",
    "model_arg": "--model-arg (the model is rebuilt from --pretrained as it was trained)",
    "bn_recalibrate": "--bn-recalibrate (the BatchNorms are folded before QAT)",
}


def add_arguments(parser) -> None:
    group = parser.add_argument_group(
        "quantization-aware training (--qat; inductor backend only: onnxruntime files come from `convzoo quantize`)")
    group.add_argument("--qat", action="store_true",
                       help="fine-tune the trained model given with --pretrained with INT8 fake quantization (torchao PT2E, "
                            f"x86 inductor quantizer) and write OUTPUT/{INT8_NAME} as `convzoo quantize --backend inductor` "
                            "does; defaults become --epochs 3 --lr 1e-4 --warmup-epochs 0")
    group.add_argument("--freeze-bn-after", type=int, metavar="EPOCHS",
                       help="--qat: the statistics of BatchNorms left unfolded stop updating after this many epochs "
                            "(default: half the epochs, at least 1; the BatchNorms convzoo.reparameterize folds, i.e. "
                            "those after a convolution, are folded before QAT)")
    group.add_argument("--freeze-observers-after", type=int, metavar="EPOCHS",
                       help="--qat: quantization ranges stop updating after this many epochs (default: one more than "
                            "--freeze-bn-after, at most the epochs)")


def check_arguments(args) -> None:
    """The :class:`UsageError` of a bad ``--qat`` command, before any work is done."""
    if not args.qat:
        given = [flag for flag, value in (("--freeze-bn-after", args.freeze_bn_after),
                                          ("--freeze-observers-after", args.freeze_observers_after)) if value is not None]
        if given:
            raise UsageError(f"{', '.join(given)} only apply to --qat")
        return
    if args.task != "classification":
        raise UsageError(f"--qat fine-tunes classifiers only, not --task {args.task}")
    if args.pretrained is None:
        raise UsageError("--qat fine-tunes a trained model: give its checkpoint with --pretrained PATH "
                         "(e.g. runs/<model>/model.safetensors)")
    if not os.path.isfile(args.pretrained):
        raise UsageError(f"checkpoint file not found: {args.pretrained}")
    for name, flag in _REJECTED.items():
        if getattr(args, name) not in (None, False, 0, 0.0, []):
            raise UsageError(f"--qat does not take {flag}")
    for flag, value in (("--freeze-bn-after", args.freeze_bn_after), ("--freeze-observers-after", args.freeze_observers_after)):
        if value is not None and value < 0:
            raise UsageError(f"{flag} must be >= 0 epochs, got {value}")
    from ..deploy.int8 import check_backend
    from ._tools import is_convzoo_checkpoint, read_metadata

    try:
        check_backend("inductor")
    except ImportError as err:
        raise UsageError(f"--qat: {err}") from None
    if args.model is None and is_convzoo_checkpoint(args.pretrained):
        args.model = read_metadata(args.pretrained).get("model_name")


def fill_defaults(args) -> None:
    """--qat's schedule defaults (after the task's: ``args.epochs`` is set)."""
    if args.freeze_bn_after is None:
        args.freeze_bn_after = max(1, args.epochs // 2)
    if args.freeze_observers_after is None:
        args.freeze_observers_after = min(args.epochs, args.freeze_bn_after + 1)


def _sample(val_set):
    """Two images of the validation split (the export's example input)."""
    import torch

    images = []
    for index in range(len(val_set)):
        image = val_set[index][0]
        if image is not None:
            images.append(image)
        if len(images) == 2:
            return torch.stack(images)
    raise UsageError("--qat needs at least 2 readable validation images")


def build_models(args, num_classes: int, val_set):
    """(the float model of --pretrained, its QATModel); a UsageError for a model the quantizer cannot take."""
    from ..deploy.qat import prepare_qat
    from ._tools import load_model_or_exit

    float_model = load_model_or_exit(args.model, args.pretrained)
    classes = getattr(float_model, "num_classes", None)
    if classes != num_classes:
        raise UsageError(f"{args.pretrained} classifies {classes} classes but the data has {num_classes}: --qat "
                         "fine-tunes on the data the model was trained on")
    try:
        return float_model, prepare_qat(float_model, _sample(val_set))
    except (ValueError, TypeError) as err:
        raise UsageError(f"--qat: {err}") from None


def trainer_class(args):
    from ..train.qat import QATTrainer

    return functools.partial(QATTrainer, freeze_bn_after=args.freeze_bn_after,
                             freeze_observers_after=args.freeze_observers_after)


def metadata(args) -> dict:
    return {"pretrained": args.pretrained, "freeze_bn_after": args.freeze_bn_after,
            "freeze_observers_after": args.freeze_observers_after}


def finish(args, trainer, float_model, output: str) -> Tuple[dict, str]:
    """Convert the trained model to INT8 (OUTPUT/model_int8.pt2); return the report as a dict and
    as the text the train command prints."""
    from ..deploy.qat import convert_qat
    from ..train.loop import EvalBatches
    from .quantize import report_lines

    path = os.path.join(output, INT8_NAME)
    report = convert_qat(trainer.final_model(), path, float_model, EvalBatches(trainer.val_loader, trainer.device))
    lines = [f"{args.model}: wrote {path} (INT8, inductor, quantization-aware fine-tuned for "
             f"{len(trainer.history)} epochs)", *report_lines(report),
             f"  fake-quant  INT8 agrees with the fake-quantized model on {100 * report.fake_quant_agreement:.1f}% "
             f"of images, output SQNR {report.fake_quant_sqnr_db:.1f} dB"]
    return report.to_dict(), "\n".join(lines)
