"""Deployment: INT8 quantization on the CPU and hardware-friendly activations.

- :func:`quantize` / :func:`load_quantized`: post-training static INT8 quantization in
  onnxruntime (QDQ ONNX) or inductor (torchao PT2E), with calibration, automatic choice of the
  layers kept in float, and a report of size, speed and agreement with the float model.
- :func:`hardware_friendly` swaps a model's exact activations for the ones of
  :mod:`convzoo.layers.activations` (LUT sigmoid/SiLU, h-sigmoid/h-swish, shift leaky ReLU).
- :func:`optimize_for_inference`: the fastest inference form of a model in one call
  (re-parameterized, memory layout chosen, compiled by inductor with freezing, verified).

ONNX export itself lives in :mod:`convzoo.export`.
"""
from .activations import SwapReport, hardware_friendly
from .int8 import BACKENDS, QuantizeReport, load_quantized, quantize
from .optimize import InferenceModel, optimize_for_inference
from .sensitivity import layer_sensitivity, sqnr_db

__all__ = ["SwapReport", "hardware_friendly", "BACKENDS", "QuantizeReport", "load_quantized", "quantize",
           "layer_sensitivity", "sqnr_db",
           "InferenceModel", "optimize_for_inference"]
