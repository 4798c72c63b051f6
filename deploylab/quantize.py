"""INT8 quantization on the CPU: the plumbing behind lesson 01 (the techniques are shown in the notebook).

Current paths (docs/ARCHITECTURE.md, "Current library paths"):

- dynamic quantization of ``Linear`` layers: torchao's ``quantize_(model, Int8DynamicActivationInt8WeightConfig())``
  (the old ``torch.ao.quantization.quantize_dynamic`` still runs but is deprecated);
- static quantization with calibration: PT2E -- ``torch.export.export``, ``prepare_pt2e`` with
  ``X86InductorQuantizer``, calibration on real images, ``convert_pt2e``, then ``torch.compile``, which
  lowers the quantize/dequantize pattern to oneDNN INT8 kernels (VNNI/AMX where the CPU has them);
- quantization-aware training: ``prepare_qat_pt2e`` and a short fine-tune with fake quantization
  (:func:`deploylab.qat.qat_finetune`: distillation from the fp32 model, batch norm and observers frozen part-way).

This module holds what the lesson needs around those calls: the per-profile sizes, input checks with
clear errors, calibration, evaluation at fixed batch shapes (so that a compiled model compiles once),
how to read the CPU's INT8 instructions (:func:`int8_instructions`, :func:`needs_reduce_range`),
per-layer sensitivity and the keep-in-float choice. Split out by concern: QAT's fine-tune in
:mod:`deploylab.qat`, saving/loading the quantized program with a verified sha256 in :mod:`deploylab.quantize_save`
(both still reachable as ``quantize.<name>``).
"""

from __future__ import annotations

import copy
import types
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from . import data, stats
from .config import Profile
from .train import accuracy, predict

LESSON = "quantization"


class QuantizationError(RuntimeError):
    """A model or an input cannot be quantized the way it was asked; the message says what to do."""


class UnsupportedLayerError(QuantizationError, TypeError):
    """The model holds a layer the x86 static INT8 path of this lesson does not handle."""


@dataclass(frozen=True)
class QuantSizes:
    """Sizes of lesson 01 per profile (the shared sizes live in :class:`deploylab.config.Profile`)."""

    name: str
    calibration_sweep: tuple[int, ...]  # calibration images tried for the student
    teacher_eval_images: int | None  # test images for the teacher (None: the profile's whole test set)
    qat_images: int  # training images of the student's QAT fine-tune (one pass, shuffled)
    teacher_qat_images: int  # the same for the teacher (ResNet50 trains slowly on 2 cores)
    qat_batch_size: int
    qat_lr: float  # SGD with momentum: ~1/100 of the learning rate the models were trained with
    sensitivity_images: int  # validation images per layer in the sensitivity scan (never test images)
    sensitivity_layers: int | None  # layers scanned (evenly spaced; None: every conv/linear)
    keep_float: int  # most sensitive layers left in float in the mixed-precision variant

    def to_dict(self) -> dict:
        return asdict(self)


# Run-time estimates of the whole notebook on 2 AVX2 cores (EPYC), from its parts as measured there (workshop run
# of 2026-12-02: each torch.compile 6-33 s, INT8 teacher ~360 test images/s, student QAT ~300 images/s; ResNet50
# trains at ~70 images/s in fp32, ~25-35 estimated with fake quantization):
# - smoke    ~3-4 min, over its 2-minute goal: ten torch.compile calls (each variant, batch 1 and 32) take most of
#            it and no size shrinks them; QAT 256 + 64 images, a few seconds;
# - workshop ~8 min: the 4.8 min measured before, plus ~3: the teacher on all 10,000 test images (INT8 static and
#            QAT, ~1 min; fp32 logits cached by lesson 00), the 8-bit/7-bit comparison (~25 s), student QAT 4,096
#            images (~15 s), teacher QAT 512 images (~20 s) and its compilation, both sensitivity scans (~10 s);
# - full     ~14 min: as workshop, plus student QAT on all 55,000 training images (one epoch, ~3 min), teacher QAT
#            2,048 images (~1.5 min), a 4-size sweep (~1 min) and the longer benchmark (~1 min).
SIZES: dict[str, QuantSizes] = {
    "smoke": QuantSizes("smoke", calibration_sweep=(8, 32), teacher_eval_images=128,
                        qat_images=256, teacher_qat_images=64, qat_batch_size=32, qat_lr=5e-4,
                        sensitivity_images=128, sensitivity_layers=6, keep_float=2),
    "workshop": QuantSizes("workshop", calibration_sweep=(16, 64, 256), teacher_eval_images=None,
                           qat_images=4096, teacher_qat_images=512, qat_batch_size=64, qat_lr=5e-4,
                           sensitivity_images=500, sensitivity_layers=None, keep_float=3),
    "full": QuantSizes("full", calibration_sweep=(32, 128, 512, 1024), teacher_eval_images=None,
                       qat_images=55_000, teacher_qat_images=2048, qat_batch_size=64, qat_lr=5e-4,
                       sensitivity_images=2000, sensitivity_layers=None, keep_float=3),
}


