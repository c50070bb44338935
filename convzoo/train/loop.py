"""The training and evaluation loop.

The recipe of the ConvNeXt / RepLKNet papers, scaled to the job: AdamW (no weight decay on
norms and biases), linear warm-up then cosine decay per optimizer step, label smoothing,
mixup/cutmix, drop path (set on the model), model EMA, gradient accumulation, autocast
(bf16/fp16), channels_last, DistributedDataParallel.

Reproducibility: the data of an epoch is a function of (seed, epoch) (see
:mod:`convzoo.train.data`), the global RNG (drop path, dropout) is re-seeded from
(seed, epoch, rank) at the start of every epoch, and the checkpoint written atomically at the
end of every epoch holds model, optimizer, EMA, grad scaler, RNG states, step and epoch. A run
resumed from the checkpoint of epoch k therefore computes exactly what the uninterrupted run
computes, whatever happened after epoch k.

The loop logs and reports through callbacks; it never prints.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from .data import EpochSampler, MixConfig, collate, mix_batch, one_hot_smoothed
from .distributed import DistInfo, all_reduce_sum, broadcast_buffers, parameters_in_sync, wrap_model

_logger = logging.getLogger(__name__)

CHECKPOINT_NAME = "checkpoint.pt"
METRICS_NAME = "metrics.jsonl"


@dataclasses.dataclass
class TrainConfig:
    """Hyper-parameters of a run. ``batch_size`` is per process; ``lr`` is the peak rate."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    min_lr: float = 1e-5
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    label_smoothing: float = 0.1
    accum_steps: int = 1
    clip_grad: Optional[float] = None
    ema_decay: float = 0.0
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    mix_prob: float = 1.0
    amp: str = "none"
    channels_last: bool = False
    sync_bn: bool = False
    workers: int = 0
    seed: int = 0
    eval_batch_size: Optional[int] = None
    bn_recalibrate: int = 0

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.accum_steps < 1:
            raise ValueError("epochs, batch_size and accum_steps must be >= 1")
        if self.lr <= 0 or self.min_lr < 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("lr must be > 0; min_lr, weight_decay and warmup_epochs >= 0")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1) (0 turns EMA off), got {self.ema_decay}")
        if self.bn_recalibrate < 0:
            raise ValueError(f"bn_recalibrate must be >= 0 batches (0 turns it off), got {self.bn_recalibrate}")
        if self.amp not in ("none", "bf16", "fp16"):
            raise ValueError(f"amp must be 'none', 'bf16' or 'fp16', got {self.amp!r}")


def cosine_lr(step: int, total_steps: int, warmup_steps: int, peak: float, floor: float) -> float:
    """Learning rate at optimizer ``step``: linear warm-up to ``peak``, then cosine to ``floor``."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * min(1.0, progress)))


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """Two AdamW groups: weights with decay; biases, norms and other 1-d parameters without."""
    decay, no_decay = [], []
    for param in model.parameters():
        if param.requires_grad:
            (no_decay if param.ndim <= 1 else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Recompute the running statistics of every BatchNorm of ``model`` with its current weights
    ("precise BN"): reset them, then take the cumulative average of the batch statistics over
    ``batches`` (image tensors (N, C, H, W)), in train mode for the norms only (dropout and drop
    path stay off), no gradient. Returns the number of BatchNorm layers (0: nothing done).

    The running averages training leaves mix the statistics of weights the optimizer has since
    changed; after a short run they can make the eval-mode network much worse than the
    train-mode one (docs/deploy.md measures this on the MobileNets)."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    was_training, momenta = model.training, [m.momentum for m in norms]
    model.eval()
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative moving average
        norm.train()
    try:
        for images in batches:
            model(images)
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.train(was_training)
    return len(norms)


class ModelEma:
    """Exponential moving average of a model's parameters and buffers (Polyak averaging).

    The decay warms up as ``min(decay, (1 + n) / (10 + n))`` over the first updates so the
    average is not dominated by the random initialisation.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for ema_value, value in zip(self.module.state_dict().values(), model.state_dict().values()):
            if ema_value.is_floating_point():
                ema_value.lerp_(value.to(ema_value.dtype), 1.0 - decay)
            else:
                ema_value.copy_(value)

    def state_dict(self) -> dict:
        return {"module": self.module.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state["module"])
        self.updates = int(state["updates"])


