"""Parameter and FLOP accounting.

:func:`count_flops` runs one forward pass under :class:`torch.utils.flop_counter.FlopCounterMode`,
which counts 2 * MACs for each matmul/convolution, including convzoo's custom operators (each
registers its formula with ``register_flop_formula``). It works on models built on the meta
device (``with torch.device("meta"): model = create_model(...)``), so the largest models are
counted in a moment without allocating their weights.
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

__all__ = ["FlopCount", "count_params", "count_flops"]


@dataclasses.dataclass(frozen=True)
class FlopCount:
    """The cost of one forward pass at ``input_size``.

    Attributes:
        macs: multiply-accumulates (``flops // 2``), the figure papers quote as "FLOPs".
        flops: floating-point operations as FlopCounterMode counts them (2 per MAC).
        by_op: flops per operator (e.g. ``"aten.convolution"``, ``"convzoo.dwconv2d"``).
        by_module: flops per module, keyed by the module's dotted name (``""`` is the whole
            model); a module's figure includes its children's.
        input_size: the input shape that was counted.
    """

    macs: int
    flops: int
    by_op: Dict[str, int]
    by_module: Dict[str, int]
    input_size: Tuple[int, ...]


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters of ``model`` (each shared parameter counted once); works on meta models."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def _op_name(op) -> str:
    name = str(op)
    for suffix in (".default", ".Tensor", ".int"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def _model_device_dtype(model: nn.Module) -> Tuple[torch.device, torch.dtype]:
    for tensor in list(model.parameters()) + list(model.buffers()):
        if tensor.is_floating_point():
            return tensor.device, tensor.dtype
    return torch.device("cpu"), torch.get_default_dtype()


def count_flops(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> FlopCount:
    """Count the FLOPs of one forward pass of ``model`` on a zero input of shape ``input_size``.

    The model runs in eval mode under ``torch.no_grad()`` on its own device and dtype (the meta
    device works) and is put back in its previous mode afterwards.
    """
    input_size = tuple(int(s) for s in input_size)
    if not input_size or any(s < 0 for s in input_size):
        raise ValueError(f"input_size must be a non-empty shape of non-negative ints, got {input_size}")
    device, dtype = _model_device_dtype(model)
    x = torch.zeros(input_size, device=device, dtype=dtype)
    was_training = model.training
    counter = FlopCounterMode(display=False)
    try:
        model.eval()
        with torch.no_grad(), counter:
            model(x)
    finally:
        model.train(was_training)
    counts = counter.get_flop_counts()
    total = int(counter.get_total_flops())
    by_op = {_op_name(op): int(n) for op, n in counts.get("Global", {}).items()}
    root = type(model).__name__
    by_module = {}
    for name, ops_counts in counts.items():
        if name == "Global":
            continue
        key = "" if name == root else name[len(root) + 1:] if name.startswith(root + ".") else name
        by_module[key] = int(sum(ops_counts.values()))
    by_module[""] = total
    return FlopCount(macs=total // 2, flops=total, by_op=by_op, by_module=by_module, input_size=input_size)
