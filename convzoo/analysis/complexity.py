"""Parameter and FLOP accounting.

:func:`count_flops` runs one forward pass under :class:`torch.utils.flop_counter.FlopCounterMode`,
which counts 2 * MACs for each matmul/convolution, including convzoo's custom operators (each
registers its formula with ``register_flop_formula``). It works on models built on the meta
device (``with torch.device("meta"): model = create_model(...)``), so the largest models are
counted in a moment without allocating their weights. :class:`MetaFlopCounter` counts only
the total, several times faster, for listing many models (``convzoo list``).
"""
from __future__ import annotations

import dataclasses
from typing import Dict, Sequence, Tuple

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry

__all__ = ["FlopCount", "MetaFlopCounter", "count_params", "count_flops"]


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


def _forward_once(model: nn.Module, x: torch.Tensor, mode) -> None:
    """One eval-mode forward pass of ``model`` on ``x`` under ``no_grad`` and the dispatch
    ``mode``; the model's train/eval mode is restored afterwards."""
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), mode:
            model(x)
    finally:
        model.train(was_training)


def count_flops(model: nn.Module, input_size: Sequence[int] = (1, 3, 224, 224)) -> FlopCount:
    """Count the FLOPs of one forward pass of ``model`` on a zero input of shape ``input_size``.

    The model runs in eval mode under ``torch.no_grad()`` on its own device and dtype (the meta
    device works) and is put back in its previous mode afterwards.
    """
    input_size = tuple(int(s) for s in input_size)
    if not input_size or any(s < 0 for s in input_size):
        raise ValueError(f"input_size must be a non-empty shape of non-negative ints, got {input_size}")
    device, dtype = _model_device_dtype(model)
    counter = FlopCounterMode(display=False)
    _forward_once(model, torch.zeros(input_size, device=device, dtype=dtype), counter)
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


_SCALARS = (int, float, bool, str, type(None), torch.dtype, torch.memory_format, torch.layout)


class _NotMeta(Exception):
    """An argument whose output metadata cannot be memoized (a real tensor, an object)."""


def _meta_key(value):
    """A hashable description of an operator argument: shape, strides and dtype of meta tensors."""
    if isinstance(value, torch.Tensor):
        if value.device.type != "meta":
            raise _NotMeta
        return (tuple(value.shape), value.stride(), value.dtype, value.storage_offset())
    if isinstance(value, (list, tuple)):
        return tuple(_meta_key(v) for v in value)
    if isinstance(value, torch.device):
        if value.type != "meta":
            raise _NotMeta
        return "meta"
    if isinstance(value, _SCALARS):
        return value
    raise _NotMeta


# In-place operators that change their tensor's shape or strides (the others keep them).
_RESHAPING_INPLACE = {"resize_", "resize_as_", "set_", "as_strided_", "squeeze_", "unsqueeze_", "transpose_", "t_",
                      "swapdims_", "swapaxes_"}


def _keeps_self(func) -> bool:
    """An in-place operator returning its first argument with its metadata unchanged (``uniform_``, ``mul_``)."""
    schema = func._schema
    name = func._overloadpacket.__name__
    return (name.endswith("_") and name not in _RESHAPING_INPLACE and len(schema.returns) == 1
            and schema.arguments and schema.arguments[0].alias_info is not None
            and schema.arguments[0].alias_info.is_write and schema.returns[0].alias_info is not None)


def _returns_new_tensors(func) -> bool:
    schema = func._schema
    return bool(schema.returns) and not schema.is_mutable and all(
        r.alias_info is None and str(r.type) in ("Tensor", "Tensor[]") for r in schema.returns)


class MetaFlopCounter(TorchDispatchMode):
    """Total FLOPs of the operators run inside it, with torch's formulas (the same total as
    :func:`count_flops`, convzoo's operators included), for models on the meta device.

    Operators on meta tensors compute their output shapes in Python, which makes a forward
    pass of a large model take a second; this mode remembers the output shape, strides and
    dtype of each functional operator for each input description and answers repeats (the
    blocks of a stage, the same backbone under several heads) with a fresh empty meta tensor.
    One instance is meant to be reused across many models (``convzoo list``)::

        counter = MetaFlopCounter()
        with torch.device("meta"), counter:
            model = create_model("convnext_tiny")
        macs = counter.count(model, (1, 3, 224, 224)) // 2
    """

    def __init__(self):
        super().__init__()
        self.flops = 0
        self._shapes = {}
        self._memoizable = {}
        self._inplace = {}

    def count(self, model: nn.Module, input_size: Sequence[int]) -> int:
        """FLOPs of one eval-mode forward pass of ``model`` (on the meta device) on ``input_size``."""
        self.flops = 0
        _forward_once(model, torch.zeros(tuple(int(s) for s in input_size), device="meta"), self)
        return self.flops

    def _key(self, func, args, kwargs):
        memoizable = self._memoizable.get(func)
        if memoizable is None:
            memoizable = self._memoizable[func] = _returns_new_tensors(func)
        if not memoizable or not any(isinstance(a, torch.Tensor) for a in args):
            return None
        try:
            return func, _meta_key(args), _meta_key(tuple(sorted(kwargs.items())))
        except _NotMeta:
            return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inplace = self._inplace.get(func)
        if inplace is None:
            inplace = self._inplace[func] = _keeps_self(func)
        if inplace and func._overloadpacket not in flop_registry and all(
                a.device.type == "meta" for a in args if isinstance(a, torch.Tensor)):
            return args[0]  # a meta tensor holds no values: initialisers and in-place updates change nothing
        key = self._key(func, args, kwargs)
        known = self._shapes.get(key) if key is not None else None
        if known is not None:
            kind, specs = known
            outs = [torch.empty_strided(shape, stride, dtype=dtype, device="meta") for shape, stride, dtype in specs]
            out = outs[0] if kind is torch.Tensor else kind(outs)
        else:
            out = func(*args, **kwargs)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            if key is not None and all(isinstance(o, torch.Tensor) for o in outs):
                kind = torch.Tensor if isinstance(out, torch.Tensor) else type(out)
                self._shapes[key] = (kind, [(tuple(o.shape), o.stride(), o.dtype) for o in outs])
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(formula(*args, **kwargs, out_val=out))
        return out
