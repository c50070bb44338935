"""Argument checks and implementation choice shared by every operator family.

Every public operator validates its arguments with these helpers *before* any kernel
runs, so that bad input gets a ``ValueError``/``TypeError`` naming the argument, what
it got and what it expects.
"""
from __future__ import annotations

import functools
import warnings
from typing import Sequence, Tuple, Union

import torch

IMPLS = ("auto", "triton", "reference")
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

IntPair = Union[int, Tuple[int, int], Sequence[int]]


def check_tensor(name: str, value, ndim: int | None = None, dtypes=FLOAT_DTYPES) -> torch.Tensor:
    """Check that ``value`` is a tensor with ``ndim`` dimensions and one of ``dtypes``."""
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if ndim is not None and value.dim() != ndim:
        raise ValueError(f"{name} must be a {ndim}-D tensor, got shape {tuple(value.shape)}")
    if dtypes is not None and value.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {str(value.dtype).replace('torch.', '')}")
    return value


def check_same(name: str, value: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    """Check that ``value`` has the dtype and device of ``ref``."""
    if value.dtype != ref.dtype:
        raise TypeError(f"{name} must have the dtype of {ref_name} ({ref.dtype}), got {value.dtype}")
    if value.device != ref.device:
        raise ValueError(f"{name} must be on the device of {ref_name} ({ref.device}), got {value.device}")


def pair(name: str, value: IntPair, minimum: int = 0) -> Tuple[int, int]:
    """Turn an int or a pair of ints into ``(h, w)``, each at least ``minimum``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if isinstance(value, int):
        out = (value, value)
    elif isinstance(value, (tuple, list, torch.Size)) and len(value) == 2 and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value
    ):
        out = (int(value[0]), int(value[1]))
    else:
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    if min(out) < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return out


def check_impl(impl: str) -> str:
    """Check the ``impl`` argument every operator takes."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    return impl


@functools.lru_cache(maxsize=None)
def triton_importable() -> bool:
    """Whether ``import triton`` works (cached)."""
    try:
        import triton  # noqa: F401
    except Exception:  # pragma: no cover - depends on the environment
        return False
    return True


@functools.lru_cache(maxsize=None)
def _warn_no_triton(op_name: str) -> None:
    warnings.warn(
        f"convzoo.ops.{op_name}: Triton is not importable, using the plain PyTorch reference on CUDA "
        "(pip install triton for the fast kernels)",
        RuntimeWarning,
        stacklevel=3,
    )


def use_triton(op_name: str, impl: str, *tensors: torch.Tensor) -> bool:
    """Decide whether ``op_name`` runs its Triton kernel.

    ``impl="triton"`` forces it (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``);
    ``impl="auto"`` takes it for CUDA tensors when Triton is importable and warns once
    otherwise; ``impl="reference"`` never does.
    """
    check_impl(impl)
    if impl == "reference":
        return False
    if impl == "triton":
        if not triton_importable():
            raise RuntimeError(f"convzoo.ops.{op_name}: impl='triton' needs the triton package")
        return True
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if not on_cuda:
        return False
    if triton_importable():
        return True
    _warn_no_triton(op_name)
    return False
