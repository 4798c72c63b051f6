"""A load generator that is not the bottleneck: open loop at a fixed offered rate, or closed loop.

The course's first generator (``load.load_run``: Python threads and httpx) spent about 1 CPU-ms per
request, more than the servers it measured (0.6-0.8 ms), and it was closed-loop: under overload it
slowed down with the server, so the queueing never showed in its latencies. This one:

- builds every request's bytes once (request line, headers with the token, body) and speaks
  HTTP/1.1 over plain sockets from one thread with ``selectors``: no HTTP library per request;
- **open loop** (:func:`open_loop`): requests are due on a Poisson schedule at the offered rate and
  each latency is measured from its *intended* send time, so time spent waiting for a free
  connection or in the server's queue counts (no coordinated omission); offered and achieved rates
  are both reported;
- **closed loop** (:func:`closed_loop`): a fixed number of connections, each sending its next request
  when the answer arrives: the maximum throughput (MLPerf's Offline scenario);
- measures its own CPU time (``RUSAGE_THREAD``: this thread only) and reports it per request, so
  every served figure can print it beside the server's;
- runs on the cores it is given (``cpus``, ``os.sched_setaffinity`` for the duration), bounded in
  count and time, loopback only, with a progress bar.

Transport errors (a refused or reset connection, no answer before ``timeout_s``) are counted apart
from HTTP statuses: a 503 is the server's answer, a reset is not.

For drills rather than measurements (a worker killed under load, overload, autoscaling), a run can
also ``record`` each request's send time and status, the first answer of each status other than
200, and the 200 answers' bodies, and call ``during(elapsed_s)`` about every 50 ms (a closed loop
stops sending when it returns True): :func:`deploylab.serving.load.load_run` is this closed loop.
"""

from __future__ import annotations

import contextlib
import os
import resource
import selectors
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
from tqdm.auto import tqdm

LOOPBACK = ("127.0.0.1", "::1", "localhost")
PERCENTILES = (50, 90, 99, 99.9)
# An idle connection is reused for at most this long, then closed and a new one opened (httpx's default
# ``keepalive_expiry``): far below the servers' idle timeout (header_timeout.KEEP_ALIVE_S, 75 s), so the
# generator never sends on a connection the server is closing. And a server's close of an idle connection is
# not a failed request: counted as one, it zeroed LitServe's Server capacity in a full run of lesson 07 (a
# 142 s trial at 21/s, every one of its 3,000 requests answered 200, one "non-200": a connection of the
# generator's pool left idle past the server's 75 s).
IDLE_EXPIRY_S = 5.0


def build_requests(host: str, port: int, path: str, bodies: Sequence[bytes], *, token: str | None = None,
                   content_type: str = "image/png", method: str = "POST") -> list[bytes]:
    """Each body as the complete bytes of one HTTP/1.1 request (built once, sent many times)."""
    if host not in LOOPBACK:
        raise ValueError(f"the load generator only talks to loopback, not {host}")
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
    if token:
        head += f"Authorization: Bearer {token}\r\n"
    return [(head + f"Content-Type: {content_type}\r\nContent-Length: {len(b)}\r\n\r\n").encode() + b for b in bodies]


