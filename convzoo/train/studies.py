"""Named studies: the RepLKNet paper's guidelines (and its blog's dilated-vs-dense comparison)
re-run as small, fixed-budget training experiments on the built-in dense task.

Every study trains its variants of one narrow three-stage RepLKNet with a light Semantic FPN
head (``semfpn_replknet_tiny`` with the options of ``convzoo train --task segmentation``'s
demo model) on the built-in band segmentation set (:class:`~convzoo.train.segdata.BandsDataset`:
each band's class is the colour of a marker up to the image width away, the dense task where
the paper sees large kernels matter) for the same budget, once per seed, and reports the
validation mIoU of the last epoch.

Studies (:data:`STUDIES`):

- ``kernel-size``: stage kernels 3-3-3, 7-7-7, 13-13-13 and 31-29-27 (small 5x5 branch where
  the kernel is larger than 5);
- ``shortcut``: 31-29-27 with and without the RepLK blocks' identity shortcut (guideline 2);
- ``reparam``: 31-29-27 with and without the parallel 5x5 kernel (guideline 3);
- ``small-maps``: a 3x3 or a 13x13 kernel in the last stage, whose maps are 2 rows high
  (guideline 5: large kernels help even on maps smaller than the kernel);
- ``dilated-vs-dense``: 31x31 dense kernels against 7x7 kernels with dilation 5, which span
  the same 31 pixels with 49 taps (no re-parameterization branch in either).
"""
from __future__ import annotations

import dataclasses
import logging
import statistics
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from ..layers.reparam import ConvNormAct, DepthwiseConv2d, ReparamLargeKernelConv

_logger = logging.getLogger(__name__)

MODEL = "semfpn_replknet_tiny"
BASE_ARGS = {"kernel_sizes": (31, 29, 27), "depths": (1, 1, 2), "channels": (32, 64, 128),
             "head_channels": 32, "head_fpn_channels": 64}


@dataclasses.dataclass(frozen=True)
class Variant:
    """One arm of a study: ``model_args`` over :data:`BASE_ARGS`, and an optional change made
    to the built model (``dilation``: every large kernel becomes ``(kernel, dilation)``)."""

    label: str
    model_args: Dict
    dilated: Optional[Tuple[int, int]] = None


@dataclasses.dataclass(frozen=True)
class Study:
    name: str
    question: str
    paper: str  # what the paper (or blog) found
    variants: Tuple[Variant, ...]


STUDIES: Dict[str, Study] = {s.name: s for s in (
    Study("kernel-size", "does a larger depthwise kernel help the dense task?",
          "RepLKNet Table 5: larger kernels are better, most on ADE20K (3-3-3-3 -> 31-29-27-13: +~4 mIoU)",
          (Variant("3-3-3", dict(kernel_sizes=(3, 3, 3), small_kernel=None)),
           Variant("7-7-7", dict(kernel_sizes=(7, 7, 7), small_kernel=5)),
           Variant("13-13-13", dict(kernel_sizes=(13, 13, 13), small_kernel=5)),
           Variant("31-29-27", dict(kernel_sizes=(31, 29, 27), small_kernel=5)))),
    Study("shortcut", "do large kernels need the identity shortcut?",
          "guideline 2: without shortcuts large kernels lose badly (MobileNet V2 13x13: -15.8 ImageNet top-1 vs -10.7 for 3x3)",
          (Variant("with shortcut", dict(small_kernel=5)),
           Variant("without shortcut", dict(small_kernel=5, lk_shortcut=False)))),
    Study("reparam", "does the parallel small kernel (re-parameterized away) help?",
          "guideline 3: re-parameterizing with a small kernel helps large kernels (31x31 + 5x5 better than 31x31 alone)",
          (Variant("31-29-27 + 5x5 branch", dict(small_kernel=5)),
           Variant("31-29-27 alone", dict(small_kernel=None)))),
    Study("small-maps", "is a large kernel useful on maps smaller than it?",
          "guideline 5: a 13x13 kernel helps even on 7x7 maps (last stage of RepLKNet: 13 better than 7)",
          (Variant("last stage 3x3", dict(kernel_sizes=(31, 29, 3), small_kernel=None)),
           Variant("last stage 13x13", dict(kernel_sizes=(31, 29, 13), small_kernel=None)))),
    Study("dilated-vs-dense", "is a dilated kernel as good as a dense one of the same span?",
          "RepLKNet authors: a dilated kernel of the same span is much weaker than a dense one",
          (Variant("dense 31x31", dict(kernel_sizes=(31, 31, 31), small_kernel=None)),
           Variant("dilated 7x7, d=5 (span 31)", dict(kernel_sizes=(31, 31, 31), small_kernel=None), dilated=(7, 5)))),
)}


@dataclasses.dataclass(frozen=True)
class StudyBudget:
    """What every variant gets: epochs over ``train_size`` fresh band images, one run per seed."""

    epochs: int = 4
    train_size: int = 1024
    val_size: int = 256
    batch_size: int = 16
    lr: float = 2e-3
    seeds: Tuple[int, ...] = (0,)
    height: int = 32
    width: int = 256

    def __post_init__(self):
        if min(self.epochs, self.train_size, self.val_size, self.batch_size) < 1 or not self.seeds:
            raise ValueError("epochs, train_size, val_size and batch_size must be >= 1 and seeds non-empty")
        if self.train_size < self.batch_size:
            raise ValueError(f"train_size ({self.train_size}) must hold one batch ({self.batch_size})")


