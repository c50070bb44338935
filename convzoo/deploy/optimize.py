"""The fastest inference form of a model in one call: :func:`optimize_for_inference`.

Steps, each checked:

1. **Re-parameterize** (:func:`convzoo.reparameterize`: branches merged, BatchNorms folded) a
   deep copy of the model, so the training form the caller holds is kept (``inplace=True``
   re-parameterizes the caller's model itself and saves the copy's memory).
2. **Memory layout**: ``memory_format="auto"`` times the eager model on the example in both
   layouts (``torch.contiguous_format`` and ``torch.channels_last``; one warm-up and three runs
   each, interleaved) and keeps ``channels_last`` only when its median is at least 5 % lower:
   which layout wins depends on the model, the batch, the size and the CPU's oneDNN kernels, and
   a rule would be wrong somewhere. The weights are converted, and every input is converted on
   the way in.
3. **Compile** (``compile="auto"`` or ``True``): ``torch.compile`` (inductor) with inductor's
   freezing, which turns the weights into constants so it can fold them into the convolutions
   and pre-pack the oneDNN/MKL weights; the large float32 linears are then moved from MKL's
   pre-packed product to oneDNN's (a graph pass, :func:`_onednn_linear_pass`). Freezing and the
   pass are fields of ``torch._inductor.config`` read when inductor compiles (the first call of
   each input shape), so they are set only around each call of the returned model
   (``config.patch``), never left on for other code. On the CPU inductor needs a C++ compiler;
   without one (no ``g++``, or ``CXX`` naming a missing program) the eager model is returned,
   with one ``RuntimeWarning``.
4. **Keep the faster form** (``compile="auto"``, the default): the compiled and the eager
   module are timed on the example (one warm-up and three runs each, interleaved) and the
   eager one is kept when its median is at least 5 % lower (measured: InternImage-T, whose eager
   form runs pre-packed linears and skips the custom ops' dispatch, ran 12 % faster eager than
   compiled, RESULTS.md 2026-12-03). The discarded compiled graph stays in ``torch.compile``'s
   caches (its memory is not returned). ``compile=True`` always keeps the compiled form.
5. **Verify**: the result is run on the example and compared with the caller's eager model
   (before any of the above): the largest absolute difference over the largest absolute value of
   the eager output must not exceed ``tolerance`` (default 1e-3: float32 re-association in folded
   and fused layers stays near 1e-6..1e-5; a wrong rewrite gives order 1); otherwise a
   ``RuntimeError`` says by how much they differ.

Eval mode only: a model in training mode is refused (its BatchNorm statistics and dropout would
make the comparison meaningless, and folding would be wrong), and the returned model refuses
``train()``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import statistics
import time
import warnings
from typing import Any, Callable, List, Optional, Union

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten

from ..layers.reparam import is_reparameterized, reparameterize

__all__ = ["InferenceModel", "optimize_for_inference", "MEMORY_FORMATS"]

_logger = logging.getLogger(__name__)

MEMORY_FORMATS = {"auto": None, "contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
DEFAULT_TOLERANCE = 1e-3
_LAYOUT_RUNS = 3  # timed eager runs per layout for memory_format="auto" (after one warm-up)
_LAYOUT_MARGIN = 0.95  # channels_last must be at least 5 % faster to be chosen
_EAGER_MARGIN = 0.95  # with compile="auto", eager must be at least 5 % faster than compiled to be kept


class InferenceModel(nn.Module):
    """The model :func:`optimize_for_inference` returns: eval-only, gradient-free.

    ``module`` is the re-parameterized eager model (in the chosen layout); calling the
    ``InferenceModel`` converts the input (N, C, H, W) to ``memory_format`` and runs the compiled
    form when there is one (with inductor freezing switched on for the call), else ``module``.

    Attributes: ``memory_format`` (``"contiguous"`` or ``"channels_last"``), ``compiled`` (bool),
    ``compile_seconds`` (the first, compiling call on the example; None when nothing was
    compiled),
    ``timed_ms`` (with ``compile="auto"``: the medians ``{"compiled": ms, "eager": ms}`` on the
    example that chose between them; else None),
    ``max_rel_error`` (max |optimized - eager| / max |eager| on the example), ``tolerance``.
    """

    def __init__(self, module: nn.Module, memory_format: str, compiled: Optional[Callable[..., Any]] = None):
        super().__init__()
        self.module = module
        self.memory_format = memory_format
        # the compiled callable wraps ``module`` (a torch.compile OptimizedModule); kept out of the
        # registered submodules so the parameters are not listed twice
        self.__dict__["_compiled"] = compiled
        self.compile_seconds: Optional[float] = None
        self.timed_ms: Optional[dict] = None
        self.max_rel_error: Optional[float] = None
        self.tolerance: Optional[float] = None
        self.train(False)

    @property
    def compiled(self) -> bool:
        return self._compiled is not None

    def train(self, mode: bool = True) -> "InferenceModel":
        if mode:
            raise RuntimeError("an InferenceModel is for inference only; train the original model instead")
        return super().train(False)

    def forward(self, x: torch.Tensor) -> Any:
        """(N, C, H, W) -> the model's output, without autograd."""
        return self.run(x, compiled=self.compiled)

    def run(self, x: torch.Tensor, *, compiled: bool) -> Any:
        """:meth:`forward` through the compiled form (``compiled=True``, which must exist) or
        the eager ``module``."""
        x = x.contiguous(memory_format=MEMORY_FORMATS[self.memory_format])
        with torch.no_grad():
            if not compiled:
                return self.module(x)
            with _freezing():
                return self._compiled(x)

    def extra_repr(self) -> str:
        return f"memory_format={self.memory_format!r}, compiled={self.compiled}"


