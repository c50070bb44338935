"""Argument checks and implementation choice shared by every operator family.

Every public operator validates its arguments with these helpers *before* any kernel
runs, so that bad input gets a ``ValueError``/``TypeError`` naming the argument, what
it got and what it expects.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from typing import Optional, Sequence, Tuple, Union

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


def check_int(name: str, value, minimum: Optional[int] = None) -> int:
    """Check that ``value`` is an int (not a bool), at least ``minimum`` when given."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def check_bool(name: str, value) -> bool:
    """Check that ``value`` is a bool (or the int 0 or 1)."""
    if isinstance(value, bool) or (isinstance(value, int) and value in (0, 1)):
        return bool(value)
    raise TypeError(f"{name} must be a bool, got {value!r}")


def check_float(name: str, value) -> float:
    """Check that ``value`` is a finite real number (not a bool); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    return float(value)


def script_unsupported(operator):
    """Mark a public operator as not compilable by ``torch.jit.script``, with a clear error.

    TorchScript cannot compile the operators' Python argument checks, and PyTorch keeps it in
    maintenance mode: ``torch.compile`` and ``torch.export`` are the supported graph paths (the
    operators are custom ops, one node each). ``torch.jit.script`` of the operator, or of a module
    that calls it, raises ``RuntimeError`` saying so instead of failing inside our checks.
    """
    name = f"convzoo.ops.{operator.__name__}"
    setattr(operator, "__script_unsupported", (
        f"{name} does not support torch.jit.script. Use torch.compile or torch.export (the operator is a "
        f"custom op, one graph node), or torch.jit.trace / torch.onnx.export with impl='reference'."))
    return operator


def check_positive_float(name: str, value) -> float:
    """Check that ``value`` is a finite real number > 0 (not a bool); returns it as a float."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {value!r}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


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

    ``impl="triton"`` forces it (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; other
    CPU tensors get a ValueError);
    ``impl="auto"`` takes it for CUDA tensors when Triton is importable and warns once
    otherwise; ``impl="reference"`` never does.
    """
    check_impl(impl)
    if impl == "reference":
        return False
    if impl == "triton":
        if not triton_importable():
            raise RuntimeError(f"convzoo.ops.{op_name}: impl='triton' needs the triton package")
        on_cpu = [t for t in tensors if t is not None and t.device.type == "cpu"]
        if on_cpu and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise ValueError(f"convzoo.ops.{op_name}: impl='triton' needs CUDA tensors, got tensors on the cpu; "
                             "use impl='auto' (the CPU kernels) or move the tensors to a GPU "
                             "(CPU tensors run Triton only under its interpreter, TRITON_INTERPRET=1)")
        return True
    on_cuda = any(t is not None and t.is_cuda for t in tensors)
    if not on_cuda:
        return False
    if triton_importable():
        return True
    _warn_no_triton(op_name)
    return False


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype a kernel computes in: float64 stays float64, every other floating dtype float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


_AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "xla")


def _autocast_on(tensors) -> Optional[str]:
    """The device type of ``tensors`` when autocast is enabled for it, else None."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    if first is None or first.device.type not in _AUTOCAST_DEVICE_TYPES:  # meta tensors have no autocast
        return None
    if not torch.is_autocast_enabled(first.device.type):
        return None
    return first.device.type


def _cast_floats(tensors, dtype: torch.dtype) -> tuple:
    return tuple(
        t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != dtype else t
        for t in tensors
    )


def autocast_to_lower(*tensors):
    """Under autocast, cast the floating tensors to autocast's dtype, as ``F.conv2d`` does.

    Custom ops are not cast by autocast themselves; conv-like operators call this first so a
    layer whose input comes out of an autocast region in bfloat16 meets weights of that dtype.
    Returns the tensors (None stays None), unchanged when autocast is off.
    """
    device_type = _autocast_on(tensors)
    if device_type is None:
        return tensors
    return _cast_floats(tensors, torch.get_autocast_dtype(device_type))


def autocast_to_widest(*tensors):
    """Under autocast, cast the floating tensors to the widest floating dtype among them.

    Sampling operators (deformable conv, RoI pooling) compute their sampling positions in the
    widest precision given, as torchvision's autocast rule for them does (it runs them in
    float32); the caller casts the result back to the input's dtype.
    """
    if _autocast_on(tensors) is None:
        return tensors
    widest = None
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.is_floating_point():
            widest = t.dtype if widest is None else torch.promote_types(widest, t.dtype)
    return tensors if widest is None else _cast_floats(tensors, widest)


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def _modes_active() -> bool:
    """Whether a torch function or dispatch mode (FlopCounterMode, FakeTensorMode, ...) is active."""
    try:
        return torch._C._len_torch_function_stack() > 0 or torch._C._len_torch_dispatch_stack() > 0
    except AttributeError:  # a PyTorch without these: assume a mode may be active
        return True


def _functorch_active() -> bool:
    """Whether a torch.func transform (vmap, grad, ...) is running."""
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:  # a PyTorch without it: assume one may be
        return True


def plain_cpu_eager(*tensors) -> bool:
    """Whether a call on these tensors can skip the custom op's dispatch and run its CPU kernels directly.

    True for eager calls on plain CPU tensors: not inside ``torch.compile``/``torch.export``/
    ``torch.jit`` tracing or a ``torch.func`` transform, no tensor subclass and no torch function
    or dispatch mode (FLOP counting, fake tensors) that should see the op as one node. The custom
    op's dispatch costs ~0.1 ms a call, and with autograd ~0.4 ms, as much as a small call's kernels.
    """
    present = [t for t in tensors if t is not None]
    if any(type(t) not in _PLAIN_TENSOR_TYPES or t.device.type != "cpu" for t in present):
        return False
    if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.jit.is_scripting():
        return False
    return not _modes_active() and not _functorch_active()


def plain_cpu_inference(*tensors) -> bool:
    """:func:`plain_cpu_eager` with no gradient to record (eager CPU inference)."""
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return False
    return plain_cpu_eager(*tensors)
