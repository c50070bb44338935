"""``create_model``: one builder owning the concerns every family shares: config overrides,
pretrained loading, gradient checkpointing and ``features_only``.

Each family file registers short entry points that call :func:`build_model` with the family's
model class, the variant's config dataclass and its ``checkpoint_filter_fn``. A model class is
constructed as ``cls(cfg, num_classes=..., in_chans=..., drop_path_rate=...)`` and offers
``feature_info``, ``forward_features``, ``forward_head``, ``forward_intermediates``,
``reset_classifier``, ``set_grad_checkpointing`` and ``classifier_name``.
"""
from __future__ import annotations

import dataclasses
import inspect
import os
from typing import Callable, Optional, Sequence, Type

import torch.nn as nn

from ._checkpoint import FilterFn, load_checkpoint
from ._features import FeatureExtractor
from ._registry import get_entry_point

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def default_pretrained_cfg(in_chans: int = 3, size: int = 224) -> dict:
    """timm's per-model input configuration: what the weights expect at evaluation time
    (``crop_mode`` "center": resize the shorter side to size / crop_pct and crop the centre;
    "squash": resize the image to size x size, as the official codes evaluate at 384)."""
    return dict(input_size=(in_chans, size, size), mean=IMAGENET_MEAN, std=IMAGENET_STD, crop_pct=0.875,
                interpolation="bicubic", crop_mode="center")


def pretrained_cfg_of(name: str, in_chans: int = 3) -> dict:
    """The input configuration registered for model ``name`` (its official weights' evaluation
    resolution, normalisation, crop and interpolation), without building the model."""
    registered = getattr(get_entry_point(name), "pretrained_cfg", {})
    cfg = {**default_pretrained_cfg(in_chans), **registered}
    cfg["input_size"] = (in_chans, *tuple(cfg["input_size"])[1:])
    return cfg


def _check_pretrained_path(pretrained) -> None:
    if pretrained is None or isinstance(pretrained, (str, os.PathLike)):
        return
    raise TypeError(
        f"pretrained takes the path of a local checkpoint file (convzoo never downloads weights), got "
        f"{pretrained!r}; for example create_model('convnext_tiny', pretrained='convnext_tiny_1k_224.pth')"
    )


def build_model(
    model_cls: Type[nn.Module],
    cfg,
    filter_fn: Optional[FilterFn] = None,
    pretrained: Optional[str | os.PathLike] = None,
    num_classes: int = 1000,
    in_chans: int = 3,
    drop_path_rate: float = 0.0,
    features_only: bool = False,
    out_indices: Sequence[int] = (0, 1, 2, 3),
    grad_checkpointing: bool = False,
    pretrained_cfg: Optional[dict] = None,
    norm_layer: Optional[Callable[[int], nn.Module]] = None,
    **overrides,
) -> nn.Module:
    """Build ``model_cls`` from ``cfg`` (a dataclass) with ``overrides`` applied to its fields.

    ``model.pretrained_cfg`` is :func:`default_pretrained_cfg` updated with ``pretrained_cfg``
    (``input_size``, ``mean``, ``std``, ``crop_pct``, ``interpolation``; a trained model adds
    ``label_names`` and ``dataset``); ``convzoo eval`` evaluates with it.
    """
    _check_pretrained_path(pretrained)
    fields = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(
            f"{model_cls.__name__} has no option {', '.join(map(repr, unknown))}; its options are {', '.join(sorted(fields))}"
        )
    if not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be an int >= 0, got {num_classes!r}")
    if not isinstance(in_chans, int) or in_chans < 1:
        raise ValueError(f"in_chans must be an int >= 1, got {in_chans!r}")
    if not 0.0 <= drop_path_rate < 1.0:
        raise ValueError(f"drop_path_rate must be in [0, 1), got {drop_path_rate!r}")
    cfg = dataclasses.replace(cfg, **overrides)
    drop_rate = getattr(cfg, "drop_rate", 0.0)  # every family's dropout before the classifier (timm's meaning)
    if not 0.0 <= drop_rate < 1.0:
        raise ValueError(f"drop_rate must be in [0, 1), got {drop_rate!r}")
    layers = {} if norm_layer is None else {"norm_layer": norm_layer}  # e.g. nn.SyncBatchNorm, where a family takes it
    if layers and "norm_layer" not in inspect.signature(model_cls).parameters:
        raise TypeError(f"{model_cls.__name__} takes no norm_layer")
    model = model_cls(cfg, num_classes=num_classes, in_chans=in_chans, drop_path_rate=drop_path_rate, **layers)
    model.cfg = cfg
    model.num_classes = num_classes
    model.in_chans = in_chans
    model.checkpoint_filter_fn = filter_fn
    model.pretrained_cfg = {**default_pretrained_cfg(in_chans), **(pretrained_cfg or {})}
    model.pretrained_cfg["input_size"] = (in_chans, *tuple(model.pretrained_cfg["input_size"])[1:])
    if pretrained is not None:
        load_checkpoint(model, pretrained, filter_fn)
    if grad_checkpointing:
        model.set_grad_checkpointing(True)
    if features_only:
        return FeatureExtractor(model, out_indices)
    return model


def create_model(name: str, pretrained: Optional[str | os.PathLike] = None, **kwargs) -> nn.Module:
    """Create the registered model ``name``.

    Args:
        name: a name from :func:`convzoo.list_models`.
        pretrained: a local checkpoint: the family's official layout or convzoo's safetensors.
        **kwargs: ``num_classes``, ``in_chans``, ``drop_path_rate``, ``drop_rate`` (dropout
            before the classifier, in every family's config), ``features_only``,
            ``out_indices``, ``grad_checkpointing``, ``pretrained_cfg`` and any field of the
            family's config.
    """
    entry = get_entry_point(name)
    _check_pretrained_path(pretrained)
    registered = getattr(entry, "pretrained_cfg", None)
    if registered:
        kwargs["pretrained_cfg"] = {**registered, **(kwargs.get("pretrained_cfg") or {})}
    model = entry(pretrained=pretrained, **kwargs)
    target = model.model if isinstance(model, FeatureExtractor) else model
    target.model_name = name
    return model