@dataclass
class LoadgenResult:
    """One run: what was offered, what came back, and what the generator itself cost."""

    mode: str  # "open" (fixed offered rate) or "closed" (fixed concurrency)
    offered_rate: float | None  # requests per second asked for (open loop)
    connections: int
    seconds: float  # from the first intended send to the last answer
    latencies_s: np.ndarray = field(repr=False)  # answered requests (any status), from intended send time
    statuses: dict[int, int] = field(default_factory=dict)
    transport_errors: dict[str, int] = field(default_factory=dict)
    generator_cpu_s: float = 0.0
    cpus: tuple[int, ...] = ()
    # recorded only when asked (``record=True``): (intended send time in s from the start, status; 0 for a
    # transport error), the first whole answer of each status other than 200, and (request index, body) of each 200
    timeline: list[tuple[float, int]] = field(default_factory=list, repr=False)
    refusals: dict[int, bytes] = field(default_factory=dict, repr=False)
    answers: list[tuple[int, bytes]] = field(default_factory=list, repr=False)

    @property
    def sent(self) -> int:
        return sum(self.statuses.values()) + sum(self.transport_errors.values())

    @property
    def ok(self) -> int:
        return self.statuses.get(200, 0)

    @property
    def achieved_rate(self) -> float:
        """Answers with status 200 per second."""
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    @property
    def generator_cpu_ms_per_request(self) -> float:
        return 1e3 * self.generator_cpu_s / max(self.sent, 1)

    def percentiles_ms(self, qs: Sequence[float] = PERCENTILES) -> dict[str, float]:
        """Latency percentiles in ms, and ``n``, the number of samples behind them."""
        out: dict[str, float] = {"n": float(len(self.latencies_s))}
        for q in qs:
            out[f"p{q:g}"] = float(np.percentile(self.latencies_s, q) * 1e3) if len(self.latencies_s) else float("nan")
        return out

    def summary(self) -> str:
        """One line: rates, percentiles with their sample count, errors, the generator's CPU per request."""
        p = self.percentiles_ms()
        offered = f"offered {self.offered_rate:.0f}/s, " if self.offered_rate else f"{self.connections} connections, "
        errors = f", transport errors {dict(self.transport_errors)}" if self.transport_errors else ""
        return (f"{self.mode} loop: {offered}achieved {self.achieved_rate:.0f}/s; statuses {dict(self.statuses)}{errors}; "
                f"p50 {p['p50']:.2f} / p90 {p['p90']:.2f} / p99 {p['p99']:.2f} / p99.9 {p['p99.9']:.2f} ms "
                f"(n={int(p['n'])}); generator {self.generator_cpu_ms_per_request:.3f} CPU-ms per request on cpus {list(self.cpus)}")


def poisson_schedule(rate: float, count: int, seed: int = 0) -> np.ndarray:
    """Intended send times (s from the start) of ``count`` requests arriving as a Poisson process at ``rate``/s."""
    if rate <= 0 or count < 1:
        raise ValueError(f"need a positive rate and count, got {rate}, {count}")
    return np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, count))


class _Connection:
    """One keep-alive connection: the request in flight (its index and intended time), the bytes read so far,
    and since when it has been idle."""

    __slots__ = ("sock", "index", "intended", "buffer", "idle_since")

    def __init__(self, sock: socket.socket):
        self.sock, self.index, self.intended, self.buffer = sock, -1, 0.0, b""
        self.idle_since = time.perf_counter()


def _response_length(buffer: bytes) -> tuple[int, int, bool] | None:
    """(status, total bytes of the response, server closes) once ``buffer`` holds a whole response, else None."""
    end = buffer.find(b"\r\n\r\n")
    if end < 0:
        return None
    head = buffer[:end].lower()
    status = int(head[9:12])
    closes = b"\r\nconnection: close" in head
    i = head.find(b"\r\ncontent-length:")
    if i >= 0:
        j = head.find(b"\r\n", i + 2)
        total = end + 4 + int(head[i + 17:j if j > 0 else None])
        return (status, total, closes) if len(buffer) >= total else None
    if b"\r\ntransfer-encoding: chunked" in head:
        k = buffer.find(b"\r\n0\r\n\r\n", end)
        return (status, k + 7, closes) if k >= 0 else None
    return None  # no length: the server will close, and _read takes what arrived


@contextlib.contextmanager
def _pinned(cpus: Sequence[int] | None) -> Iterator[tuple[int, ...]]:
    """Run this process on ``cpus`` for the block (all allowed ones when None); yields the cores used."""
    before = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, set(cpus))
    try:
        yield tuple(sorted(os.sched_getaffinity(0)))
    finally:
        os.sched_setaffinity(0, before)


def _thread_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_THREAD)
    return r.ru_utime + r.ru_stime


