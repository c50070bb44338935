"""Semantic segmentation on top of the training loop: metrics, inference modes, the trainer.

:class:`SegmentationTrainer` is :class:`~convzoo.train.loop.Trainer` with a per-pixel loss
(cross-entropy with an ignore index, plus the auxiliary head's), the poly learning-rate
schedule of mmsegmentation, and validation by mIoU; checkpoints, exact resume, metrics.jsonl
and DDP are the base class's.

Metrics (as mmsegmentation computes them): from the confusion matrix C over the pixels whose
target is not the ignore index, IoU_k = C_kk / (sum_j C_kj + sum_j C_jk - C_kk); mIoU is the
mean over the classes present in the targets or the predictions (others are NaN), aAcc the
fraction of pixels right, mAcc the mean per-class recall.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

from .distributed import DistInfo, all_reduce_sum
from .loop import EvalBatches, Trainer, autocast_context
from .segdata import IGNORE_INDEX, seg_collate


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """(K, K) int64 counts, rows = target class, columns = predicted class, over pixels whose
    target is not ``ignore_index``. ``pred`` and ``target``: integer tensors of one shape."""
    if pred.shape != target.shape:
        raise ValueError(f"pred and target must have one shape, got {tuple(pred.shape)} and {tuple(target.shape)}")
    keep = target != ignore_index
    t, p = target[keep].long(), pred[keep].long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(f"target holds class ids outside [0, {num_classes}) that are not the ignore index {ignore_index}")
    return torch.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes).cpu()


@dataclasses.dataclass
class SegEvalResult:
    """mIoU, aAcc and mAcc (in %), per-class IoU (NaN: class absent from targets and predictions)."""

    miou: float
    aacc: float
    macc: float
    iou: List[float]
    loss: float
    num_images: int
    seconds: float
    skipped: int = 0

    @classmethod
    def from_confusion(cls, confusion: np.ndarray, loss: float = float("nan"), num_images: int = 0,
                       seconds: float = 0.0, skipped: int = 0) -> "SegEvalResult":
        confusion = np.asarray(confusion, dtype=np.float64)
        tp = np.diag(confusion)
        union = confusion.sum(0) + confusion.sum(1) - tp
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
            recall = np.where(confusion.sum(1) > 0, tp / np.maximum(confusion.sum(1), 1), np.nan)
        total = confusion.sum()
        present = ~np.isnan(iou)
        return cls(
            miou=100.0 * float(iou[present].mean()) if present.any() else float("nan"),
            aacc=100.0 * float(tp.sum() / total) if total else float("nan"),
            macc=100.0 * float(np.nanmean(recall)) if (~np.isnan(recall)).any() else float("nan"),
            iou=[100.0 * float(v) for v in iou], loss=loss, num_images=num_images, seconds=seconds, skipped=skipped,
        )

    def metrics(self) -> Dict[str, float]:
        """The scalars a metrics.jsonl record holds."""
        return {"miou": self.miou, "aacc": self.aacc, "macc": self.macc, "loss": self.loss}

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else 0.0


def _windows(size: int, crop: int, stride: int) -> List[int]:
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop, stride)) + [size - crop]
    return sorted(set(starts))


def infer_logits(model: nn.Module, images: torch.Tensor, num_classes: int, mode: str = "whole",
                 crop_size: Optional[int] = None, stride: Optional[int] = None, flip: bool = False) -> torch.Tensor:
    """(N, 3, H, W) -> (N, num_classes, H, W) class scores of an eval-mode model.

    ``mode="whole"``: one pass over the whole image. ``mode="slide"``: ``crop_size`` windows
    every ``stride`` pixels (default 2/3 of the crop), the last flush with the border; where
    windows overlap their softmax scores are averaged. ``flip``: also the horizontally
    flipped image, scores averaged. Scores are softmax probabilities.
    """
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if flip:
        return 0.5 * (infer_logits(model, images, num_classes, mode, crop_size, stride)
                      + infer_logits(model, images.flip(-1), num_classes, mode, crop_size, stride).flip(-1))
    if mode == "whole":
        return model(images).float().softmax(1)
    if crop_size is None or crop_size < 1:
        raise ValueError(f"mode='slide' needs a crop_size >= 1, got {crop_size!r}")
    stride = stride or max(1, crop_size * 2 // 3)
    n, _, height, width = images.shape
    scores = images.new_zeros(n, num_classes, height, width, dtype=torch.float32)
    counts = images.new_zeros(1, 1, height, width, dtype=torch.float32)
    for top in _windows(height, crop_size, stride):
        for left in _windows(width, crop_size, stride):
            window = images[..., top:top + crop_size, left:left + crop_size]
            scores[..., top:top + crop_size, left:left + crop_size] += model(window).float().softmax(1)
            counts[..., top:top + crop_size, left:left + crop_size] += 1
    return scores / counts


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader: DataLoader, device: torch.device, num_classes: int,
                          amp: str = "none", channels_last: bool = False, info: DistInfo = DistInfo(),
                          mode: str = "whole", crop_size: Optional[int] = None, stride: Optional[int] = None,
                          flip: bool = False, ignore_index: int = IGNORE_INDEX) -> SegEvalResult:
    """mIoU, aAcc, mAcc, per-class IoU and mean pixel loss of ``model`` over ``loader`` (all ranks)."""
    model.eval()
    confusion = torch.zeros(num_classes, num_classes, dtype=torch.int64)
    loss_sum = pixels = images_seen = 0.0
    batches = EvalBatches(loader, device, channels_last)
    for images, masks in batches:
        with autocast_context(device, amp):
            scores = infer_logits(model, images, num_classes, mode, crop_size, stride, flip)
        loss_sum += F.nll_loss(scores.clamp_min(1e-12).log(), masks, ignore_index=ignore_index, reduction="sum").item()
        pixels += float((masks != ignore_index).sum())
        confusion += confusion_matrix(scores.argmax(1), masks, num_classes, ignore_index)
        images_seen += images.shape[0]
    totals = all_reduce_sum([loss_sum, pixels, images_seen, batches.skipped] + confusion.flatten().double().tolist(), info)
    loss_sum, pixels, images_seen, skipped = totals[:4]
    confusion = np.asarray(totals[4:], dtype=np.float64).reshape(num_classes, num_classes)
    return SegEvalResult.from_confusion(confusion, loss=loss_sum / max(pixels, 1.0), num_images=int(images_seen),
                                       seconds=batches.seconds, skipped=int(skipped))


def poly_lr(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float, power: float = 1.0) -> float:
    """mmsegmentation's schedule: linear warm-up to ``peak``, then
    ``(peak - floor) * (1 - progress) ** power + floor``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return floor + (peak - floor) * (1.0 - progress) ** power


