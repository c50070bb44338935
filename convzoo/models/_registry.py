"""The model registry: entry points registered by name, looked up with close-match errors."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Dict, List, Mapping, Optional

import torch.nn as nn

_ENTRY_POINTS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Optional[Callable[..., nn.Module]] = None, *, pretrained_cfg: Optional[Mapping] = None):
    """Register ``fn`` (an entry point taking ``create_model``'s keyword arguments) under its name.

    ``@register_model(pretrained_cfg=dict(input_size=(3, 384, 384), crop_pct=1.0))`` records what
    the model's released weights expect at evaluation (kept as ``fn.pretrained_cfg``; the keys
    not given are :func:`convzoo.models._builder.default_pretrained_cfg`'s).
    """
    if fn is None:
        return lambda f: register_model(f, pretrained_cfg=pretrained_cfg)
    name = fn.__name__
    if name in _ENTRY_POINTS:
        raise ValueError(f"model {name!r} is registered twice")
    if pretrained_cfg is not None:
        fn.pretrained_cfg = dict(pretrained_cfg)
    _ENTRY_POINTS[name] = fn
    return fn


def list_models(pattern: Optional[str] = None) -> List[str]:
    """Sorted names of the registered models, filtered by a shell-style ``pattern`` ('convnext*')."""
    names = sorted(_ENTRY_POINTS)
    if pattern:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    return names


def get_entry_point(name: str) -> Callable[..., nn.Module]:
    """The entry point of ``name``; a ``ValueError`` listing the close names when it is unknown."""
    if not isinstance(name, str):
        raise TypeError(f"model name must be a str, got {type(name).__name__}")
    try:
        return _ENTRY_POINTS[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_ENTRY_POINTS), n=5, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; convzoo.list_models() lists them"
        raise ValueError(f"unknown model {name!r}{hint}") from None
