"""The HTTP client every server is driven with, and the parser of Prometheus metrics.

:class:`Client` speaks TorchServe's URLs (``GET /ping``, ``POST /predictions/<model>``, the management
API's ``/models/<model>``, ``/metrics``) with the right bearer token for each API; the course's other
servers speak the same URLs, so the load generator and the bad-input corpus drive all of them with
this one client. It talks to loopback only.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import httpx
import numpy as np

from .processes import ServeError
from .protocol import png_bytes


class Client:
    """Calls the inference, management and metrics APIs with the right bearer token each.

    Thread-safe (one ``httpx.Client`` with a connection pool), so the load generator shares it.
    Keys that expire (TorchServe's, after ``token_expiration_min``): given ``renew``, a callable that
    returns the current ``{"inference": key, "management": key}`` (renewing them if it must), a
    request refused for its token is sent once more with the renewed key.
    """

    def __init__(self, inference_url: str, management_url: str, metrics_url: str, *, inference_key: str | None,
                 management_key: str | None, timeout_s: float = 30.0, max_connections: int = 64,
                 renew: Callable[[], dict[str, str]] | None = None):
        for url in (inference_url, management_url, metrics_url):
            if not url.startswith(("http://127.0.0.1:", "http://localhost:", "http://[::1]:")):
                raise ValueError(f"this client only talks to a server on loopback, not {url}")
        self.inference_url, self.management_url, self.metrics_url = inference_url, management_url, metrics_url
        self._set_keys({"inference": inference_key, "management": management_key})
        self.renew, self.renewals = renew, 0
        limits = httpx.Limits(max_connections=max_connections, max_keepalive_connections=max_connections)
        self.http = httpx.Client(timeout=timeout_s, limits=limits, trust_env=False)

    def _set_keys(self, keys: dict[str, str | None]) -> None:
        self._inference_headers = {"Authorization": f"Bearer {keys['inference']}"} if keys.get("inference") else {}
        self._management_headers = {"Authorization": f"Bearer {keys['management']}"} if keys.get("management") else {}

    def _send(self, method: str, url: str, api: str, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
        """One request with the ``api``'s key ("inference" or "management"); renewed once if its key is refused."""
        for attempt in (0, 1):
            keyed = {**(self._inference_headers if api == "inference" else self._management_headers), **(headers or {})}
            r = self.http.request(method, url, headers=keyed, **kwargs)
            if attempt or self.renew is None or not token_refused(r):
                return r
            self._set_keys(self.renew())
            self.renewals += 1
        return r

    def token(self, api: str = "inference") -> str | None:
        """The bearer token this client sends to ``api`` ("inference" or "management"), None without one
        (the load generator builds its requests with it)."""
        headers = self._inference_headers if api == "inference" else self._management_headers
        return headers["Authorization"].removeprefix("Bearer ") if headers else None

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def ping(self) -> dict[str, Any]:
        r = self._send("GET", f"{self.inference_url}/ping", "inference")
        r.raise_for_status()
        return r.json()

    def predict(self, model: str, body: bytes | str | list | dict, content_type: str | None = None):
        """POST one request to ``/predictions/<model>``; returns the ``httpx.Response`` (any status)."""
        if isinstance(body, (list, dict)):
            body, content_type = json.dumps(body).encode(), content_type or "application/json"
        elif isinstance(body, str):
            body = body.encode()
        headers = {"Content-Type": content_type} if content_type else {}
        return self._send("POST", f"{self.inference_url}/predictions/{model}", "inference", headers, content=body)

    def top1(self, model: str, image: np.ndarray) -> int:
        """The served top-1 class index of one uint8 image (sent as PNG); raises on a non-200 answer."""
        r = self.predict(model, png_bytes(image), "image/png")
        if r.status_code != 200:
            raise ServeError(f"prediction failed with {r.status_code}: {r.text[:300]}")
        return int(r.json()["predictions"][0]["index"])

    def describe(self, model: str) -> dict[str, Any]:
        """The management API's description of ``model`` (workers with pid and status, batch size...)."""
        r = self._send("GET", f"{self.management_url}/models/{model}", "management")
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
        r = self._send("PUT", f"{self.management_url}/models/{model}", "management", params=params, timeout=timeout_s + 10)
        r.raise_for_status()
        return r.json()

    def metrics(self) -> str:
        """The metrics endpoint's Prometheus text."""
        r = self._send("GET", f"{self.metrics_url}/metrics", "management")
        r.raise_for_status()
        return r.text


def token_refused(r: httpx.Response) -> bool:
    """The server refused the request's bearer token: 401, or TorchServe's 400 "Token Authorization failed"."""
    return r.status_code == 401 or (r.status_code == 400 and "token" in r.text.lower())


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