class SegmentationTrainer(Trainer):
    """:class:`~convzoo.train.loop.Trainer` for a segmentation model (see the module docstring).

    ``model.loss(outputs, masks, ignore_index)`` gives the loss (a
    :class:`~convzoo.models.segmentation.SegmentationModel` has one); validation reports
    ``val_miou``, ``val_aacc``, ``val_macc`` and ``val_loss`` (``val_`` + :meth:`SegEvalResult.metrics`).
    """

    collate_fn = staticmethod(seg_collate)
    best_metric = "val_miou"

    def __init__(self, *args, ignore_index: int = IGNORE_INDEX, poly_power: float = 1.0, **kwargs):
        self.ignore_index = ignore_index
        self.poly_power = poly_power
        super().__init__(*args, **kwargs)

    def _lr_at(self, step: int) -> float:
        cfg = self.config
        return poly_lr(step, self.total_steps, self.warmup_steps, cfg.lr, cfg.min_lr, self.poly_power)

    def _forward_loss(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, micro: int) -> Tuple[torch.Tensor, float, float]:
        with autocast_context(self.device, self.config.amp):
            outputs = self.ddp_model(images)
        loss = self.model.loss(outputs, labels, self.ignore_index)
        logits = outputs[0] if isinstance(outputs, tuple) else outputs
        valid = labels != self.ignore_index
        correct = float(((logits.argmax(1) == labels) & valid).sum())
        return loss, correct, float(valid.sum())

    def _evaluate(self, model: nn.Module) -> SegEvalResult:
        return evaluate_segmentation(model, self.val_loader, self.device, self.num_classes, self.config.amp,
                                     self.config.channels_last, self.info, ignore_index=self.ignore_index)
