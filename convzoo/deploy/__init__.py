"""Deployment: hardware-friendly activations and INT8 quantization on the CPU.

- :func:`hardware_friendly` swaps a model's exact activations for the ones of
  :mod:`convzoo.layers.activations` (LUT sigmoid/SiLU, h-sigmoid/h-swish, shift leaky ReLU).
"""
from .activations import SwapReport, hardware_friendly

__all__ = ["SwapReport", "hardware_friendly"]
