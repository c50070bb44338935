"""The trainer of quantization-aware fine-tuning (``convzoo train --qat``).

It trains a :class:`convzoo.deploy.qat.QATModel` exactly as :class:`~convzoo.train.loop.Trainer`
trains a float model (data, checkpoints, resume, metrics.jsonl: the validation figures are those
of the fake-quantized model), and follows the QAT literature's schedule: from epoch
``freeze_bn_after`` on the BatchNorms keep their running statistics, from epoch
``freeze_observers_after`` on the quantization ranges stay fixed. The schedule is a function of
the epoch, so a resumed run freezes at the same points as an uninterrupted one.
"""
from __future__ import annotations

from typing import Callable, Optional

from .loop import StepProgress, Trainer


class QATTrainer(Trainer):
    """:class:`Trainer` of a ``QATModel`` with the freezing schedule (epochs counted from 0:
    ``freeze_bn_after=1`` freezes the statistics before the second epoch)."""

    def __init__(self, *args, freeze_bn_after: int, freeze_observers_after: int, **kwargs):
        if freeze_bn_after < 0 or freeze_observers_after < 0:
            raise ValueError(f"freeze_bn_after and freeze_observers_after must be >= 0, got {freeze_bn_after} "
                             f"and {freeze_observers_after}")
        super().__init__(*args, **kwargs)
        self.freeze_bn_after, self.freeze_observers_after = freeze_bn_after, freeze_observers_after

    def train_one_epoch(self, epoch: int, on_step: Optional[Callable[[StepProgress], None]] = None) -> dict:
        if epoch >= self.freeze_bn_after:
            self.model.freeze_bn_stats()
        if epoch >= self.freeze_observers_after:
            self.model.freeze_observers()
        return super().train_one_epoch(epoch, on_step)
