"""Profiles, paths, device, threads and seeds: the settings every lesson shares.

One environment variable, ``DEPLOYLAB_PROFILE``, chooses the size of everything (see
``docs/ARCHITECTURE.md``). A profile changes sizes only -- numbers of images, epochs, benchmark
repetitions -- never code paths, so ``smoke`` runs exactly the cells that ``full`` runs.
"""

from __future__ import annotations

import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

PROFILE_ENV = "DEPLOYLAB_PROFILE"
DEFAULT_PROFILE = "workshop"


class ProfileError(ValueError):
    """An unknown profile name was asked for."""


@dataclass(frozen=True)
class Profile:
    """Sizes for one profile. ``None`` for a limit means "all of it"."""

    name: str
    train_images: int | None  # images of the training split used to train
    test_images: int | None  # images of the test set used to measure accuracy
    # The training sizes of the models that `models="smoke"` trains itself (the shipped models'
    # recipe is assets.SHIPPED_RECIPES); train_images and batch_size also size lesson-side training.
    teacher_epochs: int
    student_epochs: int
    batch_size: int  # training batch; small in smoke so that BatchNorm statistics settle in few images
    calibration_images: int  # for static quantization in later lessons
    bench_warmup: int  # untimed calls before measuring each variant
    bench_rounds: int  # interleaved rounds (A B C A B C ...)
    bench_repeats: int  # timed calls per variant and round
    augment: bool  # random crop + flip while training
    # Where the teacher and student come from: "shipped" (trained once with the CPU-first recipe,
    # committed under models/, loaded and never trained by a lesson) or "smoke" (tiny models the
    # profile trains itself, so that CI keeps the training code tested).
    models: str = "shipped"

    def to_dict(self) -> dict:
        return asdict(self)


PROFILES: dict[str, Profile] = {
    # CI and tests: every notebook end to end in under 2 minutes on 2 CPU cores.
    "smoke": Profile(
        name="smoke",
        train_images=1024,
        test_images=512,
        teacher_epochs=1,
        student_epochs=3,
        batch_size=32,
        calibration_images=32,
        bench_warmup=2,
        bench_rounds=2,
        bench_repeats=3,
        augment=False,
        models="smoke",
    ),
    # A laptop CPU in a live session; artefacts are prepared beforehand (`deploylab prepare`).
    "workshop": Profile(
        name="workshop",
        train_images=12_000,
        test_images=None,
        teacher_epochs=2,
        student_epochs=6,
        batch_size=128,
        calibration_images=256,
        bench_warmup=5,
        bench_rounds=5,
        bench_repeats=10,
        augment=False,
    ),
    # The headline results, on the same shipped models as workshop, on 2 CPU cores.
    "full": Profile(
        name="full",
        train_images=None,
        test_images=None,
        teacher_epochs=10,
        student_epochs=10,
        batch_size=128,
        calibration_images=1024,
        bench_warmup=10,
        bench_rounds=10,
        bench_repeats=20,
        augment=True,
    ),
}

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = Path(os.environ.get("DEPLOYLAB_DATA", ROOT / "data"))
RESULTS_DIR = Path(os.environ.get("DEPLOYLAB_RESULTS", ROOT / "results"))
# The shipped teacher and student (tracked in git, sha256-verified on load).
SHIPPED_DIR = Path(os.environ.get("DEPLOYLAB_MODELS", ROOT / "models"))
# Resume checkpoints of an interrupted `deploylab prepare`: outside the work tree, so that a clean
# checkout, `git clean` or a new clone on the same machine still finds them.
RESUME_DIR = Path(os.environ.get("DEPLOYLAB_RESUME", Path.home() / ".cache" / "deploylab" / "resume"))

# CPU latencies are measured with this many threads unless a lesson says otherwise (docs/ARCHITECTURE.md, "Measuring").
BENCH_THREADS = 2


def get_profile(name: Profile | str | None = None) -> Profile:
    """Return the profile named ``name``, else the one in ``$DEPLOYLAB_PROFILE``, else workshop.

    A :class:`Profile` is returned as it is: every function that takes a profile accepts a
    Profile, a name or None and resolves it here, in one place. An unknown name raises
    :class:`ProfileError` listing the valid ones -- never a silent fallback, because a typo would
    otherwise train or measure at the wrong size.
    """
    if isinstance(name, Profile):
        return name
    name = name or os.environ.get(PROFILE_ENV) or DEFAULT_PROFILE
    key = name.strip().lower()
    if key not in PROFILES:
        raise ProfileError(
            f"unknown profile {name!r}: choose one of {', '.join(PROFILES)} "
            f"(set {PROFILE_ENV}=smoke|workshop|full)"
        )
    return PROFILES[key]


def artefacts_dir(profile: Profile | str | None = None) -> Path:
    """Folder for the checkpoints and exported models of one profile."""
    p = get_profile(profile)
    return DATA_DIR / "artefacts" / p.name


def models_dir(profile: Profile | str | None = None) -> Path:
    """Folder of the teacher and student checkpoints a profile uses (shipped, or trained by smoke)."""
    p = get_profile(profile)
    return SHIPPED_DIR if p.models == "shipped" else artefacts_dir(p)


def results_dir(profile: Profile | str | None = None) -> Path:
    """Folder for the JSON result records of one profile."""
    p = get_profile(profile)
    return RESULTS_DIR / p.name


def device() -> torch.device:
    """The training device: CUDA when present, else the CPU (never an error)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def set_threads(n: int = BENCH_THREADS) -> int:
    """Set PyTorch's intra-op thread count explicitly and return it, so results can print it."""
    torch.set_num_threads(n)
    return torch.get_num_threads()


def seed_everything(seed: int = 0) -> None:
    """Seed Python, NumPy and PyTorch so splits and initialisations repeat."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def banner(profile: Profile | None = None) -> str:
    """The first lines every notebook prints: ``deploylab profile: <name>`` and ``machine: <CPU, cores, extensions>``.

    The second line is what tells the committed notebooks apart by machine: tests/test_notebooks_structure.py
    checks that every committed notebook printed the same two lines (one run, one machine).
    """
    from .hardware import REPORTED_FLAGS, cpu_flags, cpu_model

    p = profile or get_profile()
    flags = cpu_flags()
    isa = ", ".join(f for f in REPORTED_FLAGS if f in flags) or "none of " + ", ".join(REPORTED_FLAGS)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"deploylab profile: {p.name}\nmachine: {cpu_model()}, {cores} cores, {isa}"
