"""A real Prometheus for the lesson: its scrape configuration, the server itself, its HTTP API, promtool (lesson 09).

- :func:`scrape_config` -- the ``prometheus.yml`` of the lesson: global scrape and rule-evaluation
  intervals, the rule files, and one job per target (a bearer token read from a file where the
  target needs one);
- :class:`Prometheus` -- Debian's ``prometheus`` started on 127.0.0.1 at a free port with a temporary
  storage folder, in the kit's exit registry (:mod:`deploylab.serving.processes`), stopped leaving
  nothing behind; its HTTP API: instant and range queries (PromQL), targets, rules and alerts;
- :func:`promtool` -- ``promtool check rules`` / ``promtool test rules``;
- :func:`scaled_rules` -- the committed rules (``deploy/prometheus/rules.yml``) with shorter windows
  and ``for:`` durations, so that a lesson sees an alert go pending, fire and resolve in seconds.

Nothing here installs anything: without the binaries, :func:`binary` says how to get them.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

from .. import config
from ..files import atomic_path
from ..serving.processes import ServeError, ServerProcess, free_ports

RULES = config.ROOT / "deploy" / "prometheus" / "rules.yml"
RULES_TEST = config.ROOT / "deploy" / "prometheus" / "rules_test.yml"
HINT = ("Prometheus is not installed: on Debian/Ubuntu `sudo apt-get install prometheus` (it brings promtool; "
        "no service needs to run, the lesson starts its own); elsewhere download prometheus-2.x from "
        "https://prometheus.io/download/ and put `prometheus` and `promtool` on PATH")


def binary(name: str) -> str:
    """The path of ``prometheus`` or ``promtool``; a :class:`ServeError` saying how to install it otherwise."""
    found = shutil.which(name) or next((p for p in (f"/usr/bin/{name}", f"/usr/local/bin/{name}") if os.access(p, os.X_OK)), None)
    if not found:
        raise ServeError(HINT)
    return found


def missing() -> str | None:
    """None when both binaries are there, else the message that says how to get them."""
    try:
        binary("prometheus"), binary("promtool")
    except ServeError as e:
        return str(e)
    return None


def version() -> str:
    """The first line of ``prometheus --version``."""
    out = subprocess.run([binary("prometheus"), "--version"], capture_output=True, text=True, timeout=30)
    return (out.stdout or out.stderr).splitlines()[0]


# --------------------------------------------------------------------------------------------
# Configuration and rules
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """One scrape job: ``job`` name, ``host:port`` addresses, the metrics path, and optionally a file
    holding the bearer token (read by Prometheus at each scrape, never written into the configuration)."""

    job: str
    addresses: tuple[str, ...]
    metrics_path: str = "/metrics"
    token_file: str | None = None
    labels: dict[str, str] = field(default_factory=dict)


def scrape_config(targets: list[Target], *, scrape_interval: str = "15s", evaluation_interval: str = "15s",
                  rule_files: list[str] = ()) -> dict[str, Any]:
    """``prometheus.yml`` as a dict: global intervals, rule files, one ``static_configs`` job per target."""
    jobs = []
    for t in targets:
        job: dict[str, Any] = {"job_name": t.job, "metrics_path": t.metrics_path,
                               "static_configs": [{"targets": list(t.addresses), **({"labels": t.labels} if t.labels else {})}]}
        if t.token_file:
            job["authorization"] = {"type": "Bearer", "credentials_file": t.token_file}
        jobs.append(job)
    return {"global": {"scrape_interval": scrape_interval, "scrape_timeout": scrape_interval,
                       "evaluation_interval": evaluation_interval},
            "rule_files": list(rule_files), "scrape_configs": jobs}


def write_token_file(path: str | os.PathLike, token: str) -> Path:
    """``token`` alone in a file readable by its owner only (created 0600): Prometheus' ``credentials_file``."""
    path = Path(path)
    path.unlink(missing_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    return path


_WINDOW = re.compile(r"\[(\d+[smhdw])\]")


def scaled_rules(rules: dict[str, Any], durations: dict[str, str]) -> dict[str, Any]:
    """A copy of a rules file (parsed) with each range window ``[1h]`` and ``for:`` duration replaced by
    ``durations[...]`` (e.g. ``{"1h": "30s", "5m": "6s", "2m": "3s"}``); durations not named stay.

    The committed rules keep production windows; a lesson needs the same expressions over seconds.
    """
    out = yaml.safe_load(yaml.safe_dump(rules))
    for group in out["groups"]:
        for rule in group["rules"]:
            rule["expr"] = _WINDOW.sub(lambda m: f"[{durations.get(m.group(1), m.group(1))}]", rule["expr"])
            if "for" in rule:
                rule["for"] = durations.get(rule["for"], rule["for"])
    return out


def write_yaml(path: str | os.PathLike, content: dict[str, Any]) -> Path:
    """``content`` as YAML at ``path``, written to a temporary file and renamed."""
    path = Path(path)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(yaml.safe_dump(content, sort_keys=False, width=200))
    return path


def promtool(*args: str | os.PathLike, timeout_s: float = 60.0) -> subprocess.CompletedProcess:
    """``promtool ARGS`` (e.g. ``"check", "rules", path`` or ``"test", "rules", path``); never raises on failure."""
    return subprocess.run([binary("promtool"), *map(str, args)], capture_output=True, text=True, timeout=timeout_s)


# --------------------------------------------------------------------------------------------
# The server and its API
# --------------------------------------------------------------------------------------------


class PrometheusError(RuntimeError):
    """Prometheus answered a query with an error."""


class Prometheus:
    """Debian's ``prometheus`` on 127.0.0.1 at a free port, storing into a temporary folder (a context manager).

    ``config`` is a dict from :func:`scrape_config`; ``rules`` (file name -> parsed rule file) are written
    beside it and named in its ``rule_files`` if they are not already. The storage folder is deleted by :meth:`stop`.
    """

    def __init__(self, config: dict[str, Any], *, rules: dict[str, dict[str, Any]] | None = None,
                 workdir: str | os.PathLike | None = None, start_timeout_s: float = 30.0):
        self.config, self.rules = config, dict(rules or {})
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="deploylab-prometheus-"))
        self.start_timeout_s = start_timeout_s
        self.port: int | None = None
        self.ready_s: float | None = None
        self.process = ServerProcess("Prometheus", self.workdir / "prometheus.log")
        self._http = httpx.Client(timeout=10.0, trust_env=False)

    @property
    def config_file(self) -> Path:
        return self.workdir / "prometheus.yml"

    @property
    def storage(self) -> Path:
        return self.workdir / "data"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "Prometheus":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def command(self) -> list[str]:
        """The command line: the configuration, a private storage folder, loopback only, warnings in the log."""
        return [binary("prometheus"), f"--config.file={self.config_file}", f"--storage.tsdb.path={self.storage}",
                f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn", "--storage.tsdb.retention.time=1d"]

    def start(self) -> "Prometheus":
        """Write the configuration and rules, check them with promtool, launch, wait until ``/-/ready``."""
        if self.process.proc is not None:
            raise ServeError("this Prometheus is already started")
        self.workdir.mkdir(parents=True, exist_ok=True)
        listed = list(self.config.get("rule_files", []))
        for name, content in self.rules.items():  # beside the configuration: Prometheus reads relative names from there
            write_yaml(self.workdir / name, content)
            if name not in listed:
                listed.append(name)
        write_yaml(self.config_file, {**self.config, "rule_files": listed})
        checked = promtool("check", "config", self.config_file)
        if checked.returncode != 0:
            raise ServeError(f"promtool check config failed:\n{checked.stdout}{checked.stderr}")
        self.port = free_ports(1)[0]
        t0 = time.perf_counter()
        self.process.launch(self.command(), cwd=self.workdir, env=dict(os.environ))
        try:
            self.process.wait_until(self._ready, self.start_timeout_s, poll_s=0.1)
        except BaseException:
            self.stop()
            raise
        self.ready_s = time.perf_counter() - t0
        return self

    def _ready(self) -> bool:
        try:
            return self._http.get(f"{self.url}/-/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self, timeout_s: float = 15.0) -> None:
        """SIGTERM (Prometheus flushes and exits), SIGKILL after ``timeout_s``; the storage folder is deleted."""
        try:
            self.process.stop(timeout_s)
        finally:
            shutil.rmtree(self.storage, ignore_errors=True)

    def processes(self) -> list:
        """The live process of this Prometheus (for its CPU time and memory)."""
        return self.process.processes()

    # the HTTP API ----------------------------------------------------------------------------
    def api(self, path: str, **params: Any) -> Any:
        """``GET /api/v1/<path>``: its ``data``, or :class:`PrometheusError` with Prometheus' message."""
        r = self._http.get(f"{self.url}/api/v1/{path}", params=params)
        body = r.json()
        if body.get("status") != "success":
            raise PrometheusError(f"{path} {params}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str, at: float | None = None) -> list[dict[str, Any]]:
        """An instant query: ``[{"metric": {...}, "value": [t, "v"]}, ...]``."""
        return self.api("query", query=expr, **({"time": at} if at is not None else {}))["result"]

    def value(self, expr: str, at: float | None = None) -> float | None:
        """The single value of an instant query (None when it returns no series)."""
        result = self.query(expr, at)
        if len(result) > 1:
            raise PrometheusError(f"{expr} returned {len(result)} series, expected one")
        return float(result[0]["value"][1]) if result else None

    def query_range(self, expr: str, start: float, end: float, step: float) -> list[dict[str, Any]]:
        """A range query: ``[{"metric": {...}, "values": [[t, "v"], ...]}, ...]``."""
        return self.api("query_range", query=expr, start=start, end=end, step=step)["result"]

    def series(self, expr: str, start: float, end: float, step: float) -> tuple[list[float], list[float]]:
        """The one series of a range query as (times, values); empty lists when there is none."""
        result = self.query_range(expr, start, end, step)
        if not result:
            return [], []
        return [float(t) for t, _ in result[0]["values"]], [float(v) for _, v in result[0]["values"]]

    def targets(self) -> list[dict[str, Any]]:
        """The active scrape targets with their ``health`` (up/down/unknown) and ``lastError``."""
        return self.api("targets")["activeTargets"]

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (``state`` pending or firing, ``activeAt``, labels, annotations, value)."""
        return self.api("alerts")["alerts"]

    def rule_groups(self) -> list[dict[str, Any]]:
        """The loaded rule groups with each rule's health and last evaluation."""
        return self.api("rules")["groups"]

    def wait_for_targets(self, timeout_s: float = 20.0) -> list[dict[str, Any]]:
        """Wait until every target has been scraped successfully; raise with their errors otherwise."""
        deadline = time.monotonic() + timeout_s
        while True:
            targets = self.targets()
            if targets and all(t["health"] == "up" for t in targets):
                return targets
            if time.monotonic() > deadline:
                raise ServeError("targets not up: " + "; ".join(f"{t['labels'].get('job')}: {t['health']} {t['lastError']}"
                                                                 for t in targets))
            time.sleep(0.2)