@contextlib.contextmanager
def _freezing():
    """Inductor's freezing switched on for the duration of the block only, with the graph pass of
    :func:`_onednn_linear_pass` (unless the caller set a post-grad pass of their own).

    Inductor's notice that it generates no code for complex operators is silenced here: the
    FFT path of ``dwconv2d`` (large kernels on CPUs without AVX-512) traces complex products,
    which run as ATen calls, and with freezing the kernels' spectra become constants (measured
    faster than the custom-op call it replaced, RESULTS.md 2026-12-03)."""
    import torch._inductor.config as inductor_config

    patches = {"freezing": True}
    if inductor_config.post_grad_custom_post_pass is None and torch.backends.mkldnn.is_available():
        patches["post_grad_custom_post_pass"] = _onednn_linear_pass()
    with inductor_config.patch(**patches), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Torchinductor does not support code generation for complex")
        yield


#: Frozen float32 linears of at least this many multiply-adds (rows x in x out) run through
#: oneDNN's pre-packed product instead of MKL's (RESULTS.md, 2026-12-03: 7 of ConvNeXt-T's 8
#: product shapes, 115 M multiply-adds each, 5-24 % faster alone, the compiled model 4-6 % faster;
#: at InternImage-T's <= 51 M-MAC products the two are within 10 % either way and its compiled
#: model was 4-6 % slower with every linear on oneDNN).
ONEDNN_LINEAR_MIN_MACS = 64 * 2**20


@functools.lru_cache(maxsize=None)
def _onednn_linear_pass():
    """The inductor post-grad pass that swaps large frozen MKL linears for oneDNN's.

    With freezing, inductor packs every float32 linear's weight for MKL
    (``mkl._mkl_linear``). For products of at least :data:`ONEDNN_LINEAR_MIN_MACS` this pass
    packs the (constant) weight for oneDNN instead, once, at compile time, and calls
    ``mkldnn._linear_pointwise`` (same inputs, same (M, N) output). Built on first use: it
    subclasses an inductor class, and importing inductor takes seconds."""
    from torch._inductor.custom_graph_pass import CustomGraphPass

    mkl_linear = (torch.ops.mkl._mkl_linear, torch.ops.mkl._mkl_linear.default)

    class OneDNNLinears(CustomGraphPass):
        def __call__(self, graph: torch.fx.Graph) -> None:
            module = graph.owning_module
            for node in list(graph.nodes):
                if node.op != "call_function" or node.target not in mkl_linear:
                    continue
                x, _, weight, bias, rows = node.args
                if weight.op != "get_attr" or not isinstance(rows, int):
                    continue
                value = getattr(module, weight.target)
                if value.dtype != torch.float32 or rows * value.numel() < ONEDNN_LINEAR_MIN_MACS:
                    continue
                name = f"{weight.target}_onednn"
                module.register_buffer(name, torch.ops.mkldnn._reorder_linear_weight(value, rows))
                with graph.inserting_before(node):
                    packed = graph.get_attr(name)
                    packed.meta["val"] = weight.meta["val"]
                    linear = graph.call_function(torch.ops.mkldnn._linear_pointwise.default,
                                                 (x, packed, bias, "none", [], ""))
                linear.meta.update(node.meta)
                node.replace_all_uses_with(linear)
                graph.erase_node(node)
            graph.eliminate_dead_code()

        def uuid(self) -> str:
            return f"convzoo.optimize.onednn_linears.v1.{ONEDNN_LINEAR_MIN_MACS}"

    return OneDNNLinears()


