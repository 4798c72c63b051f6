"""The teacher (ResNet50) and student (MobileNetV2 at width 0.5), and their checkpoints.

Both are torchvision architectures with 10 outputs and their *default stems* (ResNet50: 7x7
stride-2 convolution and max-pool; MobileNetV2: 3x3 stride-2 convolution), chosen because they
train on 2 CPU cores in hours: the small-image stems (stride 1, no max-pool) cost ResNet50 about
16x the compute at 32x32 (measured: 6.2 against 90 images/s trained on 2 AVX2 cores; the README's
"Shipped models" section has the table). Fashion-MNIST is grayscale, so the first convolution
takes one channel instead of three.

A checkpoint is a ``state_dict`` (``<name>.pt``) plus a metadata file (``<name>.json``) with the
profile, data hash, recipe, accuracy, library versions, training time and the sha256 of the
``.pt``. :func:`load_checkpoint` refuses a file whose hash, profile, data or architecture does not
match -- a wrong checkpoint is never used silently.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from . import artefacts, data


class CheckpointError(RuntimeError):
    """A checkpoint is missing its metadata, or does not match what was asked for."""


def resnet50(num_classes: int = data.NUM_CLASSES) -> nn.Module:
    """ResNet50 for 1x32x32 inputs with torchvision's default stem (7x7 stride 2, max-pool)."""
    model = torchvision.models.resnet50(weights=None, num_classes=num_classes, zero_init_residual=True)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def mobilenet_v2(num_classes: int = data.NUM_CLASSES, width_mult: float = 1.0) -> nn.Module:
    """MobileNetV2 for 1x32x32 inputs with torchvision's default stem (3x3 stride 2).

    ``width_mult`` scales every layer's channels as in the paper (0.5: half the channels, about a
    quarter of the compute); torchvision keeps the last 1x1 convolution at 1280 channels.
    """
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes, width_mult=width_mult)
    stem = model.features[0][0]
    model.features[0][0] = nn.Conv2d(1, stem.out_channels, kernel_size=3, stride=2, padding=1, bias=False)
    return model


def mobilenet_v2_x0_5(num_classes: int = data.NUM_CLASSES) -> nn.Module:
    """The course's student: MobileNetV2 at width 0.5 (torchvision's ``_x0_5`` naming).

    Width 0.5 rather than 1.0 because the full-width student trained with the CPU recipe came
    within 0.4 point of the ResNet50 teacher, too close for the distillation lesson to show a
    teacher ahead of its student; at half width it also trains in half the time on 2 cores.
    """
    return mobilenet_v2(num_classes, width_mult=0.5)


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
    "mobilenet_v2_x0_5": mobilenet_v2_x0_5,
}
# The course's two roles and the architecture each plays them with.
ROLES = {"teacher": "resnet50", "student": "mobilenet_v2_x0_5"}


def build(arch: str) -> nn.Module:
    """A freshly initialised model of architecture ``arch`` (see :data:`ARCHITECTURES`)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]()


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (weights and biases), trainable or not."""
    return sum(p.numel() for p in model.parameters())


def checkpoint_paths(folder: Path, name: str) -> tuple[Path, Path]:
    return folder / f"{name}.pt", folder / f"{name}.json"


def save_checkpoint(model: nn.Module, folder: Path, name: str, meta: dict[str, Any], *,
                    storage: torch.dtype = torch.float32) -> dict[str, Any]:
    """Save ``model``'s weights and metadata atomically; returns the full metadata written.

    The weights are written first and the metadata last, so a metadata file only ever describes a
    complete weights file. ``storage=torch.float16`` halves the file (the shipped teacher must fit
    in git); :func:`load_checkpoint` loads it back into the fp32 model.
    """
    pt, js = checkpoint_paths(folder, name)
    state = {k: (v.detach().cpu().to(storage) if v.is_floating_point() else v.detach().cpu())
             for k, v in model.state_dict().items()}
    return artefacts.save(pt, lambda tmp: torch.save(state, tmp),
                          {"name": name, **meta, "storage": str(storage).removeprefix("torch.")}, js)


def read_metadata(folder: Path, name: str) -> dict[str, Any] | None:
    """The metadata of checkpoint ``name`` in ``folder``, or None if there is no complete checkpoint."""
    pt, js = checkpoint_paths(folder, name)
    if not js.is_file():
        return None
    try:
        return json.loads(js.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{js} is not valid JSON ({e}); delete it and rebuild with `deploylab prepare --force`") from e


def load_checkpoint(folder: Path, name: str, *, arch: str, profile: str) -> tuple[nn.Module, dict[str, Any]]:
    """Load checkpoint ``name``, after checking its sha256, profile, data hash and architecture."""
    pt, js = checkpoint_paths(folder, name)
    meta = read_metadata(folder, name)
    fix = f"delete {pt} and {js} and rebuild it (`deploylab prepare --profile {profile} --force`), or restore both from a trusted bundle"
    if meta is None:
        raise CheckpointError(f"no metadata file {js}; {fix}")
    if not pt.is_file():
        raise CheckpointError(f"{js} exists but its weights {pt} are missing; {fix}")
    problems = artefacts.problems(pt, meta, profile=profile)
    if meta.get("arch") != arch:
        problems.append(f"it holds a {meta.get('arch')!r}, not a {arch!r}")
    if problems:
        raise CheckpointError(f"refusing checkpoint {pt}: " + "; ".join(problems) + f". To fix: {fix}")
    model = build(arch)
    # load_state_dict copies each tensor into the fp32 model, converting fp16 storage back to fp32
    model.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
    return model.eval(), meta