def sizes(profile: Profile) -> QuantSizes:
    """The lesson's sizes for ``profile``."""
    return SIZES[profile.name]


# Leaf layers the PT2E + X86InductorQuantizer path of this lesson handles (quantized or passed through).
SUPPORTED_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.ReLU, nn.ReLU6, nn.Hardtanh, nn.Dropout, nn.Identity,
    nn.Flatten, nn.AdaptiveAvgPool2d, nn.AvgPool2d, nn.MaxPool2d,
)


def check_quantizable(model: nn.Module) -> None:
    """Raise :class:`UnsupportedLayerError` naming every leaf layer outside :data:`SUPPORTED_LAYERS`.

    Why: the x86 quantizer silently leaves layers it has no pattern for in float, and torch.export
    fails deep inside on some (recurrent layers, data-dependent control flow). A clear error up front
    says which layer and what to do.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    bad = [(name, type(m).__name__) for name, m in model.named_modules()
           if not list(m.children()) and name and not isinstance(m, SUPPORTED_LAYERS)]
    if bad:
        listed = ", ".join(f"{n} ({t})" for n, t in bad[:5]) + (" ..." if len(bad) > 5 else "")
        raise UnsupportedLayerError(
            f"this model holds layers the static INT8 path (PT2E + X86InductorQuantizer) of this lesson does "
            f"not handle: {listed}. Replace them, or quantize only the supported part (wrap it in its own "
            f"module), or use weight-only/dynamic quantization (torchao quantize_) for such layers."
        )


def untie_relus(model: nn.Module) -> nn.Module:
    """Give each ReLU call of torchvision's ResNet ``Bottleneck`` its own module (in place; returns the model).

    torchvision's Bottleneck calls one ``self.relu`` three times. PT2E's pattern matcher groups nodes by
    the module that produced them, so the three calls form one "partition" with three outputs, and
    ``X86InductorQuantizer`` stops with "Input partition has more than one output node" (torchao 0.18).
    The forward below is torchvision's, with three ReLU modules; the weights are untouched.
    """
    from torchvision.models.resnet import BasicBlock, Bottleneck

    def forward(self, x):
        identity = x
        out = self.relu1(self.bn1(self.conv1(x)))
        out = self.relu2(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu3(out + identity)

    for m in model.modules():
        if isinstance(m, BasicBlock):
            raise QuantizationError("untie_relus handles ResNet Bottleneck blocks only (ResNet50 and deeper)")
        if isinstance(m, Bottleneck) and not hasattr(m, "relu3"):
            m.relu1, m.relu2, m.relu3 = nn.ReLU(inplace=True), nn.ReLU(inplace=True), nn.ReLU(inplace=True)
            del m.relu
            m.forward = types.MethodType(forward, m)
    return model


def batch_dim(max_batch: int = 1024) -> tuple[dict, ...]:
    """``dynamic_shapes`` for torch.export: the batch dimension of the one (positional) input may vary."""
    return ({0: torch.export.Dim("batch", min=1, max=max_batch)},)


def export_for_quantization(model: nn.Module, example: torch.Tensor, *, train: bool = False) -> torch.fx.GraphModule:
    """``torch.export.export(model, (example,)).module()`` with a dynamic batch, after the checks above.

    ``train=True`` exports the training graph (BatchNorm in training mode) for QAT.
    """
    check_quantizable(model)
    model = copy.deepcopy(model).train(train)
    if example.ndim != 4 or example.shape[0] < 2:
        raise ValueError(f"export needs an example batch (N>=2, C, H, W) of real images, got shape {tuple(example.shape)}")
    try:
        ep = torch.export.export(model, (example,), dynamic_shapes=batch_dim())
    except Exception as e:  # torch.export's errors are long; say what happened first
        raise QuantizationError(f"torch.export could not capture {type(model).__name__}: {type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''}") from e
    return ep.module()


def batches_of(x: torch.Tensor, batch_size: int) -> Iterable[torch.Tensor]:
    """Consecutive batches of ``x``."""
    for i in range(0, len(x), batch_size):
        yield x[i : i + batch_size]


@torch.no_grad()
def calibrate(prepared: nn.Module, batches: Iterable[torch.Tensor]) -> int:
    """Run ``batches`` of real images through a model prepared by ``prepare_pt2e``; returns the image count.

    The observers record activation ranges; with no images they hold nothing, and ``convert_pt2e``
    would build a model with meaningless scales -- so an empty calibration is an error.
    """
    seen = 0
    for xb in batches:
        if not isinstance(xb, torch.Tensor) or xb.ndim != 4:
            raise TypeError(f"calibration batches must be (N, C, H, W) tensors, got {type(xb).__name__} "
                            f"{tuple(xb.shape) if isinstance(xb, torch.Tensor) else ''}")
        if len(xb) == 0:
            continue
        prepared(xb)
        seen += len(xb)
    if seen == 0:
        raise ValueError("calibration received no images: pass real training images, "
                         "e.g. batches_of(data.calibration_set(n), 32) with n >= 1")
    return seen


@torch.inference_mode()
def predict_fixed(fn, x: torch.Tensor, batch_size: int = 32) -> torch.Tensor:
    """Logits of ``fn`` on ``x`` in batches of exactly ``batch_size`` (the last one padded, then cut).

    A compiled model compiles once per input shape; padding the last batch keeps evaluation on the
    shape the benchmark already compiled, instead of paying another compilation for one odd batch.
    """
    if len(x) == 0:
        raise ValueError("nothing to predict: x is empty")
    outs = []
    for xb in batches_of(x, batch_size):
        n = len(xb)
        if n < batch_size:
            xb = torch.cat([xb, xb.new_zeros((batch_size - n, *xb.shape[1:]))])
        outs.append(fn(xb)[:n])
    return torch.cat(outs)


# CPU flags (deploylab.hardware.REPORTED_FLAGS) that give x86 an 8-bit dot product accumulating in 32 bits.
VNNI_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni")


def int8_instructions(flags: dict[str, bool]) -> str:
    """The best INT8 instructions in a hardware report's ``cpu_flags``: AMX, AVX-512 VNNI, AVX-VNNI, or none of them.

    oneDNN's INT8 convolutions use AMX tiles where present, else VNNI (one instruction multiplies
    uint8 by int8 and adds into int32), else AVX2's ``vpmaddubsw``, which adds pairs of products
    into a *saturating 16-bit* integer before widening.
    """
    if flags.get("amx_int8"):
        return "AMX"
    if flags.get("avx512_vnni"):
        return "AVX-512 VNNI"
    if flags.get("avx_vnni"):
        return "AVX-VNNI"
    return "AVX2 without VNNI" if flags.get("avx2") else "no AVX2"


def needs_reduce_range(flags: dict[str, bool]) -> bool:
    """True on a CPU without VNNI/AMX: quantize activations to 7 bits (``reduce_range=True``).

    Without VNNI, two uint8 x int8 products are added in 16 bits: 2 x 255 x 127 = 64,770 overflows
    int16 (max 32,767) and saturates; with 7-bit activations, 2 x 127 x 127 = 32,258 fits.
    torchao's ``get_default_x86_inductor_quantization_config`` documents the same advice. Lesson 04's
    ONNX Runtime has a flag of the same name that narrows the *weights* to 7 bits instead: same reason
    (16-bit sums), different tensor.
    """
    return not any(flags.get(f) for f in VNNI_FLAGS)


def per_tensor_weights(quantization_config):
    """``quantization_config`` with ONE scale per weight tensor instead of one per output channel (PTQ only).

    For comparison: the x86 INT8 kernels want per-channel weights (inductor lowers only those to
    oneDNN INT8 convolutions; a per-tensor model runs as dequantize + fp32 convolution), and
    X86InductorQuantizer's QAT supports per-channel weights only (torchao 0.18).
    """
    import dataclasses

    from torchao.quantization.pt2e import MinMaxObserver

    if quantization_config.is_qat:
        raise QuantizationError("per-tensor weights are for PTQ here: X86InductorQuantizer's QAT is per-channel only")
    weight = dataclasses.replace(quantization_config.weight, qscheme=torch.per_tensor_symmetric, ch_axis=None,
                                 observer_or_fake_quant_ctr=MinMaxObserver.with_args(eps=2**-12))
    return dataclasses.replace(quantization_config, weight=weight)


def allow_eval(model: nn.Module, *, exported_in_eval_mode: bool = False) -> nn.Module:
    """Let ``.eval()`` work on a converted (exported) model, and leave it in eval mode.

    ``torch.export``'s ``module()`` makes ``.train()`` and ``.eval()`` raise, on purpose: the graph
    is specialised at export time, and switching a flag would not switch batch norm or dropout
    (https://github.com/pytorch/pytorch/issues/151726). The benchmark calls ``.eval()`` on every
    model, so:

    - a PTQ model exported from ``model.eval()`` (``exported_in_eval_mode=True``) already computes
      batch norm and dropout in their inference form: it gets nn.Module's own ``eval()``, which
      switches nothing in the graph; its ``train()`` refuses, since this graph cannot train;
    - a QAT model (exported in train mode) gets torchao's public
      ``allow_exported_model_train_eval`` and is switched to eval now: that rewrites the train-mode
      batch-norm and dropout patterns, matching each with a *strict* ``torch.export``, which calls
      ``torch._dynamo.reset()`` (torchao 0.18) -- every model compiled earlier in the process
      recompiles silently on its next call. Do it before compiling anything.
    """
    if exported_in_eval_mode:
        def train(self, mode: bool = True):
            if mode:
                raise QuantizationError("this graph was exported from model.eval(): batch norm and dropout are fixed "
                                        "in their inference form; export model.train() and use prepare_qat_pt2e to train")
            return nn.Module.train(self, False)

        model.train = types.MethodType(train, model)
        model.eval = types.MethodType(lambda self: self.train(False), model)
    else:
        from torchao.quantization.pt2e import allow_exported_model_train_eval

        allow_exported_model_train_eval(model)
    model.eval()
    return model


def recovered(fp32: float, before: float, after: float) -> str:
    """What a fix (QAT, float layers) won back of the accuracy lost against fp32, as a phrase for a generated sentence.

    ``fp32``, ``before`` and ``after`` are accuracies (fractions); the phrase speaks in percentage points.
    """
    lost, left = 100 * (fp32 - before), 100 * (fp32 - after)
    if lost <= 0:
        return f"there was nothing to win back ({-lost:+.2f} points against fp32 before, {-left:+.2f} after)"
    if left >= lost:
        return f"it won back nothing ({lost:.2f} points below fp32 before, {left:.2f} after)"
    if left <= 0:
        return f"it won back all {lost:.2f} points ({-left:+.2f} against fp32 after)"
    return f"it won back {lost - left:.2f} of the {lost:.2f} points ({left:.2f} below fp32 after)"


def top1_agreement(logits: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of images on which ``logits`` and ``reference`` predict the same class."""
    if logits.shape != reference.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and reference {tuple(reference.shape)} differ in shape")
    return (logits.argmax(1) == reference.argmax(1)).float().mean().item()


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d and Linear layers, in model order (the layers INT8 kernels replace)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def depthwise_layers(model: nn.Module) -> set[str]:
    """Names of the depthwise convolutions (one filter per channel: ``groups == in_channels > 1``)."""
    return {n for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and m.groups > 1 and m.groups == m.in_channels}


def _fake_quant_weight(w: torch.Tensor, per_channel: bool = True) -> torch.Tensor:
    """Symmetric INT8 round trip of a weight: one scale per output channel (the x86 quantizer's), or one per tensor."""
    if per_channel:
        amax = w.detach().abs().flatten(1).amax(1).clamp(min=1e-12)
        scale = amax / 127.0
        zp = torch.zeros_like(scale, dtype=torch.int32)
        return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -128, 127)
    scale = max(w.detach().abs().max().item(), 1e-12) / 127.0
    return torch.fake_quantize_per_tensor_affine(w, scale, 0, -128, 127)


