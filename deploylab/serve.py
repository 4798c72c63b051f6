"""Serving with TorchServe: model archive, secure start/stop, an authenticated client, load and faults.

Lesson 05 in one module (the handler itself is ``handlers/deploylab_handler.py``):

1. :func:`student_onnx` -- the exported student and its model card (lesson 04's file, or exported now
   with :mod:`deploylab.export`).
2. :func:`build_archive` -- ``torch-model-archiver``: a .mar holding the model, the handler, the
   model card, ``index_to_name.json`` and a ``model-config.yaml`` (batchSize, maxBatchDelay,
   minWorkers/maxWorkers, responseTimeout, and the handler's own settings).
3. :class:`TorchServe` -- starts ``torchserve --foreground`` with a generated ``config.properties``:
   every address on 127.0.0.1 at free ports, token authorization on, the model-management API off;
   waits for ``/ping`` and for the workers; stops the whole process group and checks that nothing
   is left (a context manager, and an ``atexit`` hook for interrupted notebooks).
4. :class:`Client` -- an ``httpx`` client that reads the key file TorchServe writes and sends the
   bearer tokens (inference key for predictions, management key for describe/scale).
5. :func:`load_run` / :func:`fault_run` -- a bounded load generator (threads, one request per image,
   loopback only, a progress bar) and a worker kill during load with the time to recover.
6. :func:`bad_inputs` -- the corpus of bad requests in ``tests/bad_inputs`` (each must get a 4xx).
"""

from __future__ import annotations

import atexit
import contextlib
import io
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from . import config, data
from .config import Profile
from .files import atomic_path

HANDLER = config.ROOT / "handlers" / "deploylab_handler.py"
BAD_INPUTS_DIR = config.ROOT / "tests" / "bad_inputs"
JAVA_HINT = ("TorchServe needs Java 17: on Debian/Ubuntu `sudo apt-get install openjdk-17-jre-headless`; "
             "elsewhere install any Java 17 runtime and put `java` on PATH or set JAVA_HOME")


class ServeError(RuntimeError):
    """TorchServe could not be set up, started, reached or stopped as expected."""


class BadRequest(Exception):
    """A request the client must fix; the handler answers it with a 4xx and a JSON message.

    Defined here rather than in the handler file because TorchServe's loader expects exactly one
    class in a handler module.
    """

    KINDS = {400: "BadRequest", 413: "PayloadTooLarge", 415: "UnsupportedMediaType", 422: "UnprocessableEntity"}

    def __init__(self, message: str, code: int = 400):
        if not 400 <= code < 500:
            raise ValueError(f"a BadRequest is a 4xx, got {code}")
        super().__init__(message)
        self.message, self.code = message, code

    def body(self) -> str:
        """The JSON answer: ``{"code": 400, "type": "BadRequest", "message": "..."}``."""
        return json.dumps({"code": self.code, "type": self.KINDS.get(self.code, "ClientError"), "message": self.message})


# --------------------------------------------------------------------------------------------
# Sizes per profile
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServeSizes:
    """Lesson-05 sizes per profile (counts of requests; the code path is the same in every profile)."""

    parity_images: int | None  # test images sent one by one and compared with in-process ONNX Runtime (None: all)
    load_requests: int  # requests per load run (one run per model and concurrency)
    load_seconds: float  # a load run stops after this long even if requests remain
    fault_seconds: float  # longest load run during which a worker is killed (it ends 1 s after recovery)
    concurrency: tuple[int, ...] = (1, 8, 32)
    batch_size: int = 16  # dynamic batching: up to this many requests per inference call
    max_batch_delay_ms: int = 10  # ... waiting at most this long to fill a batch
    workers: int = 2  # Python worker processes per model (1 ONNX Runtime thread each: 2 cores)


SIZES: dict[str, ServeSizes] = {
    "smoke": ServeSizes(parity_images=256, load_requests=96, load_seconds=5.0, fault_seconds=15.0),
    "workshop": ServeSizes(parity_images=2_000, load_requests=1_000, load_seconds=20.0, fault_seconds=30.0),
    "full": ServeSizes(parity_images=None, load_requests=3_000, load_seconds=60.0, fault_seconds=60.0),
}


def sizes(profile: Profile) -> ServeSizes:
    """The lesson's sizes for ``profile``."""
    return SIZES[profile.name]


