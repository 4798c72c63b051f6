"""TorchServe: the model archive, a secure start and stop, and the lesson's sizes (lesson 05).

The handler itself is ``handlers/deploylab_handler.py``.

1. :func:`build_archive` -- ``torch-model-archiver``: a .mar holding the model, the handler, the
   model card, ``index_to_name.json`` and a ``model-config.yaml`` (batchSize, maxBatchDelay,
   minWorkers/maxWorkers, responseTimeout, and the handler's own settings).
2. :class:`TorchServe` -- starts ``torchserve --foreground`` with a generated ``config.properties``:
   every address on 127.0.0.1 at free ports, token authorization on, the model-management API off;
   waits for ``/ping`` and for the workers; stops the whole process group and checks that nothing
   is left (a context manager, and the exit registry of :mod:`deploylab.serving.processes`).
3. :meth:`TorchServe.client` -- an authenticated :class:`deploylab.serving.api.Client` (inference key
   for predictions, management key for describe/scale).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from .. import config, data
from ..config import Profile
from ..files import atomic_path
from .api import Client
from .batching_policy import MAX_BATCH, MAX_WAIT_MS
from .processes import ServeError, ServerProcess, free_ports
from .protocol import LIMITS

HANDLER = config.ROOT / "handlers" / "deploylab_handler.py"
JAVA_HINT = ("TorchServe needs Java 17: on Debian/Ubuntu `sudo apt-get install openjdk-17-jre-headless`; "
             "elsewhere install any Java 17 runtime and put `java` on PATH or set JAVA_HOME")


@dataclass(frozen=True)
class ServeSizes:
    """Lesson-05 sizes per profile (counts of requests; the code path is the same in every profile)."""

    parity_images: int | None  # test images sent one by one and compared with in-process ONNX Runtime (None: all)
    load_requests: int  # requests per load run (one run per model and concurrency)
    load_seconds: float  # a load run stops after this long even if requests remain
    fault_seconds: float  # longest load run during which a worker is killed (it ends 1 s after recovery)
    concurrency: tuple[int, ...] = (1, 8, 32)
    batch_size: int = MAX_BATCH  # dynamic batching: up to this many requests per inference call ...
    max_batch_delay_ms: int = MAX_WAIT_MS  # ... waiting at most this long: the kit's one policy (batching_policy)
    workers: int = 2  # Python worker processes per model (1 ONNX Runtime thread each: 2 cores)
    overload_seconds: float = 5.0  # each run of the overload sweep (many clients, a short queue)
    overload_concurrency: tuple[int, ...] = (16, 64, 200)  # clients of the overload sweep
    overload_queue: int = 16  # job_queue_size of the overload sweep's server (the default server keeps 1,000)


SIZES: dict[str, ServeSizes] = {
    "smoke": ServeSizes(parity_images=256, load_requests=96, load_seconds=5.0, fault_seconds=15.0, overload_seconds=3.0),
    "workshop": ServeSizes(parity_images=None, load_requests=1_000, load_seconds=20.0, fault_seconds=30.0),
    "full": ServeSizes(parity_images=None, load_requests=3_000, load_seconds=60.0, fault_seconds=60.0,
                       overload_seconds=10.0),
}


def sizes(profile: Profile) -> ServeSizes:
    """The lesson's sizes for ``profile``."""
    return SIZES[profile.name]


# --------------------------------------------------------------------------------------------
# Prerequisites
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


# --------------------------------------------------------------------------------------------
# The model archive
# --------------------------------------------------------------------------------------------


def index_to_name() -> dict[str, str]:
    """TorchServe's ``index_to_name.json`` convention: class index (as a string) -> class name."""
    return {str(i): name for i, name in enumerate(data.CLASS_NAMES)}



BACKENDS = ("onnx", "executorch", "pytorch")  # the handler's: an ONNX file, an ExecuTorch .pte program, a checkpoint


