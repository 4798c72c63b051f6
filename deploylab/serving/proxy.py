"""Lesson 06's reverse proxy: nginx with TLS in front of TorchServe, run with Compose, probed and measured.

The technique is in ``docker/``: ``nginx.conf`` (timeouts, limits, Retry-After, the two URLs, the
bearer key), ``proxy.Dockerfile`` (nginx-light on the kit's Debian base, non-root), ``compose.yaml``
(TorchServe on an internal network with token authorization off, the proxy the only published port).
This module is the plumbing around it:

- :func:`make_secrets` -- a local certificate authority, the proxy's certificate signed by it, and
  the clients' bearer key (the ``cryptography`` package; the CA's private key is never written);
- :func:`build_proxy_image` -- ``docker build -f docker/proxy.Dockerfile``;
- :class:`Stack` -- ``docker-compose up`` / ``down`` of the stack, its health, a verified HTTPS client,
  the containers' addresses and CPU time (cgroup);
- :func:`raw_exchange` -- bytes over one TLS connection, for requests no HTTP client would send;
- :func:`measure_cost` -- the same requests straight to TorchServe and through the proxy, interleaved.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import math
import os
import secrets
import shutil
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from .. import config
from ..config import Profile
from . import docker_build
from .engine import ContainerError, docker, ensure_base_image
from .processes import forget_at_exit, free_ports, stop_at_exit

PROXY_IMAGE = "deploylab-proxy:bookworm"
PROXY_DOCKERFILE = docker_build.DOCKER_DIR / "proxy.Dockerfile"
NGINX_CONF = docker_build.DOCKER_DIR / "nginx.conf"
COMPOSE_FILE = docker_build.DOCKER_DIR / "compose.yaml"
PROXY_PORT, TORCHSERVE_PORT = 8443, 8080  # inside the containers
SERVER_NAMES = ("localhost", "proxy", "deploylab-proxy")  # compose service, Kubernetes Service
PREDICT = f"/predictions/{docker_build.MODEL}"


@dataclass(frozen=True)
class ProxySizes:
    """How long the cost measurement runs: rounds x requests per variant (4 variants), open loop at
    ``rate_per_s`` (far below the proxy's limit of 100 requests/s per client: no request is refused)."""

    rounds: int
    requests: int
    rate_per_s: float = 20.0  # one request every 50 ms: a lone prediction takes ~20 ms (10 of them TorchServe's batch delay)
    warmup: int = 10


SIZES: dict[str, ProxySizes] = {
    "smoke": ProxySizes(rounds=2, requests=10, warmup=4),
    "workshop": ProxySizes(rounds=12, requests=40),
    "full": ProxySizes(rounds=20, requests=75),
}


def sizes(profile: Profile) -> ProxySizes:
    """The proxy measurement's sizes for ``profile``."""
    return SIZES[profile.name]


# --------------------------------------------------------------------------------------------
# Secrets: a local CA, the proxy's certificate, the bearer key
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ProxySecrets:
    """``ca`` is what clients trust; ``folder`` (tls.crt, tls.key, key) is mounted into the proxy."""

    ca: Path
    folder: Path
    key: str


def make_secrets(root: str | os.PathLike, *, names: tuple[str, ...] = SERVER_NAMES, days: int = 30) -> ProxySecrets:
    """Write ``root/ca.crt`` and ``root/secrets/{tls.crt,tls.key,key}``; returns their paths and the key.

    The CA (EC P-256, ``CA:TRUE, pathlen:0``) signs one server certificate for ``names`` and
    127.0.0.1, then its private key is dropped: nothing else can ever be signed with it. ``root`` is
    made 0700 (no other user of the host gets in); the files inside ``secrets/`` are 0644, because
    the folder is mounted into a container whose nginx runs as another user id than the host's owner.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    root = Path(root)
    folder = root / "secrets"
    folder.mkdir(parents=True, exist_ok=True)
    root.chmod(0o700)
    folder.chmod(0o755)
    now = dt.datetime.now(dt.timezone.utc)
    ca_key, leaf_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "deploylab lesson 06 local CA")])
    ca_ski = x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key())
    ca = (x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
          .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=5))
          .not_valid_after(now + dt.timedelta(days=days))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                       data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                                       encipher_only=False, decipher_only=False), critical=True)
          .add_extension(ca_ski, critical=False)
          .sign(ca_key, hashes.SHA256()))
    sans = [x509.DNSName(n) for n in names] + [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    leaf = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
            .issuer_name(ca_name).public_key(leaf_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                         crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(leaf_key.public_key()), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
            .sign(ca_key, hashes.SHA256()))
    key = secrets.token_urlsafe(32)
    pem = serialization.Encoding.PEM
    files = {root / "ca.crt": ca.public_bytes(pem), folder / "tls.crt": leaf.public_bytes(pem),
             folder / "tls.key": leaf_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()),
             folder / "key": key.encode()}
    for path, content in files.items():
        path.write_bytes(content)
        path.chmod(0o644)
    return ProxySecrets(root / "ca.crt", folder, key)


def tls_context(ca: str | os.PathLike) -> ssl.SSLContext:
    """A client context that trusts exactly ``ca`` (hostnames checked, TLS 1.2 at least)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


def build_proxy_image(tag: str = PROXY_IMAGE, **kw: Any) -> docker_build.BuildResult:
    """``docker build -f docker/proxy.Dockerfile -t <tag>`` on the kit's Debian base (cached layers reused)."""
    return docker_build.build_image(tag, dockerfile=PROXY_DOCKERFILE, **kw)


# --------------------------------------------------------------------------------------------
# The stack
# --------------------------------------------------------------------------------------------


def compose_bin() -> str:
    """``docker-compose`` (v1, Debian's) or raises with how to get it."""
    exe = shutil.which("docker-compose")
    if exe is None:
        raise ContainerError("docker-compose is not installed: `apt-get install docker-compose` (make setup does it as root)")
    return exe


def cpu_ns(pids: list[int]) -> int:
    """CPU time (ns) the processes ``pids`` have run so far: the sum over their threads of
    ``/proc/<pid>/task/<tid>/schedstat`` (nanoseconds; ``/proc/<pid>/stat`` counts 10 ms ticks). A
    thread or process that is gone counts 0, so compare the same list before and after."""
    total = 0
    for pid in pids:
        for stat in Path(f"/proc/{pid}/task").glob("*/schedstat"):
            try:
                total += int(stat.read_text().split()[0])
            except (OSError, ValueError, IndexError):
                pass
    return total


@dataclass(eq=False)  # identity, not field equality: kept in the exit registry (a WeakSet)
class Stack:
    """``docker/compose.yaml`` brought up as project ``project``: TorchServe behind the TLS proxy."""

    secrets: ProxySecrets
    image_tag: str = "workshop"  # the serving image deploylab-serve:<image_tag>
    project: str = field(default_factory=lambda: f"deploylab-proxy-{os.getpid()}")
    port: int | None = None  # the proxy's port on the host's loopback (a free one when None)
    started_at: float | None = None

    def env(self) -> dict[str, str]:
        return {**os.environ, "DEPLOYLAB_PROFILE": self.image_tag, "DEPLOYLAB_PROXY_PORT": str(self.port),
                "DEPLOYLAB_PROXY_SECRETS": str(self.secrets.folder.resolve())}

    def compose(self, *args: str, timeout_s: float = 240, check: bool = True) -> str:
        """``docker-compose -p <project> -f docker/compose.yaml <args>``; its stdout (and stderr unless ``check``)."""
        done = subprocess.run([compose_bin(), "-p", self.project, "-f", str(COMPOSE_FILE), *args], env=self.env(),
                              capture_output=True, text=True, timeout=timeout_s)
        if check and done.returncode != 0:
            raise ContainerError(f"docker-compose {' '.join(args)} failed: {done.stderr.strip()[-1500:]}")
        return done.stdout if check else done.stdout + done.stderr

    def __enter__(self) -> "Stack":
        return self.up()

    def __exit__(self, *exc) -> None:
        self.down()

    def up(self, timeout_s: float = 240) -> "Stack":
        """``up -d --no-build`` (the proxy starts once TorchServe is healthy), then wait for both."""
        self.port = self.port or free_ports(1)[0]
        self.started_at = time.perf_counter()
        stop_at_exit(self)
        try:
            self.compose("up", "-d", "--no-build", timeout_s=timeout_s)
            self.wait_healthy(timeout_s)
        except BaseException:
            self.down()
            raise
        return self

    def container_id(self, service: str) -> str:
        cid = self.compose("ps", "-q", service).strip()
        if not cid:
            raise ContainerError(f"no {service} container in project {self.project}")
        return cid

    def inspect(self, service: str) -> dict[str, Any]:
        return json.loads(docker("inspect", self.container_id(service)).stdout)[0]

    def wait_healthy(self, timeout_s: float = 240) -> float:
        """Seconds since ``up`` until Docker calls TorchServe healthy and ``/ping`` answers through the proxy
        (TLS verified); a container that exits or restarts fails at once, with the logs."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            states = {s: self.inspect(s) for s in ("serve", "proxy")}
            if any(i["RestartCount"] or i["State"].get("Status") in ("exited", "dead", "restarting") for i in states.values()):
                break
            if (states["serve"]["State"].get("Health") or {}).get("Status") == "healthy":
                try:
                    with self.client(key=None, timeout_s=2) as c:
                        if c.get("/ping").status_code == 200:
                            return time.perf_counter() - (self.started_at or 0.0)
                except httpx.HTTPError:
                    pass
            time.sleep(0.2)
        raise ContainerError(f"the stack is not healthy: {self.compose('ps')}\n{self.logs()}")

    def logs(self, tail: int = 30) -> str:
        return self.compose("logs", "--no-color", "--tail", str(tail), timeout_s=60, check=False)

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}"

    def client(self, key: str | None = "", timeout_s: float = 30.0) -> httpx.Client:
        """An HTTPS client that verifies the proxy's certificate against the CA; with the bearer key
        unless ``key`` is None (another string: that key)."""
        key = self.secrets.key if key == "" else key
        headers = {"Authorization": f"Bearer {key}"} if key is not None else {}
        return httpx.Client(base_url=self.url, verify=tls_context(self.secrets.ca), headers=headers,
                            timeout=timeout_s, trust_env=False)

    def address(self, service: str) -> str:
        """The container's IP on its first network (TorchServe: the internal one; reachable from this host only)."""
        nets = self.inspect(service)["NetworkSettings"]["Networks"]
        return next(n["IPAddress"] for _, n in sorted(nets.items()) if n.get("IPAddress"))

    def pids(self, service: str, command: str | None = None) -> list[int]:
        """Host process ids of the service's container (``docker top``), only those named ``command`` if given."""
        rows = docker("top", self.container_id(service), "-eo", "pid,comm").stdout.splitlines()[1:]
        return [int(pid) for pid, _, comm in (r.strip().partition(" ") for r in rows) if command in (None, comm.strip())]

    def down(self) -> None:
        """``down`` (containers and networks removed) and check that nothing of the project is left."""
        if self.started_at is None:
            return
        self.compose("down", "--timeout", "10", timeout_s=120)
        left = docker("ps", "-aq", "--filter", f"label=com.docker.compose.project={self.project}").stdout.strip()
        forget_at_exit(self)
        self.started_at = None
        if left:
            raise ContainerError(f"compose left containers of {self.project}: {left}")

    def stop(self) -> None:
        """What the exit registry calls: :meth:`down`."""
        self.down()


# --------------------------------------------------------------------------------------------
# Raw requests
# --------------------------------------------------------------------------------------------


@dataclass
class Answer:
    """One HTTP answer read off a raw connection: status, headers (lower-case names), body."""

    status: int
    headers: dict[str, str]
    body: bytes


def split_answers(data: bytes) -> list[Answer]:
    """The HTTP/1.1 answers in ``data``, in the order they came (bodies framed by Content-Length or
    chunked; a truncated last answer keeps what arrived)."""
    answers = []
    while data.startswith(b"HTTP/1."):
        head, _, rest = data.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
        if "content-length" in headers:
            n = int(headers["content-length"])
            body, data = rest[:n], rest[n:]
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while rest:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0] or b"0", 16)
                if size == 0:
                    rest = rest.partition(b"\r\n")[2]  # no trailers: the empty line after the last chunk
                    break
                body, rest = body + rest[:size], rest[size + 2:]
            data = rest
        else:
            body, data = rest, b""
        answers.append(Answer(int(lines[0].split()[1]), headers, body))
    return answers