# --------------------------------------------------------------------------------------------
# Prerequisites and model files
# --------------------------------------------------------------------------------------------


def java_problem() -> str | None:
    """``None`` if a Java 17+ runtime is usable, else a message saying how to install one."""
    java_home = os.environ.get("JAVA_HOME")
    java = str(Path(java_home) / "bin" / "java") if java_home else shutil.which("java")
    if not java or not Path(java).exists():
        return f"no `java` found. {JAVA_HINT}"
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`{java} -version` failed ({e}). {JAVA_HINT}"
    text = out.stderr + out.stdout
    try:
        major = int(text.split('"')[1].split(".")[0])
    except (IndexError, ValueError):
        return f"could not read the Java version from {text[:80]!r}. {JAVA_HINT}"
    if major < 17:
        return f"Java {major} found, TorchServe 0.12 needs 17 or later. {JAVA_HINT}"
    return None


def _bin(name: str) -> str:
    """A console script of the running environment (torchserve, torch-model-archiver)."""
    path = Path(sys.executable).parent / name
    if path.exists():
        return str(path)
    found = shutil.which(name)
    if not found:
        raise ServeError(f"`{name}` not found: install the serving extras, `pip install -e .[serve]` "
                         "(torchserve==0.12.0, torch-model-archiver==0.12.0)")
    return found


LESSON04_NAME = "student_fp32.onnx"
OWN_NAME = "serve_student_fp32.onnx"


def student_onnx(profile: Profile, *, threads: int = config.BENCH_THREADS) -> Path:
    """The student's ONNX file with a verified model card.

    Lesson 04's ``student_fp32.onnx`` is used when it is there and its card checks out; otherwise
    the student checkpoint is exported here with the same functions (dynamo exporter, dynamic
    batch), verified against PyTorch on real test images, and saved as ``serve_student_fp32.onnx``.
    """
    from . import assets, export

    folder = config.artefacts_dir(profile)
    for name in (LESSON04_NAME, OWN_NAME):
        path = folder / name
        if path.is_file():
            try:
                export.load_exported(path, profile=profile, threads=threads)
                return path
            except export.ExportError:
                continue  # stale (e.g. the student was retrained): export again below
    student = assets.student(profile)
    path = folder / OWN_NAME
    x_test, y_test = data.tensors("test", profile.test_images)
    info = export.export_onnx(student.model, path, example=x_test[:2])
    par = export.verify(path, x_test, assets.logits("student", "test", profile), y_test, threads=threads)
    export.write_card(path, role="student", arch=student.meta["arch"], profile=profile, precision="fp32",
                      exporter=info.exporter, parity=par, accuracy=par.accuracy, test_images=par.images,
                      source={"file": "student.pt", "sha256": student.meta.get("sha256")})
    return path


def index_to_name() -> dict[str, str]:
    """TorchServe's ``index_to_name.json`` convention: class index (as a string) -> class name."""
    return {str(i): name for i, name in enumerate(data.CLASS_NAMES)}


def png_bytes(image: np.ndarray) -> bytes:
    """A uint8 (H, W) image encoded as PNG, as a client would upload it."""
    from PIL import Image

    arr = np.asarray(image)
    if arr.dtype != np.uint8 or arr.ndim != 2:
        raise TypeError(f"png_bytes expects a uint8 (H, W) image, got {arr.dtype} {arr.shape}")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


