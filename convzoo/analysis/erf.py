"""Effective receptive field (ERF), measured the way the RepLKNet paper does (Ding et al.,
"Scaling Up Your Kernels to 31x31", CVPR 2022, section 5 and its ``erf/`` scripts).

For each input image ``x`` (1, C, H, W) and the last feature map ``F = f(x)`` (1, C', h, w)
(the last stage's output, before pooling and head):

1. the central point ``F[:, :, h // 2, w // 2]`` is passed through ReLU and summed over channels;
2. its gradient ``g`` with respect to ``x`` is taken, passed through ReLU (only the positive
   contributions count, as in the official script) and summed over the input channels: an
   (H, W) contribution map;
3. the maps are averaged over the images.

For reading and comparing, the averaged map ``A`` becomes ``S = log10(A + 1) / max(log10(A + 1))``
(scores in [0, 1]). The **high-contribution area ratio** at threshold ``t`` is the area of the
smallest square centred on the image centre, of odd side ``2r + 1`` with ``r >= 1``, whose scores
sum to more than ``t`` times the total of ``S``, divided by the image area (the paper's
``get_rectangle``). A larger ratio means the contributions are spread more widely: a larger ERF.
A square that would reach past the border is clipped to the image, so the ratio never exceeds 1.

The log makes the ratios depend on the magnitude of the gradients: a network with large
gradients gets a flatter ``S`` and larger ratios. :class:`ERFResult` therefore also gives the
ratios of the contribution map itself (``area_ratios_linear``), which do not change when the map
is scaled. For a randomly initialised network with BatchNorm, whose running statistics are
still the defaults (mean 0, variance 1), eval-mode activations and gradients have arbitrary
scales; :func:`recalibrate_batchnorm` re-estimates the statistics on a few images first, which
puts the network in the state it computes in training mode.
"""
from __future__ import annotations

import dataclasses
import logging
import math
from typing import Dict, Iterable, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

_logger = logging.getLogger(__name__)

THRESHOLDS = (0.2, 0.3, 0.5, 0.99)
_CALIBRATION_BATCH = 8


@dataclasses.dataclass
class ERFResult:
    """The ERF of one model. ``contribution`` is the (H, W) map averaged over ``num_images``."""

    model: str
    input_size: Tuple[int, int]
    feature_size: Tuple[int, int]  # (h, w) of the last feature map
    num_images: int
    contribution: torch.Tensor  # (H, W) float64, mean over images of the aggregated positive gradient
    area_ratios: Dict[float, Optional[float]]  # threshold -> high-contribution area ratio (log scores)
    side_lengths: Dict[float, Optional[int]]  # threshold -> side of that square, in input pixels
    area_ratios_linear: Dict[float, Optional[float]]  # the same ratio on the contribution itself (no log)

    def scores(self) -> torch.Tensor:
        """The (H, W) log-scaled scores in [0, 1] that the heatmap shows."""
        return log_scores(self.contribution)

    def to_dict(self) -> dict:
        """JSON-ready summary (the map itself left out)."""
        return {
            "model": self.model,
            "input_size": list(self.input_size),
            "feature_size": list(self.feature_size),
            "num_images": self.num_images,
            "area_ratios": {str(t): r for t, r in self.area_ratios.items()},
            "side_lengths": {str(t): s for t, s in self.side_lengths.items()},
            "area_ratios_linear": {str(t): r for t, r in self.area_ratios_linear.items()},
        }


