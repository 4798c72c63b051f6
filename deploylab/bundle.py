"""An offline bundle for a workshop: everything a laptop needs, with no network on the day.

``deploylab bundle OUT`` gathers, into the folder ``OUT``:

- ``wheels/``: the wheels of ``requirements/lock.txt`` (``pip download``, so pip's own configuration
  decides where they come from), plus setuptools for installing ``deploylab`` itself;
- ``requirements.txt``: the requirements the wheels were gathered for;
- ``data/fashion-mnist/``: the four dataset files (the verified ``data/`` cache, or Debian's);
- ``data/artefacts/<profile>/``: the prepared artefacts of the profile (checkpoints and their
  metadata, exported models and cards, cached logits), each checkpoint checked against its metadata
  before it is packed;
- ``source/deploylab-src.tar``: the repository at ``HEAD`` (``git archive``);
- ``install.sh``: verifies every file, then installs with ``pip install --no-index --find-links wheels``
  into a fresh ``.venv`` and puts the data in place;
- ``MANIFEST.sha256``: the sha256 of every other file (``sha256sum -c`` reads it too), written last,
  so a bundle without it is an interrupted one.

``deploylab bundle --verify OUT`` checks a bundle against its manifest. The install script checks
again on the target machine and refuses a bundle with a missing or altered file.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any, Sequence

from . import artefacts, config, data, models
from .config import Profile
from .files import atomic_path, sha256_file
from .hardware import library_versions

LOCK = config.ROOT / "requirements" / "lock.txt"
MANIFEST = "MANIFEST.sha256"
INFO = "bundle.json"
# Build back-end of deploylab's pyproject.toml: the offline editable install needs it among the wheels.
BUILD_REQUIREMENTS = ("setuptools>=68",)


class BundleError(RuntimeError):
    """A bundle could not be built, or a bundle does not match its manifest."""


def _offline_env() -> dict[str, str]:
    """An environment in which pip sees no configuration file, index or extra find-links: only what
    the command line names. Used to check a bundle the way the target machine will use it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # pip: "os.devnull disables loading of all configuration files"
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


