"""The rollout router (lesson 10): one URL in front of the served version and a candidate.

A small ASGI app (Starlette on uvicorn, the same HTTP door as the custom server: bearer token,
bounded body, header deadline) that forwards ``POST /predictions/<model>`` to model servers:

- **canary**: a share ``weight`` of the requests is answered by the candidate, exactly (request
  ``n`` goes to the candidate when ``floor((n+1) w) > floor(n w)``: 1 in 10 at 10%, never a run of
  luck). The same request is also sent to the served version, whose answer is compared with the
  candidate's (top-1 agreement) and discarded: what the controller's agreement rule reads;
- **shadow**: every request is answered by the served version; a copy goes to the candidate in the
  background, its answer compared and never returned;
- **swap**: ``stable`` is replaced; requests already sent to the old one finish there (it is
  *draining*), new ones go to the new one. ``GET /admin/state`` says how many are still in flight
  on each draining version; stop the old server only when that reaches 0.

Every answer (served or compared) is logged in memory -- time, version, role, status, latency,
agreement -- and read by the controller through ``GET /admin/log?since=N``. The admin endpoints take
a second key (the management key, as TorchServe's): whoever can send predictions cannot reroute them.

Why a router of our own and not nginx or haproxy: both split traffic by weight (nginx
``split_clients``, haproxy ``weight``) and nginx can mirror requests, but neither compares two
versions' answers to the same request -- the agreement a model rollout is judged on -- because a
mirrored answer is discarded unread. The split, the drain and the retry are what a learner copies
into nginx or a service mesh; the comparison needs code that sees both answers, as this does.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from ..serving.header_timeout import KEEP_ALIVE_S, header_timeout_protocol
from ..serving.http_input import UNAUTHORIZED, authorized, error_body, error_response, expected_header, read_body
from ..serving.protocol import BadRequest

UPSTREAM_TIMEOUT_S = 10.0
LOG_LIMIT = 200_000  # answers kept in memory (a run of the lesson logs a few thousand)


@dataclass
class Backend:
    """One model server behind the router: its version label, URL and bearer key; requests in flight."""

    version: str
    url: str
    key: str
    inflight: int = 0

    @classmethod
    def from_spec(cls, spec: dict[str, str]) -> "Backend":
        """``{"version", "url", "key_file"}``: the key is read from the server's key file, never passed around."""
        key = json.loads(Path(spec["key_file"]).read_text())["inference"]["key"]
        return cls(spec["version"], spec["url"].rstrip("/"), key)


@dataclass
class Answer:
    """What one backend answered (``status`` None: it could not be reached or did not answer in time)."""

    status: int | None
    body: bytes
    latency_s: float
    error: str = ""

    def top1(self) -> int | None:
        """The predicted class index of a 200 answer, else None."""
        if self.status != 200:
            return None
        try:
            return int(json.loads(self.body)["predictions"][0]["index"])
        except (ValueError, KeyError, IndexError, TypeError):
            return None


