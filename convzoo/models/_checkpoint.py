"""Checkpoint reading, strict loading with key remapping, and convzoo's own safetensors format.

Official checkpoints come as ``.pth`` files (a bare state dict, or one wrapped in ``model`` /
``state_dict`` / ``module``); they are read with ``torch.load(weights_only=True)``, which here
also accepts the ``argparse.Namespace`` of training arguments that official training scripts
store next to the weights (``{'model': ..., 'optimizer': ..., 'epoch': ..., 'args': ...}``).
Each family passes a ``checkpoint_filter_fn(state_dict, model) -> state_dict`` that maps the
official key layout onto ours and returns early when the keys are already native; it never
changes the model. A model whose official files may hold merged (re-parameterized) modules
names them with ``model.checkpoint_form(state_dict) -> [module names]``, and the loader merges
those before reading the file.

convzoo's own format is a ``.safetensors`` file whose metadata holds the model name and its
config as JSON, so :func:`load_model` can rebuild the model from the file alone. The metadata
also records the inference form: ``reparameterized`` (the whole model) and
``reparameterized_modules`` (the submodules merged on their own, such as RepLKNet's large
kernels after ``merge_large_kernels``), which loading redoes before it reads the weights.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
from typing import Callable, Dict, List, Mapping, Optional

import torch
import torch.nn as nn

_logger = logging.getLogger(__name__)

StateDict = Dict[str, torch.Tensor]
FilterFn = Callable[[StateDict, nn.Module], StateDict]

_WRAPPER_KEYS = ("state_dict", "model", "module", "model_state")

# Globals a weights_only load accepts beyond torch's defaults: the training arguments official
# scripts (RepLKNet-pytorch, facebookresearch/ConvNeXt, ...) pickle next to the weights.
_SAFE_GLOBALS = [argparse.Namespace]


@contextlib.contextmanager
def _allow_safe_globals():
    """Allow ``_SAFE_GLOBALS`` in ``torch.load(weights_only=True)`` within the block only.

    ``torch.serialization.safe_globals`` (torch >= 2.5) scopes the allowlist to the block; on
    torch 2.4, which only has the process-wide ``add_safe_globals``, the previous allowlist is
    restored afterwards.
    """
    serialization = torch.serialization
    if hasattr(serialization, "safe_globals"):
        with serialization.safe_globals(_SAFE_GLOBALS):
            yield
    elif all(hasattr(serialization, f) for f in ("add_safe_globals", "get_safe_globals", "clear_safe_globals")):
        previous = list(serialization.get_safe_globals())
        serialization.add_safe_globals(_SAFE_GLOBALS)
        try:
            yield
        finally:
            serialization.clear_safe_globals()
            serialization.add_safe_globals(previous)
    else:  # no allowlist API: such files are refused as before
        yield


def _unreadable(path: str, err: Exception) -> ValueError:
    kind = "a safetensors file" if path.endswith(".safetensors") else "a PyTorch checkpoint (torch.save)"
    reason = f"{type(err).__name__}: {err}" if str(err) else type(err).__name__
    return ValueError(f"{path} is not a readable checkpoint: it cannot be read as {kind} ({reason})")


def read_state_dict(path: str | os.PathLike) -> StateDict:
    """Read a state dict from a ``.pth``/``.pt``/``.bin`` or ``.safetensors`` file on disk.

    A file that cannot be read as either (a text file, a truncated download) is a ``ValueError``
    naming the file and the reason.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            return load_file(path, device="cpu")
        except Exception as err:  # noqa: BLE001 - safetensors' own error type; the file is the problem
            raise _unreadable(path, err) from None
    with _allow_safe_globals():
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - unpickling fails in many ways on a foreign file
            raise _unreadable(path, err) from None
    for key in _WRAPPER_KEYS:
        if isinstance(obj, Mapping) and key in obj and isinstance(obj[key], Mapping):
            obj = obj[key]
            break
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(f"{path} does not hold a state dict of tensors")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_metadata(path: str | os.PathLike) -> Dict[str, str]:
    """The string metadata of a ``.safetensors`` file (empty for other files); a ``ValueError``
    when the file is not a readable safetensors file."""
    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        return {}
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as f:
            return dict(f.metadata() or {})
    except Exception as err:  # noqa: BLE001 - safetensors' own error type; the file is the problem
        raise _unreadable(path, err) from None


