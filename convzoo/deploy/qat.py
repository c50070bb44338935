"""Quantization-aware fine-tuning (QAT) for the inductor backend, with torchao's PT2E QAT flow.

Where plain post-training quantization (:func:`convzoo.deploy.quantize`) costs too much
accuracy, a trained float model is fine-tuned for a few epochs with the INT8 rounding simulated
(fake quantization), so its weights adapt to it:

1. :func:`prepare_qat` copies the model, folds its BatchNorms into the convolutions
   (:func:`convzoo.reparameterize`, as ``quantize`` does), switches it to the plain-PyTorch
   reference operators, ``torch.export``-s it in train mode and prepares it with torchao's
   ``prepare_qat_pt2e`` and the ``X86InductorQuantizer`` in its QAT configuration: weights
   (per output channel) and activations get fake-quantize modules with moving-average min/max
   observers. The result is a :class:`QATModel`, an ordinary trainable module;
2. the caller trains it (``convzoo train --qat`` uses the ordinary trainer) and, as the QAT
   literature does, freezes the observers after some epochs (:meth:`QATModel.freeze_observers`).
   Folding the BatchNorms first is the literature's "freeze the BatchNorm statistics" from the
   start: the network computes what the INT8 program will compute. (torchao can also keep
   conv + BatchNorm pairs as a QAT pattern that learns the statistics and folds them at
   conversion, but matching its patterns takes minutes per model on a 2-core CPU; a BatchNorm
   that ``reparameterize`` cannot fold goes that way, and :meth:`QATModel.freeze_bn_stats`
   freezes it);
3. :func:`convert_qat` converts the model (``convert_pt2e``), saves the INT8
   program exactly as ``quantize(..., backend="inductor")`` does (a ``.pt2`` that
   :func:`convzoo.deploy.load_quantized` runs through ``torch.compile``), and reports size, the
   float and INT8 top-1, their agreement and output SQNR, and the INT8 model's SQNR against
   the fake-quantized one.

Only the inductor backend: an onnxruntime QDQ file would need the fake-quantized graph exported
to ONNX, which is not done here (quantize the float model with ``backend="onnxruntime"``).
"""
from __future__ import annotations

import copy
import dataclasses
import math
import os
import tempfile
import warnings
from typing import Iterable, Optional, Tuple, Union

import torch
import torch.nn as nn

from . import _inductor
from .int8 import QuantizeReport, _check_images, _check_path, _custom_op_layers, _prepare, _unquantizable_layers, check_backend

# the training flag of the batch-norm operators torch.export records is their 6th argument, of
# dropout its 3rd
_BATCH_NORM_OPS = ("_native_batch_norm_legit", "batch_norm", "native_batch_norm", "cudnn_batch_norm")
_BN_TRAINING_ARG = 5
_DROPOUT_OPS = ("dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout")
_DROPOUT_TRAINING_ARG = 2


@dataclasses.dataclass
class QATReport(QuantizeReport):
    """:class:`QuantizeReport` of a QAT model, plus how closely the INT8 program follows the
    fake-quantized model it was converted from (over the same evaluation images)."""

    fake_quant_sqnr_db: float = math.nan
    fake_quant_agreement: float = math.nan  # fraction of images with the same arg-max class


class QATModel(nn.Module):
    """A model prepared for quantization-aware training (by :func:`prepare_qat`): (N, C, H, W) ->
    the float model's output, with INT8 rounding simulated.

    ``train()`` / ``eval()`` switch the exported graph's dropout and BatchNorm calls between their
    train and eval forms (an exported graph ignores ``module.training``). In eval mode the observers
    are off, so evaluation data never moves the quantization ranges; in train mode they are on
    until :meth:`freeze_observers`. After :meth:`freeze_bn_stats` the BatchNorms use (and no
    longer update) their running statistics in train mode too.
    """

    def __init__(self, graph_module: torch.fx.GraphModule, in_chans: Optional[int], num_classes: Optional[int]):
        super().__init__()
        self.graph_module = graph_module
        self.in_chans, self.num_classes = in_chans, num_classes
        self.bn_frozen = False
        self.observers_frozen = False
        self.train()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph_module(x)

    def train(self, mode: bool = True) -> "QATModel":
        from torchao.quantization.pt2e import disable_observer, enable_observer

        self.training = mode  # not passed on: torchao's prepared graph refuses train() / eval()
        _set_training_flags(self.graph_module, batch_norm=mode and not self.bn_frozen, dropout=mode)
        self.graph_module.apply(enable_observer if mode and not self.observers_frozen else disable_observer)
        return self

    def freeze_bn_stats(self) -> None:
        """From now on the BatchNorms normalise with their running statistics, which stay fixed."""
        self.bn_frozen = True
        self.train(self.training)

    def freeze_observers(self) -> None:
        """From now on the quantization ranges (scales, zero points) stay fixed."""
        self.observers_frozen = True
        self.train(self.training)


