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
from . import UsageError, build_model, check_model_name


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
    """Whether ``path`` is a ``.safetensors`` file written by :func:`convzoo.save_checkpoint`."""
    return path.endswith(".safetensors") and read_metadata(path).get("format") == "convzoo"


def load_model_or_exit(name: Optional[str], checkpoint: Optional[str], num_classes: Optional[int] = None) -> nn.Module:
    """The model named ``name`` with the weights of ``checkpoint``; a :class:`UsageError` telling
    the user what to fix when the name is unknown, the file is missing or does not fit."""
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
        kwargs = {} if num_classes is None else {"num_classes": num_classes}
        return build_model(name, pretrained=checkpoint, **kwargs)
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
