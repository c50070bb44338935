"""The onnxruntime backend of :mod:`convzoo.deploy.int8`: static QDQ quantization of
convzoo's own ONNX export (int8 weights per output channel, uint8 activations per tensor,
min/max calibration), run by onnxruntime's CPU execution provider."""
from __future__ import annotations

import ast
import logging
import os
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn

from ..export import export_onnx

_logger = logging.getLogger(__name__)

SUFFIX = ".onnx"
PACKAGES = ("onnx", "onnxruntime", "onnxscript")
# 7-bit weights where the CPU lacks VNNI (AVX2 only): onnxruntime's u8s8 kernels there can
# saturate 16-bit intermediate sums (onnxruntime's quantization guide); measured on a trained
# MobileNetV2 on such a CPU: output SQNR 4.5 dB -> 7.1 dB.
REDUCE_RANGE = torch.backends.cpu.get_cpu_capability() == "AVX2"


def export_fp32(model: nn.Module, path: str, input_size: Sequence[int]) -> None:
    """The float model (already prepared: folded, eval, reference ops) as ONNX with a dynamic batch."""
    export_onnx(model, path, input_size=tuple(input_size), dynamic_batch=True, check=False)


def _scopes(node) -> list:
    for prop in node.metadata_props:
        if prop.key == "pkg.torch.onnx.name_scopes":
            return ast.literal_eval(prop.value)
    return []


def nodes_of_layers(path: str, layers: Sequence[str]) -> list:
    """Names of the ONNX nodes of ``path`` that the dynamo exporter attributed to the modules
    ``layers`` (or to their submodules)."""
    import onnx

    if not layers:
        return []
    proto = onnx.load(path, load_external_data=False)
    names = []
    for node in proto.graph.node:
        scopes = _scopes(node)
        if any(s == layer or s.startswith(layer + ".") for s in scopes for layer in layers):
            names.append(node.name)
    return names


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over batches of images."""

    def __init__(self, input_name: str, batches: Iterator[torch.Tensor]):
        self.input_name, self.batches = input_name, batches

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {self.input_name: batch.numpy()}

    def rewind(self):  # pragma: no cover - calibration reads the data once
        raise RuntimeError("calibration data can be read once")


def quantize(fp32_path: str, out_path: str, batches: Iterator[torch.Tensor], keep_float: Sequence[str]) -> None:
    """Quantize the ONNX file ``fp32_path`` into ``out_path`` (QDQ, per-channel weights), calibrating
    on ``batches`` (N, C, H, W); the nodes of the modules ``keep_float`` stay float."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    excluded = nodes_of_layers(fp32_path, keep_float)
    shaped = out_path + ".shapes.onnx"  # shape inference first, as onnxruntime asks (node names kept)
    quant_pre_process(fp32_path, shaped, skip_optimization=True)
    _logger.info("onnxruntime: %d node(s) kept float", len(excluded))
    quantize_static(
        shaped, out_path, _Reader("input", batches), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, nodes_to_exclude=excluded, reduce_range=REDUCE_RANGE,
        calibrate_method=CalibrationMethod.MinMax,
        extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
    )
    os.remove(shaped)


def load(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the ONNX file ``path`` with onnxruntime on the CPU (as many threads as
    PyTorch uses): (N, C, H, W) -> output."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name

    def run(x: torch.Tensor) -> torch.Tensor:
        (out,) = session.run(None, {name: np.ascontiguousarray(x.detach().cpu().numpy())})
        return torch.from_numpy(out)

    return run


def file_bytes(path: str) -> int:
    return os.path.getsize(path)
