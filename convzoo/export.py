"""ONNX export of the deployed (re-parameterized, eval-mode) form of a model.

The convzoo operators are registered as ``torch.library`` custom ops, which no ONNX runtime
knows. For export every module with an ``impl`` attribute is switched to ``impl="reference"``:
the operators then run their plain-PyTorch reference path, which is written with standard ops
(bilinear sampling by ``grid_sample`` / gathers, matmuls, convolutions), so the exported graph
holds only standard ONNX operators (GridSample, Gather, MatMul, Conv, ...) and runs on any
runtime. Results are checked against PyTorch with onnxruntime on the CPU.

Two exporters exist in PyTorch 2.13: the ``torch.export``-based one (``"dynamo"``, the default
of ``torch.onnx.export``; needs the ``onnxscript`` package) and the older TorchScript-based one
(``"torchscript"``, deprecated but needing nothing else). ``exporter="auto"`` takes the dynamo
exporter when onnxscript is installed and the TorchScript one otherwise.
"""
from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import logging
import os
import warnings
from contextlib import redirect_stdout
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .layers.reparam import is_reparameterized, reparameterize

_logger = logging.getLogger(__name__)

EXPORTERS = ("auto", "dynamo", "torchscript")
DEFAULT_OPSET = 18


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how closely onnxruntime reproduces PyTorch."""

    path: str
    exporter: str
    opset: int
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]
    dynamic_batch: bool
    dynamic_size: bool
    onnx_ops: Tuple[str, ...]  # the distinct ONNX operator types in the graph, sorted
    max_abs_error: Optional[float] = None  # None when not checked
    max_rel_error: Optional[float] = None  # max |ort - torch| / max |torch|
    checked_shape: Optional[Tuple[int, ...]] = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def use_reference_ops(model: nn.Module) -> int:
    """Set ``impl = "reference"`` on every module of ``model`` that has an ``impl`` attribute;
    returns how many were switched."""
    switched = 0
    for module in model.modules():
        if hasattr(module, "impl"):
            module.impl = "reference"
            switched += 1
    return switched


def resolve_exporter(exporter: str) -> str:
    """``"auto"`` -> ``"dynamo"`` when onnxscript is installed, else ``"torchscript"``."""
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if exporter == "auto":
        return "dynamo" if importlib.util.find_spec("onnxscript") is not None else "torchscript"
    if exporter == "dynamo" and importlib.util.find_spec("onnxscript") is None:
        raise ImportError("the dynamo ONNX exporter needs onnxscript: pip install onnxscript (or use exporter='torchscript')")
    return exporter


def prepare_for_export(model: nn.Module) -> nn.Module:
    """Re-parameterize ``model`` in place (unless already done), eval mode, reference operators."""
    if not is_reparameterized(model):
        reparameterize(model)
    model.eval()
    switched = use_reference_ops(model)
    _logger.info("export: %d module(s) switched to the reference operator path", switched)
    return model


class _NoTorchvisionNotice(logging.Filter):
    """Drops the dynamo exporter's "torchvision is not installed. Skipping torchvision::..." records:
    they concern torchvision's own ops, which a convzoo graph does not hold."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("torchvision is not installed")


@contextlib.contextmanager
def _quiet_registration():
    registration = logging.getLogger("torch.onnx._internal.exporter._registration")
    notice = _NoTorchvisionNotice()
    registration.addFilter(notice)
    try:
        yield
    finally:
        registration.removeFilter(notice)


def _export(model, x, path, exporter, opset, dynamic_batch, dynamic_size) -> None:
    names = dict(input_names=["input"], output_names=["output"])
    if exporter == "torchscript":
        dims = {**({0: "batch"} if dynamic_batch else {}), **({2: "height", 3: "width"} if dynamic_size else {})}
        axes = {"input": dims, "output": {0: "batch"} if dynamic_batch else {}} if dims else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            warnings.filterwarnings("ignore", message="Constant folding")
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(model, (x,), path, dynamo=False, opset_version=opset, dynamic_axes=axes,
                              do_constant_folding=True, **names)
        return
    dims = {**({0: torch.export.Dim("batch", min=1)} if dynamic_batch else {}),
            **({2: torch.export.Dim.DYNAMIC, 3: torch.export.Dim.DYNAMIC} if dynamic_size else {})}
    shapes = (dims,) if dims else None
    log = io.StringIO()
    with redirect_stdout(log), _quiet_registration():  # the dynamo exporter reports its progress on stdout
        torch.onnx.export(model, (x,), path, dynamo=True, opset_version=opset, dynamic_shapes=shapes,
                          external_data=False, verbose=False, **names)
    _logger.debug("dynamo exporter: %s", log.getvalue())