def _pip(args: Sequence[str], *, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "pip", *args]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise BundleError(f"`pip {' '.join(args[:2])} ...` failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return done


def download_wheels(requirements: Path, wheels: Path) -> list[Path]:
    """``pip download`` the requirements (constrained by the lock file) and the build back-end into ``wheels``."""
    wheels.mkdir(parents=True, exist_ok=True)
    constraints = ["-c", str(LOCK)] if requirements.resolve() != LOCK.resolve() else []
    _pip(["download", "--quiet", "--dest", str(wheels), "--only-binary", ":all:", "-r", str(requirements), *constraints])
    _pip(["download", "--quiet", "--dest", str(wheels), "--only-binary", ":all:", *BUILD_REQUIREMENTS])
    files = sorted(wheels.iterdir())
    not_wheels = [f.name for f in files if f.suffix != ".whl"]
    if not_wheels:
        raise BundleError(f"not wheels (an offline install cannot build them): {not_wheels}")
    return files


def check_resolvable(requirements: Path, wheels: Path) -> str:
    """``pip install --dry-run --no-index`` of ``requirements`` from ``wheels`` alone; returns pip's summary line.

    Only the resolver runs (nothing is installed): proves that every pin, and every dependency of
    every pin, is among the bundle's wheels.
    """
    done = _pip(["install", "--dry-run", "--ignore-installed", "--no-index", "--find-links", str(wheels),
                 "-r", str(requirements)], env=_offline_env())
    lines = [ln for ln in done.stdout.splitlines() if ln.startswith("Would install")]
    return lines[-1] if lines else done.stdout.strip().splitlines()[-1]


def dataset_files() -> list[Path]:
    """The four verified ``.gz`` files of Fashion-MNIST (the data/ cache, filled from Debian's copy if needed)."""
    ds = data.load_fashion_mnist(allow_download=False)  # raises DataError with instructions if absent
    for folder in (data.cache_dir(), data.DEBIAN_DIR):
        paths = [folder / f"{stem}.gz" for stem, _ in data.FILES.values()]
        if all(p.is_file() for p in paths):
            return paths
    raise BundleError(f"Fashion-MNIST verified from {ds.source}, but its .gz files are neither in "
                      f"{data.cache_dir()} nor in {data.DEBIAN_DIR}")


def artefact_files(profile: Profile, exclude: Sequence[str] = ()) -> list[Path]:
    """The prepared artefacts of ``profile``, checkpoints verified against their metadata.

    Temporary files of interrupted writes (hidden ``.*`` names) are left out, and so is anything
    matching one of the ``exclude`` glob patterns (relative to the artefacts folder).
    """
    folder = config.artefacts_dir(profile)
    if models.read_metadata(config.models_dir(profile), "student") is None:  # shipped models travel in the source
        raise BundleError(f"no student in {config.models_dir(profile)}: run `deploylab prepare --profile {profile.name}` first")
    if not folder.is_dir():
        return []
    keep = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        if any(part.startswith(".") for part in Path(rel).parts):
            continue
        if any(fnmatch.fnmatch(rel, pat) for pat in exclude):
            continue
        keep.append(path)
    for path in keep:
        if path.suffix == ".pt" and path.with_suffix(".json").is_file():
            meta = json.loads(path.with_suffix(".json").read_text())
            if "sha256" in meta:
                problems = artefacts.problems(path, meta, profile=profile.name)
                if problems:
                    raise BundleError(f"{path} does not match its metadata ({'; '.join(problems)}); "
                                      f"rebuild it (`deploylab prepare --profile {profile.name} --force`) or exclude it")
    return keep


def git_source(out: Path) -> tuple[Path, str, bool]:
    """``git archive HEAD`` into ``out/source``; returns the tar, the commit and whether the tree had changes."""
    def git(*args: str) -> str:
        done = subprocess.run(["git", "-C", str(config.ROOT), *args], capture_output=True, text=True)
        if done.returncode != 0:
            raise BundleError(f"`git {' '.join(args)}` failed in {config.ROOT}: {done.stderr.strip()} "
                              "(the bundle ships the committed source: run it from a git checkout with a commit)")
        return done.stdout.strip()

    commit = git("rev-parse", "HEAD")
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    tar = out / "source" / "deploylab-src.tar"
    tar.parent.mkdir(parents=True, exist_ok=True)
    git("archive", "--format=tar", "--prefix=deploylab/", "-o", str(tar), "HEAD")
    return tar, commit, dirty


def write_manifest(root: Path) -> Path:
    """``MANIFEST.sha256`` over every file under ``root`` except itself (``sha256sum`` format, sorted)."""
    lines = [f"{sha256_file(p)}  {p.relative_to(root).as_posix()}"
             for p in sorted(root.rglob("*")) if p.is_file() and p.name != MANIFEST]
    with atomic_path(root / MANIFEST) as tmp:
        tmp.write_text("\n".join(lines) + "\n")
    return root / MANIFEST


def verify(root: str | os.PathLike) -> dict[str, Any]:
    """Check every file of a bundle against ``MANIFEST.sha256``; raises :class:`BundleError` listing
    missing, altered and unlisted files. Returns the bundle's ``bundle.json`` with the file count."""
    root = Path(root)
    manifest = root / MANIFEST
    if not manifest.is_file():
        raise BundleError(f"{root} has no {MANIFEST}: not a bundle, or an interrupted one (build it again)")
    expected = {}
    for line in manifest.read_text().splitlines():
        digest, _, rel = line.partition("  ")
        if len(digest) != 64 or not rel:
            raise BundleError(f"malformed line in {manifest}: {line[:80]!r}")
        expected[rel] = digest
    present = {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file() and p.name != MANIFEST}
    missing = sorted(set(expected) - present)
    altered = sorted(rel for rel in set(expected) & present if sha256_file(root / rel) != expected[rel])
    unlisted = sorted(present - set(expected))
    if missing or altered or unlisted:
        parts = [f"{name}: {', '.join(v[:10])}{' ...' if len(v) > 10 else ''}"
                 for name, v in (("missing", missing), ("altered (sha256 differs)", altered), ("not in the manifest", unlisted)) if v]
        raise BundleError(f"bundle {root} does not match its manifest -- " + "; ".join(parts)
                          + ". Do not install it: copy the bundle again from its source.")
    info = json.loads((root / INFO).read_text())
    info["files"] = len(expected)
    return info


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(src, dst)


def build(out: str | os.PathLike, profile: Profile | str | None = None, *, requirements: str | os.PathLike = LOCK,
          archive: bool = False, exclude: Sequence[str] = (), log=print) -> Path:
    """Build a bundle in ``out`` (a new or empty folder); returns ``out`` (or ``out.tar`` with ``archive``).

    ``requirements`` defaults to the whole lock file (with the CUDA build of torch: several GB); a
    smaller file gives a partial bundle, e.g. for a test. ``exclude``: glob patterns of artefacts to leave out.
    """
    profile = config.get_profile(profile)
    out, requirements = Path(out), Path(requirements)
    if not requirements.is_file():
        raise BundleError(f"no requirements file {requirements}")
    if out.exists() and any(out.iterdir()):
        raise BundleError(f"{out} exists and is not empty: choose a new folder")
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()

    tar, commit, dirty = git_source(out)
    log(f"source: {commit[:12]} ({tar.stat().st_size / 1e6:.1f} MB)"
        + (" -- note: the working tree has uncommitted changes, which are NOT in the bundle" if dirty else ""))
    for path in dataset_files():
        _copy(path, out / "data" / "fashion-mnist" / path.name)
    log(f"dataset: 4 files from {path.parent}")
    folder = config.artefacts_dir(profile)
    arts = artefact_files(profile, exclude)
    for path in arts:
        _copy(path, out / "data" / "artefacts" / profile.name / path.relative_to(folder))
    log(f"artefacts ({profile.name}): {len(arts)} files, {sum(p.stat().st_size for p in arts) / 1e6:.0f} MB")

    shutil.copyfile(requirements, out / "requirements.txt")
    log(f"wheels: pip download -r {requirements} (the CUDA build of torch alone is several GB) ...")
    wheels = download_wheels(out / "requirements.txt", out / "wheels")
    summary = check_resolvable(out / "requirements.txt", out / "wheels")
    log(f"wheels: {len(wheels)} files, {sum(p.stat().st_size for p in wheels) / 1e6:.0f} MB; "
        f"offline resolution checked (pip --dry-run --no-index): {summary[:120]}...")

    install = out / "install.sh"
    install.write_text(INSTALL_SH)
    install.chmod(0o755)
    info = {"profile": profile.name, "commit": commit, "uncommitted_changes": dirty, "data_sha256": data.DATA_SHA256,
            "dataset_files": {f"{stem}.gz": digest for stem, digest in data.FILES.values()},  # of the decoded files
            "requirements": requirements.name, "python": f"{sys.version_info.major}.{sys.version_info.minor}",
            "platform": sys.platform, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "deploylab": library_versions().get("deploylab")}
    (out / INFO).write_text(json.dumps(info, indent=2) + "\n")
    write_manifest(out)
    log(f"bundle ready in {time.perf_counter() - t0:.0f} s: {out} (verify: deploylab bundle --verify {out}; "
        f"install: {out}/install.sh TARGET)")
    if not archive:
        return out
    tar_path = out.with_name(out.name + ".tar")
    with atomic_path(tar_path) as tmp, tarfile.open(tmp, "w") as t:  # wheels are compressed already: plain tar
        t.add(out, arcname=out.name)
    log(f"archive: {tar_path} ({tar_path.stat().st_size / 1e6:.0f} MB)")
    return tar_path


# The install script shipped in every bundle. POSIX sh + python3 (for the sha256 check: portable
# where `sha256sum` is not, e.g. macOS). Everything pip does here is offline: no configuration
# file, no index, only the bundle's wheels.
INSTALL_SH = r'''#!/bin/sh
# Install deploylab from this offline bundle: ./install.sh [TARGET]   (default: ./deploylab next to the bundle)
# 1. verifies every file against MANIFEST.sha256 (refuses a missing or altered file);
# 2. unpacks the source into TARGET, creates TARGET/.venv, installs the wheels with
#    `pip install --no-index --find-links wheels` (no network, no pip configuration);
# 3. puts the dataset and the prepared artefacts into TARGET/data and checks the dataset.
set -eu
BUNDLE=$(cd "$(dirname "$0")" && pwd)
TARGET=${1:-$BUNDLE/../deploylab}
PYTHON=${PYTHON:-python3}
say() { printf '[bundle] %s\n' "$*"; }
die() { printf '[bundle] ERROR: %s\n' "$*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null 2>&1 || die "no $PYTHON: install Python 3.11 (or set PYTHON=/path/to/python3)"
say "verifying $(wc -l < "$BUNDLE/MANIFEST.sha256") files against MANIFEST.sha256"
"$PYTHON" - "$BUNDLE" <<'EOF' || die "the bundle is damaged or was modified: do not install it; copy it again from its source"
import hashlib, pathlib, sys
root = pathlib.Path(sys.argv[1])
bad = []
for line in (root / "MANIFEST.sha256").read_text().splitlines():
    digest, _, rel = line.partition("  ")
    path = root / rel
    if not path.is_file():
        bad.append(f"missing: {rel}")
        continue
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    if h.hexdigest() != digest:
        bad.append(f"sha256 mismatch: {rel}")
for b in bad:
    print(f"[bundle] {b}", file=sys.stderr)
sys.exit(1 if bad else 0)
EOF

PROFILE=$("$PYTHON" -c "import json,sys; print(json.load(open(sys.argv[1]))['profile'])" "$BUNDLE/bundle.json")
mkdir -p "$TARGET"
TARGET=$(cd "$TARGET" && pwd)
say "unpacking the source into $TARGET"
tar -xf "$BUNDLE/source/deploylab-src.tar" -C "$TARGET" --strip-components=1

# Offline and hermetic: no pip configuration file, no index, no find-links but the bundle's.
unset PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_FIND_LINKS PIP_CONSTRAINT PIP_REQUIREMENT 2>/dev/null || true
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INDEX=1
[ -x "$TARGET/.venv/bin/python" ] || "$PYTHON" -m venv "$TARGET/.venv"
say "installing $(ls "$BUNDLE/wheels" | wc -l) wheels (pip install --no-index --find-links wheels)"
"$TARGET/.venv/bin/python" -m pip install -q --no-index --find-links "$BUNDLE/wheels" -r "$BUNDLE/requirements.txt" \
  || die "pip could not install the bundle's wheels offline (wrong Python version or platform?" \
         "the bundle says: $(cat "$BUNDLE/bundle.json" | tr -d '\n '))"
"$TARGET/.venv/bin/python" -m pip install -q --no-index --find-links "$BUNDLE/wheels" --no-deps -e "$TARGET" \
  || die "pip could not install deploylab itself from $TARGET"
if "$TARGET/.venv/bin/python" -c "import ipykernel" 2>/dev/null; then
  "$TARGET/.venv/bin/python" -m ipykernel install --sys-prefix --name deploylab --display-name "Python (deploylab)" >/dev/null
fi

say "placing the dataset and the $PROFILE artefacts into $TARGET/data"
mkdir -p "$TARGET/data/fashion-mnist" "$TARGET/data/artefacts"
cp "$BUNDLE"/data/fashion-mnist/*.gz "$TARGET/data/fashion-mnist/"
rm -rf "$TARGET/data/artefacts/$PROFILE"
cp -R "$BUNDLE/data/artefacts/$PROFILE" "$TARGET/data/artefacts/$PROFILE"
"$PYTHON" - "$BUNDLE/bundle.json" "$TARGET/data/fashion-mnist" <<'EOF' || die "the dataset in $TARGET/data/fashion-mnist does not verify"
import gzip, hashlib, json, pathlib, sys
folder = pathlib.Path(sys.argv[2])
for name, digest in json.load(open(sys.argv[1]))["dataset_files"].items():
    if hashlib.sha256(gzip.decompress((folder / name).read_bytes())).hexdigest() != digest:
        sys.exit(f"[bundle] {name}: the decoded file does not match its pinned sha256")
EOF
if "$TARGET/.venv/bin/python" -c "import torch" 2>/dev/null; then
  cd "$TARGET" && DEPLOYLAB_DATA="$TARGET/data" "$TARGET/.venv/bin/deploylab" data --offline \
    || die "deploylab could not read the dataset after installing"
else
  say "partial bundle (no torch among its requirements): dataset checked by hash only, not with deploylab data"
fi
say "done: cd $TARGET && DEPLOYLAB_PROFILE=$PROFILE .venv/bin/jupyter lab --ip=127.0.0.1 notebooks"
'''