@dataclass
class RawResult:
    """What came back on one connection: the answers, whether the server closed the connection
    (``closed``; a reset counts), after how many seconds, and the bytes as they came."""

    answers: list[Answer]
    closed: bool
    seconds: float
    data: bytes

    @property
    def statuses(self) -> list[int]:
        return [a.status for a in self.answers]


def raw_exchange(port: int, request: bytes, ca: str | os.PathLike, *, host: str = "127.0.0.1",
                 server_hostname: str = "localhost", wait_s: float = 10.0, answers: int | None = None) -> RawResult:
    """Send ``request`` as it is over one TLS connection, then read until the server closes it,
    ``wait_s`` passes (a timeout leaves ``closed`` False: the server kept the connection open), or
    ``answers`` complete answers have come."""
    t0 = time.perf_counter()
    data, closed = b"", False
    with socket.create_connection((host, port), timeout=wait_s) as raw, \
            tls_context(ca).wrap_socket(raw, server_hostname=server_hostname) as s:
        s.sendall(request)
        s.settimeout(0.25)
        while time.perf_counter() - t0 < wait_s:
            try:
                chunk = s.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            except (ConnectionError, ssl.SSLError, OSError):
                closed = True
                break
            if not chunk:
                closed = True
                break
            data += chunk
            got = split_answers(data) if answers else []
            if answers and len(got) >= answers and len(got[-1].body) >= int(got[-1].headers.get("content-length", 0)):
                break
    return RawResult(split_answers(data), closed, time.perf_counter() - t0, data)