def onnx_op_types(path: str) -> Tuple[str, ...]:
    """The distinct operator types of the ONNX graph at ``path`` (functions inlined by name)."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    ops = {node.op_type for node in proto.graph.node}
    for function in proto.functions:
        ops.discard(function.name)
        ops.update(node.op_type for node in function.node)
    return tuple(sorted(ops))


def _dynamic_dims(path: str) -> Tuple[int, ...]:
    """The dimensions of the graph's input that the file leaves free."""
    import onnx

    proto = onnx.load(path, load_external_data=False)
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    return tuple(i for i, d in enumerate(dims) if d.HasField("dim_param") or not d.HasField("dim_value"))


def check_onnx(model: nn.Module, path: str, x: torch.Tensor) -> Tuple[float, float]:
    """Run ``path`` with onnxruntime on the CPU and ``model`` on ``x``; (max abs, max rel) error."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {session.get_inputs()[0].name: x.detach().cpu().numpy()})
    with torch.no_grad():
        expected = model(x).detach().cpu()
    got = torch.from_numpy(got)
    if got.shape != expected.shape:
        raise RuntimeError(f"onnxruntime output shape {tuple(got.shape)} differs from PyTorch's {tuple(expected.shape)}")
    abs_error = float((got.double() - expected.double()).abs().max()) if expected.numel() else 0.0
    scale = float(expected.double().abs().max()) if expected.numel() else 1.0
    return abs_error, abs_error / max(scale, 1e-12)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    input_size: Sequence[int] = (224, 224),
    batch_size: int = 1,
    opset: int = DEFAULT_OPSET,
    exporter: str = "auto",
    dynamic_batch: bool = True,
    check: bool = True,
    seed: int = 0,
    dynamic_size: bool = False,
) -> ExportResult:
    """Export the deployed form of ``model`` to the ONNX file ``path``.

    ``model`` is re-parameterized and switched to the reference operators in place. The graph
    takes ``input`` of shape (batch, in_chans, H, W) and returns ``output``. The batch is free
    unless ``dynamic_batch=False`` (then ``batch_size``); H and W are ``input_size`` unless
    ``dynamic_size``, which leaves them free where the model's graph allows it: convolutional
    models, the deformable ones included (their sampling is written for any size), take any
    size at least as large as their smallest input; a model whose code fixes a size (a pooling
    to a constant grid) fails the export with a message. With ``check`` the file is run by
    onnxruntime on another random input (one more image; 16 more pixels per side with
    ``dynamic_size``) and the errors against PyTorch are reported.
    """
    path = os.fspath(path)
    exporter = resolve_exporter(exporter)
    if len(input_size) != 2 or min(input_size) < 1:
        raise ValueError(f"input_size must be (H, W) with positive sizes, got {tuple(input_size)}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    model = prepare_for_export(model)
    parameter = next(model.parameters(), None)
    dtype = parameter.dtype if parameter is not None else torch.float32
    generator = torch.Generator().manual_seed(seed)
    # torch.export specialises dimensions of size 1: trace a dynamic batch with at least 2
    traced_batch = max(batch_size, 2) if dynamic_batch else batch_size
    shape = (traced_batch, getattr(model, "in_chans", 3), *input_size)
    x = torch.randn(shape, generator=generator, dtype=dtype)
    with torch.no_grad():
        output = model(x)
        _export(model, x, path, exporter, opset, dynamic_batch, dynamic_size)
    free = _dynamic_dims(path)
    for wanted, dims, what, option in ((dynamic_batch, (0,), "batch size", "dynamic_batch=False"),
                                       (dynamic_size, (2, 3), "input size", "no dynamic_size")):
        if wanted and not set(dims) <= set(free):
            raise RuntimeError(
                f"the {exporter} exporter fixed the {what} of {path} (the model's code specialises on it); "
                f"export with {option} or try the other exporter"
            )
    result = ExportResult(
        path=path, exporter=exporter, opset=opset, input_shape=tuple(shape), output_shape=tuple(output.shape),
        dynamic_batch=dynamic_batch, dynamic_size=dynamic_size, onnx_ops=onnx_op_types(path),
    )
    if check:
        check_shape = ((traced_batch + 1,) if dynamic_batch else shape[:1]) + shape[1:2] + (
            tuple(s + 16 for s in shape[2:]) if dynamic_size else shape[2:])
        x_check = torch.randn(check_shape, generator=generator, dtype=dtype)
        result.max_abs_error, result.max_rel_error = check_onnx(model, path, x_check)
        result.checked_shape = tuple(check_shape)
    return result