class _Run:
    """The event loop both modes share: connections, sends, reads, the tally."""

    def __init__(self, host: str, port: int, requests: Sequence[bytes], connections: int, timeout_s: float, total: int,
                 progress: bool, record: bool = False, desc: str | None = None):
        self.addr, self.requests, self.max_connections, self.timeout_s = (host, port), requests, connections, timeout_s
        self.sel = selectors.DefaultSelector()
        self.idle: list[_Connection] = []
        self.open = 0
        self.latencies: list[float] = []
        self.statuses: Counter[int] = Counter()
        self.errors: Counter[str] = Counter()
        self.last_expiry = 0.0
        self.record, self.started = record, time.perf_counter()
        self.timeline: list[tuple[float, int]] = []
        self.refusals: dict[int, bytes] = {}
        self.answers: list[tuple[int, bytes]] = []
        self.bar = tqdm(total=total or None, desc=desc, unit="req", disable=not progress, mininterval=0.5, leave=False)

    def connection(self) -> _Connection | None:
        """An idle connection, a new one if fewer than the maximum are open, else None (raises OSError
        when a new one cannot connect).

        An idle connection older than :data:`IDLE_EXPIRY_S` is closed instead of reused, as a pooling client
        does (httpx's ``keepalive_expiry``): the servers close theirs after ``header_timeout.KEEP_ALIVE_S``, and
        a request sent on a connection the server is closing fails through no fault of the server.
        """
        now = time.perf_counter()
        while self.idle:
            conn = self.idle.pop()  # the most recently used: the others may go stale at a low rate
            if now - conn.idle_since <= IDLE_EXPIRY_S:
                return conn
            self.close(conn)
        if self.open >= self.max_connections:
            return None
        sock = socket.create_connection(self.addr, timeout=self.timeout_s)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.open += 1
        conn = _Connection(sock)
        self.sel.register(sock, selectors.EVENT_READ, conn)
        return conn

    def connect(self, n: int) -> list[_Connection]:
        """Up to ``n`` new connections; a failed connect counts as a transport error."""
        made = []
        for _ in range(n):
            try:
                conn = self.connection()
            except OSError as e:
                self.errors[type(e).__name__] += 1
                self.bar.update(1)
                continue
            if conn is not None:
                made.append(conn)
        return made

    def send(self, conn: _Connection, index: int, intended: float) -> bool:
        conn.index, conn.intended, conn.buffer = index, intended, b""
        try:
            conn.sock.sendall(self.requests[index % len(self.requests)])
            return True
        except OSError as e:
            self.fail(conn, type(e).__name__)
            return False

    def fail(self, conn: _Connection, why: str) -> None:
        """A connection broke: a transport error if a request was on it; an idle one (no request in flight) the
        server may close, as HTTP allows, so it is only dropped from the pool."""
        if conn.index < 0:
            self.retire(conn)
            return
        self.errors[why] += 1
        if self.record:
            self.timeline.append((conn.intended - self.started, 0))
        self.bar.update(1)
        self.close(conn)

    def retire(self, conn: _Connection) -> None:
        """Close an idle connection the server has closed (not an error: no request was on it)."""
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)
        self.close(conn)

    def close(self, conn: _Connection) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn.sock)
        conn.sock.close()
        self.open -= 1

    def read(self, timeout: float) -> list[_Connection]:
        """Read what arrived within ``timeout``; the connections whose answer is complete (now idle again)."""
        done = []
        for key, _ in self.sel.select(timeout):
            conn: _Connection = key.data
            try:
                chunk = conn.sock.recv(262144)
            except OSError as e:
                self.fail(conn, type(e).__name__)
                continue
            if not chunk:
                self.fail(conn, "closed by the server")
                continue
            conn.buffer += chunk
            parsed = _response_length(conn.buffer)
            if parsed is None:
                continue
            status, total, closes = parsed
            now = time.perf_counter()
            self.latencies.append(now - conn.intended)
            self.statuses[status] += 1
            if self.record:
                self.keep(conn, status, total)
            self.bar.update(1)
            conn.index, conn.idle_since = -1, now
            if closes:
                self.close(conn)
            else:
                done.append(conn)
        return done

    def keep(self, conn: _Connection, status: int, total: int) -> None:
        """Record one answer: its send time and status, its bytes if it is the first of a refusal, its body if 200."""
        self.timeline.append((conn.intended - self.started, status))
        if status == 200:
            self.answers.append((conn.index, conn.buffer[conn.buffer.find(b"\r\n\r\n") + 4:total]))
        elif status not in self.refusals:
            self.refusals[status] = conn.buffer[:total]

    def expire(self, now: float) -> None:
        """Requests without an answer after ``timeout_s``: a transport error each, their connection closed
        (looked at every 0.1 s, not at every event: the scan costs CPU per open connection)."""
        if now - self.last_expiry < 0.1:
            return
        self.last_expiry = now
        for key in list(self.sel.get_map().values()):
            conn = key.data
            if conn.index >= 0 and now - conn.intended > self.timeout_s:
                self.fail(conn, "timeout")

    def finish(self, mode: str, rate: float | None, started: float, cpu0: float, cpus: tuple[int, ...]) -> LoadgenResult:
        cpu = _thread_cpu() - cpu0
        for key in list(self.sel.get_map().values()):
            self.close(key.data)
        self.bar.close()
        return LoadgenResult(mode, rate, self.max_connections, time.perf_counter() - started, np.asarray(self.latencies),
                             dict(self.statuses), dict(self.errors), cpu, cpus, self.timeline, self.refusals, self.answers)