def last_feature_map(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The (N, C, h, w) output of the last stage of ``model`` (before pooling and head).

    Uses ``forward_intermediates`` when the model has it (every convzoo model), otherwise
    ``forward_features``, otherwise the model's own output, which must then be a 4-D map.
    """
    if hasattr(model, "forward_intermediates") and getattr(model, "feature_info", None):
        features = model.forward_intermediates(x, [len(model.feature_info) - 1])[-1]
    elif hasattr(model, "forward_features"):
        features = model.forward_features(x)
    else:
        features = model(x)
    if not isinstance(features, torch.Tensor) or features.dim() != 4:
        shape = tuple(features.shape) if isinstance(features, torch.Tensor) else type(features).__name__
        raise ValueError(f"the ERF needs an (N, C, h, w) feature map from {type(model).__name__}, got {shape}")
    return features


def contribution_map(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
    """Sum over the batch of the positive input gradients of the central point, summed over
    channels: an (H, W) map for ``x`` (N, C, H, W), and the feature map's (h, w)."""
    x = x.detach().requires_grad_(True)
    features = last_feature_map(model, x)
    h, w = features.shape[-2:]
    centre = F.relu(features[:, :, h // 2, w // 2]).sum()
    if not centre.requires_grad:
        return torch.zeros(x.shape[-2:], dtype=torch.float64), (h, w)
    (grad,) = torch.autograd.grad(centre, x)
    return F.relu(grad).sum((0, 1)).double().cpu(), (h, w)


def log_scores(contribution: torch.Tensor) -> torch.Tensor:
    """``log10(A + 1)`` rescaled to a maximum of 1 (all zeros stay zeros)."""
    scores = torch.log10(contribution.double() + 1)
    peak = scores.max()
    return scores / peak if peak > 0 else scores


def high_contribution_area(scores: torch.Tensor, threshold: float) -> Tuple[Optional[int], Optional[float]]:
    """(side, area ratio) of the smallest centred square of side ``2r + 1`` (r >= 1) holding more
    than ``threshold`` of the total score of the (H, W) ``scores``; (None, None) if the map is 0."""
    if not 0 < threshold < 1:
        raise ValueError(f"threshold must be in (0, 1), got {threshold}")
    height, width = scores.shape
    total = float(scores.sum())
    if total <= 0 or not math.isfinite(total):
        return None, None
    cy, cx = height // 2, width // 2
    r = 1
    while True:  # ends at the latest when the square covers the whole image
        window = scores[max(cy - r, 0): cy + r + 1, max(cx - r, 0): cx + r + 1]
        if float(window.sum()) / total > threshold or window.numel() == height * width:
            return 2 * r + 1, window.numel() / (height * width)
        r += 1


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, images: Iterable[torch.Tensor], num_images: int,
                          device: str | torch.device = "cpu") -> int:
    """Re-estimate the running mean and variance of every BatchNorm of ``model`` as the plain
    average over the first ``num_images`` of ``images`` (batches (N, C, H, W) or (C, H, W)),
    with only the BatchNorms in training mode; returns how many BatchNorm layers were updated.
    The model is left in eval mode."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not norms or num_images < 1:
        return 0
    model.eval().to(device)
    momenta = [m.momentum for m in norms]
    for norm in norms:
        norm.reset_running_stats()
        norm.momentum = None  # cumulative average over the batches
        norm.train()
    seen, pending = 0, []
    try:
        for batch in images:
            batch = (batch.unsqueeze(0) if batch.dim() == 3 else batch)[: num_images - seen]
            pending.append(batch)
            seen += batch.shape[0]
            if seen >= num_images or sum(b.shape[0] for b in pending) >= _CALIBRATION_BATCH:
                model(torch.cat(pending).to(device))  # batches of several images: no 1x1 maps of 1 sample
                pending = []
            if seen >= num_images:
                break
        if pending:
            model(torch.cat(pending).to(device))
    finally:
        for norm, momentum in zip(norms, momenta):
            norm.momentum = momentum
        model.eval()
    _logger.info("recalibrated %d BatchNorm layers on %d images", len(norms), seen)
    return len(norms)


def effective_receptive_field(
    model: nn.Module,
    images: Iterable[torch.Tensor],
    num_images: int,
    name: Optional[str] = None,
    thresholds: Sequence[float] = THRESHOLDS,
    device: str | torch.device = "cpu",
) -> ERFResult:
    """The ERF of ``model`` over the first ``num_images`` images of ``images``.

    Args:
        model: a network whose last stage yields an (N, C, h, w) map (see :func:`last_feature_map`);
            it is put in eval mode (BatchNorm statistics fixed, no drop path).
        images: batches (N, C, H, W) or single images (C, H, W), already normalised, all one size.
        num_images: how many images to average over (fewer if ``images`` runs out first).
        thresholds: the thresholds of the high-contribution area ratios.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be >= 1, got {num_images}")
    model = model.eval().to(device)
    total: Optional[torch.Tensor] = None
    counted, feature_size, input_size = 0, None, None
    for batch in images:
        batch = batch.unsqueeze(0) if batch.dim() == 3 else batch
        batch = batch[: num_images - counted].to(device)
        if input_size is not None and tuple(batch.shape[-2:]) != input_size:
            raise ValueError(f"all images must have one size, got {tuple(batch.shape[-2:])} after {input_size}")
        input_size = tuple(batch.shape[-2:])
        grad_map, feature_size = contribution_map(model, batch)
        if not torch.isfinite(grad_map).all():
            _logger.warning("non-finite gradient for a batch of %d image(s); skipped", batch.shape[0])
            continue
        total = grad_map if total is None else total + grad_map
        counted += batch.shape[0]
        _logger.info("ERF %s: %d/%d images", name or type(model).__name__, counted, num_images)
        if counted >= num_images:
            break
    if total is None:
        raise ValueError("no image gave a finite gradient (or no images were given)")
    contribution = total / counted
    scores = log_scores(contribution)
    areas = {float(t): high_contribution_area(scores, t) for t in thresholds}
    return ERFResult(
        model=name or getattr(model, "model_name", type(model).__name__),
        input_size=input_size,
        feature_size=tuple(feature_size),
        num_images=counted,
        contribution=contribution,
        area_ratios={t: a[1] for t, a in areas.items()},
        side_lengths={t: a[0] for t, a in areas.items()},
        area_ratios_linear={float(t): high_contribution_area(contribution, t)[1] for t in thresholds},
    )
