"""The student on Ray Serve: a real Ray cluster (one or two nodes on this machine), replicas, autoscaling.

Lesson 08 runs the same ONNX model and the same HTTP door as the other servers on an existing
distributed engine:

- :class:`~deploylab.serving.ray_cluster.RayCluster` -- ``ray start`` processes, one per node, each in
  its own process group (:mod:`~deploylab.serving.ray_cluster`);
- :class:`Classifier` -- the Ray Serve deployment: the bearer check and the bounded body read of
  :mod:`~deploylab.serving.http_input`, :func:`~deploylab.serving.protocol.decode_http` for every
  input, then ``@serve.batch`` so that one model call serves up to ``max_batch`` requests (the model
  loaded by :func:`~deploylab.serving.predictor.load`: ONNX Runtime or ExecuTorch, ``runtime``);
- :class:`RayServeServer` -- a cluster plus the application behind Serve's HTTP proxy on 127.0.0.1,
  speaking TorchServe's URLs (``GET /ping``, ``POST /predictions/student``) so that
  :class:`~deploylab.serving.api.Client` and :func:`~deploylab.serving.load.load_run` drive it
  unchanged; replica counts over time (``serve.status()``) and a replica killed under load.

The bearer key never enters Ray's state: the replicas read it from the 0600 key file (on one machine)
or from the ``DEPLOYLAB_INFERENCE_KEY`` environment variable (a Kubernetes Secret, see deploy/k8s).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import ray
from ray import serve
from ray.serve.config import BackpressureConfig, RequestRouterConfig
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .. import config
from . import header_timeout, protocol
from .api import Client
from .batching_policy import MAX_BATCH, MAX_WAIT_MS
from .http_input import BODY_TIMEOUT_S, MAX_REQUEST_BYTES, UNAUTHORIZED, authorized, error_response, expected_header, read_body
from .load import LoadResult, kill_under_load
from .processes import ServeError, forget_at_exit, free_ports, port_in_use, stop_at_exit
from .ray_cluster import EXIT_TIMEOUT_S, RAY_ENV, RayCluster, ray_processes  # noqa: F401  (RAY_ENV, ray_processes: the lesson's)

APP_NAME = "classifier"
DEPLOYMENT_NAME = "Classifier"
KEY_ENV = "DEPLOYLAB_INFERENCE_KEY"
SERVE_LOGGING = {"log_level": "WARNING", "enable_access_log": False}  # Serve's controller, proxy and replicas
# Load shedding. A replica takes MAX_ONGOING requests at once (Serve's default, 5, would starve the batcher
# of 16); up to MAX_QUEUED more wait in the proxy's router; beyond, Serve answers 503 with Retry-After at
# once. Measured with 200 clients against one replica on 2 cores: with 256 queued, requests waited up to
# 20 s and more -- a queued request retries its replica with a backoff that grows to 0.5 s (Serve's
# default), so slots freed by the replica stayed empty while the CPUs idled (10 answers/s). With 32
# queued and the backoff capped at 20 ms, every request was answered within about 1 s or shed at once.
MAX_ONGOING = 32
MAX_QUEUED = 32
RETRY_AFTER_S = 1.0
ROUTER_BACKOFF = {"initial_backoff_s": 0.005, "max_backoff_s": 0.02}
# Serve's HTTP proxy (uvicorn) closes a connection idle this long after its last answer: the course's one
# value (the custom server's, nginx's default), clearly longer than a client or a load balancer keeps an idle
# connection, so that the client side always closes first and never sends on a closing connection (the
# keep-alive race of header_timeout.KEEP_ALIVE_S). Ray's default is 90 s. Ray 2.60 has no timeout for a
# connection that sends nothing or half a request: a reverse proxy in front closes those (lesson 06).
KEEP_ALIVE_S = header_timeout.KEEP_ALIVE_S
CROWD_CLIENTS, CROWD_DEADLINE_S = 200, 10.0  # lesson 08's crowd: every request answered or shed within the deadline


@dataclass(frozen=True)
class ScaleOutSizes:
    """Lesson-08 sizes per profile (the code path is the same in every profile)."""

    parity_images: int  # real test images, served and compared with in-process ONNX Runtime
    load_requests: int  # requests per load run (one run per server, replica count and concurrency)
    load_seconds: float  # a load run stops after this long even if requests remain
    rounds: int  # interleaved rounds of each comparison (1 replica, 2 replicas, 1, 2, ...)
    autoscale_load_s: float  # how long the load that makes Serve scale up lasts
    autoscale_quiet_s: float  # how long to watch for the scale-down after it
    fault_seconds: float  # the longest the load run with a killed replica may last
    crowd_seconds: float  # how long 200 connections hammer one replica (each request has CROWD_DEADLINE_S)
    concurrency: tuple[int, ...] = (1, 8, 32)
    max_replicas: int = 3  # the autoscaling maximum (0.5 CPU each: 3 fit on 2 cores with the proxy)
    max_batch: int = MAX_BATCH  # @serve.batch, LitServe's max_batch_size and the custom server's micro-batch
    max_wait_ms: float = float(MAX_WAIT_MS)  # (batching_policy: the kit's one policy)


SIZES: dict[str, ScaleOutSizes] = {
    "smoke": ScaleOutSizes(parity_images=32, load_requests=96, load_seconds=3.0, rounds=1, autoscale_load_s=15.0,
                           autoscale_quiet_s=20.0, fault_seconds=20.0, crowd_seconds=3.0, concurrency=(1, 32)),
    # workshop and full: parity (and so accuracy) on the whole 10,000-image test set, as every variant of the course
    "workshop": ScaleOutSizes(parity_images=10_000, load_requests=800, load_seconds=10.0, rounds=3, autoscale_load_s=25.0,
                              autoscale_quiet_s=30.0, fault_seconds=30.0, crowd_seconds=8.0),
    "full": ScaleOutSizes(parity_images=10_000, load_requests=3_000, load_seconds=20.0, rounds=3, autoscale_load_s=40.0,
                          autoscale_quiet_s=40.0, fault_seconds=40.0, crowd_seconds=10.0),
}


def sizes(profile: "config.Profile") -> ScaleOutSizes:
    """The lesson's sizes for ``profile``."""
    return SIZES[profile.name]