# --------------------------------------------------------------------------------------------
# What the proxy costs
# --------------------------------------------------------------------------------------------


def _alternating(paths: list[tuple[httpx.Client, dict[str, Any]]], url: str, bodies: list[bytes] | None, n: int,
                 rate_per_s: float) -> tuple[list[list[float]], list[list[int]]]:
    """``n`` requests per path, the paths taking turns request by request (A B A B ...), open loop:
    request i is due at start + i / rate and its latency runs from that due time (ms), so a stall of
    the machine hits both paths alike. With ``bodies`` each is a POST of the next body, else a GET."""
    latencies: list[list[float]] = [[] for _ in paths]
    statuses: list[list[int]] = [[] for _ in paths]
    start = time.perf_counter()
    for i in range(n * len(paths)):
        (client, ext), j = paths[i % len(paths)], i % len(paths)
        due = start + i / rate_per_s
        time.sleep(max(0.0, due - time.perf_counter()))
        if bodies:
            r = client.post(url, content=bodies[(i // len(paths)) % len(bodies)], extensions=ext)
        else:
            r = client.get(url, extensions=ext)
        latencies[j].append((time.perf_counter() - due) * 1000.0)
        statuses[j].append(r.status_code)
    return latencies, statuses


def median_interval(diffs: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """The median of paired differences and a distribution-free interval for it (order statistics of
    the sign test: no assumption on the shape, robust to a few disturbed rounds). Returns (low,
    coverage, high); with too few rounds for ``level`` the interval is the whole range, its coverage lower."""
    d, n = sorted(diffs), len(diffs)
    k = 0  # the largest k with P(Binomial(n, 1/2) < k) * 2 <= 1 - level
    while k + 1 <= n // 2 and 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n <= 1 - level:
        k += 1
    coverage = 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n if k else 1 - 2 / 2**n
    lo, hi = (d[k - 1], d[n - k]) if k else (d[0], d[-1])
    return lo, coverage, hi


def measure_cost(stack: Stack, bodies: list[bytes], profile: Profile | None = None, *,
                 rounds: int | None = None, requests: int | None = None, rate_per_s: float | None = None) -> dict[str, Any]:
    """The same requests straight to TorchServe (plain HTTP to its container's address: reachable from
    this host, from no other) and through the proxy (HTTPS with the key to the proxy's container
    address, the certificate checked for the name ``proxy``), each path over one keep-alive
    connection, the two paths taking turns request by request, open loop at a fixed rate. Two kinds
    of request, in alternating blocks: a prediction (``bodies``, PNG images) and ``GET /ping``, whose
    small server time shows the proxy's own share; ``rounds`` of each.

    Returns, per kind and path, latency percentiles over all rounds and each round's p50; per kind,
    the median of the per-round p50 differences proxy - direct with a distribution-free 95 % interval,
    and CPU per request: nginx's processes per proxied request, TorchServe's processes (the JVM and its
    workers, not the health checks) and this client process per request of either path.
    """
    s = sizes(config.get_profile(profile))
    rounds, requests, rate = rounds or s.rounds, requests or s.requests, rate_per_s or s.rate_per_s
    direct = httpx.Client(base_url=f"http://{stack.address('serve')}:{TORCHSERVE_PORT}", timeout=30, trust_env=False)
    proxied = httpx.Client(base_url=f"https://{stack.address('proxy')}:{PROXY_PORT}", verify=tls_context(stack.secrets.ca),
                           headers={"Authorization": f"Bearer {stack.secrets.key}"}, timeout=30, trust_env=False)
    paths = {"direct": (direct, {}), "proxy": (proxied, {"sni_hostname": "proxy"})}
    kinds = {"predict": (PREDICT, bodies), "ping": ("/ping", None)}
    nginx, serve = stack.pids("proxy", "nginx"), stack.pids("serve")
    lat = {(k, p): [] for k in kinds for p in paths}
    round_p50 = {(k, p): [] for k in kinds for p in paths}
    statuses: dict[tuple[str, str], dict[int, int]] = {(k, p): {} for k in kinds for p in paths}
    cpu = {k: [0, 0, 0.0] for k in kinds}  # nginx ns, TorchServe ns, client s
    try:
        for url, body in kinds.values():  # warm-up: connections, TLS session, TorchServe's workers
            _alternating(list(paths.values()), url, body, s.warmup, rate)
        for r in range(rounds):
            for kind in (("predict", "ping") if r % 2 == 0 else ("ping", "predict")):
                url, body = kinds[kind]
                before = (cpu_ns(nginx), cpu_ns(serve), time.process_time())
                ms, st = _alternating(list(paths.values()), url, body, requests, rate)
                after = (cpu_ns(nginx), cpu_ns(serve), time.process_time())
                for i in range(3):
                    cpu[kind][i] += after[i] - before[i]
                for path, path_ms, path_st in zip(paths, ms, st):
                    lat[(kind, path)] += path_ms
                    round_p50[(kind, path)].append(float(np.percentile(path_ms, 50)))
                    for code in path_st:
                        statuses[(kind, path)][code] = statuses[(kind, path)].get(code, 0) + 1
    finally:
        direct.close()
        proxied.close()
    n = rounds * requests  # per kind and path
    out: dict[str, Any] = {"rounds": rounds, "requests_per_round": requests, "rate_per_s": rate, "variants": [], "cpu_ms": {},
                           "added_p50_ms": {}}
    for (kind, path), ms in lat.items():
        q = np.percentile(ms, [50, 90, 99])
        out["variants"].append({"request": kind, "path": path, "p50_ms": float(q[0]), "p90_ms": float(q[1]), "p99_ms": float(q[2]),
                                "mean_ms": float(np.mean(ms)), "round_p50_ms": round_p50[(kind, path)], "latencies_ms": ms,
                                "statuses": statuses[(kind, path)]})
    for kind in kinds:
        out["cpu_ms"][kind] = {"nginx_per_proxied_request": cpu[kind][0] / n / 1e6,
                               "torchserve_per_request": cpu[kind][1] / (2 * n) / 1e6,
                               "client_per_request": cpu[kind][2] / (2 * n) * 1e3}
        diffs = np.subtract(round_p50[(kind, "proxy")], round_p50[(kind, "direct")]).tolist()
        lo, coverage, hi = median_interval(diffs)
        out["added_p50_ms"][kind] = {"median": float(np.median(diffs)), "low": lo, "high": hi, "coverage": coverage,
                                     "min": min(diffs), "max": max(diffs)}
    return out


def main(argv: list[str] | None = None) -> int:
    """``python -m deploylab.serving.proxy secrets DIR`` (CA, certificate, key) or ``build`` (the proxy image)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["secrets"] and len(args) == 2:
        made = make_secrets(args[1])
        print(f"CA for clients: {made.ca}\nmount into the proxy: {made.folder} (tls.crt, tls.key, key)")
    elif args == ["build"]:
        ensure_base_image()
        print(build_proxy_image().to_dict())
    else:
        print("usage: python -m deploylab.serving.proxy secrets DIR | build", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