@dataclass(frozen=True)
class ModelConfig:
    """What goes into the archive's model-config.yaml (TorchServe reads the top-level keys;
    the ``handler`` section is read by our handler)."""

    batch_size: int = MAX_BATCH  # the kit's one batching policy (batching_policy), as every server that batches
    max_batch_delay_ms: int = MAX_WAIT_MS
    min_workers: int = 2
    max_workers: int = 2
    response_timeout_s: int = 30
    backend: str = "onnx"
    top_k: int = 3
    max_bytes: int = LIMITS["max_bytes"]
    max_side: int = LIMITS["max_side"]
    intra_op_threads: int = 1

    def to_yaml_dict(self) -> dict[str, Any]:
        if self.batch_size < 1 or self.min_workers < 1 or self.max_workers < self.min_workers:
            raise ValueError(f"invalid model config {self}: batch_size >= 1 and 1 <= min_workers <= max_workers")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {self.backend!r}")
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

    ``model_file`` is the ONNX file or, for ``cfg.backend == 'executorch'``, the ``.pte`` program
    (its ``.card.json`` travels with either) or, for
    ``cfg.backend == 'pytorch'``, a checkpoint ``.pt`` (its ``.json`` metadata travels with it).
    Returns the archive's path.
    """
    model_file = Path(model_file)
    if not model_file.is_file():
        raise FileNotFoundError(f"no model file {model_file}")
    companion = model_file.with_suffix(".json" if cfg.backend == "pytorch" else ".card.json")
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
    with zipfile.ZipFile(mar) as z:
        return sorted(z.namelist())


# --------------------------------------------------------------------------------------------
# Starting and stopping TorchServe
# --------------------------------------------------------------------------------------------


# What TorchServe 0.12 answers without a key (measured by tests/test_torchserve_integration.py):
# its API description (with its version) on the inference and management ports, and the metrics
# endpoint. Token authorization covers /ping, /predictions and the management API only. Acceptable
# on loopback, where only this machine's users reach the ports; never publish them beyond it.
OPEN_ENDPOINTS: tuple[tuple[str, str, str], ...] = (
    ("OPTIONS", "inference", "/"),
    ("GET", "inference", "/api-description"),
    ("OPTIONS", "management", "/"),
    ("GET", "management", "/api-description"),
    ("GET", "metrics", "/metrics"),
)

JOB_QUEUE_SIZE = 1000  # requests queued per model before TorchServe sheds them (its own default: 100)


def config_properties(ports: dict[str, int], store: Path, *, max_request_size: int = 1 << 20,
                      job_queue_size: int = JOB_QUEUE_SIZE, host: str = "127.0.0.1",
                      extra: dict[str, str] | None = None) -> str:
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
        # requests queued per model before TorchServe sheds them (its default 100). Its 503 then says
        # "Model ... has no worker ... use scale workers API" even though the workers exist, with no
        # Retry-After: a queue of 1,000 keeps 200 concurrent clients answered (slower) instead (lesson 05)
        "job_queue_size": str(job_queue_size),
        "install_py_dep_per_model": "false",
        "enable_envvars_config": "false",
        **(extra or {}),
    }
    return "".join(f"{k}={v}\n" for k, v in props.items())


class TorchServe:
    """One TorchServe instance in its own working folder, started and stopped by this object.

    Use it as a context manager (``with TorchServe(...) as ts:``) so that an exception or an
    interrupted notebook cell stops it; :meth:`stop` kills the whole process group (the Java
    frontend and its Python workers) and raises if any process survives.
    """

    def __init__(self, store: str | os.PathLike, models: dict[str, str], *, workdir: str | os.PathLike | None = None,
                 token_auth: bool = True, start_timeout_s: float = 120.0, max_request_size: int = 1 << 20,
                 job_queue_size: int = JOB_QUEUE_SIZE, token_expiration_min: float | None = None):
        self.store = Path(store)
        self.models = dict(models)  # name -> archive file name in store
        for mar in self.models.values():
            if not (self.store / mar).is_file():
                raise FileNotFoundError(f"no archive {self.store / mar}: build it with torchserve.build_archive")
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="deploylab-ts-"))
        self.token_auth = token_auth
        self.start_timeout_s = start_timeout_s
        self.max_request_size = max_request_size
        if job_queue_size < 1:
            raise ValueError(f"job_queue_size must be >= 1, got {job_queue_size}")
        self.job_queue_size = job_queue_size
        self.token_expiration_min = token_expiration_min  # None: TorchServe's 60 minutes
        self.ports: dict[str, int] = {}
        self.process = ServerProcess("TorchServe", self.log_dir / "torchserve.stdout.log", secrets=[self.key_file])

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
        if self.process.proc is not None:
            raise ServeError("this TorchServe is already started")
        p = free_ports(5)
        self.ports = dict(zip(("inference", "management", "metrics", "grpc_inference", "grpc_management"), p))
        self.ports["worker_base"] = 20000 + (os.getpid() * 97 + p[0]) % 30000  # worker sockets: avoid other instances
        self.log_dir.mkdir(parents=True, exist_ok=True)
        (self.workdir / "tmp").mkdir(exist_ok=True)
        extra = {} if self.token_expiration_min is None else {"token_expiration_min": f"{self.token_expiration_min:g}"}
        self.config_file.write_text(config_properties(self.ports, self.store, max_request_size=self.max_request_size,
                                                        job_queue_size=self.job_queue_size, extra=extra))
        cmd = [_bin("torchserve"), "--start", "--foreground", "--ncs", "--ts-config", str(self.config_file),
               "--model-store", str(self.store), "--models", *[f"{n}={m}" for n, m in self.models.items()]]
        if not self.token_auth:
            cmd.append("--disable-token-auth")  # acceptable on a laptop, never beyond (see lesson 05)
        env = {**os.environ, "LOG_LOCATION": str(self.log_dir), "METRICS_LOCATION": str(self.log_dir),
               "TMPDIR": str(self.workdir / "tmp"), "TEMP": str(self.workdir / "tmp")}
        env.pop("TS_CONFIG_FILE", None)  # it would override --ts-config
        # its own session (process group): stop() signals the launcher, Java and the workers at once
        self.process.launch(cmd, cwd=self.workdir, env=env)
        try:
            self.process.wait_until(self._ready, self.start_timeout_s, poll_s=0.25)
        except BaseException:  # KeyboardInterrupt included: never leave a half-started server
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        """/ping is healthy and every model has its minimum of READY workers (raises if a model failed to load)."""
        log = self.log_dir / "ts_log.log"
        if log.is_file() and "Load model failed" in log.read_text(errors="replace"):
            raise ServeError(f"a model failed to load; from {self.log_dir / 'model_log.log'}:\n"
                             f"{self.tail_log('model_log.log', 25)}")
        if self.token_auth and not self.key_file.is_file():
            return False
        try:
            with self.client(timeout_s=5.0) as client:
                return client.ping().get("status") == "Healthy" and all(
                    client.ready_workers(n) >= client.min_workers(n) for n in self.models)
        except (httpx.HTTPError, ServeError, KeyError, ValueError):
            return False

    def tokens(self) -> dict[str, str]:
        """The inference and management keys from the key file TorchServe wrote into its working folder."""
        if not self.token_auth:
            return {}
        if not self.key_file.is_file():
            raise ServeError(f"no key file {self.key_file}: is TorchServe running with token authorization?")
        keys = self._read_key_file()
        return {"inference": keys["inference"]["key"], "management": keys["management"]["key"]}

    def _read_key_file(self, attempts: int = 20) -> dict[str, Any]:
        """key_file.json, decoded; read again shortly if caught half written (TorchServe rewrites it in
        place, truncate then write, when a key is renewed)."""
        for attempt in range(attempts):
            try:
                return json.loads(self.key_file.read_text())
            except ValueError:
                if attempt == attempts - 1:
                    raise
                time.sleep(0.05)
        raise AssertionError("unreachable")

    def renewed_tokens(self, margin_s: float = 2.0) -> dict[str, str]:
        """The current keys, each renewed first with the API key if it expires within ``margin_s``.

        TorchServe's inference and management keys expire (``token_expiration_min``, 60 by default);
        its token API (``GET /token?type=inference`` on the management port, authorized by the API
        key, which never expires) replaces one and rewrites the key file. Clients call this when a
        key is refused (``Client(renew=...)``).
        """
        if not self.token_auth:
            return {}
        keys = self._read_key_file()
        soon = datetime.now(timezone.utc) + timedelta(seconds=margin_s)
        for kind in ("inference", "management"):
            if datetime.fromisoformat(keys[kind]["expiration time"].replace("Z", "+00:00")) <= soon:
                r = httpx.get(f"{self.url('management')}/token", params={"type": kind},
                              headers={"Authorization": f"Bearer {keys['API']['key']}"}, timeout=10, trust_env=False)
                if r.status_code != 200:
                    raise ServeError(f"TorchServe refused to renew the {kind} key: {r.status_code} {r.text[:200]}")
        return self.tokens()

    def client(self, timeout_s: float = 30.0, **kwargs: Any) -> Client:
        """An authenticated :class:`~deploylab.serving.api.Client` for this server; it renews expired keys."""
        t = self.tokens()
        kwargs.setdefault("renew", self.renewed_tokens if self.token_auth else None)
        return Client(self.url("inference"), self.url("management"), self.url("metrics"),
                      inference_key=t.get("inference"), management_key=t.get("management"), timeout_s=timeout_s, **kwargs)

    def processes(self) -> list[psutil.Process]:
        """Live processes of this server: the launcher, the Java frontend and its Python workers."""
        return self.process.processes()

    def roles(self) -> dict[str, list[psutil.Process]]:
        """The live processes by role -- ``frontend`` (Java), ``workers`` (the Python model workers),
        ``launcher`` (the ``torchserve`` script) -- to account CPU time to each (``processes.cpu_seconds``)."""
        roles: dict[str, list[psutil.Process]] = {"frontend": [], "workers": [], "launcher": []}
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(p.cmdline())
                role = "frontend" if p.name() == "java" else "workers" if "model_service_worker" in cmd else "launcher"
                roles[role].append(p)
        return roles

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM to the process group, SIGKILL after ``timeout_s``; raises if a process survives."""
        try:
            self.process.stop(timeout_s)
        finally:
            shutil.rmtree(self.workdir / "tmp", ignore_errors=True)  # unpacked archives, worker sockets; logs stay

    def tail_log(self, name: str = "ts_log.log", lines: int = 30) -> str:
        """The last lines of one of TorchServe's logs (ts_log.log, model_log.log, access_log.log...)."""
        path = self.log_dir / name
        return self.process.tail(lines, path if path.is_file() else None)
