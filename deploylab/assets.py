"""Train-or-load cache of the course's models: every notebook gets them from here.

``teacher()`` and ``student()`` return the checkpoint of the active profile (after verifying it,
see :func:`deploylab.models.load_checkpoint`). In ``workshop`` and ``full`` these are the *shipped*
models under ``models/``: trained once on 2 CPU cores with :data:`SHIPPED_RECIPES`, committed with
their metadata and a manifest of sha256s, never trained by a lesson. ``smoke`` trains its own tiny
models on first use, so that the training code stays tested. ``prepare()`` builds whatever is
missing, epoch by epoch with a resume checkpoint under ``~/.cache/deploylab/resume`` (an
interrupted run continues where it stopped), behind one progress bar with the ETA of the whole
preparation.

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
import math
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from . import config, data, models
from .config import Profile
from .files import atomic_path, atomic_write_bytes, atomic_write_json, sha256_file
from .hardware import hardware_report
from .train import Recipe, evaluate, fit, predict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Asset:
    """A model together with its verified metadata."""

    model: nn.Module
    meta: dict[str, Any]


# The CPU-first recipe of the shipped models (README, "Shipped models", has the measurements that
# chose it): default stems at 32x32, all 55,000 training images, random crop + flip, batch 128,
# channels_last, SGD with Nesterov momentum and a one-cycle schedule. ResNet50 trains at ~70
# images/s on 2 AVX2 cores in this loop (90 in a bare step benchmark), so 10 epochs take ~2.2 hours.
SHIPPED_RECIPES: dict[str, Recipe] = {
    "teacher": Recipe(epochs=10, batch_size=128, lr=0.1, augment=True),
    "student": Recipe(epochs=15, batch_size=128, lr=0.05, augment=True),
}
# The shipped models are stored in fp16 (the fp32 teacher alone is 94 MB) when that changes their
# test accuracy by less than this; otherwise in fp32.
FP16_TOLERANCE = 0.001
MANIFEST = "MANIFEST.sha256"


def recipe_for(role: str, profile: Profile) -> Recipe:
    """The training recipe of ``role`` ('teacher' or 'student') in ``profile``."""
    if role not in models.ROLES:
        raise ValueError(f"unknown role {role!r}: choose one of {', '.join(models.ROLES)}")
    if profile.models == "shipped":
        return SHIPPED_RECIPES[role]
    epochs = {"teacher": profile.teacher_epochs, "student": profile.student_epochs}[role]
    return Recipe(epochs=epochs, batch_size=profile.batch_size, augment=profile.augment)


def training_images(profile: Profile) -> int | None:
    """How many training images the profile's teacher and student train on (None: all 55,000)."""
    return None if profile.models == "shipped" else profile.train_images


def rebuild_command(profile: Profile, role: str | None = None) -> str:
    """The command that trains ``role`` (or every model) of ``profile`` again from scratch."""
    only = f" --only {role}" if role else ""
    return f"deploylab prepare --profile {profile.name}{only} --force"


def resume_path(role: str, profile: Profile) -> Path:
    """Where an interrupted training run of ``role`` keeps its state (outside the work tree)."""
    return config.RESUME_DIR / profile.models / f"{role}.pt"


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
    n_train = data.split_size("train", training_images(profile))
    if meta.get("train_images") != n_train:
        problems.append(f"train_images: {meta.get('train_images')!r}, now {n_train}")
    return problems


def _train(role: str, profile: Profile, bar: tqdm | None = None) -> tuple[nn.Module, dict[str, Any]]:
    """Train ``role`` at the sizes of ``profile`` (resuming an interrupted run); returns model and metadata."""
    config.seed_everything(0)
    arch = models.ROLES[role]
    recipe = recipe_for(role, profile)
    x, y = data.tensors("train", training_images(profile))
    model = models.build(arch)
    device = config.device()
    history = fit(model, x, y, recipe, device=device, desc=role, bar=bar, resume=resume_path(role, profile),
                  resume_identity={"arch": arch, "data_sha256": data.DATA_SHA256, "models": profile.models},
                  validation=data.tensors("val", profile.test_images))
    x_test, y_test = data.tensors("test", profile.test_images)
    acc = evaluate(model, x_test, y_test)
    meta = {
        "role": role,
        "arch": arch,
        "profile": profile.models,
        "recipe": recipe.to_dict(),
        "train_images": len(x),
        "training_seconds": round(history["seconds"], 1),
        "training_device": str(device) if device.type == "cpu" else f"cuda ({torch.cuda.get_device_name(0)})",
        # bf16 autocast where it measured faster (train.choose_autocast), else fp32: the same recipe
        # rounds differently in each, so the record says which one trained it and what the probe measured
        "training_precision": history["precision"],
        "precision_probe": history["precision_probe"],
        "resumed_at_epochs": history["resumed_at_epochs"],
        "epoch_seconds": history["epoch_seconds"],
        "epoch_load_average": history["epoch_load_average"],
        "val_accuracy_per_epoch": history["val_accuracy"],
        "loss_per_epoch": [round(v, 4) for v in history["loss"]],
        "final_loss": round(history["loss"][-1], 4),
        "test_accuracy": acc,
        "test_images": len(x_test),
        "parameters": models.count_parameters(model),
        "hardware": hardware_report(),
        "rebuild": rebuild_command(profile, role),
    }
    return model, meta