def test_images(n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """The same real test images (raw uint8, and labels) that ``data.tensors('test', n)`` preprocesses."""
    ds = data.load_fashion_mnist()
    keep = data._take(len(ds.test_labels), n, data.SPLIT_SEED)
    return ds.test_images[keep], ds.test_labels[keep]


# --------------------------------------------------------------------------------------------
# The model archive
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """What goes into the archive's model-config.yaml (TorchServe reads the top-level keys;
    the ``handler`` section is read by our handler)."""

    batch_size: int = 16
    max_batch_delay_ms: int = 10
    min_workers: int = 2
    max_workers: int = 2
    response_timeout_s: int = 30
    backend: str = "onnx"
    top_k: int = 3
    max_bytes: int = 256 * 1024
    max_side: int = 512
    intra_op_threads: int = 1

    def to_yaml_dict(self) -> dict[str, Any]:
        if self.batch_size < 1 or self.min_workers < 1 or self.max_workers < self.min_workers:
            raise ValueError(f"invalid model config {self}: batch_size >= 1 and 1 <= min_workers <= max_workers")
        if self.backend not in ("onnx", "pytorch"):
            raise ValueError(f"backend must be 'onnx' or 'pytorch', got {self.backend!r}")
        return {
            "minWorkers": self.min_workers,
            "maxWorkers": self.max_workers,
            "batchSize": self.batch_size,
            "maxBatchDelay": self.max_batch_delay_ms,
            "responseTimeout": self.response_timeout_s,
            "handler": {"backend": self.backend, "top_k": self.top_k, "max_bytes": self.max_bytes,
                        "max_side": self.max_side, "intra_op_threads": self.intra_op_threads},
        }


def build_archive(
    model_file: str | os.PathLike,
    store: str | os.PathLike,
    name: str,
    cfg: ModelConfig = ModelConfig(),
    *,
    extra: Sequence[str | os.PathLike] = (),
    version: str = "1.0",
) -> Path:
    """Run ``torch-model-archiver`` and put ``<store>/<name>.mar`` in place (atomically).

    ``model_file`` is the ONNX file (its ``.card.json`` travels with it) or, for
    ``cfg.backend == 'pytorch'``, a checkpoint ``.pt`` (its ``.json`` metadata travels with it).
    Returns the archive's path.
    """
    import yaml

    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"no model file {model_file}")
    companion = model_file.with_suffix(".card.json") if cfg.backend == "onnx" else model_file.with_suffix(".json")
    if not companion.is_file():
        raise ServeError(f"{model_file.name} has no {companion.name} next to it: the archive ships the model's card")
    store = Path(store)
    store.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="deploylab-mar-") as tmp:
        tmp = Path(tmp)
        (tmp / "index_to_name.json").write_text(json.dumps(index_to_name(), indent=2))
        (tmp / "model-config.yaml").write_text(yaml.safe_dump(cfg.to_yaml_dict(), sort_keys=False))
        files = [companion, tmp / "index_to_name.json", *map(Path, extra)]
        cmd = [_bin("torch-model-archiver"), "--model-name", name, "--version", version,
               "--serialized-file", str(model_file), "--handler", str(HANDLER),
               "--extra-files", ",".join(str(f) for f in files),
               "--config-file", str(tmp / "model-config.yaml"),
               "--export-path", str(tmp), "--force"]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise ServeError(f"torch-model-archiver failed ({done.returncode}): {done.stderr[-2000:]}")
        out = store / f"{name}.mar"
        with atomic_path(out) as dst:
            shutil.move(str(tmp / f"{name}.mar"), dst)
    return out


def archive_contents(mar: str | os.PathLike) -> list[str]:
    """The file names inside a .mar (a zip file)."""
    import zipfile

    with zipfile.ZipFile(mar) as z:
        return sorted(z.namelist())


