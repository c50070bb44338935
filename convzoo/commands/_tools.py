"""Argument helpers shared by the deployment and analysis commands (reparam, export, erf,
offsets, bench): model loading with user-facing errors, size and device parsing."""
from __future__ import annotations

import argparse
import os
from typing import Optional, Tuple

import torch
import torch.nn as nn

from ..models import load_model
from ..models._checkpoint import read_metadata
from . import UsageError, check_model_name, create_model_or_exit


def image_size(text: str) -> Tuple[int, int]:
    """argparse type: ``"224"`` -> (224, 224), ``"192,256"`` or ``"192x256"`` -> (192, 256) (H, W)."""
    parts = text.replace("x", ",").split(",")
    try:
        sizes = tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected SIZE or H,W (e.g. 224 or 192,256), got {text!r}") from None
    if len(sizes) == 1:
        sizes = sizes * 2
    if len(sizes) != 2 or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected SIZE or H,W with positive integers, got {text!r}")
    return sizes


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_model_arguments(parser: argparse.ArgumentParser, model_required: bool = True) -> None:
    """``--model``, ``--checkpoint`` and ``--num-classes``, with the help text every command shares."""
    parser.add_argument(
        "--model", required=model_required, metavar="NAME",
        help="registered model name (`convzoo list` shows them)" + ("" if model_required else
             "; may be left out when --checkpoint is a convzoo .safetensors file, which names its model"),
    )
    parser.add_argument(
        "--checkpoint", metavar="PATH",
        help="weights: a convzoo .safetensors file or the family's official .pth checkpoint "
             "(default: random initialisation)",
    )
    parser.add_argument(
        "--num-classes", type=int, default=None, metavar="N",
        help="classifier size of an official checkpoint (default 1000; convzoo files store their own)",
    )


def is_convzoo_checkpoint(path: str) -> bool:
    """Whether ``path`` is a ``.safetensors`` file written by :func:`convzoo.save_checkpoint`
    (a :class:`UsageError` naming the file when it is not a readable safetensors file)."""
    try:
        return path.endswith(".safetensors") and read_metadata(path).get("format") == "convzoo"
    except ValueError as err:
        raise UsageError(str(err)) from None


def _training_run_options(checkpoint: str) -> Optional[dict]:
    """``num_classes`` and the model options of a ``convzoo train`` checkpoint; None for other files."""
    from ..train.loop import load_training_checkpoint

    if checkpoint.endswith(".safetensors"):
        return None
    try:
        meta = load_training_checkpoint(checkpoint)["meta"]
    except ValueError:
        return None  # an official checkpoint, or a file the model loader reports as unreadable
    return {**meta.get("model_args", {}), "num_classes": int(meta["num_classes"])}


def _classes_in_checkpoint(name: str, checkpoint: str) -> Optional[int]:
    """The number of classes of the classifier stored in an official-layout ``checkpoint``
    (None when it holds no classifier), found on a meta-device model of ``name``."""
    import torch

    from ..models import create_model
    from ..models._checkpoint import read_state_dict

    state = read_state_dict(checkpoint)
    with torch.device("meta"):
        model = create_model(name)
    filter_fn = getattr(model, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        state = filter_fn(state, model)
    heads = getattr(model, "classifier_name", None)
    for head in ([heads] if isinstance(heads, str) else list(heads or ())):
        weight = state.get(f"{head}.weight")
        if weight is not None and weight.ndim >= 1:
            return int(weight.shape[0])
    return None


def load_model_or_exit(name: Optional[str], checkpoint: Optional[str], num_classes: Optional[int] = None) -> nn.Module:
    """The model named ``name`` with the weights of ``checkpoint``; a :class:`UsageError` telling
    the user what to fix when the name is unknown, the file is missing, unreadable or does not fit.

    Without ``num_classes`` the classifier keeps the size stored in the checkpoint (a training
    checkpoint's, or the classifier weights' of an official file), so a trained head is never
    silently replaced."""
    if checkpoint is not None and not os.path.isfile(checkpoint):
        raise UsageError(f"checkpoint not found: {checkpoint}")
    try:
        if checkpoint is not None and is_convzoo_checkpoint(checkpoint):
            stored = read_metadata(checkpoint).get("model_name")
            if name is not None and name != stored:
                raise UsageError(f"{checkpoint} holds a {stored!r} model, not {name!r}; drop --model or fix it")
            kwargs = {} if num_classes is None else {"num_classes": num_classes}
            return load_model(checkpoint, **kwargs)
        if name is None:
            raise UsageError("--model NAME is required unless --checkpoint is a convzoo .safetensors file")
        check_model_name(name)
        kwargs = {}
        if checkpoint is not None:
            kwargs = _training_run_options(checkpoint) or {}
            if num_classes is None and "num_classes" not in kwargs:
                found = _classes_in_checkpoint(name, checkpoint)
                if found is not None:
                    kwargs["num_classes"] = found
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return create_model_or_exit(name, pretrained=checkpoint, **kwargs)
    except UsageError:
        raise
    except (ValueError, TypeError, FileNotFoundError) as error:
        raise UsageError(str(error)) from None


def check_model_names(names) -> None:
    """A :class:`UsageError` naming the close matches for the first unknown model name."""
    for name in names:
        check_model_name(name)


def resolve_device(text: str) -> torch.device:
    """``"auto"`` -> CUDA when available, else CPU; otherwise the named device, checked."""
    if text == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(text)
    except RuntimeError:
        raise UsageError(f"unknown device {text!r}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda asked for, but no CUDA GPU is available; use --device cpu")
    return device


def add_device_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", default="auto", metavar="DEV",
        help="auto (CUDA when available, else CPU), cpu, cuda or cuda:N (default: auto)",
    )


def model_name(model: nn.Module) -> str:
    """The registered name of ``model`` (its class name when it has none)."""
    return getattr(model, "model_name", None) or type(model).__name__


def check_output_file(path: str, option: str) -> None:
    """A :class:`UsageError` before any work when ``path`` (the file of ``option``) cannot be
    written: its folder is missing, or it is a folder itself."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{option} {path}: the folder {folder} does not exist; create it first")
    if os.path.isdir(path):
        raise UsageError(f"{option} {path} is a folder; give a file name")


def check_input_size(model: nn.Module, size: Tuple[int, int], option: str = "--input-size") -> None:
    """A :class:`UsageError` before any work when ``model`` cannot take an input of ``size``
    (H, W): a copy of the model runs on PyTorch's meta device (shapes only, no computation)."""
    import dataclasses

    from ..models import create_model

    name, cfg = getattr(model, "model_name", None), getattr(model, "cfg", None)
    if name is None or not dataclasses.is_dataclass(cfg):
        return
    in_chans = getattr(model, "in_chans", 3)
    try:
        with torch.device("meta"):
            probe = create_model(name, num_classes=getattr(model, "num_classes", 1000), in_chans=in_chans,
                                 **{f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}).eval()
        with torch.no_grad():
            probe(torch.empty(1, in_chans, 224, 224, device="meta"))
    except Exception:  # noqa: BLE001 - a model the meta device cannot run is checked by its real run
        return
    try:
        with torch.no_grad():
            probe(torch.empty(1, in_chans, *size, device="meta"))
    except (RuntimeError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{name} cannot take a {size[0]}x{size[1]} input ({option}): {reason}; use a larger size") from None