def _save(model: nn.Module, role: str, profile: Profile, meta: dict[str, Any]) -> dict[str, Any]:
    """Save a trained model where ``profile`` keeps it; shipped ones in fp16 when accuracy allows."""
    folder = config.models_dir(profile)
    storage = torch.float32
    if profile.models == "shipped":
        half = models.build(meta["arch"])
        half.load_state_dict({k: v.half() if v.is_floating_point() else v for k, v in model.state_dict().items()})
        x_test, y_test = data.tensors("test", profile.test_images)
        meta["test_accuracy_fp32"] = meta["test_accuracy"]
        meta["test_accuracy_fp16_storage"] = evaluate(half.eval(), x_test, y_test)  # fp32 model, fp16-rounded weights
        if abs(meta["test_accuracy_fp16_storage"] - meta["test_accuracy"]) < FP16_TOLERANCE:
            storage, meta["test_accuracy"] = torch.float16, meta["test_accuracy_fp16_storage"]
    meta = models.save_checkpoint(model, folder, role, meta, storage=storage)
    if profile.models == "shipped":
        write_manifest(folder)
    return meta


def write_manifest(folder: Path) -> Path:
    """``MANIFEST.sha256`` of every checkpoint in ``folder`` (``sha256sum -c`` reads it)."""
    lines = [f"{sha256_file(pt)}  {pt.name}" for pt in sorted(folder.glob("*.pt"))]
    return atomic_write_bytes(folder / MANIFEST, ("\n".join(lines) + "\n").encode())


def manifest_problems(folder: Path, name: str) -> list[str]:
    """How checkpoint ``name`` disagrees with the folder's manifest (empty: listed with this sha256)."""
    path = folder / MANIFEST
    if not path.is_file():
        return [f"{path} is missing"]
    listed = {}  # file name -> sha256, from `sha256sum`'s "<digest>  <name>" lines
    for line in path.read_text().splitlines():
        if line.strip():
            digest, file_name = line.split(None, 1)
            listed[file_name] = digest
    want = listed.get(f"{name}.pt")
    if want is None:
        return [f"{name}.pt is not listed in {path}"]
    actual = sha256_file(folder / f"{name}.pt")
    return [] if actual == want else [f"its sha256 {actual[:12]}... differs from {path.name}'s {want[:12]}..."]


def load_or_build(role: str, profile: Profile | str | None = None, *, build: bool | None = None, force: bool = False,
                  bar: tqdm | None = None) -> Asset:
    """The verified checkpoint of ``role`` for ``profile``; trained and saved first if missing.

    ``build`` says whether a missing checkpoint may be trained here. By default ``smoke`` trains
    its tiny models (seconds) and the shipped profiles never do: their models take hours, so only
    ``deploylab prepare`` trains them (``build=True``); a lesson that finds one missing stops with
    the way to restore it. ``force=True`` retrains and replaces an existing checkpoint (only once
    the new one is saved).
    """
    if role not in models.ROLES:
        raise ValueError(f"unknown role {role!r}: choose one of {', '.join(models.ROLES)}")
    profile = config.get_profile(profile)
    folder = config.models_dir(profile)
    exists = models.read_metadata(folder, role) is not None
    if exists and not force:
        return _load(role, profile, folder)
    if build is None:
        build = profile.models != "shipped"
    if not build:
        hint = (f"the shipped models belong in {folder} (tracked in git: `git checkout -- {folder.name}` restores them); "
                f"to train it instead (hours on a CPU) run `deploylab prepare --profile {profile.name}`"
                if profile.models == "shipped" else f"run `deploylab prepare --profile {profile.name}`")
        raise models.CheckpointError(f"no {role} checkpoint for profile {profile.name!r} in {folder}; {hint}")
    model, meta = _train(role, profile, bar)
    meta = _save(model, role, profile, meta)
    resume_path(role, profile).unlink(missing_ok=True)  # only now: the trained model is safely saved
    return _load(role, profile, folder)