def _set_training_flags(module: torch.fx.GraphModule, batch_norm: bool, dropout: bool) -> None:
    """Set the ``training`` argument of the graph's batch-norm and dropout calls.

    (torchao's ``move_exported_model_to_train/eval`` rewrite these calls from patterns with the
    default eps and momentum, which would change e.g. MobileNetV3's eps of 1e-3; flipping the flag
    keeps every other argument.)
    """
    for node in module.graph.nodes:
        name = getattr(node.target, "_opname", None) if node.op == "call_function" else None
        index = _BN_TRAINING_ARG if name in _BATCH_NORM_OPS else _DROPOUT_TRAINING_ARG if name in _DROPOUT_OPS else None
        if index is not None and len(node.args) > index and isinstance(node.args[index], bool):
            node.args = node.args[:index] + (batch_norm if index == _BN_TRAINING_ARG else dropout,) + node.args[index + 1:]
    module.recompile()


def _qat_config():
    """The x86 inductor quantizer's QAT configuration with plain fake-quantize modules.

    Its default QAT modules run the fused fake-quantize kernel, which derives the scales from the
    observed ranges by its own formula (per-channel weight scales 1/256 off the observer's
    ``calculate_qparams``, which ``convert_pt2e`` uses): every weight would round differently in
    the INT8 program than in training (measured: the INT8 program 20 dB from the fake-quantized
    model, as far as INT8 is from float). The plain ``FakeQuantize`` keeps the observer's values,
    so the fake-quantized model computes what the INT8 program computes.
    """
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.fake_quantize import FakeQuantize
    from torchao.quantization.pt2e.observer import MovingAverageMinMaxObserver, MovingAveragePerChannelMinMaxObserver

    fused = xiq.get_default_x86_inductor_quantization_config(is_qat=True)

    def plain(spec, observer):
        return dataclasses.replace(spec, observer_or_fake_quant_ctr=FakeQuantize.with_args(observer=observer, eps=2 ** -12))

    return dataclasses.replace(fused, input_activation=plain(fused.input_activation, MovingAverageMinMaxObserver),
                               output_activation=plain(fused.output_activation, MovingAverageMinMaxObserver),
                               weight=plain(fused.weight, MovingAveragePerChannelMinMaxObserver))


def prepare_qat(model: nn.Module, sample: torch.Tensor) -> QATModel:
    """``model`` (copied, not changed) prepared for quantization-aware training.

    Args:
        model: a trained float model taking (N, C, H, W).
        sample (Tensor[N, C, H, W]): example images (N >= 2) to export with; the batch stays dynamic.

    Raises ValueError, naming the layer, when the model calls an operator the quantizer cannot
    handle (a custom operator: torchao's QAT graph would have to train through it). convzoo's
    deformable / RoI layers run their plain-PyTorch reference there and stay float (warned).
    """
    check_backend("inductor")
    channels = getattr(model, "in_chans", None)
    _check_images("sample", sample, channels)
    if sample.shape[0] < 2:
        raise ValueError(f"sample needs at least 2 images (the batch is exported as dynamic), got {sample.shape[0]}")
    import torchao.quantization.pt2e.quantizer.x86_inductor_quantizer as xiq
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e

    model = _prepare(model)  # a copy, BatchNorms folded (convzoo.reparameterize), reference operators
    model.train()  # dropout as in training; a BatchNorm left unfolded learns its statistics
    program = _inductor.export_program(model, sample)
    custom = _custom_op_layers(program)
    if custom:
        layer, op = next(iter(custom.items()))
        raise ValueError(f"layer {layer!r} calls the custom operator {op}, which the quantizer cannot handle in "
                         "quantization-aware training; replace the layer, or quantize after training with "
                         "convzoo.deploy.quantize(backend='inductor'), where it stays float")
    for layer in _unquantizable_layers(model):
        warnings.warn(f"layer {layer!r} ({type(model.get_submodule(layer)).__name__}) runs a convzoo operator with no "
                      "INT8 kernel: it stays float", UserWarning, stacklevel=2)
    quantizer = xiq.X86InductorQuantizer()
    quantizer.set_global(_qat_config())
    for layer in _unquantizable_layers(model):
        quantizer.set_module_name_qconfig(layer, None)
    graph_module = program.module()
    _inductor.separate_repeated_module_calls(graph_module)
    prepared = prepare_qat_pt2e(graph_module, quantizer)
    return QATModel(prepared, channels, getattr(model, "num_classes", None))


