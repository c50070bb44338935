"""Post-training static INT8 quantization on the CPU, in onnxruntime or in inductor.

:func:`quantize` takes a float model and calibration images and writes an INT8 file:

1. the model is copied, its BatchNorms folded (:func:`convzoo.reparameterize`), put in eval
   mode and switched to the plain-PyTorch reference operators;
2. layers that cannot be quantized are found: convzoo's deformable / RoI layers (their
   operators have no INT8 kernels) stay float with a warning; a layer calling another custom
   operator is an error for onnxruntime (no ONNX form) and stays float with a warning in
   inductor;
3. ``keep_float="auto"`` measures each layer's output error (:mod:`convzoo.deploy.sensitivity`)
   and keeps the worst ones in float;
4. the backend quantizes, calibrating on the images (min/max ranges):

   - ``"onnxruntime"``: convzoo's own ONNX export, then onnxruntime's static QDQ quantization
     (int8 weights per output channel, uint8 activations) -> ``.onnx``;
   - ``"inductor"``: torchao's PT2E with the ``X86InductorQuantizer`` -> a ``torch.export``
     program ``.pt2`` that :func:`load_quantized` reads back and runs through ``torch.compile``;

5. the file is loaded back and compared with the float model in the same runtime (the float
   model exported the same way): file size, speed at the given batch sizes, and on the
   evaluation images top-1 agreement, output SQNR and (with labels) top-1 accuracy of both.

The file is written under a temporary name and renamed only when all of this succeeded, so a
failure leaves nothing half-written.
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import importlib.util
import logging
import math
import os
import statistics
import tempfile
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn

from ..analysis.latency import time_step
from ..export import prepare_for_export
from . import _inductor, _onnxruntime
from .sensitivity import choose_keep_float, quantizable_layers, sqnr_db

_logger = logging.getLogger(__name__)

BACKENDS = {"onnxruntime": _onnxruntime, "inductor": _inductor}
MIN_CALIBRATION_IMAGES = 100  # fewer gives a warning: the activation ranges are then poorly estimated
AUTO_TARGET_SQNR_DB = 30.0  # keep_float="auto" keeps layers float until the simulated model reaches this
AUTO_MAX_FRACTION = 0.1  # ... or this fraction of the quantizable layers is kept float
SENSITIVITY_IMAGES = 32  # images the per-layer measurement runs on


@dataclasses.dataclass
class QuantizeReport:
    """What :func:`quantize` wrote and how the INT8 model compares with the float one."""

    path: str
    backend: str
    calibration_images: int
    kept_float: List[str]  # module names left in float (chosen, automatic, or unquantizable)
    layer_sqnr_db: Dict[str, float]  # per-layer output SQNR when measured (keep_float="auto")
    fp32_bytes: int  # the float model saved the same way (ONNX / .pt2)
    int8_bytes: int
    eval_images: int
    top1_agreement: float  # fraction of evaluation images with the same arg-max class
    sqnr_db: float  # output SQNR of INT8 vs float over the evaluation images
    fp32_top1: Optional[float] = None  # accuracy in percent, when labels are given
    int8_top1: Optional[float] = None
    speed_ms: Dict[int, Tuple[float, float]] = dataclasses.field(default_factory=dict)  # batch -> (fp32, int8) median ms

    @property
    def size_ratio(self) -> float:
        """How many times smaller the INT8 file is."""
        return self.fp32_bytes / max(self.int8_bytes, 1)

    def speedup(self, batch: int) -> float:
        fp32, int8 = self.speed_ms[batch]
        return fp32 / int8

    def to_dict(self) -> dict:
        result = dataclasses.asdict(self)
        result["size_ratio"] = self.size_ratio
        result["speedup"] = {batch: self.speedup(batch) for batch in self.speed_ms}
        return result


# ------------------------------------------------------------------------------------- checks

def check_backend(backend: str) -> None:
    """A ValueError for an unknown backend, an ImportError naming what to install for a known one."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    missing = [name for name in BACKENDS[backend].PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ImportError(f"the {backend} backend needs {', '.join(missing)}: pip install {' '.join(missing)}")


