"""Train-or-load cache of the course's models: every notebook gets them from here.

``teacher()`` and ``student()`` return the checkpoint of the active profile if it exists (after
verifying it, see :func:`deploylab.models.load_checkpoint`), and otherwise train it -- with a
progress bar -- and save it. ``prepare()`` builds everything a workshop needs ahead of time.

Models and results that a *lesson* trains (the distilled students, a hyper-parameter sweep) go
through :func:`lesson_model` and :func:`lesson_result`: the notebook's own training code runs
once, the outcome is saved with the settings it was made with, and later runs with the same
settings load it (saying so, with the recorded training time) instead of spending half an hour of
a workshop on training. Other settings, or ``retrain=True``, train again.

A checkpoint that exists but fails verification is never retrained over: the error says how to
rebuild it deliberately (``force=True`` / ``deploylab prepare --force``).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import config, data, models
from .config import Profile
from .files import atomic_path, atomic_write_json
from .train import Recipe, evaluate, fit, timed

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Asset:
    """A model together with its verified metadata."""

    model: nn.Module
    meta: dict[str, Any]


def recipe_for(role: str, profile: Profile) -> Recipe:
    """The training recipe of ``role`` ('teacher' or 'student') in ``profile``."""
    epochs = {"teacher": profile.teacher_epochs, "student": profile.student_epochs}[role]
    return Recipe(epochs=epochs, batch_size=profile.batch_size, augment=profile.augment)


def recipe_problems(role: str, profile: Profile, meta: dict[str, Any]) -> list[str]:
    """How a checkpoint's recorded training differs from what ``profile`` trains now (empty: it matches).

    A checkpoint made before a recipe change loads fine and looks valid, but every lesson built on it
    would teach from a model the kit no longer makes -- so the mismatch is refused, not ignored.
    """
    problems = []
    want = recipe_for(role, profile).to_dict()
    have = meta.get("recipe") or {}
    for key in sorted(want):
        if have.get(key) != want[key]:
            problems.append(f"recipe {key}: {have.get(key)!r}, now {want[key]!r}")
    n_train = data.split_size("train", profile.train_images)
    if meta.get("train_images") != n_train:
        problems.append(f"train_images: {meta.get('train_images')!r}, now {n_train}")
    return problems


def _train(role: str, profile: Profile) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``role`` from scratch at the sizes of ``profile``; returns the model and its metadata."""
    config.seed_everything(0)
    arch = models.ROLES[role]
    recipe = recipe_for(role, profile)
    x, y = data.tensors("train", profile.train_images)
    model = models.build(arch)
    device = config.device()
    history, seconds = timed(fit, model, x, y, recipe, device=device, desc=f"train {role} ({arch}, {profile.name})")
    x_test, y_test = data.tensors("test", profile.test_images)
    acc = evaluate(model, x_test, y_test)
    meta = {
        "role": role,
        "arch": arch,
        "profile": profile.name,
        "recipe": recipe.to_dict(),
        "train_images": len(x),
        "training_seconds": round(seconds, 1),
        "training_device": str(device) if device.type == "cpu" else f"cuda ({torch.cuda.get_device_name(0)})",
        "final_loss": round(history["loss"][-1], 4),
        "test_accuracy": acc,
        "test_images": len(x_test),
        "parameters": models.count_parameters(model),
    }
    return model, meta


def load_or_build(role: str, profile: Profile | str | None = None, *, build: bool = True, force: bool = False) -> Asset:
    """The verified checkpoint of ``role`` for ``profile``; trained and saved first if missing.

    ``build=False`` raises instead of training (for code that must not spend minutes training);
    ``force=True`` retrains and replaces an existing checkpoint.
    """
    if role not in models.ROLES:
        raise ValueError(f"unknown role {role!r}: choose one of {', '.join(models.ROLES)}")
    profile = profile if isinstance(profile, Profile) else config.get_profile(profile)
    folder = config.artefacts_dir(profile)
    exists = models.read_metadata(folder, role) is not None
    if exists and not force:
        model, meta = models.load_checkpoint(folder, role, arch=models.ROLES[role], profile=profile.name)
        stale = recipe_problems(role, profile, meta)
        if stale:
            raise models.CheckpointError(
                f"refusing {folder / meta['file']}: it was trained with another recipe than the kit's current "
                f"{profile.name!r} one ({'; '.join(stale)}). Rebuild it: `deploylab prepare --profile {profile.name} --force`"
            )
        return Asset(model, meta)
    if not build:
        raise models.CheckpointError(
            f"no {role} checkpoint for profile {profile.name!r} in {folder}; run `deploylab prepare --profile {profile.name}`"
        )
    model, meta = _train(role, profile)
    meta = models.save_checkpoint(model, folder, role, meta)
    return Asset(model, meta)


def teacher(profile: Profile | str | None = None, **kwargs) -> Asset:
    """The ResNet50 teacher of the active profile (trained on first use)."""
    return load_or_build("teacher", profile, **kwargs)