# Serve checks look_back_period_s against the deprecated metrics_interval_s (default 10 s) every time it reads an
# autoscaling config (serve.run, serve.status, ...); the push interval that counts is
# RAY_SERVE_*_AUTOSCALING_METRIC_PUSH_INTERVAL_S (RAY_ENV: 0.5 s), so the warning is wrong here.
warnings.filterwarnings("ignore", message=".*look_back_period_s.*metrics_interval_s", category=FutureWarning)


def read_key(key_file: str | os.PathLike | None) -> str:
    """The bearer key: from :data:`KEY_ENV` when set (a Kubernetes Secret), else from the JSON key file."""
    if os.environ.get(KEY_ENV):
        return os.environ[KEY_ENV]
    if not key_file:
        raise ServeError(f"no bearer key: set {KEY_ENV} or pass key_file")
    return json.loads(Path(key_file).read_text())["inference"]["key"]


# --------------------------------------------------------------------------------------------
# The deployment
# --------------------------------------------------------------------------------------------


class Classifier:
    """One Ray Serve replica: the shared HTTP door, then the model in batches (``@serve.batch``)."""

    def __init__(self, model_path: str, key_file: str | None = None, model_name: str = "student", top_k: int = 3,
                 max_request_bytes: int = MAX_REQUEST_BYTES, body_timeout_s: float = BODY_TIMEOUT_S, runtime: str | None = None):
        from . import predictor  # in the replica's process

        self.expected = expected_header(read_key(key_file))
        self.model = predictor.load(model_path, runtime=runtime, threads=1)  # sha256 checked against the model card
        self.model_name, self.top_k = model_name, top_k
        self.max_request_bytes, self.body_timeout_s = max_request_bytes, body_timeout_s

    async def __call__(self, request: Request) -> Response:
        if not authorized(request.headers, self.expected):  # before a byte of the body is read
            return error_response(401, UNAUTHORIZED)
        path = request.url.path.rstrip("/")
        if path == "/ping" and request.method == "GET":
            return JSONResponse({"status": "Healthy"})
        if path != f"/predictions/{self.model_name}" or request.method != "POST":
            return error_response(404, f"no route {request.method} {path}; this server serves POST /predictions/{self.model_name}")
        try:
            body = await read_body(request, self.max_request_bytes, self.body_timeout_s)
            x = protocol.model_input(protocol.decode_http(body, request.headers.get("content-type")))
        except protocol.BadRequest as e:
            return Response(e.body(), status_code=e.code, media_type="application/json")
        logits = await self.infer(x)  # only valid inputs reach a batch
        return JSONResponse(protocol.top_k(logits[None, :], self.top_k)[0], headers={"X-Replica-Pid": str(os.getpid())})

    @serve.batch(max_batch_size=16, batch_wait_timeout_s=0.005)
    async def infer(self, xs: list[np.ndarray]) -> list[np.ndarray]:
        """One model call for every input queued (up to 16, waiting at most 5 ms for more)."""
        return list(self.model.run(np.concatenate(xs)))


