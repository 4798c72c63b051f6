"""The teacher (ResNet50) and student (MobileNetV2), and their checkpoints.

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

import datetime as dt
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from . import data
from .files import atomic_path, atomic_write_json, sha256_file


class CheckpointError(RuntimeError):
    """A checkpoint is missing its metadata, or does not match what was asked for."""


def resnet50(num_classes: int = data.NUM_CLASSES) -> nn.Module:
    """ResNet50 for 1x32x32 inputs with torchvision's default stem (7x7 stride 2, max-pool)."""
    model = torchvision.models.resnet50(weights=None, num_classes=num_classes, zero_init_residual=True)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


def mobilenet_v2(num_classes: int = data.NUM_CLASSES) -> nn.Module:
    """MobileNetV2 for 1x32x32 inputs with torchvision's default stem (3x3 stride 2)."""
    model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
    model.features[0][0] = nn.Conv2d(1, 32, kernel_size=3, stride=2, padding=1, bias=False)
    return model


ARCHITECTURES: dict[str, Callable[[], nn.Module]] = {
    "resnet50": resnet50,
    "mobilenet_v2": mobilenet_v2,
}
# The course's two roles and the architecture each plays them with.
ROLES = {"teacher": "resnet50", "student": "mobilenet_v2"}


def build(arch: str) -> nn.Module:
    """A freshly initialised model of architecture ``arch`` (see :data:`ARCHITECTURES`)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}: choose one of {', '.join(ARCHITECTURES)}")
    return ARCHITECTURES[arch]()


def count_parameters(model: nn.Module) -> int:
    """Number of parameters (weights and biases), trainable or not."""
    return sum(p.numel() for p in model.parameters())


def library_versions() -> dict[str, str]:
    """Versions of the libraries a result depends on (missing ones are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("deploylab", "torch", "torchvision", "numpy", "onnx", "onnxruntime", "torchao", "torch-pruning"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            pass
    return out


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
    with atomic_path(pt) as tmp:
        torch.save(state, tmp)
        digest = sha256_file(tmp)
    full = {
        "name": name,
        **meta,
        "data_sha256": data.DATA_SHA256,
        "versions": library_versions(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "file": pt.name,
        "storage": str(storage).removeprefix("torch."),
        "size_bytes": pt.stat().st_size,
        "sha256": digest,
    }
    atomic_write_json(js, full)
    return full


def read_metadata(folder: Path, name: str) -> dict[str, Any] | None:
    """The metadata of checkpoint ``name`` in ``folder``, or None if there is no complete checkpoint."""
    pt, js = checkpoint_paths(folder, name)
    if not js.is_file():
        return None
    try:
        return json.loads(js.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{js} is not valid JSON ({e}); delete it and rebuild with `deploylab prepare --force`") from e


def artefact_problems(path: Path, meta: dict[str, Any], *, profile: str) -> list[str]:
    """What disqualifies artefact ``path`` against its metadata: another profile, other data, a sha256
    that differs (corrupt or replaced file). Empty when it may be used."""
    problems = []
    if meta.get("profile") != profile:
        problems.append(f"it was built for profile {meta.get('profile')!r}, not {profile!r}")
    if meta.get("data_sha256") != data.DATA_SHA256:
        problems.append("it was made from different data (data hash differs)")
    actual = sha256_file(path)
    if meta.get("sha256") != actual:
        problems.append(f"its sha256 is {actual[:12]}..., the metadata says {str(meta.get('sha256'))[:12]}... (corrupt or replaced)")
    return problems


def load_checkpoint(folder: Path, name: str, *, arch: str, profile: str) -> tuple[nn.Module, dict[str, Any]]:
    """Load checkpoint ``name``, after checking its sha256, profile, data hash and architecture."""
    pt, js = checkpoint_paths(folder, name)
    meta = read_metadata(folder, name)
    fix = f"delete {pt} and {js} and rebuild it (`deploylab prepare --profile {profile} --force`), or restore both from a trusted bundle"
    if meta is None:
        raise CheckpointError(f"no metadata file {js}; {fix}")
    if not pt.is_file():
        raise CheckpointError(f"{js} exists but its weights {pt} are missing; {fix}")
    problems = artefact_problems(pt, meta, profile=profile)
    if meta.get("arch") != arch:
        problems.append(f"it holds a {meta.get('arch')!r}, not a {arch!r}")
    if problems:
        raise CheckpointError(f"refusing checkpoint {pt}: " + "; ".join(problems) + f". To fix: {fix}")
    model = build(arch)
    # load_state_dict copies each tensor into the fp32 model, converting fp16 storage back to fp32
    model.load_state_dict(torch.load(pt, map_location="cpu", weights_only=True))
    return model.eval(), meta