def _load(role: str, profile: Profile, folder: Path) -> Asset:
    """Load and verify ``role``: sha256 (metadata and, for shipped models, the manifest), data, recipe."""
    fix = rebuild_command(profile, role)
    if profile.models == "shipped":
        problems = manifest_problems(folder, role)
        if problems:
            raise models.CheckpointError(
                f"refusing shipped model {folder / (role + '.pt')}: {'; '.join(problems)}. Restore it with "
                f"`git checkout -- {shlex.quote(str(folder))}` (a Git LFS or partial clone may hold a text pointer "
                f"instead of the weights), or rebuild it: `{fix}`")
    model, meta = models.load_checkpoint(folder, role, arch=models.ROLES[role], profile=profile.models)
    stale = recipe_problems(role, profile, meta)
    if stale:
        raise models.CheckpointError(
            f"refusing {folder / meta['file']}: it was trained with another recipe than the kit's current "
            f"{profile.name!r} one ({'; '.join(stale)}). Rebuild it: `{fix}`"
        )
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


def prepare(profile: Profile | str | None = None, *, force: bool = False, only: tuple[str, ...] | None = None,
            logits_cache: bool = True) -> dict[str, dict[str, Any]]:
    """Build everything a workshop needs: the dataset cache, sample images, teacher and student.

    Models that are missing (or all of ``only`` with ``force``) train behind one progress bar whose
    ETA covers the whole preparation; an interrupted run continues from its resume checkpoints,
    ``force`` discards them and starts over. A model that exists is verified, not retrained.
    """
    profile = config.get_profile(profile)
    roles = tuple(only or models.ROLES)
    ds = data.load_fashion_mnist()
    log.info("Fashion-MNIST from %s, sha256 %s", ds.source, data.DATA_SHA256[:12])
    data.write_sample_images(sample_images_dir(), per_class=2)
    folder = config.models_dir(profile)
    # what trains: everything with --force; otherwise what is missing, and what an interrupted run left
    # a resume checkpoint for (e.g. a --force run stopped half way: it continues and then replaces the model)
    todo = [r for r in roles if force or models.read_metadata(folder, r) is None or resume_path(r, profile).is_file()]
    if force:
        for role in todo:
            resume_path(role, profile).unlink(missing_ok=True)
    n_train = data.split_size("train", training_images(profile))
    total = sum(recipe_for(r, profile).steps(n_train) for r in todo)
    done = sum(_resumed_steps(r, profile, n_train) for r in todo)
    metas = {}
    with tqdm(total=total, initial=done, desc=f"prepare {profile.name}", unit="step", disable=not todo) as bar:
        for role in roles:
            metas[role] = load_or_build(role, profile, build=True, force=role in todo, bar=bar).meta
    # The fp32 predictions the lessons compare against (and distil from): minutes on a CPU, so
    # computed here, once, rather than live in a workshop.
    if logits_cache:
        for role, split in (("teacher", "test"), ("student", "test"), ("teacher", "train")):
            if role in roles:
                logits(role, split, profile)
    return metas


def _resumed_steps(role: str, profile: Profile, n_train: int) -> int:
    """Steps already done by an interrupted run of ``role`` (0 if none, or if its file is unreadable)."""
    path = resume_path(role, profile)
    if not path.is_file():
        return 0
    try:
        # mmap: only the epoch number is read here, not the whole state (fit() loads it once, later)
        epoch = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["epoch"]
    except Exception:  # fit() reports and discards a corrupt file; here it only means "no progress"
        return 0
    return epoch * math.ceil(n_train / recipe_for(role, profile).batch_size)


VIEWS = ("original", "hflip")  # the views of an image whose logits can be cached


def logits(role: str, split: str = "test", profile: Profile | str | None = None, *, limit: int | None = -1,
           view: str = "original") -> torch.Tensor:
    """fp32 logits of ``role``'s checkpoint on ``split``, cached next to the checkpoint.

    ResNet50 at 32x32 takes minutes for 10,000 images on 2 CPU cores, and later lessons need the
    fp32 teacher's predictions as a baseline (or as soft targets); this computes them once per
    checkpoint. ``limit=-1`` means the profile's size for the split (test: ``test_images``,
    train: ``train_images``); the cache key includes the checkpoint's sha256, so a new checkpoint
    never reuses old logits. ``view="hflip"`` gives the logits of the horizontally flipped images
    (the distillation lesson trains its students on both views).
    """
    if view not in VIEWS:
        raise ValueError(f"view must be one of {', '.join(VIEWS)}, got {view!r}")
    profile = config.get_profile(profile)
    if limit == -1:
        limit = {"test": profile.test_images, "train": profile.train_images, "val": None}[split]
    asset = load_or_build(role, profile, build=False)
    suffix = "" if view == "original" else f".{view}"  # the original view keeps its earlier cache name
    key = f"{role}.{split}.{limit or 'all'}{suffix}.{asset.meta['sha256'][:16]}.logits.pt"
    path = config.artefacts_dir(profile) / "cache" / key
    if path.is_file():
        return torch.load(path, weights_only=True)
    x, _ = data.tensors(split, limit)
    if view == "hflip":
        x = x.flip(3)
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
    profile = config.get_profile(profile)
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
