"""``features_only`` wrapper: returns the feature maps of chosen stages of a model.

Contract for every model family: ``model.feature_info`` is a list with one dict per stage,
``{"num_chs": C, "reduction": stride, "module": "stages.i"}``, and
``model.forward_intermediates(x, indices)`` returns the (N, C_i, H/stride_i, W/stride_i)
maps of those stage indices, in order.
"""
from __future__ import annotations

from typing import List, Sequence

import torch
import torch.nn as nn


class FeatureExtractor(nn.Module):
    """Wraps a classification model; ``forward(x)`` returns a list of stage feature maps."""

    def __init__(self, model: nn.Module, out_indices: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        num_stages = len(model.feature_info)
        indices = []
        for i in out_indices:
            if not isinstance(i, int) or not -num_stages <= i < num_stages:
                raise ValueError(f"out_indices must hold stage indices in [0, {num_stages}), got {tuple(out_indices)}")
            indices.append(i % num_stages)
        if not indices:
            raise ValueError("out_indices must name at least one stage")
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(0)
        self.model = model
        self.out_indices = tuple(indices)
        self.feature_info = [dict(model.feature_info[i]) for i in self.out_indices]

    def channels(self) -> List[int]:
        return [f["num_chs"] for f in self.feature_info]

    def reductions(self) -> List[int]:
        return [f["reduction"] for f in self.feature_info]

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        return self.model.forward_intermediates(x, self.out_indices)