def deployment(*, num_replicas: int | None = 1, autoscaling: dict[str, Any] | None = None,
               max_ongoing_requests: int = MAX_ONGOING, max_queued_requests: int = MAX_QUEUED,
               router_backoff: dict[str, float] | None = ROUTER_BACKOFF, replica_cpus: float = 0.5,
               max_replicas_per_node: int | None = None):
    """The :class:`Classifier` as a Ray Serve deployment with the course's options.

    ``max_ongoing_requests`` per replica (Serve's default, 5, would starve the batcher of 16);
    beyond ``max_queued_requests`` waiting in the proxy's router, a 503 with ``Retry-After`` at once
    (``backpressure_config``: load shed on purpose, see :data:`MAX_QUEUED`); health checked every
    second, so that a dead replica is noticed at once. ``router_backoff=None`` keeps Serve's default
    retry backoff (up to 0.5 s), which lesson 08 shows failing a crowd.
    """
    options: dict[str, Any] = dict(name=DEPLOYMENT_NAME, max_ongoing_requests=max_ongoing_requests,
                                   max_queued_requests=max_queued_requests,
                                   backpressure_config=BackpressureConfig(status_code=503, retry_after_s=RETRY_AFTER_S),
                                   request_router_config=RequestRouterConfig(**(router_backoff or {})),
                                   health_check_period_s=1.0, health_check_timeout_s=5.0, graceful_shutdown_timeout_s=2.0,
                                   ray_actor_options={"num_cpus": replica_cpus})
    if autoscaling is not None:
        options["autoscaling_config"] = autoscaling
    elif num_replicas is not None:  # None: the config file's (build_app) or Serve's default
        options["num_replicas"] = num_replicas
    if max_replicas_per_node is not None:
        options["max_replicas_per_node"] = max_replicas_per_node
    return serve.deployment(**options)(Classifier)


def http_options(port: int, host: str = "127.0.0.1", keep_alive_s: int = KEEP_ALIVE_S) -> dict[str, Any]:
    """Serve's HTTP proxy on ``host:port``, closing idle keep-alive connections after ``keep_alive_s``."""
    return {"host": host, "port": port, "keep_alive_timeout_s": keep_alive_s}


def build_app(args: dict[str, Any]):
    """The application builder for a Serve config file (``import_path: deploylab.serving.ray_serve:build_app``).

    ``args``: ``model`` (the ``.onnx`` or ``.pte`` file with its card), optional ``key_file`` and ``runtime``; the key otherwise comes
    from :data:`KEY_ENV`. Replica counts and autoscaling come from the config file's deployment options.
    """
    return deployment(num_replicas=None).bind(str(args["model"]), args.get("key_file"), runtime=args.get("runtime"))


# --------------------------------------------------------------------------------------------
# Serve on the cluster
# --------------------------------------------------------------------------------------------


@dataclass
class ReplicaFault:
    """One replica killed during load: what failed and how long until Serve had replaced it."""

    killed_pid: int
    kill_at_s: float
    replaced_s: float | None  # from the kill until as many replicas RUNNING as before, none the killed pid
    failed_requests: int
    wrong_answers: int  # 200 answers whose top-1 differs from in-process ONNX Runtime's
    load: LoadResult = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        return {"killed_pid": self.killed_pid, "kill_at_s": self.kill_at_s, "replaced_s": self.replaced_s,
                "failed_requests": self.failed_requests, "wrong_answers": self.wrong_answers,
                "requests": self.load.requests, "statuses": self.load.statuses, "images/s": self.load.throughput}