def student(profile: Profile | str | None = None, **kwargs) -> Asset:
    """The MobileNetV2 student of the active profile (trained on first use)."""
    return load_or_build("student", profile, **kwargs)


def sample_images_dir() -> Path:
    """Where the real test images for serving demos are written."""
    return config.DATA_DIR / "samples"


def prepare(profile: Profile | str | None = None, *, force: bool = False) -> dict[str, dict[str, Any]]:
    """Build everything a workshop needs: the dataset cache, sample images, teacher and student."""
    profile = profile if isinstance(profile, Profile) else config.get_profile(profile)
    ds = data.load_fashion_mnist()
    log.info("Fashion-MNIST from %s, sha256 %s", ds.source, data.DATA_SHA256[:12])
    data.write_sample_images(sample_images_dir(), per_class=2)
    metas = {role: load_or_build(role, profile, force=force).meta for role in models.ROLES}
    # The fp32 predictions the lessons compare against (and distil from): minutes on a CPU, so
    # computed here, once, rather than live in a workshop.
    for role, split in (("teacher", "test"), ("student", "test"), ("teacher", "train")):
        logits(role, split, profile)
    return metas


def logits(role: str, split: str = "test", profile: Profile | str | None = None, *, limit: int | None = -1) -> torch.Tensor:
    """fp32 logits of ``role``'s checkpoint on ``split``, cached next to the checkpoint.

    ResNet50 at 32x32 takes minutes for 10,000 images on 2 CPU cores, and later lessons need the
    fp32 teacher's predictions as a baseline (or as soft targets); this computes them once per
    checkpoint. ``limit=-1`` means the profile's size for the split (test: ``test_images``,
    train: ``train_images``); the cache key includes the checkpoint's sha256, so a new checkpoint
    never reuses old logits.
    """
    from .train import predict

    profile = profile if isinstance(profile, Profile) else config.get_profile(profile)
    if limit == -1:
        limit = {"test": profile.test_images, "train": profile.train_images, "val": None}[split]
    asset = load_or_build(role, profile, build=False)
    key = f"{role}.{split}.{limit or 'all'}.{asset.meta['sha256'][:16]}.logits.pt"
    path = config.artefacts_dir(profile) / "cache" / key
    if path.is_file():
        return torch.load(path, weights_only=True)
    x, _ = data.tensors(split, limit)
    out = predict(asset.model, x, device=config.device())  # the GPU where there is one: 55,000 images on a CPU take long
    with atomic_path(path) as tmp:
        torch.save(out, tmp)
    return out


def _canonical(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` as JSON would give them back (tuples become lists), so that saved and new compare equal."""
    return json.loads(json.dumps(settings, sort_keys=True))


def lesson_model(name: str, arch: str, settings: dict[str, Any], train_model: Callable[[nn.Module], dict[str, Any]],
                 profile: Profile | str | None = None, *, seed: int = 0, retrain: bool = False) -> tuple[Asset, bool]:
    """A model a lesson trains, saved as checkpoint ``name``; returns ``(asset, loaded_from_disk)``.

    If a verified checkpoint ``name`` exists that was made with exactly ``settings`` (everything
    that decides the result: recipe, hyper-parameters, the teacher's sha256, data sizes), it is
    loaded. Otherwise ``arch`` is built after seeding with ``seed``, ``train_model(model)`` trains
    it and returns metadata to record (history, seconds, accuracy...), and the checkpoint is
    written atomically with ``settings``. ``retrain=True`` always trains.
    """
    profile = profile if isinstance(profile, Profile) else config.get_profile(profile)
    folder = config.artefacts_dir(profile)
    settings = _canonical(settings)
    meta = models.read_metadata(folder, name)
    if meta is not None and not retrain and meta.get("settings") == settings:
        model, meta = models.load_checkpoint(folder, name, arch=arch, profile=profile.name)
        return Asset(model, meta), True
    config.seed_everything(seed)
    model = models.build(arch)
    recorded = train_model(model)
    meta = models.save_checkpoint(model, folder, name, {"role": name, "arch": arch, "profile": profile.name,
                                                        "settings": settings, "seed": seed, **recorded})
    return Asset(model, meta), False


def lesson_result(name: str, settings: dict[str, Any], compute: Callable[[], dict[str, Any]],
                  profile: Profile | str | None = None, *, retrain: bool = False) -> tuple[dict[str, Any], bool]:
    """A JSON-able result a lesson computes (a sweep), cached like :func:`lesson_model`; returns ``(result, loaded)``."""
    path = config.artefacts_dir(profile) / "cache" / f"{name}.json"
    settings = _canonical(settings)
    if path.is_file() and not retrain:
        try:
            saved = json.loads(path.read_text())
        except json.JSONDecodeError:
            saved = {}  # a damaged cache entry is recomputed (and replaced atomically), never trusted
        if saved.get("settings") == settings and saved.get("data_sha256") == data.DATA_SHA256:
            return saved["result"], True
    result = _canonical(compute())
    atomic_write_json(path, {"settings": settings, "data_sha256": data.DATA_SHA256, "result": result})
    return result, False