@torch.inference_mode()
def layer_sensitivity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, calibration: torch.Tensor,
                      layers: list[str] | None = None, *, per_channel: bool = True,
                      reduce_range: bool = False) -> dict[str, float]:
    """Accuracy of ``model`` when only ONE layer at a time runs in simulated INT8, for each of ``layers``.

    "Simulated INT8" is a round trip through INT8 of the layer's weight -- with batch norm folded in, as
    PT2E quantizes it; symmetric, per channel or per tensor -- and of its input (per tensor, asymmetric
    uint8, 7 bits with ``reduce_range``, range from ``calibration`` images), while everything else stays
    fp32. Cheap (fp32 eager inference), and it ranks which layers lose the most when quantized.
    ``x`` must be validation images: the ranking chooses the layers kept in float (test images refused).
    """
    from torch.fx.experimental.optimization import fuse

    data.refuse_test_images(x, "layer_sensitivity ranks layers to keep in float")
    layers = layers or quantizable_layers(model)
    if len(calibration) == 0:
        raise ValueError("layer_sensitivity needs calibration images to find activation ranges")
    model = fuse(copy.deepcopy(model).eval())  # batch norm folded into the convolutions, as PT2E folds it
    mods = dict(model.named_modules())
    unknown = [n for n in layers if n not in mods]
    if unknown:
        raise ValueError(f"no such layers in the model: {unknown[:5]}")
    ranges: dict[str, tuple[float, float]] = {}
    hooks = [mods[n].register_forward_pre_hook(
        lambda m, args, n=n: ranges.__setitem__(n, (min(ranges.get(n, (0, 0))[0], args[0].min().item()),
                                                      max(ranges.get(n, (0, 0))[1], args[0].max().item()))))
        for n in layers]
    predict(model, calibration)
    for h in hooks:
        h.remove()
    qmax = 127 if reduce_range else 255
    out = {}
    for n in layers:
        m = mods[n]
        lo, hi = ranges[n]
        scale = max(hi - lo, 1e-8) / qmax
        zp = int(round(-lo / scale))
        original = m.weight.data.clone()
        m.weight.data = _fake_quant_weight(original, per_channel)
        h = m.register_forward_pre_hook(
            lambda mod, args, scale=scale, zp=zp: (torch.fake_quantize_per_tensor_affine(args[0], scale, zp, 0, qmax),))
        out[n] = accuracy(predict(model, x), y)
        h.remove()
        m.weight.data = original
    return out