class RayServeServer:
    """A :class:`RayCluster` with the :class:`Classifier` application behind Serve's proxy on 127.0.0.1."""

    def __init__(self, model_path: str | os.PathLike, *, runtime: str | None = None, nodes: int = 1, num_replicas: int = 1,
                 autoscaling: dict[str, Any] | None = None, max_replicas_per_node: int | None = None,
                 workdir: str | os.PathLike | None = None, start_timeout_s: float = 180.0, keep_alive_s: int = KEEP_ALIVE_S):
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise FileNotFoundError(f"no model file {self.model_path}")
        from .predictor import runtime_for

        self.runtime = runtime_for(self.model_path, runtime)  # a wrong runtime: a ValueError before the cluster starts
        self.cluster = RayCluster(nodes, start_timeout_s=start_timeout_s)
        self.num_replicas, self.autoscaling, self.max_replicas_per_node = num_replicas, autoscaling, max_replicas_per_node
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="deploylab-ray-"))
        self.start_timeout_s, self.keep_alive_s = start_timeout_s, keep_alive_s
        self.port: int | None = None
        self.ready_s: float | None = None

    @property
    def key_file(self) -> Path:
        return self.workdir / "key_file.json"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "RayServeServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self, port: int | None = None) -> "RayServeServer":
        """Start the cluster, Serve's proxy on ``127.0.0.1:port`` and the application; wait for its replicas."""
        from .asgi import write_key_file

        self.port = port or free_ports(1)[0]
        if port_in_use(self.port):
            raise ServeError(f"port {self.port} is already in use on 127.0.0.1: stop what listens there or choose another")
        self.workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        write_key_file(self.key_file)
        try:
            self.cluster.start()
            logging.getLogger("ray.serve").setLevel(logging.WARNING)  # the driver's INFO lines, in a notebook
            serve.start(proxy_location="HeadOnly", http_options=http_options(self.port, keep_alive_s=self.keep_alive_s),
                        logging_config=SERVE_LOGGING)
            self.deploy(num_replicas=self.num_replicas, autoscaling=self.autoscaling,
                        max_replicas_per_node=self.max_replicas_per_node)
            with self.client() as c:
                self.cluster.node_processes[0].wait_until(lambda: _pings(c), 30)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - t0
        stop_at_exit(self)  # newer than its cluster: the key file goes too
        return self

    def deploy(self, *, num_replicas: int = 1, autoscaling: dict[str, Any] | None = None,
               max_replicas_per_node: int | None = None, **options: Any) -> float:
        """(Re)deploy the application with these options on the running cluster; returns seconds until its replicas run.

        Serve updates the deployment in place (new replicas start, surplus ones stop), so a lesson can
        compare 1 and 2 replicas, or switch autoscaling on, without restarting the cluster. ``options``:
        :func:`deployment`'s others (``max_queued_requests``, ``router_backoff``, ...) for this deployment.
        """
        app = deployment(num_replicas=num_replicas, autoscaling=autoscaling, max_replicas_per_node=max_replicas_per_node,
                         **options).bind(str(self.model_path), str(self.key_file), runtime=self.runtime)
        t0 = time.perf_counter()
        serve.run(app, name=APP_NAME, route_prefix="/", logging_config=SERVE_LOGGING)
        want = autoscaling["min_replicas"] if autoscaling else num_replicas
        deadline = time.perf_counter() + self.start_timeout_s
        while time.perf_counter() < deadline:  # exactly `want` running, none starting or stopping
            states = self.replica_states()
            if states.get("RUNNING", 0) == want and sum(states.values()) == want:
                break
            time.sleep(0.2)
        else:
            raise ServeError(f"the deployment did not settle at {want} replicas: {self.replica_states()}")
        self.num_replicas, self.autoscaling = num_replicas, autoscaling
        return time.perf_counter() - t0

    def roles(self) -> dict[str, list[psutil.Process]]:
        """The cluster's processes by what they do: Serve's HTTP proxy, the replicas, and Ray's own (GCS, raylets, agents)."""
        out: dict[str, list[psutil.Process]] = {"proxy": [], "replicas": [], "ray system": []}
        for p in self.processes():
            with contextlib.suppress(psutil.Error):
                name = p.name() + " " + " ".join(p.cmdline()[:1])
                role = "proxy" if "ProxyActor" in name else "replicas" if "ServeReplica" in name else "ray system"
                out[role].append(p)
        return out

    def key(self) -> str:
        return read_key(self.key_file)

    def client(self, timeout_s: float = 30.0, **kwargs: Any) -> Client:
        """An authenticated :class:`~deploylab.serving.api.Client`, as for the other servers."""
        return Client(self.url, self.url, self.url, inference_key=self.key(), management_key=self.key(), timeout_s=timeout_s, **kwargs)

    def replica_states(self) -> dict[str, int]:
        """Serve's own count of the deployment's replicas per state (public API: ``serve.status()``)."""
        app = serve.status().applications.get(APP_NAME)
        if app is None or DEPLOYMENT_NAME not in app.deployments:
            return {}
        return {str(getattr(k, "value", k)): int(v) for k, v in app.deployments[DEPLOYMENT_NAME].replica_states.items()}

    def running(self) -> int:
        return self.replica_states().get("RUNNING", 0)

    def replicas(self) -> list[dict[str, Any]]:
        """Each replica: state, pid and node. Serve's public status has counts only; this reads the controller's
        details (``get_serve_details``, what ``serve status`` and the dashboard show), a private API."""
        details = serve.context._get_global_client().get_serve_details()
        deps = details.get("applications", {}).get(APP_NAME, {}).get("deployments", {})
        return [{"state": r["state"], "pid": r.get("pid"), "node_id": r.get("node_id"), "node_ip": r.get("node_ip")}
                for r in deps.get(DEPLOYMENT_NAME, {}).get("replicas", [])]

    def processes(self) -> list[psutil.Process]:
        return self.cluster.processes()

    def kill_replica_under_load(self, bodies: list[bytes], reference_top1: np.ndarray, *, concurrency: int = 8,
                                kill_after_s: float = 1.0, max_seconds: float = 30.0, settle_s: float = 1.0,
                                progress: bool = True) -> ReplicaFault:
        """SIGKILL one replica's process ``kill_after_s`` into a load run; time until Serve has replaced it.

        ``bodies[i]`` is the PNG of an image whose in-process top-1 is ``reference_top1[i]``: every 200
        answer is checked against it (a wrong answer would be worse than a failed one).
        """
        before = [r for r in self.replicas() if r["state"] == "RUNNING"]
        if not before:
            raise ServeError("no RUNNING replica to kill")
        victim = int(before[0]["pid"])
        if victim not in {p.pid for p in self.processes()}:
            raise ServeError(f"replica pid {victim} is not a process of this cluster; refusing to kill it")
        with self.client() as c:
            killed_at, replaced, load = kill_under_load(
                c, "student", bodies, victim,
                lambda: sum(r["state"] == "RUNNING" and r["pid"] != victim for r in self.replicas()) >= len(before),
                concurrency=concurrency, max_seconds=max_seconds, kill_after_s=kill_after_s, settle_s=settle_s,
                progress=progress, desc=f"Ray Serve x{concurrency}, one replica killed")
        wrong = sum(int(json.loads(body)["predictions"][0]["index"]) != int(reference_top1[i % len(bodies)])
                    for i, body in load.answers)
        return ReplicaFault(victim, killed_at, replaced, load.requests - load.ok, wrong, load)

    def stop(self, timeout_s: float = 5.0, *, graceful: bool = True) -> None:
        """Shut Serve down (``graceful``), stop the cluster; deletes the key; raises if a process survives."""
        with contextlib.suppress(Exception):
            if graceful and ray.is_initialized():
                serve.shutdown()
        try:
            self.cluster.stop(timeout_s)
        finally:
            self.key_file.unlink(missing_ok=True)
            forget_at_exit(self)

    def stop_now(self) -> None:
        """The exit path (interpreter exit, SIGTERM): no graceful Serve shutdown, the cluster stopped at once."""
        self.stop(EXIT_TIMEOUT_S, graceful=False)


def _pings(client: Client) -> bool:
    with contextlib.suppress(Exception):
        client.ping()
        return True
    return False

