"""Serverless style: a ``handler(event, context)`` function and its cold start, measured locally.

Cloud functions (AWS Lambda behind API Gateway, Google Cloud Functions, Azure Functions) call one
function per request with a JSON event and expect a JSON answer. We cannot deploy to a cloud here, so
this module gives the function in that shape and measures what can be measured on this machine:

- :func:`handler` -- takes an API-Gateway proxy event (``{"body": ..., "isBase64Encoded": ...,
  "headers": {"content-type": ...}}``), a base64 PNG/JPEG or a JSON pixel array; returns
  ``{"statusCode", "headers", "body"}``. The model is loaded once per process, on the first call
  (a warm instance reuses it), from the file named by the ``DEPLOYLAB_MODEL`` environment variable
  (a function's configuration) or :func:`configure`, run by the runtime ``DEPLOYLAB_RUNTIME`` names
  (``onnxruntime`` or ``executorch``; unset: from the file's suffix), through
  :func:`deploylab.serving.predictor.load`. Decoding and validation are
  :mod:`deploylab.serving.protocol` -- the same code as the TorchServe handler and the custom server;
  a malformed event gets a 4xx answer, never an exception (a function host would make that a 5xx).
- :func:`cold_start` -- starts a fresh Python process per repetition and times its phases: interpreter
  start, imports, model load, first prediction (what a cloud adds on top -- downloading the package,
  starting the sandbox -- cannot be measured here).
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import PackageNotFoundError, distribution, packages_distributions
from pathlib import Path
from typing import Any

import numpy as np

from .. import config
from . import predictor, protocol
from .protocol import BadRequest

MODEL_ENV = "DEPLOYLAB_MODEL"  # path of the .onnx or .pte file (its .card.json next to it)
RUNTIME_ENV = "DEPLOYLAB_RUNTIME"  # onnxruntime or executorch (unset: from the file's suffix)
THREADS_ENV = "DEPLOYLAB_THREADS"  # the runtime's intra-op threads (default 2: the function's cores)
TOP_K = 3

_STATE: dict[str, Any] = {}  # per process: the loaded model (a warm instance keeps it)


def configure(model_path: str | os.PathLike | None, threads: int | None = None, runtime: str | None = None) -> None:
    """Point the function at a model (as setting the function's environment would) and forget a loaded one.

    ``runtime``: ``onnxruntime`` or ``executorch`` (None: unset, the file's suffix decides).
    """
    _STATE.clear()
    if model_path is None:
        os.environ.pop(MODEL_ENV, None)
    else:
        os.environ[MODEL_ENV] = str(model_path)
    if threads is not None:
        os.environ[THREADS_ENV] = str(int(threads))
    if runtime is None:
        os.environ.pop(RUNTIME_ENV, None)
    else:
        if model_path is not None:
            predictor.runtime_for(model_path, runtime)  # a runtime that cannot run the file: a ValueError now, not at the first event
        elif runtime not in predictor.RUNTIMES:
            raise ValueError(f"unknown runtime {runtime!r}; choose one of {', '.join(predictor.RUNTIMES)}")
        os.environ[RUNTIME_ENV] = runtime


def model() -> predictor.Predictor:
    """The loaded model (:class:`~deploylab.serving.predictor.Predictor`), loaded and its card checked on the first call."""
    if "model" not in _STATE:
        path = os.environ.get(MODEL_ENV)
        if not path:
            raise RuntimeError(f"the function has no model: set {MODEL_ENV}=/path/to/student_fp32.onnx "
                               "(its .card.json next to it) or call serverless.configure(path)")
        threads = int(os.environ.get(THREADS_ENV, config.BENCH_THREADS))
        runtime = os.environ.get(RUNTIME_ENV) or None
        _STATE["model"] = predictor.load(path, runtime=runtime, threads=threads)  # sha256 checked against the card
    return _STATE["model"]


def _response(status: int, body: str) -> dict[str, Any]:
    return {"statusCode": status, "headers": {"Content-Type": "application/json"}, "body": body, "isBase64Encoded": False}


def _event_body(event: Any) -> tuple[bytes, str | None]:
    """The raw body bytes and content type of an API-Gateway proxy event (v1 or v2 payload)."""
    if not isinstance(event, dict):
        raise BadRequest(f"the event must be a JSON object with a 'body', got a {type(event).__name__}")
    body = event.get("body")
    if body is None:
        raise BadRequest("the event has no 'body': send the image (base64, isBase64Encoded=true) or a JSON pixel array")
    if not isinstance(body, str):
        raise BadRequest(f"the event's 'body' must be a string, got a {type(body).__name__}")
    headers = event.get("headers") or {}
    if not isinstance(headers, dict):
        raise BadRequest(f"the event's 'headers' must be an object of names and values, got a {type(headers).__name__}")
    content_type = {str(k).lower(): v for k, v in headers.items()}.get("content-type")
    if content_type is not None and not isinstance(content_type, str):
        raise BadRequest(f"the event's content-type header must be a string, got a {type(content_type).__name__}")
    if event.get("isBase64Encoded"):
        try:
            raw = base64.b64decode(body, validate=True)
        except ValueError:
            raise BadRequest("isBase64Encoded is true but the body is not valid base64") from None
    else:
        try:
            raw = body.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate: JSON allows it, UTF-8 does not
            raise BadRequest("the event's body is not valid Unicode text (a lone surrogate)") from None
    return raw, content_type


def handler(event: dict[str, Any], context: Any = None) -> dict[str, Any]:
    """The function: one API-Gateway event in, one JSON HTTP answer out (4xx with a message for bad input)."""
    try:
        raw, content_type = _event_body(event)
        x = protocol.model_input(protocol.decode_http(raw, content_type))
    except Exception as e:  # the boundary: a malformed event is the caller's 4xx, never a raise
        bad = protocol.refusal(e)
        return _response(bad.code, bad.body())
    logits = model().run(x)
    return _response(200, json.dumps(protocol.top_k(logits, TOP_K)[0]))


def event_from_image(image_bytes: bytes, content_type: str = "image/png") -> dict[str, Any]:
    """An API-Gateway proxy event carrying an image as base64 (binary bodies travel base64-encoded)."""
    return {"httpMethod": "POST", "path": "/predict", "headers": {"content-type": content_type},
            "body": base64.b64encode(image_bytes).decode("ascii"), "isBase64Encoded": True}


def event_from_body(body: bytes, content_type: str | None) -> dict[str, Any]:
    """An event for any HTTP body: text types travel as text, everything else base64-encoded."""
    ct = (content_type or "").lower()
    if ct.startswith(("application/json", "text/")):
        try:
            return {"httpMethod": "POST", "path": "/predict", "headers": {"content-type": content_type},
                    "body": body.decode("utf-8"), "isBase64Encoded": False}
        except UnicodeDecodeError:
            pass
    return {**event_from_image(body, content_type or "application/octet-stream")}


def event_from_pixels(pixels: np.ndarray) -> dict[str, Any]:
    """An event carrying a JSON pixel array ``{"pixels": [[...], ...]}``."""
    body = json.dumps({"pixels": np.asarray(pixels).astype(int).tolist()})
    return {"httpMethod": "POST", "path": "/predict", "headers": {"content-type": "application/json"},
            "body": body, "isBase64Encoded": False}


# --------------------------------------------------------------------------------------------
# Cold start, in fresh processes
# --------------------------------------------------------------------------------------------

_CHILD = r"""
import json, sys, time
t_start = time.time()
from deploylab.serving import serverless    # the function's module: deploylab, torch, numpy, PIL
import importlib, os
from deploylab.serving import predictor     # the runtime is imported lazily by the first call otherwise: count it here
runtime = predictor.runtime_for(os.environ["DEPLOYLAB_MODEL"], os.environ.get("DEPLOYLAB_RUNTIME") or None)
importlib.import_module(predictor.MODULES[runtime])
t_imported = time.time()
serverless.model()                          # read the file, check its sha256, build the session
t_loaded = time.time()
event = json.load(open(sys.argv[1]))
answer = serverless.handler(event, None)    # the first prediction of this instance
t_first = time.time()
import resource
rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
modules = sorted({m.split(".")[0] for m in sys.modules})
print("COLDSTART " + json.dumps({"t_start": t_start, "t_imported": t_imported, "t_loaded": t_loaded,
      "t_first": t_first, "status": answer["statusCode"], "body": answer["body"], "max_rss_bytes": rss_kb * 1024,
      "modules": modules}))
"""

PHASES = ("interpreter", "imports", "model load", "first prediction", "total")


@dataclass
class ColdStart:
    """Per-repetition phase times (s) of fresh processes, and what they answered."""

    phases: dict[str, list[float]] = field(default_factory=lambda: {p: [] for p in PHASES})
    statuses: list[int] = field(default_factory=list)
    answers: list[dict[str, Any]] = field(default_factory=list)
    max_rss_bytes: list[int] = field(default_factory=list)
    modules: list[str] = field(default_factory=list)  # top-level modules the function imported

    @property
    def repeats(self) -> int:
        return len(self.statuses)

    def percentile(self, phase: str = "total", q: float = 50) -> float:
        return float(np.percentile(self.phases[phase], q))

    def table(self) -> list[dict[str, Any]]:
        """One row per phase: p50, p90, max (s)."""
        return [{"phase": p, "p50 s": self.percentile(p, 50), "p90 s": self.percentile(p, 90), "max s": max(self.phases[p])}
                for p in PHASES]

    def to_dict(self) -> dict[str, Any]:
        return {"repeats": self.repeats, "phases_s": self.phases, "p50_s": {p: self.percentile(p, 50) for p in PHASES},
                "p90_s": {p: self.percentile(p, 90) for p in PHASES}, "max_rss_bytes": max(self.max_rss_bytes)}


# --------------------------------------------------------------------------------------------
# What a deployment must ship
# --------------------------------------------------------------------------------------------


def distributions_of(modules: list[str] | set[str]) -> list[str]:
    """The installed distributions (pip names) that provide these top-level modules; the standard
    library and modules of no distribution (deploylab itself when not installed) are left out."""
    mapping = packages_distributions()
    return sorted({d for m in modules for d in mapping.get(m, [])})


def install_bytes(distributions: list[str] | set[str]) -> dict[str, int]:
    """Bytes on disk of each installed distribution (every file its RECORD lists), largest first."""
    sizes = {}
    for name in distributions:
        try:
            dist = distribution(name)
        except PackageNotFoundError:
            continue
        total = 0
        for f in dist.files or []:
            path = Path(dist.locate_file(f))
            if path.is_file():
                total += path.stat().st_size
        sizes[name] = total
    return dict(sorted(sizes.items(), key=lambda kv: -kv[1]))


def tree_bytes(folder: str | os.PathLike) -> int:
    """Bytes of all files under ``folder`` (e.g. a Java runtime), links not followed."""
    total = 0
    for root, _, files in os.walk(folder):
        for f in files:
            p = Path(root) / f
            if p.is_file() and not p.is_symlink():
                total += p.stat().st_size
    return total


def cold_start(model_path: str | os.PathLike, event: dict[str, Any], *, repeats: int = 5, threads: int = config.BENCH_THREADS,
               timeout_s: float = 120.0, runtime: str | None = None) -> ColdStart:
    """Run the function ``repeats`` times, each in a NEW Python process, and time its phases.

    Times are wall-clock (``time.time()``) taken in the parent just before ``Popen`` and in the child
    at its first line, after the imports, after the model load and after the first answer.
    """
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    out = ColdStart()
    env = {**os.environ, MODEL_ENV: str(model_path), THREADS_ENV: str(threads), RUNTIME_ENV: runtime or "",
           "OMP_NUM_THREADS": str(threads), "PYTHONDONTWRITEBYTECODE": "1"}
    with tempfile.TemporaryDirectory(prefix="deploylab-cold-") as tmp:
        event_file = Path(tmp) / "event.json"
        event_file.write_text(json.dumps(event))
        for _ in range(repeats):
            t0 = time.time()
            done = subprocess.run([sys.executable, "-c", _CHILD, str(event_file)], capture_output=True, text=True,
                                  env=env, cwd=config.ROOT, timeout=timeout_s)
            line = next((ln for ln in done.stdout.splitlines() if ln.startswith("COLDSTART ")), None)
            if done.returncode != 0 or line is None:
                raise RuntimeError(f"the cold-start process failed ({done.returncode}): {done.stderr[-1500:]}")
            r = json.loads(line[len("COLDSTART "):])
            for phase, value in zip(PHASES, (r["t_start"] - t0, r["t_imported"] - r["t_start"], r["t_loaded"] - r["t_imported"],
                                             r["t_first"] - r["t_loaded"], r["t_first"] - t0)):
                out.phases[phase].append(value)
            out.statuses.append(int(r["status"]))
            out.answers.append(json.loads(r["body"]))
            out.max_rss_bytes.append(int(r["max_rss_bytes"]))
            out.modules = r["modules"]
    return out
