"""INT8 quantization on the CPU: the plumbing behind lesson 01 (the techniques are shown in the notebook).

Current paths (docs/ARCHITECTURE.md, "Current library paths"):

- dynamic quantization of ``Linear`` layers: torchao's ``quantize_(model, Int8DynamicActivationInt8WeightConfig())``
  (the old ``torch.ao.quantization.quantize_dynamic`` still runs but is deprecated);
- static quantization with calibration: PT2E -- ``torch.export.export``, ``prepare_pt2e`` with
  ``X86InductorQuantizer``, calibration on real images, ``convert_pt2e``, then ``torch.compile``, which
  lowers the quantize/dequantize pattern to oneDNN INT8 kernels (VNNI/AMX where the CPU has them);
- quantization-aware training: ``prepare_qat_pt2e`` and a short fine-tune with fake quantization.

This module holds what the lesson needs around those calls: the per-profile sizes, input checks with
clear errors, calibration, evaluation at fixed batch shapes (so that a compiled model compiles once),
per-layer sensitivity, and saving/loading the quantized program with a verified sha256.
"""

from __future__ import annotations

import copy
import io
import json
import types
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import artefacts
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
    teacher_eval_images: int | None  # test images for the INT8 teacher (ResNet50 is slow on 2 cores)
    qat_steps: int  # optimisation steps of the quantization-aware fine-tune
    qat_batch_size: int
    qat_lr: float
    sensitivity_images: int  # test images per layer in the sensitivity scan
    sensitivity_layers: int | None  # layers scanned (evenly spaced; None: every conv/linear)
    keep_float: int  # most sensitive layers left in float in the mixed-precision variant

    def to_dict(self) -> dict:
        return asdict(self)


SIZES: dict[str, QuantSizes] = {
    "smoke": QuantSizes("smoke", calibration_sweep=(8, 32), teacher_eval_images=128,
                        qat_steps=4, qat_batch_size=32, qat_lr=1e-4, sensitivity_images=128,
                        sensitivity_layers=6, keep_float=2),
    "workshop": QuantSizes("workshop", calibration_sweep=(16, 64, 256),
                           teacher_eval_images=2000, qat_steps=100, qat_batch_size=64, qat_lr=1e-4,
                           sensitivity_images=500, sensitivity_layers=20, keep_float=3),
    "full": QuantSizes("full", calibration_sweep=(32, 128, 512, 1024),
                       teacher_eval_images=None, qat_steps=400, qat_batch_size=128, qat_lr=1e-4,
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


def compile_int8(model: nn.Module) -> nn.Module:
    """``torch.compile`` (static shapes) with inductor's freezing on: constant weights get folded and pre-packed.

    Freezing is what lets inductor turn dequantize -> conv -> quantize into one oneDNN INT8
    convolution with packed weights (the torchao X86InductorQuantizer tutorial sets it too). We use it
    for the fp32 baseline as well, so both sides of a comparison are compiled the same way.
    """
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True
    # dynamic=False: one static graph per batch size (1 and 32 here). With automatic dynamic shapes the
    # batch-1 graph of an INT8 model failed a stride check at run time (torch 2.14.1, torchao 0.18).
    return torch.compile(model, dynamic=False)


def allow_eval(model: nn.Module, *, exported_in_eval_mode: bool = False) -> nn.Module:
    """Let ``.eval()`` / ``.train()`` work on a converted (exported) model, and leave it in eval mode.

    bench and train call ``.eval()``. torchao's first ``.eval()`` of an exported model rewrites the
    train-mode dropout and batch-norm patterns of its graph, matching them with a strict
    ``torch.export`` -- which calls ``torch._dynamo.reset()``: every model compiled earlier in the
    process silently recompiles on its next call. So:

    - a QAT model (exported in train mode) is switched to eval *here*, right after ``convert_pt2e``
      and before anything is compiled;
    - a PTQ model exported from ``model.eval()`` (``exported_in_eval_mode=True``) already holds the
      eval form of those layers; it is only marked as in eval, so its ``.eval()`` is a no-op.
    """
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    allow_exported_model_train_eval(model)
    try:
        from torchao.quantization.pt2e.export_utils import _EXPORTED_TRAINING_ATTR
    except ImportError:  # another torchao: fall back to the rewrite (correct, just resets dynamo once)
        _EXPORTED_TRAINING_ATTR = None
    if exported_in_eval_mode and _EXPORTED_TRAINING_ATTR is not None:
        setattr(model, _EXPORTED_TRAINING_ATTR, False)
    else:
        model.eval()
    return model


def qat_finetune(prepared: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, batch_size: int,
                 lr: float, seed: int = 0) -> list[float]:
    """Short fine-tune of a ``prepare_qat_pt2e`` model (fake quantization in the graph); returns the losses.

    Plain SGD with momentum at a small learning rate: the weights are already trained, QAT only lets
    them adapt to the rounding. (Long QAT runs also freeze BatchNorm statistics part-way; a few
    hundred steps at this learning rate do not need it.)
    """
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    if steps < 1:
        raise ValueError(f"QAT needs at least one step, got {steps}")
    if len(x) < batch_size:
        raise ValueError(f"QAT needs at least one full batch: {len(x)} images for batch size {batch_size}")
    gen = torch.Generator().manual_seed(seed)
    params = [p for p in prepared.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=lr, momentum=0.9)
    losses: list[float] = []
    move_exported_model_to_train(prepared)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (batch_size,), generator=gen)
        loss = F.cross_entropy(prepared(x[idx]), y[idx], label_smoothing=0.1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    move_exported_model_to_eval(prepared)
    return losses


def quantizable_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d and Linear layers, in model order (the layers INT8 kernels replace)."""
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


def _fake_quant_weight(w: torch.Tensor) -> torch.Tensor:
    """Symmetric per-output-channel INT8 round trip of a weight (what the x86 quantizer does)."""
    amax = w.detach().abs().flatten(1).amax(1).clamp(min=1e-12)
    scale = amax / 127.0
    zp = torch.zeros_like(scale, dtype=torch.int32)
    return torch.fake_quantize_per_channel_affine(w, scale, zp, 0, -128, 127)


@torch.inference_mode()
def layer_sensitivity(model: nn.Module, x: torch.Tensor, y: torch.Tensor, calibration: torch.Tensor,
                      layers: list[str] | None = None) -> dict[str, float]:
    """Accuracy of ``model`` when only ONE layer at a time runs in simulated INT8, for each of ``layers``.

    "Simulated INT8" is a round trip through INT8 of the layer's weight (per channel, symmetric) and of
    its input (per tensor, asymmetric uint8, range from ``calibration`` images) -- the scheme of the
    x86 quantizer -- while everything else stays fp32. Cheap (fp32 eager inference), and it ranks which
    layers lose the most when quantized.
    """
    layers = layers or quantizable_layers(model)
    if len(calibration) == 0:
        raise ValueError("layer_sensitivity needs calibration images to find activation ranges")
    model = copy.deepcopy(model).eval()
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
    out = {}
    for n in layers:
        m = mods[n]
        lo, hi = ranges[n]
        scale = max(hi - lo, 1e-8) / 255.0
        zp = int(round(-lo / scale))
        original = m.weight.data.clone()
        m.weight.data = _fake_quant_weight(original)
        h = m.register_forward_pre_hook(
            lambda mod, args, scale=scale, zp=zp: (torch.fake_quantize_per_tensor_affine(args[0], scale, zp, 0, 255),))
        out[n] = accuracy(predict(model, x), y)
        h.remove()
        m.weight.data = original
    return out


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


def drop_unused_attributes(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Remove parameters and buffers the graph no longer reads (in place; returns ``gm``).

    ``convert_pt2e`` folds each weight into a new INT8 constant but leaves the original fp32
    parameter registered on the module; ``torch.export`` would save it too, and the "INT8" file would
    be larger than the fp32 checkpoint (measured: 14.3 MB against 9.2 MB for the student).
    """
    used = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    for name in [k for k, _ in list(gm.named_parameters()) + list(gm.named_buffers())]:
        if name not in used:
            owner, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner) if owner else gm, attr)
    gm.delete_all_unused_submodules()
    return gm