def _check_path(path: str, backend: str) -> None:
    suffix = BACKENDS[backend].SUFFIX
    if not path.endswith(suffix):
        raise ValueError(f"the {backend} backend writes a {suffix} file; path must end in {suffix}, got {path!r}")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"the folder of path does not exist: {folder}")


def _check_images(name: str, images, channels: Optional[int]) -> None:
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a tensor (N, C, H, W), got {type(images).__name__}")
    if images.dim() != 4 or images.shape[0] < 1 or not images.is_floating_point():
        raise ValueError(f"{name} must be a float tensor (N, C, H, W) with N >= 1, got {images.dtype} {tuple(images.shape)}")
    if channels is not None and images.shape[1] != channels:
        raise ValueError(f"{name} has {images.shape[1]} channels but the model takes {channels}")


def _check_keep_float(keep_float, model: nn.Module) -> None:
    if keep_float == "auto":
        return
    if isinstance(keep_float, str) or not all(isinstance(name, str) for name in keep_float):
        raise TypeError(f"keep_float must be 'auto' or a sequence of module names, got {keep_float!r}")
    names = [name for name, _ in model.named_modules() if name]
    for name in keep_float:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; close names: {', '.join(close)}" if close else ""
            raise ValueError(f"keep_float names {name!r}, which is no module of the model{hint}")


def _custom_op_layers(program: torch.export.ExportedProgram) -> Dict[str, str]:
    """Module name -> 'namespace::op' for every call of a non-ATen operator in ``program``."""
    found = {}
    for node in program.graph.nodes:
        target = node.target
        if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
            continue
        namespace = target.namespace
        if namespace in ("aten", "prims"):
            continue
        stack = node.meta.get("nn_module_stack") or {}
        layer = list(stack.values())[-1][0] if stack else "<top level>"
        found.setdefault(layer, f"{namespace}::{target._opname}")
    return found


def _unquantizable_layers(model: nn.Module) -> List[str]:
    """convzoo's operator layers with no INT8 kernel (deformable conv, DCNv3, RoI pooling): every
    module with an ``impl`` switch that is not a plain convolution."""
    return [name for name, module in model.named_modules()
            if hasattr(module, "impl") and not isinstance(module, nn.Conv2d)]


# ------------------------------------------------------------------------------------ helpers

def _batches(images: torch.Tensor, batch_size: int, progress: Optional[Callable[[int, int], None]]):
    total = images.shape[0]
    for start in range(0, total, batch_size):
        batch = images[start:start + batch_size].contiguous()
        yield batch
        if progress is not None:
            progress(min(start + batch_size, total), total)