# --------------------------------------------------------------------------------------------
# Starting and stopping TorchServe
# --------------------------------------------------------------------------------------------


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct TCP ports that were free on ``host`` a moment ago (the OS picks them)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def config_properties(ports: dict[str, int], store: Path, *, max_request_size: int = 1 << 20,
                      host: str = "127.0.0.1", extra: dict[str, str] | None = None) -> str:
    """A ``config.properties`` with secure defaults: loopback addresses, token auth and no model API.

    Token authorization and the model-management API are stated explicitly even where they are
    TorchServe 0.12's defaults, so that a reader sees them and a future default cannot flip them.
    """
    props = {
        "inference_address": f"http://{host}:{ports['inference']}",
        "management_address": f"http://{host}:{ports['management']}",
        "metrics_address": f"http://{host}:{ports['metrics']}",
        "grpc_inference_address": host,
        "grpc_inference_port": str(ports["grpc_inference"]),
        "grpc_management_address": host,
        "grpc_management_port": str(ports["grpc_management"]),
        "initial_worker_port": str(ports["worker_base"]),
        "model_store": str(store),
        "disable_token_authorization": "false",
        "enable_model_api": "false",
        "enable_metrics_api": "true",
        "metrics_mode": "prometheus",
        "max_request_size": str(max_request_size),
        "default_response_timeout": "30",
        "install_py_dep_per_model": "false",
        "enable_envvars_config": "false",
        **(extra or {}),
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


# Every server started from this process (TorchServe here, the ASGI server of lesson 07): anything with stop().
_RUNNING: "weakref.WeakSet[Any]" = weakref.WeakSet()


def stop_at_exit(server: Any) -> None:
    """Stop ``server`` (its ``stop()``) when the interpreter exits, unless :func:`forget_at_exit` came first."""
    _RUNNING.add(server)


def forget_at_exit(server: Any) -> None:
    """``server`` was stopped: nothing left to do for it at exit."""
    _RUNNING.discard(server)


@atexit.register
def _stop_all() -> None:  # a notebook kernel that exits (or restarts) takes its servers down
    for server in list(_RUNNING):
        with contextlib.suppress(Exception):
            server.stop()


class TorchServe:
    """One TorchServe instance in its own working folder, started and stopped by this object.

    Use it as a context manager (``with TorchServe(...) as ts:``) so that an exception or an
    interrupted notebook cell stops it; :meth:`stop` kills the whole process group (the Java
    frontend and its Python workers) and raises if any process survives.
    """

    def __init__(self, store: str | os.PathLike, models: dict[str, str], *, workdir: str | os.PathLike | None = None,
                 token_auth: bool = True, start_timeout_s: float = 120.0, max_request_size: int = 1 << 20):
        self.store = Path(store)
        self.models = dict(models)  # name -> archive file name in store
        for mar in self.models.values():
            if not (self.store / mar).is_file():
                raise FileNotFoundError(f"no archive {self.store / mar}: build it with serve.build_archive")
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="deploylab-ts-"))
        self.token_auth = token_auth
        self.start_timeout_s = start_timeout_s
        self.max_request_size = max_request_size
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None
        self._pids: set[int] = set()

    # paths -----------------------------------------------------------------------------------
    @property
    def log_dir(self) -> Path:
        return self.workdir / "logs"

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    @property
    def config_file(self) -> Path:
        return self.workdir / "config.properties"

    def url(self, api: str) -> str:
        return f"http://127.0.0.1:{self.ports[api]}"

    # life cycle ------------------------------------------------------------------------------
    def __enter__(self) -> "TorchServe":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "TorchServe":
        """Write config.properties, launch TorchServe, wait for /ping and for every model's workers."""
        problem = java_problem()
        if problem:
            raise ServeError(problem)
        if self.proc is not None:
            raise ServeError("this TorchServe is already started")
        p = free_ports(5)
        self.ports = dict(zip(("inference", "management", "metrics", "grpc_inference", "grpc_management"), p))
        self.ports["worker_base"] = 20000 + (os.getpid() * 97 + p[0]) % 30000  # worker sockets: avoid other instances
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        self.config_file.write_text(config_properties(self.ports, self.store, max_request_size=self.max_request_size))
        cmd = [_bin("torchserve"), "--start", "--foreground", "--ncs", "--ts-config", str(self.config_file),
               "--model-store", str(self.store), "--models", *[f"{n}={m}" for n, m in self.models.items()]]
        if not self.token_auth:
            cmd.append("--disable-token-auth")  # acceptable on a laptop, never beyond (see lesson 05)
        env = {**os.environ, "LOG_LOCATION": str(self.log_dir), "METRICS_LOCATION": str(self.log_dir),
               "TMPDIR": str(self.workdir / "tmp"), "TEMP": str(self.workdir / "tmp")}
        env.pop("TS_CONFIG_FILE", None)  # it would override --ts-config
        self._stdout = open(self.log_dir / "torchserve.stdout.log", "wb")
        # its own session (process group): stop() signals the launcher, Java and the workers at once
        self.proc = subprocess.Popen(cmd, cwd=self.workdir, env=env, stdout=self._stdout, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        stop_at_exit(self)
        try:
            self._wait_ready()
        except BaseException:  # KeyboardInterrupt included: never leave a half-started server
            self.stop()
            raise
        return self

    def _alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _remember_pids(self) -> None:
        import psutil

        if self.proc is None:
            return
        with contextlib.suppress(psutil.Error):
            root = psutil.Process(self.proc.pid)
            self._pids |= {root.pid, *(c.pid for c in root.children(recursive=True))}

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + self.start_timeout_s
        client = None
        while time.monotonic() < deadline:
            if not self._alive():
                raise ServeError(f"TorchServe exited during start-up; see {self.log_dir}:\n{self.tail_log()}")
            if self._load_failed():
                raise ServeError(f"a model failed to load; from {self.log_dir / 'model_log.log'}:\n"
                                 f"{self.tail_log('model_log.log', 25)}")
            try:
                if client is None and (not self.token_auth or self.key_file.is_file()):
                    client = self.client()
                if client is not None and client.ping().get("status") == "Healthy":
                    if all(client.ready_workers(n) >= client.min_workers(n) for n in self.models):
                        client.close()
                        self._remember_pids()
                        return
            except (httpx.HTTPError, ServeError, KeyError, ValueError):
                pass
            time.sleep(0.25)
        raise ServeError(f"TorchServe did not become ready in {self.start_timeout_s:.0f} s; see {self.log_dir}:\n{self.tail_log()}")

    def _load_failed(self) -> bool:
        path = self.log_dir / "ts_log.log"
        return path.is_file() and "Load model failed" in path.read_text(errors="replace")

    def tokens(self) -> dict[str, str]:
        """The inference and management keys from the key file TorchServe wrote into its working folder."""
        if not self.token_auth:
            return {}
        if not self.key_file.is_file():
            raise ServeError(f"no key file {self.key_file}: is TorchServe running with token authorization?")
        keys = json.loads(self.key_file.read_text())
        return {"inference": keys["inference"]["key"], "management": keys["management"]["key"]}

    def client(self, timeout_s: float = 30.0, **kwargs) -> "Client":
        """An authenticated :class:`Client` for this server."""
        t = self.tokens()
        return Client(self.url("inference"), self.url("management"), self.url("metrics"),
                      inference_key=t.get("inference"), management_key=t.get("management"), timeout_s=timeout_s, **kwargs)

    def processes(self) -> list[Any]:
        """Live processes of this server: the launcher, the Java frontend and its Python workers."""
        import psutil

        self._remember_pids()
        alive = []
        for pid in sorted(self._pids):
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(pid)
                if proc.status() != psutil.STATUS_ZOMBIE:
                    alive.append(proc)
        return alive

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``timeout_s``; raises if a process survives."""
        import psutil

        if self.proc is None:
            return
        self._remember_pids()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            pass
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and self.processes():
            time.sleep(0.2)
        for proc in self.processes():  # anything that ignored SIGTERM (or left the group)
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=10)
        psutil.wait_procs(self.processes(), timeout=10)
        self._stdout.close()
        survivors = self.processes()
        self.proc = None
        forget_at_exit(self)
        self.key_file.unlink(missing_ok=True)  # the tokens die with the server
        shutil.rmtree(self.workdir / "tmp", ignore_errors=True)  # unpacked archives, worker sockets; logs stay
        if survivors:
            raise ServeError(f"processes of TorchServe survived stop(): {[p.pid for p in survivors]}")

    def tail_log(self, name: str = "ts_log.log", lines: int = 30) -> str:
        """The last lines of one of TorchServe's logs (ts_log.log, model_log.log, access_log.log...)."""
        path = self.log_dir / name
        if not path.is_file():
            path = self.log_dir / "torchserve.stdout.log"
        if not path.is_file():
            return "(no log yet)"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


# --------------------------------------------------------------------------------------------
# The client
# --------------------------------------------------------------------------------------------


class Client:
    """Calls the inference, management and metrics APIs with the right bearer token each.

    Thread-safe (one ``httpx.Client`` with a connection pool), so the load generator shares it.
    """

    def __init__(self, inference_url: str, management_url: str, metrics_url: str, *, inference_key: str | None,
                 management_key: str | None, timeout_s: float = 30.0, max_connections: int = 64):
        import httpx

        for url in (inference_url, management_url, metrics_url):
            if not url.startswith(("http://127.0.0.1:", "http://localhost:", "http://[::1]:")):
                raise ValueError(f"this client only talks to a server on loopback, not {url}")
        self.inference_url, self.management_url, self.metrics_url = inference_url, management_url, metrics_url
        self._inference_headers = {"Authorization": f"Bearer {inference_key}"} if inference_key else {}
        self._management_headers = {"Authorization": f"Bearer {management_key}"} if management_key else {}
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.http = httpx.Client(timeout=timeout_s, limits=limits, trust_env=False)

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ping(self) -> dict[str, Any]:
        r = self.http.get(f"{self.inference_url}/ping", headers=self._inference_headers)
        r.raise_for_status()
        return r.json()

    def predict(self, model: str, body: bytes | str | list | dict, content_type: str | None = None):
        """POST one request to ``/predictions/<model>``; returns the ``httpx.Response`` (any status)."""
        if isinstance(body, (list, dict)):
            body, content_type = json.dumps(body).encode(), content_type or "application/json"
        elif isinstance(body, str):
            body = body.encode()
        headers = dict(self._inference_headers)
        if content_type:
            headers["Content-Type"] = content_type
        return self.http.post(f"{self.inference_url}/predictions/{model}", content=body, headers=headers)

    def top1(self, model: str, image: np.ndarray) -> int:
        """The served top-1 class index of one uint8 image (sent as PNG); raises on a non-200 answer."""
        r = self.predict(model, png_bytes(image), "image/png")
        if r.status_code != 200:
            raise ServeError(f"prediction failed with {r.status_code}: {r.text[:300]}")
        return int(r.json()["predictions"][0]["index"])

    def describe(self, model: str) -> dict[str, Any]:
        """The management API's description of ``model`` (workers with pid and status, batch size...)."""
        r = self.http.get(f"{self.management_url}/models/{model}", headers=self._management_headers)
        r.raise_for_status()
        return r.json()[0]

    def min_workers(self, model: str) -> int:
        return int(self.describe(model)["minWorkers"])

    def ready_workers(self, model: str) -> int:
        return sum(w.get("status") == "READY" for w in self.describe(model).get("workers", []))

    def worker_pids(self, model: str) -> list[int]:
        return [int(w["pid"]) for w in self.describe(model).get("workers", []) if w.get("pid", -1) > 0]

    def scale(self, model: str, min_workers: int, max_workers: int | None = None, *, timeout_s: float = 60.0) -> dict:
        """``PUT /models/<model>?min_worker=..&synchronous=true`` (allowed with the model API off)."""
        params = {"min_worker": min_workers, "max_worker": max_workers or min_workers, "synchronous": "true",
                  "timeout": int(timeout_s)}
        r = self.http.put(f"{self.management_url}/models/{model}", params=params, headers=self._management_headers,
                          timeout=timeout_s + 10)
        r.raise_for_status()
        return r.json()

    def metrics(self) -> str:
        """The metrics endpoint's Prometheus text."""
        r = self.http.get(f"{self.metrics_url}/metrics", headers=self._management_headers)
        r.raise_for_status()
        return r.text


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition: ``(metric name, labels, value)``; comments skipped."""
    samples = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        if "{" in head:
            name, _, rest = head.partition("{")
            labels = {}
            for part in rest.rstrip("}").split('",'):
                if "=" in part:
                    k, _, v = part.partition("=")
                    labels[k.strip()] = v.strip().strip('"')
        else:
            name, labels = head, {}
        try:
            samples.append((name.strip(), labels, float(value)))
        except ValueError:
            continue
    return samples


# --------------------------------------------------------------------------------------------
# Bad inputs
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BadInput:
    """One bad request of the corpus and the status class it must get."""

    name: str
    body: bytes
    content_type: str | None
    why: str
    expect: int | None = None  # an exact 4xx if the corpus says so, else any 4xx
    frontend: bool = False  # refused by TorchServe's Java frontend (no handler involved): its 413 has an empty body


def bad_inputs(folder: str | os.PathLike = BAD_INPUTS_DIR) -> list[BadInput]:
    """Read the corpus: ``cases.json`` lists each request (a file in the folder, or inline text)."""
    folder = Path(folder)
    cases = json.loads((folder / "cases.json").read_text())
    out = []
    for c in cases:
        if "file" in c:
            body = (folder / c["file"]).read_bytes()
        elif "repeat" in c:  # a large body made on the fly: no multi-megabyte file in git
            body = c["text"].encode() * int(c["repeat"])
        else:
            body = c.get("text", "").encode()
        out.append(BadInput(c["name"], body, c.get("content_type"), c["why"], c.get("expect"), bool(c.get("frontend", False))))
    if len(out) < 20:
        raise ServeError(f"the bad-input corpus in {folder} has {len(out)} cases; the lesson expects at least 20")
    return out


def run_bad_inputs(client: Client, model: str, cases: Iterable[BadInput]) -> list[dict[str, Any]]:
    """Send every bad request; one row each with the status, whether it is an acceptable 4xx, and the message."""
    rows = []
    for case in cases:
        r = client.predict(model, case.body, case.content_type)
        try:
            message = r.json().get("message", r.text)
        except ValueError:
            message = r.text
        ok = 400 <= r.status_code < 500 and (case.expect is None or r.status_code == case.expect)
        is_json = r.headers.get("content-type", "").startswith("application/json")
        rows.append({"case": case.name, "status": r.status_code, "ok": ok and (is_json or case.frontend), "json": is_json,
                     "message": str(message)[:120] or "(empty body)", "answered by": "frontend" if case.frontend else "handler"})
    return rows


# --------------------------------------------------------------------------------------------
# Load and faults
# --------------------------------------------------------------------------------------------


@dataclass
class LoadResult:
    """One bounded load run: per-request latencies and statuses, and what they add up to."""

    model: str
    concurrency: int
    requests: int
    seconds: float
    statuses: dict[int, int]
    latencies_ms: list[float] = field(repr=False)
    timeline: list[tuple[float, int]] = field(repr=False)  # (start time in s from the run's start, status)

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def errors_5xx(self) -> int:
        return sum(n for code, n in self.statuses.items() if code >= 500 or code < 100)

    @property
    def throughput(self) -> float:
        """Successful images per second over the run."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def summary(self) -> dict[str, Any]:
        from .bench import latency_percentiles

        s = latency_percentiles(self.latencies_ms) if self.latencies_ms else None
        return {"model": self.model, "concurrency": self.concurrency, "requests": self.requests, "ok": self.ok,
                "5xx": self.errors_5xx, "images/s": self.throughput,
                "p50 ms": s.p50_ms if s else None, "p90 ms": s.p90_ms if s else None, "p99 ms": s.p99_ms if s else None}


def load_run(client: Client, model: str, bodies: Sequence[bytes], *, concurrency: int, requests: int | None,
             max_seconds: float, content_type: str = "image/png", progress: bool = True, desc: str | None = None,
             during: Callable[[float], bool | None] | None = None) -> LoadResult:
    """Send ``requests`` requests (cycling through ``bodies``) from ``concurrency`` threads.

    Bounded twice: by count (``None``: no count limit) and by ``max_seconds``. A connection error or timeout counts as status
    0 (a failure). ``during(elapsed_s)`` is called from the main thread about every 50 ms (the fault
    drill kills a worker from there); when it returns True the run stops early.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    if concurrency < 1 or (requests is not None and requests < 1) or not bodies or max_seconds <= 0:
        raise ValueError("need concurrency >= 1, requests >= 1 (or None), max_seconds > 0 and at least one body")
    lock = threading.Lock()
    counter = iter(range(requests)) if requests is not None else itertools.count()
    latencies: list[float] = []
    timeline: list[tuple[float, int]] = []
    start = time.perf_counter()
    deadline = start + max_seconds
    stop = threading.Event()
    bar = tqdm(total=requests, desc=desc or f"{model} x{concurrency}", unit="req", disable=not progress, leave=False)

    def worker() -> None:
        import httpx

        while time.perf_counter() < deadline and not stop.is_set():
            with lock:
                i = next(counter, None)
            if i is None:
                return
            t0 = time.perf_counter()
            try:
                status = client.predict(model, bodies[i % len(bodies)], content_type).status_code
            except httpx.HTTPError:
                status = 0
            t1 = time.perf_counter()
            with lock:
                latencies.append((t1 - t0) * 1000.0)
                timeline.append((t0 - start, status))
                bar.update(1)

    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        futures = [pool.submit(worker) for _ in range(concurrency)]
        while not all(f.done() for f in futures):
            if during is not None and during(time.perf_counter() - start):
                stop.set()
            time.sleep(0.05)
        for f in futures:
            f.result()
    seconds = time.perf_counter() - start
    bar.close()
    statuses = Counter(s for _, s in timeline)
    return LoadResult(model, concurrency, len(timeline), seconds, dict(sorted(statuses.items())), latencies, timeline)


@dataclass
class FaultResult:
    """A worker killed during load: what failed and how long until the workers were back."""

    killed_pid: int
    kill_at_s: float
    recovered_s: float | None  # from the kill until every worker was READY again with a new pid (None: never)
    failed_requests: int
    load: LoadResult

    def to_dict(self) -> dict[str, Any]:
        return {"killed_pid": self.killed_pid, "kill_at_s": self.kill_at_s, "recovered_s": self.recovered_s,
                "failed_requests": self.failed_requests, "requests": self.load.requests,
                "statuses": self.load.statuses, "images/s": self.load.throughput}


def fault_run(server: TorchServe, client: Client, model: str, bodies: Sequence[bytes], *, concurrency: int = 8,
              max_seconds: float = 30.0, kill_after_s: float = 1.0, settle_s: float = 1.0,
              progress: bool = True) -> FaultResult:
    """Kill one worker (SIGKILL, as the kernel's OOM killer would) ``kill_after_s`` into a load run.

    TorchServe's frontend notices the dead worker and starts a new one. Recovery time is measured
    from the kill until the management API shows as many READY workers as before, none of them the
    killed pid. The load goes on meanwhile (every non-200 answer counts as failed) and stops
    ``settle_s`` after recovery, or after ``max_seconds``.
    """
    import psutil

    before = client.worker_pids(model)
    n_before = client.ready_workers(model)
    if not before:
        raise ServeError(f"model {model!r} has no worker to kill")
    victim = before[0]
    if victim not in {p.pid for p in server.processes()}:
        raise ServeError(f"worker pid {victim} is not a child of this TorchServe; refusing to kill it")
    state: dict[str, Any] = {"killed": None, "recovered": None}

    def during(elapsed: float) -> bool:
        if state["killed"] is None:
            if elapsed >= kill_after_s:
                with contextlib.suppress(psutil.Error):
                    psutil.Process(victim).kill()
                state["killed"] = elapsed
        elif state["recovered"] is None:
            with contextlib.suppress(Exception):
                workers = client.describe(model).get("workers", [])
                if sum(w.get("status") == "READY" and w.get("pid") != victim for w in workers) >= n_before:
                    state["recovered"] = elapsed
        return state["recovered"] is not None and elapsed >= state["recovered"] + settle_s

    load = load_run(client, model, bodies, concurrency=concurrency, requests=None, max_seconds=max_seconds,
                    progress=progress, desc=f"{model} x{concurrency}, one worker killed", during=during)
    if state["killed"] is None:
        raise ServeError(f"the load run ended before the worker was killed at {kill_after_s} s")
    recovered = None if state["recovered"] is None else state["recovered"] - state["killed"]
    return FaultResult(victim, state["killed"], recovered, load.requests - load.ok, load)


def inprocess_throughput(onnx_path: str | os.PathLike, images: np.ndarray, profile: Profile,
                         threads: int = config.BENCH_THREADS) -> Any:
    """Latency stats of in-process ONNX Runtime at batch 32 on real images (``bench.compare_latency``)."""
    from . import bench, export

    sess = export.session(onnx_path, threads=threads)
    x = data.preprocess(images[:32])
    res = bench.compare_latency({"onnxruntime in-process": export.as_callable(sess)}, bench.example_inputs(x, (32,)),
                                profile=profile, progress=False)
    return res["onnxruntime in-process"][32]


def served_parity(client: Client, model: str, images: np.ndarray, reference_top1: np.ndarray, *,
                  concurrency: int = 8, progress: bool = True) -> dict[str, Any]:
    """Send every image (PNG) and compare the served top-1 with ``reference_top1``."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm.auto import tqdm

    if len(images) != len(reference_top1):
        raise ValueError(f"{len(images)} images for {len(reference_top1)} reference labels")
    bodies = [png_bytes(im) for im in images]
    with ThreadPoolExecutor(max_workers=concurrency) as pool:
        served = list(tqdm(pool.map(lambda b: client.predict(model, b, "image/png"), bodies), total=len(bodies),
                           desc="served parity", unit="img", disable=not progress, leave=False))
    statuses = Counter(r.status_code for r in served)
    top1 = np.array([r.json()["predictions"][0]["index"] if r.status_code == 200 else -1 for r in served])
    return {"images": len(images), "statuses": dict(statuses), "served_top1": top1,
            "agreement": float((top1 == np.asarray(reference_top1)).mean())}
