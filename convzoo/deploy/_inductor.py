"""The inductor backend of :mod:`convzoo.deploy.int8`: torchao's PT2E quantization with the
x86 inductor quantizer (int8 weights per output channel, uint8 activations per tensor), saved as
a ``torch.export`` program (``.pt2``) with a dynamic batch, run through ``torch.compile`` with
inductor's freezing (which turns the quantize/dequantize patterns into oneDNN int8 kernels)."""
from __future__ import annotations

import copy
import os
from typing import Callable, Iterator, Sequence

import torch
import torch.nn as nn

SUFFIX = ".pt2"
PACKAGES = ("torchao",)


def _dynamic_batch() -> tuple:
    return ({0: torch.export.Dim("batch", min=1, max=4096)},)


def export_program(model: nn.Module, sample: torch.Tensor) -> torch.export.ExportedProgram:
    """``torch.export`` of the prepared float model with a dynamic batch (sample batch >= 2)."""
    return torch.export.export(model, (sample,), dynamic_shapes=_dynamic_batch())


def _save(program: torch.export.ExportedProgram, path: str) -> None:
    """``torch.export.save`` without the example inputs (they would count in the file's size)."""
    program = copy.copy(program)
    program.example_inputs = None
    torch.export.save(program, path)


def export_fp32(program: torch.export.ExportedProgram, path: str) -> None:
    _save(program, path)


def _drop_unused_attributes(module: torch.fx.GraphModule) -> None:
    """convert_pt2e leaves the float weights beside their int8 copies; drop what the graph does not read."""
    used = {node.target for node in module.graph.nodes if node.op == "get_attr"}
    for name, _ in list(module.named_parameters()) + list(module.named_buffers()):
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(module.get_submodule(owner) if owner else module, attr)


def separate_repeated_module_calls(module: torch.fx.GraphModule) -> None:
    """Give each call of a module called more than once (ResNet's one ``self.relu`` after both
    convs and after the residual add) its own name in the nodes' ``nn_module_stack``.

    The x86 quantizer groups nodes into partitions by that name; the calls of a shared module
    would form one partition with several outputs, which it rejects ("Input partition has more
    than one output node"). ``torch.export`` marks the k-th repeated call's stack key ``...@k``;
    the module's name gets the same suffix (the first call keeps the plain name).
    """
    for node in module.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if node.op != "call_function" or not stack:
            continue
        key, (name, kind) = next(reversed(stack.items()))
        if "@" in key:
            stack[key] = (name + key[key.rindex("@"):], kind)


def quantize(program: torch.export.ExportedProgram, out_path: str, batches: Iterator[torch.Tensor],
             keep_float: Sequence[str], sample: torch.Tensor) -> None:
    """PT2E-quantize ``program`` (calibrating on ``batches``) and save it to ``out_path``; the
    modules ``keep_float`` are left unannotated (float)."""
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e

    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(xiq.get_default_x86_inductor_quantization_config())
    for name in keep_float:
        quantizer.set_module_name_qconfig(name, None)
    module = program.module()
    separate_repeated_module_calls(module)
    prepared = prepare_pt2e(module, quantizer)
    with torch.no_grad():
        for batch in batches:
            prepared(batch)
    save_converted(convert_pt2e(prepared), out_path, sample)


def save_converted(converted: torch.fx.GraphModule, out_path: str, sample: torch.Tensor) -> None:
    """Save a ``convert_pt2e`` result as :func:`quantize` does: the float weights it leaves beside
    their int8 copies dropped, re-exported with a dynamic batch (sample batch >= 2)."""
    _drop_unused_attributes(converted)
    _save(torch.export.export(converted, (sample,), dynamic_shapes=_dynamic_batch()), out_path)


def compiled(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``torch.compile(module)`` with inductor's freezing on, as a function of (N, C, H, W)."""
    import torch._inductor.config as inductor_config

    compiled_module = torch.compile(module, dynamic=False)

    def run(x: torch.Tensor) -> torch.Tensor:
        # freezing must be on where inductor compiles (the first call per shape); compile options
        # do not reach the freezing pass, so the config is patched around each call
        with inductor_config.patch(freezing=True), torch.no_grad():
            return compiled_module(x)

    return run


def load_module(path: str) -> nn.Module:
    """The quantized (or float) program saved at ``path`` as a module (eager, not compiled)."""
    import torchao.quantization.pt2e  # noqa: F401 - registers the quantized_decomposed operators

    return torch.export.load(path).module()


def load(path: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A function running the program at ``path`` compiled by inductor: (N, C, H, W) -> output."""
    return compiled(load_module(path))


def file_bytes(path: str) -> int:
    return os.path.getsize(path)
