"""Lesson 06: the served student in a Docker container -- build it, run it, prove it, clean up.

The pieces, in the order a run uses them (``python -m deploylab.serving.container`` and
``docker/build_and_test.sh`` do all of it; the notebook and ``tests/test_docker_integration.py``
call the steps one by one):

1. :mod:`deploylab.serving.engine` -- a reachable Docker engine and the local base image;
2. :mod:`deploylab.serving.docker_build` -- the staged build inputs, hadolint, ``docker build``;
3. :class:`Container` -- ``docker run`` with the secure defaults (ports on 127.0.0.1 only, a
   read-only root filesystem with two tmpfs mounts, no capabilities, a memory limit, tini as
   init), waits for Docker's health status, reads the tokens out of the container
   (``docker exec cat key_file.json``), gives an authenticated :class:`deploylab.serving.api.Client`,
   and removes the container (a context manager, and the exit registry of
   :mod:`deploylab.serving.processes` for notebooks);
4. :func:`parity` -- served predictions against in-process ONNX Runtime on real test images.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import httpx

from .. import config, data, deployable, export, onnxrt
from ..config import Profile
from ..files import atomic_write_json
from ..tables import target_line
from .api import Client
from .docker_build import IMAGE, MODEL, build_image, hadolint, stage_context
from .engine import BASE_IMAGE, LABEL, ContainerError, docker, engine_version, ensure_base_image, ensure_engine
from .load import served_parity
from .processes import forget_at_exit, stop_at_exit
from .protocol import png_bytes, top_k

INFERENCE_PORT, METRICS_PORT = 8080, 8082  # inside the container (docker/config.properties)
WORKDIR = "/home/serve/run"  # TorchServe's working folder: key_file.json and logs/
KEY_FILE = f"{WORKDIR}/key_file.json"
USER_ID = 10001  # the image's non-root user


# --------------------------------------------------------------------------------------------
# Sizes per profile
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DockerSizes:
    """Lesson-06 sizes per profile (the load runs reuse lesson 05's ``torchserve.sizes``)."""

    parity_images: int | None  # test images sent to the container and compared with ONNX Runtime (None: all)
    memory: str = "2g"  # the container's memory limit (JVM heap: 25 % of it)
    healthy_timeout_s: float = 180.0  # docker run -> healthy, before giving up


SIZES: dict[str, DockerSizes] = {
    "smoke": DockerSizes(parity_images=128),
    "workshop": DockerSizes(parity_images=None),
    "full": DockerSizes(parity_images=None),
}


def sizes(profile: Profile) -> DockerSizes:
    """The lesson's sizes for ``profile``."""
    return SIZES[profile.name]


@dataclass(frozen=True)
class Targets:
    """The lesson's targets: printed as target / measured / met or missed, never asserted."""

    image_bytes: int = 2 * 10**9  # image size with CPU-only torch
    healthy_s: float = 30.0  # docker run -> healthy on 2 cores
    errors_5xx: int = 0  # in load and bad-input runs


TARGETS = Targets()


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


@dataclass(eq=False)  # identity, not field equality: kept in the exit registry (a WeakSet)
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
    # the metrics port answers without a key (torchserve.OPEN_ENDPOINTS): not published unless asked for,
    # e.g. for a Prometheus on the same host; another container on its network can scrape it unpublished
    publish_metrics: bool = False
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
        stop_at_exit(self)  # a notebook kernel that exits takes its containers with it
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

    def renewed_tokens(self) -> dict[str, str]:
        """The keys after the image's health check has run once inside the container: it renews a key
        that expires soon with TorchServe's API key (``docker/healthcheck.py``), then they are read."""
        docker("exec", self._id(), "/opt/venv/bin/python", "/app/healthcheck.py", check=False)
        return self.tokens()

    def client(self, timeout_s: float = 30.0) -> Client:
        """A :class:`~deploylab.serving.api.Client` with the inference key, renewed when refused.

        The management API is not published, so the client's management URL is the inference
        URL: management calls (describe, scale) answer 4xx from outside the container, as they should.
        TorchServe's keys expire after 60 minutes; the container's health check renews them, and this
        client reads the new ones (``renewed_tokens``) when its key is refused.
        """
        t = self.tokens()
        inference = self.url("inference")
        return Client(inference, inference, self.url("metrics") if "metrics" in self.ports else inference,
                      inference_key=t["inference"], management_key=t["management"], timeout_s=timeout_s,
                      renew=self.renewed_tokens)

    def logs(self, tail: int = 50) -> str:
        """The last lines of the container's output (TorchServe's console log)."""
        if self.cid is None:
            return "(not started)"
        done = docker("logs", "--tail", str(tail), self.cid, check=False)
        return (done.stdout + done.stderr).strip()

    def exec(self, *cmd: str) -> str:
        """Run a command inside the container (as its user); returns stdout."""
        return docker("exec", self._id(), *cmd).stdout

    def scrape_metrics(self) -> str:
        """TorchServe's Prometheus text, read from inside the container, as a scraper on its network
        would: the metrics port answers without a key, so it is not published by default."""
        url = f"http://127.0.0.1:{METRICS_PORT}/metrics"
        return self.exec("/opt/venv/bin/python", "-c",
                         f"import urllib.request; print(urllib.request.urlopen({url!r}, timeout=10).read().decode())")

    def remove(self) -> None:
        """``docker rm --force`` (SIGKILL: the filesystem is throw-away) and check it is gone."""
        if self.cid is None:
            return
        docker("rm", "--force", "--volumes", self.cid, check=False, timeout=60)
        gone = docker("ps", "--all", "--quiet", "--no-trunc", "--filter", f"id={self.cid}").stdout.strip() == ""
        forget_at_exit(self)
        cid, self.cid = self.cid, None
        if not gone:
            raise ContainerError(f"container {cid[:12]} is still there after docker rm --force")

    def stop(self) -> None:
        """What the exit registry calls: :meth:`remove`."""
        self.remove()

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
    images, labels = data.raw_split("test", n)
    sess, _ = export.load_exported(onnx_path, profile=profile)
    logits = onnxrt.run(sess, data.preprocess(images))
    result = served_parity(client, MODEL, images, logits.argmax(1), progress=progress)
    answer = client.predict(MODEL, png_bytes(images[0]), "image/png").json()["predictions"]
    expected = {p["index"]: p["probability"] for p in top_k(logits[:1], k=len(data.CLASS_NAMES))[0]["predictions"]}
    result["max_prob_diff"] = max(abs(p["probability"] - expected[p["index"]]) for p in answer)
    result["labels_match"] = all(p["label"] == data.CLASS_NAMES[p["index"]] for p in answer)
    result["served_accuracy"] = float((result["served_top1"] == labels).mean())
    return result



# --------------------------------------------------------------------------------------------
# Build and test in one go (docker/build_and_test.sh)
# --------------------------------------------------------------------------------------------


def build_and_test(profile: Profile, *, wheels: str | None = None, certs: str | None = None,
                   build_args: dict[str, str] | None = None, keep: bool = False) -> dict[str, Any]:
    """Engine, base image, stage, build, run, wait healthy, parity, no-token refusal, clean up.

    Returns a summary (image size, build and start times, parity); prints target / measured lines.
    """
    problem = ensure_engine()
    if problem:
        raise ContainerError(problem)
    t0 = time.perf_counter()
    base_built = ensure_base_image()
    base_s = time.perf_counter() - t0
    onnx_path = deployable.student_onnx(profile)
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
            refused = httpx.post(f"{c.url()}/predictions/{MODEL}", content=png_bytes(data.raw_split("test", 1)[0][0]),
                                 trust_env=False).status_code
        if keep:
            forget_at_exit(c)
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
    """Command line: ``python -m deploylab.serving.container [test|build|base-image|engine|clean|lint]``."""
    ap = argparse.ArgumentParser(prog="python -m deploylab.serving.container", description=__doc__.splitlines()[0])
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
            ensure_base_image()
            stage_context(deployable.student_onnx(profile), wheels=a.wheels, certs=a.certs)
            b = build_image(f"{IMAGE}:{profile.name}", build_args=build_args)
            print(json.dumps(b.to_dict(), indent=1))
            return 0
        summary = build_and_test(profile, wheels=a.wheels, certs=a.certs, build_args=build_args, keep=a.keep)
    except ContainerError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1))
    if a.json:
        atomic_write_json(a.json, summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