def program_bytes(model: nn.Module, example: torch.Tensor) -> bytes:
    """A converted (or any exportable) model as the bytes of ``torch.export.save`` -- the file you would ship.

    Attributes the graph does not use (the fp32 originals of folded INT8 weights) are left out. The
    program stores its example input, so it gets two images *copied*: a slice of a larger tensor would
    be saved with that tensor's whole storage (the full test set: 41 MB in the workshop profile).
    """
    if isinstance(model, torch.fx.GraphModule):
        model = drop_unused_attributes(copy.deepcopy(model))
    if len(example) < 2:
        raise ValueError("program_bytes needs an example batch of at least 2 images (batch 1 would be specialised)")
    ep = torch.export.export(model, (example[:2].clone(),), dynamic_shapes=batch_dim())
    buf = io.BytesIO()
    torch.export.save(ep, buf)
    return buf.getvalue()


def save_program(model: nn.Module, example: torch.Tensor, folder: Path, name: str, meta: dict[str, Any]) -> dict[str, Any]:
    """Export ``model`` and save it as ``<name>.pt2`` plus ``<name>.json`` (sha256, profile, data hash, versions).

    Written to temporary files and renamed; the metadata comes last, so it only ever describes a
    complete program. Refuses the names of the course's fp32 checkpoints.
    """
    if name in ("teacher", "student"):
        raise ValueError(f"{name!r} is the fp32 checkpoint's name; pick another (e.g. {name}_int8)")
    folder = Path(folder)
    pt2, js = folder / f"{name}.pt2", folder / f"{name}.json"
    blob = program_bytes(model, example)
    return artefacts.save(pt2, lambda tmp: tmp.write_bytes(blob), {"name": name, **meta}, js)


def load_program(folder: Path, name: str, *, profile: str) -> tuple[nn.Module, dict[str, Any]]:
    """Load ``<name>.pt2`` saved by :func:`save_program` after checking its sha256, profile and data hash."""
    folder = Path(folder)
    pt2, js = folder / f"{name}.pt2", folder / f"{name}.json"
    fix = "delete both files and re-run the quantization notebook (01_quantization) in this profile"
    if not js.is_file() or not pt2.is_file():
        raise QuantizationError(f"no complete quantized program {pt2} + {js}; {fix}")
    meta = json.loads(js.read_text())
    problems = artefacts.problems(pt2, meta, profile=profile)
    if problems:
        raise QuantizationError(f"refusing {pt2}: " + "; ".join(problems) + f". To fix: {fix}")
    return torch.export.load(pt2).module(), meta