@dataclasses.dataclass
class VariantResult:
    label: str
    params: int
    miou: List[float]  # per seed, last epoch, in %
    pixel_acc: List[float]
    seconds: float

    @property
    def mean(self) -> float:
        return statistics.fmean(self.miou)

    @property
    def spread(self) -> float:
        return statistics.stdev(self.miou) if len(self.miou) > 1 else 0.0


def _dilate_large_kernels(model: nn.Module, kernel: int, dilation: int) -> None:
    """Replace every :class:`ReparamLargeKernelConv` by a ``kernel`` x ``kernel`` depthwise conv
    with ``dilation`` + BatchNorm (same channels and stride), in place."""
    for name, module in list(model.named_modules()):
        if isinstance(module, ReparamLargeKernelConv):
            conv = DepthwiseConv2d(module.channels, kernel, module.stride, dilation=dilation, bias=False)
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, ConvNormAct(conv, nn.BatchNorm2d(module.channels)))


def build_variant(variant: Variant, num_classes: int) -> nn.Module:
    from ..models import create_model

    model = create_model(MODEL, num_classes=num_classes, **{**BASE_ARGS, **variant.model_args})
    if variant.dilated is not None:
        _dilate_large_kernels(model, *variant.dilated)
    return model


def _train_once(variant: Variant, budget: StudyBudget, seed: int) -> Tuple[float, float, int]:
    """(val mIoU %, val pixel accuracy %, params) of ``variant`` trained with ``seed``."""
    from .loop import TrainConfig
    from .segdata import BandsConfig, BandsDataset
    from .segmentation import SegmentationTrainer

    data = BandsConfig(height=budget.height, width=budget.width, num_train=budget.train_size, num_val=budget.val_size)
    train_set, val_set = BandsDataset("train", data), BandsDataset("val", data)
    torch.manual_seed(seed)
    model = build_variant(variant, train_set.num_classes)
    config = TrainConfig(epochs=budget.epochs, batch_size=budget.batch_size, lr=budget.lr, min_lr=budget.lr / 100,
                         warmup_epochs=min(1.0, budget.epochs / 4), label_smoothing=0.0, seed=seed)
    trainer = SegmentationTrainer(model, train_set, val_set, train_set.num_classes, config)
    last = trainer.fit()[-1]
    return last["val_miou"], last["val_aacc"], sum(p.numel() for p in model.parameters())


def run_study(name: str, budget: StudyBudget = StudyBudget(),
              on_run: Optional[Callable[[str, int, float], None]] = None) -> List[VariantResult]:
    """Train every variant of study ``name`` once per seed; ``on_run(label, seed, miou)`` after each run."""
    if name not in STUDIES:
        raise ValueError(f"unknown study {name!r}; the studies are {', '.join(STUDIES)}")
    results = []
    for variant in STUDIES[name].variants:
        start, mious, accs, params = time.perf_counter(), [], [], 0
        for seed in budget.seeds:
            miou, acc, params = _train_once(variant, budget, seed)
            mious.append(miou)
            accs.append(acc)
            _logger.info("%s / %s / seed %d: val mIoU %.2f", name, variant.label, seed, miou)
            if on_run is not None:
                on_run(variant.label, seed, miou)
        results.append(VariantResult(variant.label, params, mious, accs, time.perf_counter() - start))
    return results


def markdown_table(name: str, budget: StudyBudget, results: Sequence[VariantResult]) -> str:
    study = STUDIES[name]
    lines = [f"### {name}: {study.question}", "",
             f"Paper: {study.paper}.", "",
             f"Budget: {budget.epochs} epochs x {budget.train_size} band images ({budget.height}x{budget.width}), "
             f"batch {budget.batch_size}, lr {budget.lr:g}, seeds {', '.join(map(str, budget.seeds))}; "
             f"{budget.val_size} validation images.", "",
             "| variant | params | val mIoU % (mean) | spread (std) | per seed | pixel acc % (mean) | seconds |",
             "|---|---:|---:|---:|---|---:|---:|"]
    for r in results:
        lines.append(f"| {r.label} | {r.params / 1e6:.3f}M | {r.mean:.2f} | {r.spread:.2f} | "
                     f"{', '.join(f'{m:.2f}' for m in r.miou)} | {statistics.fmean(r.pixel_acc):.2f} | {r.seconds:.0f} |")
    return "\n".join(lines) + "\n"


def to_json(name: str, budget: StudyBudget, results: Sequence[VariantResult]) -> dict:
    study = STUDIES[name]
    return {"study": name, "question": study.question, "paper": study.paper, "model": MODEL, "base_args": BASE_ARGS,
            "budget": dataclasses.asdict(budget),
            "variants": [{"label": r.label, "params": r.params, "miou": r.miou, "miou_mean": r.mean,
                          "miou_std": r.spread, "pixel_acc": r.pixel_acc, "seconds": r.seconds,
                          "model_args": v.model_args, "dilated": v.dilated}
                         for r, v in zip(results, study.variants)]}