@dataclasses.dataclass
class EvalResult:
    """Accuracy (in %) and speed of one pass over a validation set."""

    top1: float
    top5: float
    loss: float
    num_images: int
    seconds: float
    skipped: int = 0

    @property
    def images_per_second(self) -> float:
        return self.num_images / self.seconds if self.seconds > 0 else 0.0

    def metrics(self) -> Dict[str, float]:
        """The scalars a metrics.jsonl record holds (each prefixed with ``val_`` / ``ema_val_``)."""
        return {"top1": self.top1, "top5": self.top5, "loss": self.loss}


@dataclasses.dataclass
class StepProgress:
    """What a progress display needs after each optimizer step."""

    epoch: int
    epochs: int
    step: int
    steps: int
    loss: float
    accuracy: float
    images_per_second: float
    lr: float
    eta_seconds: float


def autocast_context(device: torch.device, amp: str):
    if amp == "none":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if amp == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


def atomic_torch_save(obj, path: str) -> None:
    """``torch.save`` to a temporary file, flushed to disk, then renamed over ``path``."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as handle:
        torch.save(obj, handle)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def load_training_checkpoint(path: str) -> dict:
    """Read a checkpoint written by :class:`Trainer` (tensors and plain Python values only)."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - unpickling fails in many ways on a foreign file
        raise ValueError(f"{path} is not a readable checkpoint: it cannot be read as a PyTorch checkpoint "
                         f"(torch.save) ({type(err).__name__}: {err})") from None
    if not isinstance(state, dict) or state.get("format") != "convzoo-train":
        raise ValueError(f"{path} is not a convzoo training checkpoint")
    return state


class EvalBatches:
    """The non-empty ``(images, targets)`` batches of an evaluation loader (yielding
    ``(images, targets, skipped_paths)``), moved to ``device`` (images channels-last on request).
    After the loop, ``skipped`` counts the unreadable images the loader dropped and ``seconds``
    the time the loop took (the GPU's queued work included). Shared by every evaluation loop."""

    def __init__(self, loader: DataLoader, device: torch.device, channels_last: bool = False):
        self.loader, self.device, self.channels_last = loader, device, channels_last
        self.skipped = 0
        self.seconds = 0.0

    def __iter__(self):
        start = time.perf_counter()
        for images, targets, skipped_paths in self.loader:
            self.skipped += len(skipped_paths)
            if images.numel() == 0:
                continue
            images = images.to(self.device, non_blocking=True)
            if self.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            yield images, targets.to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds = time.perf_counter() - start


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, device: torch.device, amp: str = "none",
             channels_last: bool = False, info: DistInfo = DistInfo()) -> EvalResult:
    """Top-1/top-5 accuracy, mean loss and throughput of ``model`` over ``loader`` (all ranks)."""
    model.eval()
    correct1 = correct5 = loss_sum = count = 0.0
    batches = EvalBatches(loader, device, channels_last)
    for images, labels in batches:
        with autocast_context(device, amp):
            logits = model(images)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hits = top == labels[:, None]
        correct1 += hits[:, 0].sum().item()
        correct5 += hits.any(dim=1).sum().item()
        count += labels.shape[0]
    correct1, correct5, loss_sum, count, skipped = all_reduce_sum([correct1, correct5, loss_sum, count, batches.skipped], info)
    denominator = max(count, 1.0)
    return EvalResult(
        top1=100.0 * correct1 / denominator, top5=100.0 * correct5 / denominator, loss=loss_sum / denominator,
        num_images=int(count), seconds=batches.seconds, skipped=int(skipped),
    )