class RouterState:
    """The routing table and the answer log; changed only by the admin endpoints."""

    def __init__(self, stable: Backend):
        self.stable, self.candidate = stable, None
        self.weight, self.shadow, self.n = 0.0, False, 0
        self.draining: list[Backend] = []
        self.log: list[dict[str, Any]] = []
        self.t0 = time.monotonic()

    def to_candidate(self) -> bool:
        """The exact share: request n goes to the candidate when floor((n+1) w) > floor(n w)."""
        if self.candidate is None or self.shadow or self.weight <= 0:
            return False
        n, self.n = self.n, self.n + 1
        return int((n + 1) * self.weight) > int(n * self.weight)

    def record(self, backend: Backend, role: str, served: bool, answer: Answer, agree: bool | None) -> None:
        """Keep one answer for the controller (bounded: the oldest go first)."""
        if len(self.log) >= LOG_LIMIT:
            del self.log[: LOG_LIMIT // 10]
        self.log.append({"t": round(time.monotonic() - self.t0, 4), "version": backend.version, "role": role,
                         "served": served, "status": answer.status, "latency_ms": round(1e3 * answer.latency_s, 3),
                         "agree": agree, "error": answer.error})


def forward(client: httpx.AsyncClient, backend: Backend, path: str, body: bytes, content_type: str | None) -> Awaitable[Answer]:
    """Send the request to ``backend`` with its own key; a transport failure is an Answer with status None.

    The request counts as in flight on ``backend`` from this call on, before anything is awaited:
    a swap that happens before the coroutine first runs (``asyncio.gather`` schedules it) still
    finds it in flight and waits for it.
    """
    backend.inflight += 1
    return _send(client, backend, path, body, content_type)


async def _send(client: httpx.AsyncClient, backend: Backend, path: str, body: bytes, content_type: str | None) -> Answer:
    t0 = time.perf_counter()
    try:
        headers = {"Authorization": f"Bearer {backend.key}", "Content-Type": content_type or "application/octet-stream"}
        r = await client.post(f"{backend.url}{path}", content=body, headers=headers)
        return Answer(r.status_code, r.content, time.perf_counter() - t0)
    except httpx.HTTPError as e:
        return Answer(None, b"", time.perf_counter() - t0, type(e).__name__)
    finally:
        backend.inflight -= 1


def agreement(a: Answer, b: Answer) -> bool | None:
    """Do both answers name the same top-1 class? None when either is not a prediction."""
    x, y = a.top1(), b.top1()
    return None if x is None or y is None else x == y


def to_response(answer: Answer, backend: Backend) -> Response:
    """The backend's answer as the client's, with the version that produced it; 502 if it never came."""
    headers = {"X-Model-Version": backend.version}
    if answer.status is None:
        return Response(error_body(502, f"model version {backend.version} could not be reached ({answer.error})"),
                        status_code=502, media_type="application/json", headers=headers)
    return Response(answer.body, status_code=answer.status, media_type="application/json", headers=headers)


def create_app(stable: dict[str, str], *, key: str, admin_key: str) -> Starlette:
    """The router app: ``stable`` is the served version's spec (see :meth:`Backend.from_spec`)."""
    expected, expected_admin = expected_header(key), expected_header(admin_key)
    state = RouterState(Backend.from_spec(stable))
    res: dict[str, Any] = {"tasks": set()}

    @contextlib.asynccontextmanager
    async def lifespan(app):
        limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
        res["client"] = httpx.AsyncClient(timeout=UPSTREAM_TIMEOUT_S, limits=limits, trust_env=False)
        yield
        await res["client"].aclose()

    async def shadow_copy(candidate: Backend, path: str, body: bytes, ctype: str | None, served: Answer) -> None:
        answer = await forward(res["client"], candidate, path, body, ctype)
        state.record(candidate, "shadow", False, answer, agreement(answer, served))

    async def predict(request):
        if not authorized(request.headers, expected):
            return error_response(401, UNAUTHORIZED)
        try:
            body = await read_body(request)
        except BadRequest as e:
            return Response(e.body(), status_code=e.code, media_type="application/json")
        path, ctype = request.url.path, request.headers.get("content-type")
        stable, candidate = state.stable, state.candidate
        if candidate is not None and state.to_candidate():
            answer, reference = await asyncio.gather(forward(res["client"], candidate, path, body, ctype),
                                                     forward(res["client"], stable, path, body, ctype))
            state.record(candidate, "candidate", True, answer, agreement(answer, reference))
            state.record(stable, "reference", False, reference, None)
            return to_response(answer, candidate)
        answer = await forward(res["client"], stable, path, body, ctype)
        state.record(stable, "stable", True, answer, None)
        if candidate is not None and state.shadow:
            task = asyncio.get_running_loop().create_task(shadow_copy(candidate, path, body, ctype, answer))
            res["tasks"].add(task)
            task.add_done_callback(res["tasks"].discard)
        return to_response(answer, stable)

    async def ping(request):
        if not authorized(request.headers, expected):
            return error_response(401, UNAUTHORIZED)
        return JSONResponse({"status": "Healthy", "stable": state.stable.version})

    def describe() -> dict[str, Any]:
        state.draining = [b for b in state.draining if b.inflight > 0]  # drained ones are forgotten
        return {"t": round(time.monotonic() - state.t0, 4),
                "stable": state.stable.version, "candidate": state.candidate.version if state.candidate else None,
                "weight": state.weight, "shadow": state.shadow, "logged": len(state.log),
                "inflight": {b.version: b.inflight for b in (state.stable, state.candidate) if b is not None},
                "draining": {b.version: b.inflight for b in state.draining}}

    async def admin_state(request):
        if not authorized(request.headers, expected_admin):
            return error_response(401, UNAUTHORIZED)
        if request.method == "POST":
            change = json.loads(await read_body(request))
            if "stable" in change:  # the swap: the old version drains, new requests go to the new one
                old, state.stable = state.stable, Backend.from_spec(change["stable"])
                if old.version != state.stable.version and old is not state.candidate:
                    state.draining.append(old)
            if "candidate" in change:
                state.candidate = Backend.from_spec(change["candidate"]) if change["candidate"] else None
            if "weight" in change:
                state.weight, state.n = min(max(float(change["weight"]), 0.0), 1.0), 0
            if "shadow" in change:
                state.shadow = bool(change["shadow"])
        return JSONResponse(describe())

    async def admin_log(request):
        if not authorized(request.headers, expected_admin):
            return error_response(401, UNAUTHORIZED)
        since = int(request.query_params.get("since", 0))
        return JSONResponse({"records": state.log[since:], "next": len(state.log)})

    routes = [Route("/ping", ping, methods=["GET"]), Route("/predictions/{model}", predict, methods=["POST"]),
              Route("/admin/state", admin_state, methods=["GET", "POST"]), Route("/admin/log", admin_log, methods=["GET"])]
    return Starlette(routes=routes, lifespan=lifespan)


def main(argv: list[str] | None = None) -> None:
    """``python -m deploylab.ops.router --port 8090 --key-file key.json --admin-key-file admin.json --stable stable.json``"""
    from ..serving.asgi import write_key_file  # the one key-file writer of the kit

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--key-file", required=True, help="where to write the generated bearer key for predictions (0600)")
    p.add_argument("--admin-key-file", required=True, help="where to write the generated key for /admin (0600)")
    p.add_argument("--stable", required=True, help="JSON file: the served version's {version, url, key_file}")
    a = p.parse_args(argv)
    stable = json.loads(Path(a.stable).read_text())
    key, admin_key = write_key_file(a.key_file), write_key_file(a.admin_key_file)
    try:
        uvicorn.run(create_app(stable, key=key, admin_key=admin_key), host="127.0.0.1", port=a.port, log_level="warning",
                    access_log=False, http=header_timeout_protocol(), timeout_keep_alive=KEEP_ALIVE_S)
    finally:
        for f in (a.key_file, a.admin_key_file):
            Path(f).unlink(missing_ok=True)



class RouterServer:
    """The router as a subprocess in its own process group (a context manager), in the kit's exit registry.

    ``stable`` is the served model server (an :class:`~deploylab.serving.asgi.AsgiServer` or anything
    with ``url`` and ``key_file``); :meth:`configure` changes the routing through the admin API.
    """

    def __init__(self, stable: Any, *, version: str, workdir: str | os.PathLike | None = None, start_timeout_s: float = 60.0):
        import tempfile

        from ..serving.processes import ServerProcess

        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="deploylab-router-"))
        self.key_file, self.admin_key_file = self.workdir / "key_file.json", self.workdir / "admin_key_file.json"
        self.stable_spec = spec(stable, version)
        self.start_timeout_s, self.port = start_timeout_s, None
        self.process = ServerProcess("the rollout router", self.workdir / "router.log", secrets=[self.key_file, self.admin_key_file])

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "RouterServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> "RouterServer":
        """Launch the router and wait until /ping answers with its key."""
        import sys

        from .. import config
        from ..files import atomic_write_json
        from ..serving.processes import free_ports

        self.workdir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.workdir / "stable.json", self.stable_spec)
        self.port = free_ports(1)[0]
        cmd = [sys.executable, "-m", "deploylab.ops.router", "--port", str(self.port), "--key-file", str(self.key_file),
               "--admin-key-file", str(self.admin_key_file), "--stable", str(self.workdir / "stable.json")]
        self.process.launch(cmd, cwd=config.ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        try:
            self.process.wait_until(self._ready, self.start_timeout_s, poll_s=0.05)
        except BaseException:
            self.stop()
            raise
        return self

    def _ready(self) -> bool:
        if not (self.key_file.is_file() and self.admin_key_file.is_file()):
            return False
        try:
            return httpx.get(f"{self.url}/ping", headers={"Authorization": f"Bearer {self.key()}"}, timeout=2,
                             trust_env=False).status_code == 200
        except (httpx.HTTPError, ValueError, KeyError):
            return False

    def key(self) -> str:
        """The bearer key clients send predictions with."""
        return json.loads(self.key_file.read_text())["inference"]["key"]

    def _admin(self, method: str, path: str, **kwargs: Any) -> Any:
        admin_key = json.loads(self.admin_key_file.read_text())["inference"]["key"]
        r = httpx.request(method, f"{self.url}{path}", headers={"Authorization": f"Bearer {admin_key}"}, timeout=10,
                          trust_env=False, **kwargs)
        r.raise_for_status()
        return r.json()

    def configure(self, **change: Any) -> dict[str, Any]:
        """Change the routing: ``stable``/``candidate`` (specs from :func:`spec`, or None), ``weight``, ``shadow``."""
        return self._admin("POST", "/admin/state", json=change)

    def state(self) -> dict[str, Any]:
        """The router's clock (``t``, the log's), versions, share, shadow flag, requests in flight per version and per draining version."""
        return self._admin("GET", "/admin/state")

    def log(self, since: int = 0) -> tuple[list[dict[str, Any]], int]:
        """The answers logged from ``since`` on, and the index to ask from next time."""
        out = self._admin("GET", "/admin/log", params={"since": since})
        return out["records"], out["next"]

    def processes(self) -> list[Any]:
        return self.process.processes()

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM to the router's process group (uvicorn finishes requests in flight), SIGKILL after ``timeout_s``."""
        self.process.stop(timeout_s)


def spec(server: Any, version: str) -> dict[str, str]:
    """How the router reaches a model server: its version label, URL and key file (the key itself stays in the file)."""
    return {"version": version, "url": server.url, "key_file": str(server.key_file)}

if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