class _Agreement:
    """Streaming top-1 agreement and SQNR of one output against a reference output."""

    def __init__(self):
        self.signal = self.noise = self.same = self.count = 0.0

    def add(self, reference: torch.Tensor, test: torch.Tensor) -> None:
        reference, test = reference.double(), test.double()
        self.signal += float(reference.pow(2).sum())
        self.noise += float((test - reference).pow(2).sum())
        self.same += float((reference.argmax(1) == test.argmax(1)).sum())
        self.count += reference.shape[0]

    def sqnr_db(self) -> float:
        return math.inf if self.noise == 0.0 else 10.0 * math.log10(max(self.signal, 1e-300) / self.noise)

    def agreement(self) -> float:
        return self.same / max(self.count, 1.0)


def convert_qat(model: QATModel, path: Union[str, os.PathLike], float_model: nn.Module,
                eval_batches: Iterable[Tuple[torch.Tensor, Optional[torch.Tensor]]]) -> QATReport:
    """Convert the fine-tuned ``model`` to INT8, save it to ``path`` (``.pt2``) and compare it.

    Args:
        model: the :class:`QATModel` after training (copied, not changed).
        path: the ``.pt2`` file to write, in the format of ``quantize(..., backend="inductor")``.
        float_model: the float model QAT started from, the reference of the report.
        eval_batches: ``(images (N, C, H, W), labels (N,) or None)`` pairs the models are compared
            on (e.g. the validation split); with labels the report has both top-1 accuracies.

    The three models run eagerly here (the INT8 program through its reference quantize /
    dequantize operators); no speed is measured. The file is written under a temporary name and
    renamed when all succeeded, so a failure leaves nothing half-written.
    """
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    path = os.fspath(path)
    check_backend("inductor")
    _check_path(path, "inductor")
    if not isinstance(model, QATModel):
        raise TypeError(f"model must be a QATModel from prepare_qat, got {type(model).__name__}")
    fake_quant = copy.deepcopy(model).eval()
    float_model = _prepare(float_model)  # BN folded, eval, reference operators: the float program
    folder = os.path.dirname(os.path.abspath(path))
    with tempfile.TemporaryDirectory(dir=folder, prefix=".convzoo-qat-") as work:
        int8_path, fp32_path = os.path.join(work, "int8.pt2"), os.path.join(work, "fp32.pt2")
        batches = iter(eval_batches)
        first = next(batches, None)
        if first is None:
            raise ValueError("eval_batches is empty: the INT8 model must be compared on some images")
        sample = first[0][:2] if first[0].shape[0] >= 2 else first[0][:1].repeat(2, 1, 1, 1)
        _check_images("eval images", first[0], model.in_chans)
        _inductor.save_converted(convert_pt2e(copy.deepcopy(fake_quant.graph_module)), int8_path, sample)
        _inductor.export_fp32(_inductor.export_program(float_model, sample), fp32_path)
        int8 = _inductor.load_module(int8_path)
        report = _compare(float_model, fake_quant, int8, [first], batches)
        report.fp32_bytes, report.int8_bytes = os.path.getsize(fp32_path), os.path.getsize(int8_path)
        os.replace(int8_path, path)
    report.path = path
    return report


@torch.no_grad()
def _compare(float_model: nn.Module, fake_quant: nn.Module, int8: nn.Module, *batch_lists) -> QATReport:
    versus_float, versus_fake = _Agreement(), _Agreement()
    right_float = right_int8 = labelled = 0.0
    for batches in batch_lists:
        for images, labels in batches:
            images = images.contiguous()
            reference, fake, quantized = float_model(images).float(), fake_quant(images).float(), int8(images).float()
            versus_float.add(reference, quantized)
            versus_fake.add(fake, quantized)
            if labels is not None:
                right_float += float((reference.argmax(1) == labels).sum())
                right_int8 += float((quantized.argmax(1) == labels).sum())
                labelled += labels.shape[0]
    report = QATReport(path="", backend="inductor", calibration_images=0, kept_float=[], layer_sqnr_db={},
                       fp32_bytes=0, int8_bytes=0, eval_images=int(versus_float.count),
                       top1_agreement=versus_float.agreement(), sqnr_db=versus_float.sqnr_db(),
                       fake_quant_sqnr_db=versus_fake.sqnr_db(), fake_quant_agreement=versus_fake.agreement())
    if labelled:
        report.fp32_top1, report.int8_top1 = 100.0 * right_float / labelled, 100.0 * right_int8 / labelled
    return report