def make_loader(dataset: Dataset, batch_size: int, sampler: EpochSampler, workers: int, device: torch.device, drop_last: bool,
                collate_fn: Callable = collate) -> DataLoader:
    return DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate_fn,
        pin_memory=device.type == "cuda", drop_last=drop_last, persistent_workers=workers > 0,
    )


class Trainer:
    """Trains ``model`` on ``train_set``, validating on ``val_set`` after every epoch.

    Args:
        model: the (unwrapped) model, already configured (drop path, grad checkpointing).
        train_set / val_set: data sets yielding ``(image, label, skipped_paths)`` for a key
            from :class:`EpochSampler` (see :mod:`convzoo.train.data`).
        num_classes: number of classes (for label smoothing and mixing).
        config: the hyper-parameters.
        info: rank, world size and device of this process.
        output_dir: where the checkpoint, the metrics JSONL and the final weights go (rank 0).
        metadata: what a checkpoint must carry besides the state to rebuild the run
            (model name and options, data description), stored under ``"meta"``.

    Subclasses for other tasks (:class:`convzoo.train.segmentation.SegmentationTrainer`)
    override ``collate_fn``, ``best_metric``, :meth:`_lr_at`, :meth:`_forward_loss` and :meth:`_evaluate`.
    """

    collate_fn = staticmethod(collate)
    best_metric = "val_top1"

    def __init__(self, model: nn.Module, train_set: Dataset, val_set: Dataset, num_classes: int, config: TrainConfig,
                 info: DistInfo = DistInfo(), output_dir: Optional[str] = None, metadata: Optional[dict] = None):
        self.config = config
        self.info = info
        self.device = info.device
        self.num_classes = num_classes
        self.output_dir = output_dir
        self.metadata = dict(metadata or {})
        memory_format = torch.channels_last if config.channels_last else torch.contiguous_format
        self.model = model.to(self.device, memory_format=memory_format)
        self.ema = ModelEma(self.model, config.ema_decay) if config.ema_decay > 0 else None
        self.ddp_model = wrap_model(self.model, info, sync_bn=config.sync_bn)
        if config.sync_bn and info.enabled:
            self.model = self.ddp_model.module
        self.optimizer = torch.optim.AdamW(param_groups(self.model, config.weight_decay), lr=config.lr, betas=(0.9, 0.999))
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=config.amp == "fp16" and self.device.type == "cuda")
        self.train_sampler = EpochSampler(len(train_set), config.seed, shuffle=True, rank=info.rank,
                                          world_size=info.world_size, drop_last=True)
        self.val_sampler = EpochSampler(len(val_set), config.seed, shuffle=False, rank=info.rank, world_size=info.world_size)
        self.train_loader = make_loader(train_set, config.batch_size, self.train_sampler, config.workers, self.device,
                                        drop_last=True, collate_fn=self.collate_fn)
        self.val_loader = make_loader(val_set, config.eval_batch_size or config.batch_size, self.val_sampler,
                                      config.workers, self.device, drop_last=False, collate_fn=self.collate_fn)
        self.steps_per_epoch = len(self.train_loader) // config.accum_steps
        if self.steps_per_epoch < 1:
            raise ValueError(
                f"the training set ({len(train_set)} images over {info.world_size} process(es)) is smaller than one "
                f"optimizer step of batch_size {config.batch_size} x accum_steps {config.accum_steps}; lower --batch-size"
            )
        self.total_steps = self.steps_per_epoch * config.epochs
        self.warmup_steps = int(round(config.warmup_epochs * self.steps_per_epoch))
        self.mix = MixConfig(config.mixup_alpha, config.cutmix_alpha, config.mix_prob)
        self.epoch = 0  # number of finished epochs
        self.step = 0  # number of optimizer steps taken
        self.history: List[dict] = []
        self.skipped_paths: set = set()

    # ---------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict:
        rng = {"torch": torch.get_rng_state()}
        if self.device.type == "cuda":
            rng["cuda"] = torch.cuda.get_rng_state(self.device)
        return {
            "format": "convzoo-train",
            "epoch": self.epoch,
            "step": self.step,
            "model": self.model.state_dict(),
            "model_ema": self.ema.state_dict() if self.ema is not None else None,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "scheduler": {"step": self.step, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps},
            "rng": rng,
            "config": dataclasses.asdict(self.config),
            "history": self.history,
            "skipped_paths": sorted(self.skipped_paths),
            "meta": self.metadata,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue from a checkpoint of this run (same model; epochs may be extended)."""
        self.model.load_state_dict(state["model"])
        if self.ema is not None:
            if state.get("model_ema") is None:
                raise ValueError("the checkpoint has no EMA weights but this run uses --model-ema")
            self.ema.load_state_dict(state["model_ema"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        if "cuda" in state["rng"] and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["rng"]["cuda"], self.device)
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
        self.history = list(state.get("history", []))
        self.skipped_paths = set(state.get("skipped_paths", []))

    def save_checkpoint(self) -> Optional[str]:
        if not (self.info.is_main and self.output_dir):
            return None
        path = os.path.join(self.output_dir, CHECKPOINT_NAME)
        atomic_torch_save(self.state_dict(), path)
        return path

    # ---------------------------------------------------------------- training
    def _seed_epoch(self, epoch: int) -> None:
        torch.manual_seed((self.config.seed * 1_000_003 + epoch) * 1_009 + self.info.rank)
        self.train_sampler.set_epoch(epoch)

    def _loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()

    def _lr_at(self, step: int) -> float:
        return cosine_lr(step, self.total_steps, self.warmup_steps, self.config.lr, self.config.min_lr)

    def _set_lr(self) -> float:
        lr = self._lr_at(self.step)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _optimizer_step(self) -> None:
        if self.config.clip_grad is not None:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.model.parameters(), self.config.clip_grad)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None:
            self.ema.update(self.model)
        self.step += 1

    def _forward_loss(self, images: torch.Tensor, labels: torch.Tensor, epoch: int, micro: int):
        """(loss, number right, number counted) of one micro-batch (label smoothing, mixing)."""
        cfg = self.config
        targets = one_hot_smoothed(labels, self.num_classes, cfg.label_smoothing)
        mix_rng = np.random.default_rng([cfg.seed, epoch, micro, self.info.rank])
        images, targets = mix_batch(images, targets, self.mix, mix_rng)
        with autocast_context(self.device, cfg.amp):
            logits = self.ddp_model(images)
        loss = self._loss(logits, targets)
        return loss, float((logits.argmax(dim=1) == labels).sum()), float(labels.shape[0])

    def train_one_epoch(self, epoch: int, on_step: Optional[Callable[[StepProgress], None]] = None) -> dict:
        """One pass over the training data; returns the epoch's mean loss, accuracy and speed."""
        cfg = self.config
        self._seed_epoch(epoch)
        self.ddp_model.train()
        loss_sum = correct = counted = seen = 0.0
        start = time.perf_counter()
        micro_steps = self.steps_per_epoch * cfg.accum_steps
        lr = self._set_lr()
        for micro, (images, labels, skipped) in enumerate(self.train_loader):
            if micro >= micro_steps:
                break
            self.skipped_paths.update(skipped)
            images, labels = images.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            last_micro = (micro + 1) % cfg.accum_steps == 0
            sync = contextlib.nullcontext() if (last_micro or not self.info.enabled) else self.ddp_model.no_sync()
            with sync:
                loss, right, count = self._forward_loss(images, labels, epoch, micro)
                self.scaler.scale(loss / cfg.accum_steps).backward()
            loss_sum += loss.item() * labels.shape[0]
            correct += right
            counted += count
            seen += labels.shape[0]
            if last_micro:
                lr = self._set_lr()
                self._optimizer_step()
                if on_step is not None:
                    elapsed = time.perf_counter() - start
                    done = (micro + 1) // cfg.accum_steps
                    on_step(StepProgress(
                        epoch=epoch, epochs=cfg.epochs, step=done, steps=self.steps_per_epoch,
                        loss=loss_sum / seen, accuracy=100.0 * correct / max(counted, 1.0),
                        images_per_second=seen * self.info.world_size / elapsed, lr=lr,
                        eta_seconds=elapsed / done * (self.steps_per_epoch - done),
                    ))
        if not math.isfinite(loss_sum):
            raise FloatingPointError(f"the training loss became {loss_sum} in epoch {epoch + 1}; lower --lr")
        seconds = time.perf_counter() - start
        loss_sum, correct, counted, seen = all_reduce_sum([loss_sum, correct, counted, seen], self.info)
        return {"train_loss": loss_sum / seen, "train_acc": 100.0 * correct / max(counted, 1.0),
                "train_images_per_second": seen / seconds, "lr": lr, "train_seconds": seconds}

    def _recalibration_batches(self):
        """The first ``config.bn_recalibrate`` training batches of the epoch just trained (images only)."""
        for index, (images, _, _) in enumerate(self.train_loader):
            if index >= self.config.bn_recalibrate:
                break
            images = images.to(self.device, non_blocking=True)
            yield images.contiguous(memory_format=torch.channels_last) if self.config.channels_last else images

    def _evaluate(self, model: nn.Module) -> EvalResult:
        return evaluate(model, self.val_loader, self.device, self.config.amp, self.config.channels_last, self.info)

    def validate(self) -> Dict[str, EvalResult]:
        broadcast_buffers(self.model, self.info)  # every rank scores its shard with rank 0's model
        results = {"model": self._evaluate(self.model)}
        if self.ema is not None:
            broadcast_buffers(self.ema.module, self.info)
            results["ema"] = self._evaluate(self.ema.module)
        return results

    def fit(self, on_step: Optional[Callable[[StepProgress], None]] = None,
            on_epoch: Optional[Callable[[dict], None]] = None, stop_after: Optional[int] = None) -> List[dict]:
        """Train from ``self.epoch`` to ``config.epochs`` (or until ``stop_after`` epochs are done)."""
        last = self.config.epochs if stop_after is None else min(self.config.epochs, stop_after)
        while self.epoch < last:
            epoch = self.epoch
            record = {"epoch": epoch + 1}
            record.update(self.train_one_epoch(epoch, on_step))
            record["step"] = self.step
            if self.config.bn_recalibrate:
                with autocast_context(self.device, self.config.amp):
                    recalibrate_batchnorm(self.model, self._recalibration_batches())
            for name, result in self.validate().items():
                prefix = "val" if name == "model" else "ema_val"
                record.update({f"{prefix}_{key}": value for key, value in result.metrics().items()})
                record["val_skipped"] = result.skipped
            record["train_skipped_total"] = int(all_reduce_sum([len(self.skipped_paths)], self.info)[0])
            if self.info.enabled:
                record["ranks_in_sync"] = parameters_in_sync(self.model, self.info)
            self.epoch += 1
            self.history.append(record)
            self.save_checkpoint()
            self._write_metrics()
            if on_epoch is not None:
                on_epoch(record)
        return self.history

    def _write_metrics(self) -> None:
        """Rewrite metrics.jsonl from the history, atomically: a new run's first epoch replaces an
        old run's file, and an interruption never leaves a torn or empty one."""
        if not (self.info.is_main and self.output_dir):
            return
        path = os.path.join(self.output_dir, METRICS_NAME)
        with open(path + ".tmp", "w") as handle:
            handle.writelines(json.dumps(record) + "\n" for record in self.history)
        os.replace(path + ".tmp", path)

    def final_model(self) -> nn.Module:
        """The weights to deploy: the EMA when it is on, the trained model otherwise."""
        return self.ema.module if self.ema is not None else self.model


def best_epoch(history: Sequence[dict], key: str = "val_top1") -> Optional[dict]:
    scored = [record for record in history if key in record]
    return max(scored, key=lambda record: record[key]) if scored else None