def _run_batched(run: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([run(images[i:i + batch_size].contiguous()).float() for i in range(0, images.shape[0], batch_size)])


def median_ms(run: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, warmup: int = 2, min_seconds: float = 1.0,
              max_repeats: int = 50) -> float:
    """Median time of ``run(x)`` in ms: ``warmup`` runs, then repeats for about ``min_seconds``."""
    first = time_step(lambda: run(x), torch.device("cpu"), warmup, 1)[0]
    repeats = int(min(max_repeats, max(3, min_seconds * 1e3 / max(first, 1e-3))))
    return statistics.median(time_step(lambda: run(x), torch.device("cpu"), 0, repeats))


def _prepare(model: nn.Module) -> nn.Module:
    model = copy.deepcopy(model)
    was_folded = getattr(model, "is_reparameterized", False)
    prepare_for_export(model)  # folds BN (convzoo.reparameterize), eval, reference operators
    if not was_folded:
        _logger.info("quantize: BatchNorm folded and branches merged (convzoo.reparameterize)")
    return model


# -------------------------------------------------------------------------------- the API

def quantize(
    model: nn.Module,
    calibration: torch.Tensor,
    path: Union[str, os.PathLike],
    *,
    backend: str = "onnxruntime",
    keep_float: Union[str, Sequence[str]] = (),
    eval_images: Optional[torch.Tensor] = None,
    eval_labels: Optional[torch.Tensor] = None,
    batch_size: int = 32,
    speed_batches: Sequence[int] = (1,),
    progress: Optional[Callable[[int, int], None]] = None,
) -> QuantizeReport:
    """Post-training static INT8 quantization of ``model`` into the file ``path``.

    Args:
        model: a float model taking (N, C, H, W); it is copied, not changed.
        calibration (Tensor[N, C, H, W]): images the activation ranges are measured on, normalised
            as for the model (a few hundred; fewer than 100 gives a warning).
        path: the file to write: ``.onnx`` for ``backend="onnxruntime"``, ``.pt2`` for ``"inductor"``.
        keep_float: module names to leave in float, or ``"auto"`` to choose them by measuring each
            layer's output error (see :mod:`convzoo.deploy.sensitivity`).
        eval_images (Tensor[M, C, H, W]), eval_labels (Tensor[M]): where the INT8 model is compared
            with the float one (default: the calibration images, without labels).
        batch_size: images per calibration / evaluation step.
        speed_batches: batch sizes at which FP32 and INT8 are timed in the backend (empty: none).
        progress: called with (images done, total) during calibration.

    Returns a :class:`QuantizeReport`. Raises ValueError/TypeError for bad input before any work.
    """
    path = os.fspath(path)
    check_backend(backend)
    _check_path(path, backend)
    channels = getattr(model, "in_chans", None)
    _check_images("calibration", calibration, channels)
    eval_images = calibration if eval_images is None else eval_images
    _check_images("eval_images", eval_images, channels)
    if eval_images.shape[2:] != calibration.shape[2:]:
        raise ValueError(f"eval_images are {tuple(eval_images.shape[2:])} but calibration images {tuple(calibration.shape[2:])}")
    if eval_labels is not None and tuple(eval_labels.shape) != (eval_images.shape[0],):
        raise ValueError(f"eval_labels must be ({eval_images.shape[0]},), one label per evaluation image, got {tuple(eval_labels.shape)}")
    if batch_size < 1 or any(int(b) < 1 for b in speed_batches):
        raise ValueError(f"batch_size and speed_batches must be >= 1, got {batch_size} and {tuple(speed_batches)}")
    _check_keep_float(keep_float, model)
    if calibration.shape[0] < MIN_CALIBRATION_IMAGES:
        warnings.warn(f"only {calibration.shape[0]} calibration images (at least {MIN_CALIBRATION_IMAGES} recommended): "
                      "the activation ranges may be poorly estimated", UserWarning, stacklevel=2)

    model = _prepare(model)
    sample = calibration[:2].clone() if calibration.shape[0] >= 2 else calibration.repeat(2, 1, 1, 1)
    program = _inductor.export_program(model, sample)
    kept = _kept_layers(model, program, backend, keep_float)
    layer_sqnr: Dict[str, float] = {}
    if keep_float == "auto":
        kept, layer_sqnr = _auto_keep_float(model, calibration, kept)

    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".convzoo-quantize-") as work:
        fp32_path = os.path.join(work, "fp32" + BACKENDS[backend].SUFFIX)
        int8_path = os.path.join(work, "int8" + BACKENDS[backend].SUFFIX)
        batches = _batches(calibration, batch_size, progress)
        if backend == "onnxruntime":
            _onnxruntime.export_fp32(model, fp32_path, calibration.shape[2:])
            _onnxruntime.quantize(fp32_path, int8_path, batches, kept)
        else:
            _inductor.export_fp32(program, fp32_path)
            _inductor.quantize(program, int8_path, batches, kept, sample)
        report = _compare(backend, fp32_path, int8_path, eval_images, eval_labels, batch_size, speed_batches)
        os.replace(int8_path, path)
    report.path, report.calibration_images = path, int(calibration.shape[0])
    report.kept_float, report.layer_sqnr_db = kept, layer_sqnr
    return report


