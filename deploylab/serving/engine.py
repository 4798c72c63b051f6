"""The Docker engine and the base image (lesson 06), for machines with no registry in reach.

- :func:`ensure_engine` -- a reachable Docker engine; as root, ``dockerd`` is started when it is
  installed but not running (the course's lab machines), logging to ``logs/dockerd.log``.
- :func:`ensure_base_image` -- the local base image the kit builds FROM: where no registry is
  reachable, a stand-in for ``debian:bookworm-slim`` made with ``debootstrap --variant=minbase`` and
  ``docker import``, under its own name (:data:`BASE_IMAGE`, never the official one's, which it
  would shadow on the user's host); the Dockerfiles take it as their ``BASE_IMAGE`` build argument.
- :func:`docker` -- run one ``docker`` command, its failure a :class:`ContainerError` with the message.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from .. import config

# The debootstrap stand-in's own name; the Dockerfiles default to the official image (OFFICIAL_BASE) and
# get this one through --build-arg BASE_IMAGE=... (docker_build.build_image, compose.yaml's build args).
BASE_IMAGE = "deploylab-debian:bookworm-slim"
OFFICIAL_BASE = "debian:bookworm-slim"
DEBIAN_SUITE = "bookworm"
DEBIAN_MIRROR = "http://deb.debian.org/debian"
LABEL = "org.deploylab.lesson=06"  # on every container and image made here, so leftovers can be found
ENGINE_HINT = ("install a Docker engine (Debian/Ubuntu: `sudo apt-get install docker.io`, then "
               "`sudo systemctl start docker` or, as root, `dockerd &`), or Docker Desktop elsewhere")


class ContainerError(RuntimeError):
    """Docker could not build, start, reach or remove what this lesson asked of it."""


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
# And what Debian's official images set for apt (/etc/apt/apt.conf.d/docker-clean): no package caches
# (pkgcache.bin, srcpkgcache.bin: ~80 MB after an `apt-get update`) and no downloaded .debs in a layer.
_APT_RM = 'rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true'
SLIM_APT_CLEAN = f"""DPkg::Post-Invoke {{ "{_APT_RM}"; }};
APT::Update::Post-Invoke {{ "{_APT_RM}"; }};
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
"""


def _trim_rootfs(root: Path) -> None:
    """Remove what a slim image does not carry: downloaded .debs, apt lists, man pages, locales, docs."""
    for pattern in ("var/cache/apt/archives/*.deb", "var/cache/apt/*.bin", "var/lib/apt/lists/*_*"):
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

    Where a registry is reachable, ``docker pull debian:bookworm-slim`` is the normal way (then build
    with ``--build-arg BASE_IMAGE=debian:bookworm-slim``); this function does not pull (the course's
    machines reach no registry). It builds a stand-in with ``debootstrap --variant=minbase`` (needs
    root and the ``debootstrap`` package), trims it the way Debian's slim images are trimmed, and
    imports it with ``docker import`` under ``tag`` -- its own name, so that an official
    ``debian:bookworm-slim`` on the same host is neither shadowed nor replaced.
    """
    if image_id(tag):
        return False
    debootstrap = shutil.which("debootstrap") or ("/usr/sbin/debootstrap" if Path("/usr/sbin/debootstrap").exists() else None)
    if debootstrap is None or os.geteuid() != 0:
        raise ContainerError(f"no local image {tag}: as root with `apt-get install debootstrap` let deploylab build it "
                             "(python -m deploylab.serving.container base-image), or `docker pull "
                             f"{OFFICIAL_BASE}` and build with --build-arg BASE_IMAGE={OFFICIAL_BASE}")
    with tempfile.TemporaryDirectory(prefix="deploylab-rootfs-") as tmp:
        root = Path(tmp) / "rootfs"
        done = subprocess.run([debootstrap, "--variant=minbase", suite, str(root), mirror],
                              capture_output=True, text=True, timeout=timeout_s)
        if done.returncode != 0:
            raise ContainerError(f"debootstrap failed ({done.returncode}): {done.stdout[-1000:]}{done.stderr[-1000:]}")
        (root / "etc/dpkg/dpkg.cfg.d").mkdir(parents=True, exist_ok=True)
        (root / "etc/dpkg/dpkg.cfg.d/docker-slim").write_text(SLIM_DPKG_EXCLUDES)
        (root / "etc/apt/apt.conf.d/docker-clean").write_text(SLIM_APT_CLEAN)
        _trim_rootfs(root)
        tar = subprocess.Popen(["tar", "-C", str(root), "-c", "."], stdout=subprocess.PIPE)
        imp = subprocess.run([docker_bin() or "docker", "import", "--change", 'CMD ["bash"]', "-", tag],
                             stdin=tar.stdout, capture_output=True, text=True, timeout=timeout_s)
        tar.stdout.close()
        tar.wait()
        if imp.returncode != 0 or tar.returncode != 0:
            raise ContainerError(f"docker import failed: {imp.stderr[-1000:]}")
    return True