def _classifier_prefixes(model: nn.Module) -> tuple:
    name = getattr(model, "classifier_name", None)
    if name is None:
        return ()
    return (name,) if isinstance(name, str) else tuple(name)


def _under(key: str, prefixes) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _first(keys: List[str], sep: str, count: int = 5) -> str:
    """``": a, b, c, ... (N more)"``: the first ``count`` of ``keys``, so a wrong file gives a short message."""
    shown = sep.join(keys[:count])
    more = f"{sep}... ({len(keys) - count} more)" if len(keys) > count else ""
    return f": {shown}{more}"


def load_state_dict_strict(model: nn.Module, state: StateDict, source: str = "checkpoint") -> None:
    """Load ``state`` into ``model`` strictly; a head of another size is left re-initialised.

    Keys under ``model.classifier_name`` whose shapes differ from the model's (a checkpoint
    with another ``num_classes``) are dropped and the head keeps its fresh initialisation;
    when the model has no classifier (``num_classes=0``: the head is an ``nn.Identity``), the
    checkpoint's classifier keys are dropped. Both say so in a log message. BatchNorm step
    counters (``num_batches_tracked``) a file lacks start at 0. Any other missing,
    unexpected or mis-shaped key raises a ``ValueError`` naming every one of them.
    """
    own = model.state_dict()
    heads = _classifier_prefixes(model)
    headless = [h for h in heads if not any(_under(k, (h,)) for k in own)]
    dropped_head, removed_head, mismatched = [], [], []
    for key in list(state):
        if key in own and own[key].shape != state[key].shape:
            if _under(key, heads):
                dropped_head.append(key)
                del state[key]
            else:
                mismatched.append(f"{key}: checkpoint {tuple(state[key].shape)} vs model {tuple(own[key].shape)}")
        elif key not in own and _under(key, headless):
            removed_head.append(key)
            del state[key]
    for key in own:
        if key.endswith(".num_batches_tracked") and key not in state:
            # Files written before BatchNorm had step counters (torchvision's legacy ResNet-50,
            # RepLKNet's releases) lack them; they are unused in eval: start them at 0, as
            # BatchNorm's own loading of such files does.
            state[key] = torch.zeros_like(own[key], device="cpu")
    missing = [k for k in own if k not in state and k not in dropped_head]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"missing keys ({len(missing)}){_first(missing, ', ')}")
        if unexpected:
            parts.append(f"unexpected keys ({len(unexpected)}){_first(unexpected, ', ')}")
        if mismatched:
            parts.append(f"shape mismatches ({len(mismatched)}){_first(mismatched, '; ')}")
        raise ValueError(
            f"{source} does not fit {type(model).__name__} ({len(own)} keys): " + " | ".join(parts)
            + " (is it a checkpoint of this model, with the same options?)"
        )
    model.load_state_dict(state, strict=False)
    if dropped_head:
        _logger.warning(
            "%s: classifier re-initialised for num_classes=%s (checkpoint head %s not loaded)",
            source, getattr(model, "num_classes", "?"), ", ".join(dropped_head),
        )
    if removed_head:
        _logger.warning(
            "%s: no classifier for num_classes=%s (checkpoint head %s not loaded)",
            source, getattr(model, "num_classes", "?"), ", ".join(removed_head),
        )


def _reparameterized_modules(model: nn.Module) -> List[str]:
    """Names of the outermost re-parameterizable submodules already in their merged form in a
    model that, as a whole, is not: RepLKNet's large kernels after ``merge_large_kernels`` or
    after loading a ``structural_reparam`` checkpoint."""
    from ..layers.reparam import is_reparameterized

    if is_reparameterized(model):
        return []
    names: List[str] = []
    for name, module in model.named_modules():
        if (name and callable(getattr(module, "reparameterize", None)) and not _under(name, names)
                and is_reparameterized(module)):
            names.append(name)
    return names