def _kept_layers(model: nn.Module, program, backend: str, keep_float) -> List[str]:
    """The explicitly kept layers plus those no INT8 backend can quantize (warned about)."""
    kept = [] if keep_float == "auto" else list(keep_float)
    custom = _custom_op_layers(program)
    if custom and backend == "onnxruntime":
        layer, op = next(iter(custom.items()))
        raise ValueError(f"layer {layer!r} calls the custom operator {op}, which has no ONNX form, so onnxruntime "
                         "can neither run nor quantize it; use backend='inductor' (it stays float there) or "
                         "replace the layer")
    for layer, op in custom.items():
        warnings.warn(f"layer {layer!r} calls the custom operator {op}, which cannot be quantized: it stays float",
                      UserWarning, stacklevel=3)
    for layer in _unquantizable_layers(model):
        warnings.warn(f"layer {layer!r} ({type(model.get_submodule(layer)).__name__}) runs a convzoo operator with no "
                      "INT8 kernel: it stays float", UserWarning, stacklevel=3)
    extra = [layer for layer in list(custom) + _unquantizable_layers(model) if layer not in kept and layer != "<top level>"]
    return kept + extra


def _auto_keep_float(model: nn.Module, calibration: torch.Tensor, kept: List[str]) -> Tuple[List[str], Dict[str, float]]:
    layers = quantizable_layers(model)
    max_layers = max(1, math.ceil(AUTO_MAX_FRACTION * len(layers)))
    excluded = [name for name in layers if any(name == k or name.startswith(k + ".") for k in kept)]
    chosen, sensitivity, simulated = choose_keep_float(
        model, calibration[:SENSITIVITY_IMAGES], AUTO_TARGET_SQNR_DB, max_layers, exclude=excluded)
    _logger.info("keep-float auto: %d layer(s) kept float, simulated output SQNR %.1f dB", len(chosen), simulated)
    return kept + chosen, sensitivity


def _compare(backend: str, fp32_path: str, int8_path: str, images: torch.Tensor, labels: Optional[torch.Tensor],
             batch_size: int, speed_batches: Sequence[int]) -> QuantizeReport:
    module = BACKENDS[backend]
    fp32_run, int8_run = module.load(fp32_path), load_quantized(int8_path)
    fp32_out = _run_batched(fp32_run, images, batch_size)
    int8_out = _run_batched(int8_run, images, batch_size)
    report = QuantizeReport(
        path=int8_path, backend=backend, calibration_images=0, kept_float=[], layer_sqnr_db={},
        fp32_bytes=module.file_bytes(fp32_path), int8_bytes=module.file_bytes(int8_path), eval_images=int(images.shape[0]),
        top1_agreement=float((fp32_out.argmax(1) == int8_out.argmax(1)).double().mean()),
        sqnr_db=sqnr_db(fp32_out, int8_out),
    )
    if labels is not None:
        report.fp32_top1 = 100.0 * float((fp32_out.argmax(1) == labels).double().mean())
        report.int8_top1 = 100.0 * float((int8_out.argmax(1) == labels).double().mean())
    for batch in speed_batches:
        x = images[:1].expand(int(batch), *images.shape[1:]).contiguous()
        report.speed_ms[int(batch)] = (median_ms(fp32_run, x), median_ms(int8_run, x))
    return report


def load_quantized(path: Union[str, os.PathLike]) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running a file written by :func:`quantize`: (N, C, H, W) -> output.

    ``.onnx``: an onnxruntime CPU session; ``.pt2``: the ``torch.export`` program compiled by
    inductor (the first call compiles).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no such quantized model file: {path}")
    for name, module in BACKENDS.items():
        if path.endswith(module.SUFFIX):
            check_backend(name)
            return module.load(path)
    raise ValueError(f"path must be a .onnx or .pt2 file written by convzoo quantize, got {path!r}")