def most_sensitive(sensitivity: dict[str, float], k: int) -> list[str]:
    """The ``k`` layers of a :func:`layer_sensitivity` scan with the lowest accuracy (the most sensitive first)."""
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    return sorted(sensitivity, key=sensitivity.get)[:k]


@dataclass(frozen=True)
class FloatChoice:
    """Which layers stay in float: the candidates, those kept, and the paired comparison that decided."""

    candidates: tuple[str, ...]  # the most sensitive layers of the scan (on validation images)
    kept: tuple[str, ...]  # the candidates if they win beyond noise, else none (all INT8: the simpler model)
    comparison: stats.Score  # the mixed model against all-INT8, paired, on validation images

    def sentence(self) -> str:
        """The choice and why, for a generated sentence."""
        diff = self.comparison.difference()
        if self.kept:
            return f"keep {len(self.kept)} layer(s) in float: mixed against all-INT8 on validation images {diff}"
        return (f"keep none in float: mixed against all-INT8 on validation images {diff}, so the simpler all-INT8 "
                "model stays")


def choose_keep_float(all_int8: Any, mixed: Any, candidates: list[str], x_val: torch.Tensor, y_val: torch.Tensor, *,
                      resamples: int = 2000) -> FloatChoice:
    """Keep ``candidates`` in float only if the ``mixed`` model beats ``all_int8`` beyond noise on validation images.

    Both models are scored on the same validation images and compared image by image
    (:func:`deploylab.stats.score`, paired bootstrap); a gain whose 95% interval includes 0 could be a
    handful of images, so the simpler model (no float layers, one kind of kernel) is kept. Test images
    are refused: the test set scores the final choice once.
    """
    data.refuse_test_images(x_val, "choose_keep_float")
    comparison = stats.score(predict_fixed(mixed, x_val), y_val, predict_fixed(all_int8, x_val), resamples=resamples)
    kept = tuple(candidates) if stats.better_beyond_noise(comparison) else ()
    return FloatChoice(tuple(candidates), kept, comparison)


def evenly_spaced(items: list[str], k: int | None) -> list[str]:
    """``k`` items spread over ``items`` (first and last included), or all of them if ``k`` is None."""
    if k is None or k >= len(items):
        return list(items)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k == 1:
        return [items[0]]
    step = (len(items) - 1) / (k - 1)
    return [items[round(i * step)] for i in range(k)]


# Moved by concern (this module stays under 500 lines); ``quantize.qat_finetune`` and friends keep working.
_MOVED = {"qat_finetune": "qat", "loss_trend": "qat", "drop_unused_attributes": "quantize_save",
          "program_bytes": "quantize_save", "save_program": "quantize_save", "load_program": "quantize_save"}


def __getattr__(name: str):
    """The functions moved to :mod:`deploylab.qat` and :mod:`deploylab.quantize_save`, imported on first use."""
    if name in _MOVED:
        import importlib

        return getattr(importlib.import_module(f"{__package__}.{_MOVED[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