def cpp_compiler() -> Optional[str]:
    """The C++ compiler inductor would use on the CPU (its own search: ``CXX`` or ``g++``), or
    None when there is none."""
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except exc.InvalidCxxCompiler:
        return None


def _check_arguments(model, example_input, compile, memory_format, tolerance) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if isinstance(model, InferenceModel):
        raise TypeError("model is already an InferenceModel; pass the original model")
    if model.training:
        raise ValueError("model is in training mode; optimize_for_inference works on eval-mode models: call model.eval() first")
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor (N, C, H, W), got {type(example_input).__name__}")
    if example_input.dim() != 4 or example_input.shape[0] < 1:
        raise ValueError(f"example_input must have shape (N, C, H, W) with N >= 1, got {tuple(example_input.shape)}")
    if not example_input.is_floating_point():
        raise TypeError(f"example_input must be a floating-point tensor, got {example_input.dtype}")
    channels = getattr(model, "in_chans", None)
    if isinstance(channels, int) and example_input.shape[1] != channels:
        raise ValueError(f"example_input has {example_input.shape[1]} channels but the model takes {channels}")
    parameter = next(model.parameters(), None)
    if parameter is not None and (parameter.device != example_input.device or parameter.dtype != example_input.dtype):
        raise ValueError(f"example_input is {example_input.dtype} on {example_input.device} but the model's parameters "
                         f"are {parameter.dtype} on {parameter.device}; move one to the other")
    if not (isinstance(compile, bool) or compile == "auto"):
        raise ValueError(f"compile must be True, False or 'auto', got {compile!r}")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {', '.join(MEMORY_FORMATS)}, got {memory_format!r}")
    if not isinstance(tolerance, (int, float)) or not tolerance > 0:
        raise ValueError(f"tolerance must be a positive number, got {tolerance!r}")


def _outputs(out: Any) -> List[torch.Tensor]:
    leaves, _ = tree_flatten(out)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def max_rel_error(got: Any, expected: Any) -> float:
    """The largest max |got - expected| / max |expected| over the output tensors (same structure)."""
    got, expected = _outputs(got), _outputs(expected)
    if len(got) != len(expected) or any(g.shape != e.shape for g, e in zip(got, expected)):
        raise RuntimeError(f"the optimized model's outputs {[tuple(g.shape) for g in got]} differ in structure from "
                           f"the eager model's {[tuple(e.shape) for e in expected]}")
    worst = 0.0
    for g, e in zip(got, expected):
        if e.numel():
            scale = float(e.double().abs().max().clamp_min(1e-12))
            worst = max(worst, float((g.double() - e.double()).abs().max()) / scale)
    return worst


def _time_into(fn: Callable[[], Any], times: List[float]) -> None:
    start = time.perf_counter()
    fn()
    times.append((time.perf_counter() - start) * 1e3)


def choose_memory_format(module: nn.Module, x: torch.Tensor) -> str:
    """``"channels_last"`` when the eager ``module`` runs ``x`` at least 5 % faster in that
    layout (weights and input), else ``"contiguous"`` (module doc). ``module`` ends in the
    contiguous layout."""
    layouts = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
    inputs = {name: x.contiguous(memory_format=fmt) for name, fmt in layouts.items()}
    copies = {"contiguous": module, "channels_last": copy.deepcopy(module).to(memory_format=torch.channels_last)}
    times = {name: [] for name in layouts}
    with torch.no_grad():
        for _ in range(_LAYOUT_RUNS + 1):
            for name in layouts:
                _time_into(lambda: copies[name](inputs[name]), times[name])
    medians = {name: statistics.median(t[1:]) for name, t in times.items()}
    choice = "channels_last" if medians["channels_last"] < _LAYOUT_MARGIN * medians["contiguous"] else "contiguous"
    _logger.info("layout: contiguous %.1f ms, channels_last %.1f ms (eager, median of %d) -> %s",
                 medians["contiguous"], medians["channels_last"], _LAYOUT_RUNS, choice)
    return choice