def open_loop(host: str, port: int, requests: Sequence[bytes], *, rate: float, count: int | None = None,
              seconds: float | None = None, connections: int = 64, timeout_s: float = 10.0, seed: int = 0,
              cpus: Sequence[int] | None = None, progress: bool = True) -> LoadgenResult:
    """Send requests at ``rate`` per second (Poisson arrivals) for ``count`` requests or ``seconds``.

    Each request is due at its intended time; it waits for a free connection (at most
    ``connections`` are opened) if none is, and its latency runs from the intended time.
    """
    count = count or int(rate * (seconds or 10.0))
    schedule = poisson_schedule(rate, count, seed)
    with _pinned(cpus) as used:
        run = _Run(host, port, requests, connections, timeout_s, count, progress)
        due: deque[int] = deque()
        nxt = 0
        cpu0, started = _thread_cpu(), time.perf_counter()
        run.started = started
        schedule = schedule + started
        while nxt < count or due or run.open - len(run.idle) > 0:
            now = time.perf_counter()
            while nxt < count and schedule[nxt] <= now:
                due.append(nxt)
                nxt += 1
            while due:
                try:
                    conn = run.connection()
                except OSError as e:  # the request cannot even be sent: a transport error
                    run.errors[type(e).__name__] += 1
                    run.bar.update(1)
                    due.popleft()
                    continue
                if conn is None:  # every connection busy: the due requests wait, their clocks running
                    break
                i = due.popleft()
                run.send(conn, i, schedule[i])
            wait = max(0.0, schedule[nxt] - time.perf_counter()) if nxt < count and not due else 0.05
            if run.open == 0 and not due:
                time.sleep(min(wait, 0.05))
            else:
                run.idle.extend(run.read(min(wait, 0.05)))
            run.expire(time.perf_counter())
        return run.finish("open", rate, started, cpu0, used)


def closed_loop(host: str, port: int, requests: Sequence[bytes], *, connections: int, count: int | None = None,
                seconds: float | None = None, timeout_s: float = 10.0, cpus: Sequence[int] | None = None,
                progress: bool = True, record: bool = False, during: Callable[[float], bool | None] | None = None,
                desc: str | None = None) -> LoadgenResult:
    """``connections`` connections, each sending its next request when the last is answered; for
    ``count`` requests or ``seconds``, whichever comes first. Latency runs from each send.

    ``record`` keeps the timeline, refusals and answers (see :class:`LoadgenResult`); ``during(elapsed_s)``
    is called about every 50 ms, and the run stops sending when it returns True.
    """
    if not (count or seconds):
        raise ValueError("bound the run: give count or seconds")
    limit = count or 1 << 62
    with _pinned(cpus) as used:
        run = _Run(host, port, requests, connections, timeout_s, count or 0, progress, record, desc)
        sent = 0
        cpu0, started = _thread_cpu(), time.perf_counter()
        run.started = started
        end = started + (seconds or float("inf"))
        next_call = started
        ready = run.connect(connections)
        while True:
            now = time.perf_counter()
            if during is not None and now >= next_call:
                next_call = now + 0.05
                if during(now - started):
                    end = now
            for conn in ready:
                if sent < limit and now < end:
                    sent += run.send(conn, sent, now)
                else:
                    run.idle.append(conn)
            if run.open - len(run.idle) <= 0:
                break
            ready = run.read(0.05)
            run.expire(time.perf_counter())
            if run.open < connections and sent < limit and time.perf_counter() < end:
                ready += run.connect(connections - run.open)
        return run.finish("closed", None, started, cpu0, used)