def _redo_reparameterization(model: nn.Module, meta: Mapping[str, str]) -> None:
    """Put ``model`` into the form recorded in a convzoo file's metadata, so that its keys fit."""
    from ..layers.reparam import reparameterize

    if meta.get("reparameterized") == "true":
        reparameterize(model)
    for name in json.loads(meta.get("reparameterized_modules") or "[]"):
        reparameterize(model.get_submodule(name))


def load_checkpoint(model: nn.Module, path: str | os.PathLike, filter_fn: Optional[FilterFn] = None) -> nn.Module:
    """Load the checkpoint at ``path`` into ``model`` (official layouts through ``filter_fn``,
    by default the model's own ``checkpoint_filter_fn``); a ``features_only`` model loads into
    the classifier it wraps.

    For a convzoo file, ``model`` is first put into the (partly) re-parameterized form the
    file was saved in.
    """
    model = model.model if hasattr(model, "out_indices") and isinstance(getattr(model, "model", None), nn.Module) else model
    if filter_fn is None:
        filter_fn = getattr(model, "checkpoint_filter_fn", None)
    state = read_state_dict(path)
    meta = read_metadata(path)
    _redo_reparameterization(model, meta)
    if meta.get("format") != "convzoo" and callable(getattr(model, "checkpoint_form", None)):
        _redo_reparameterization(model, {"reparameterized_modules": json.dumps(model.checkpoint_form(state))})
    if filter_fn is not None and meta.get("format") != "convzoo":
        state = filter_fn(state, model)
    load_state_dict_strict(model, state, source=os.fspath(path))
    return model


def _config_dict(model: nn.Module) -> dict:
    cfg = getattr(model, "cfg", None)
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else {}


def save_checkpoint(model: nn.Module, path: str | os.PathLike) -> None:
    """Write ``model``'s weights and config to ``path`` (``.safetensors``, convzoo's format).

    Written to a temporary file and renamed, so an interrupted save never leaves a torn file.
    """
    from safetensors.torch import save_file

    from ..layers.reparam import is_reparameterized

    path = os.fspath(path)
    if not path.endswith(".safetensors"):
        raise ValueError(f"save_checkpoint writes .safetensors files, got {path!r}")
    inner = getattr(model, "model", model) if hasattr(model, "out_indices") else model
    meta = {
        "format": "convzoo",
        "model_name": str(getattr(inner, "model_name", "")),
        "num_classes": str(getattr(inner, "num_classes", "")),
        "in_chans": str(getattr(inner, "in_chans", "")),
        "config": json.dumps(_config_dict(inner)),
        "reparameterized": "true" if is_reparameterized(inner) else "false",
        "reparameterized_modules": json.dumps(_reparameterized_modules(inner)),
        "pretrained_cfg": json.dumps(getattr(inner, "pretrained_cfg", {})),
    }
    state = {k: v.detach().contiguous().cpu() for k, v in inner.state_dict().items()}
    tmp = path + ".tmp"
    save_file(state, tmp, metadata=meta)
    os.replace(tmp, path)


def stored_pretrained_cfg(meta: Mapping[str, str]) -> dict:
    """The ``pretrained_cfg`` in a convzoo file's metadata (``{}`` for files written before it was stored)."""
    cfg = json.loads(meta.get("pretrained_cfg") or "{}")
    return {k: tuple(v) if isinstance(v, list) and k != "label_names" else v for k, v in cfg.items()}


def load_model(path: str | os.PathLike, **kwargs) -> nn.Module:
    """Rebuild a model from a convzoo ``.safetensors`` file written by :func:`save_checkpoint`."""
    from ._builder import create_model

    meta = read_metadata(path)
    if meta.get("format") != "convzoo" or not meta.get("model_name"):
        raise ValueError(f"{os.fspath(path)} is not a convzoo checkpoint (no model name in its metadata)")
    config = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(meta.get("config") or "{}").items()}
    args = dict(config)
    if meta.get("num_classes", "").isdigit():
        args["num_classes"] = int(meta["num_classes"])
    if meta.get("in_chans", "").isdigit():
        args["in_chans"] = int(meta["in_chans"])
    if meta.get("pretrained_cfg"):
        args["pretrained_cfg"] = stored_pretrained_cfg(meta)
    args.update(kwargs)
    return create_model(meta["model_name"], pretrained=path, **args)