def _eager_is_faster(result: "InferenceModel", x: torch.Tensor) -> bool:
    """Time ``result``'s compiled form and its eager module on ``x`` (module doc, step 4); the
    medians go to ``result.timed_ms``. True when eager is at least 5 % faster."""
    forms = {"compiled": lambda: result.run(x, compiled=True), "eager": lambda: result.run(x, compiled=False)}
    times = {name: [] for name in forms}
    for _ in range(_LAYOUT_RUNS + 1):
        for name, run in forms.items():
            _time_into(run, times[name])
    result.timed_ms = {name: statistics.median(t[1:]) for name, t in times.items()}
    return result.timed_ms["eager"] < _EAGER_MARGIN * result.timed_ms["compiled"]


def optimize_for_inference(
    model: nn.Module,
    example_input: torch.Tensor,
    *,
    compile: Union[bool, str] = "auto",
    memory_format: str = "auto",
    inplace: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
) -> InferenceModel:
    """The fastest inference form of ``model`` for inputs like ``example_input`` (module doc).

    Args:
        model: an eval-mode model taking (N, C, H, W).
        example_input (Tensor[N, C, H, W]): a typical input (the shape the model will mostly
            see; on the model's device and dtype). The layout is timed and the compiled form
            built and checked on it.
        compile: ``"auto"``: ``torch.compile`` with inductor freezing, kept unless the eager
            module is at least 5 % faster on the example (module doc); ``True``: compiled,
            always kept; ``False``: eager. Either compiling value falls back to eager with a
            warning when the CPU has no C++ compiler.
        memory_format: ``"auto"`` (timed, module doc), ``"contiguous"`` or ``"channels_last"``.
        inplace: re-parameterize ``model`` itself instead of a deep copy (the caller's
            training form is then gone).
        tolerance: the largest allowed max |optimized - eager| / max |eager| on the example.

    Returns:
        an :class:`InferenceModel` (call it like the model; eval-only, no autograd).

    Raises:
        TypeError / ValueError: bad arguments, before any work. RuntimeError: the optimized
        output differs from the eager one by more than ``tolerance``.

    Example:
        >>> model = convzoo.create_model("convnext_tiny").eval()
        >>> fast = convzoo.optimize_for_inference(model, torch.randn(1, 3, 224, 224))
        >>> logits = fast(images)
    """
    _check_arguments(model, example_input, compile, memory_format, tolerance)
    with torch.no_grad():
        expected = model(example_input)
    if not all(torch.isfinite(t).all() for t in _outputs(expected)):
        raise ValueError("the eager model's output on example_input is not finite; pass a typical input")
    module = model if inplace else copy.deepcopy(model)
    if not is_reparameterized(module):
        reparameterize(module)
    if memory_format == "auto":
        memory_format = choose_memory_format(module, example_input)
    module.to(memory_format=MEMORY_FORMATS[memory_format])
    compiled = None
    if compile:
        if example_input.device.type == "cpu" and cpp_compiler() is None:
            warnings.warn("optimize_for_inference: no C++ compiler found for inductor on the CPU (install g++ or set "
                          "CXX); returning the re-parameterized eager model, not compiled", RuntimeWarning, stacklevel=2)
        else:
            compiled = torch.compile(module, dynamic=False)
    result = InferenceModel(module, memory_format, compiled)
    start = time.perf_counter()
    got = result(example_input)
    if compiled is not None:
        result.compile_seconds = time.perf_counter() - start
        _logger.info("compiled (inductor, freezing) in %.1f s", result.compile_seconds)
    result.max_rel_error, result.tolerance = max_rel_error(got, expected), float(tolerance)
    if result.max_rel_error > tolerance:
        raise RuntimeError(
            f"the optimized model differs from the eager model on example_input by {result.max_rel_error:.3g} "
            f"(max |difference| / max |eager output|), above tolerance={tolerance:g}; try compile=False or "
            f"memory_format='contiguous' to find the step at fault"
        )
    if compiled is not None and compile == "auto" and _eager_is_faster(result, example_input):
        result.__dict__["_compiled"] = None
        result.max_rel_error = max_rel_error(result(example_input), expected)
    if result.timed_ms is not None:
        _logger.info("compiled %.1f ms, eager %.1f ms (median of %d) -> %s", result.timed_ms["compiled"],
                     result.timed_ms["eager"], _LAYOUT_RUNS, "compiled" if result.compiled else "eager")
    _logger.info("optimized: %s, compiled=%s, max relative difference to eager %.2e",
                 memory_format, result.compiled, result.max_rel_error)
    return result
