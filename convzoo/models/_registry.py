"""The model registry: entry points registered by name, looked up with close-match errors."""
from __future__ import annotations

import difflib
import fnmatch
from typing import Callable, Dict, List, Optional

import torch.nn as nn

_ENTRY_POINTS: Dict[str, Callable[..., nn.Module]] = {}


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``fn`` (an entry point taking ``create_model``'s keyword arguments) under its name."""
    name = fn.__name__
    if name in _ENTRY_POINTS:
        raise ValueError(f"model {name!r} is registered twice")
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
