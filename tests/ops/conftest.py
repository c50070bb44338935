"""Operator tests: uninitialised memory reads NaN.

Every test here runs with ``torch.empty`` and ``torch.empty_like`` returning floating tensors filled
with NaN (as flash-linear-attention's tests do), so a kernel that leaves part of the output it
allocated unwritten fails its comparison with the reference instead of passing on memory that
happened to hold the right values. Integer tensors and tensors made while ``torch.compile``
traces are left alone.
"""
import pytest
import torch
import torch.utils._device

_EMPTY, _EMPTY_LIKE = torch.empty, torch.empty_like
# PyTorch keeps the factory functions a ``with torch.device(...)`` block redirects in a set made once,
# by identity, on first use: make it now, with the real torch.empty, so that a first use inside a
# test here cannot keep the NaN-filling one in it for the rest of the session.
torch.utils._device._device_constructors()


def _nan_filled(tensor: torch.Tensor) -> torch.Tensor:
    if (tensor.is_floating_point() or tensor.is_complex()) and tensor.device.type != "meta":
        tensor.fill_(float("nan"))
    return tensor


def nan_empty(*args, **kwargs) -> torch.Tensor:
    """``torch.empty`` whose floating results hold NaN."""
    out = _EMPTY(*args, **kwargs)
    return out if torch.compiler.is_compiling() else _nan_filled(out)


def nan_empty_like(*args, **kwargs) -> torch.Tensor:
    """``torch.empty_like`` whose floating results hold NaN."""
    out = _EMPTY_LIKE(*args, **kwargs)
    return out if torch.compiler.is_compiling() else _nan_filled(out)


@pytest.fixture(autouse=True)
def uninitialised_memory_is_nan(monkeypatch):
    monkeypatch.setattr(torch, "empty", nan_empty)
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)
