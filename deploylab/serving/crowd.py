"""A crowd: many clients at once, each request held to a deadline -- did the server answer or shed every one?

:func:`~deploylab.serving.load.load_run` measures throughput and latency with a few threads. A crowd
asks another question: with far more clients than the server can serve at once, does **every**
request end within its deadline, either answered (200, the right prediction) or refused at once with
503 and a ``Retry-After`` header -- or do some just wait until the client gives up?

- :func:`crowd_run` -- ``clients`` concurrent HTTP/1.1 clients (one asyncio task and one keep-alive
  connection each, so 200 clients cost one thread and little CPU), for ``seconds``; each request must end within
  ``deadline_s``; a client that is told 503 waits the ``Retry-After`` it was given, as a well-behaved
  client does; every 200 answer's top-1 is checked against the in-process reference;
- :class:`CrowdResult` -- the outcome of every request: answered, shed with or without
  ``Retry-After``, another status, no answer within the deadline, a connection error.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from .. import bench

ANSWERED, SHED, SHED_NO_RETRY_AFTER, LATE, FAILED = "answered", "shed (503 + Retry-After)", "503 without Retry-After", \
    "no answer within the deadline", "connection error"


@dataclass
class CrowdResult:
    """Every request of a crowd run: its outcome, its latency (ms) and what it was told."""

    clients: int
    seconds: float
    deadline_s: float
    outcomes: dict[str, int]  # ANSWERED, SHED, ... and "status <code>" for anything else
    latencies_ms: dict[str, list[float]] = field(repr=False)  # per outcome
    retry_after: dict[str, int]  # Retry-After values seen, and how often
    wrong_answers: int  # 200 answers whose top-1 differs from the reference
    errors: dict[str, int] = field(default_factory=dict)  # connection errors by type

    @property
    def requests(self) -> int:
        return sum(self.outcomes.values())

    @property
    def within_contract(self) -> bool:
        """Every request answered correctly or shed with Retry-After, each within the deadline."""
        return self.requests > 0 and self.outcomes.get(ANSWERED, 0) + self.outcomes.get(SHED, 0) == self.requests \
            and self.wrong_answers == 0

    def slowest_ms(self, outcome: str = ANSWERED) -> float | None:
        lat = self.latencies_ms.get(outcome)
        return max(lat) if lat else None

    def summary(self) -> dict[str, Any]:
        """One row: counts per outcome, answer latency percentiles, the slowest shed, answers per second."""
        answered = self.latencies_ms.get(ANSWERED, [])
        s = bench.latency_percentiles(answered) if answered else None
        return {"clients": self.clients, "seconds": self.seconds, "deadline s": self.deadline_s, "requests": self.requests,
                **self.outcomes, "answers/s": len(answered) / self.seconds if self.seconds else 0.0,
                "p50 ms": s.p50_ms if s else None, "p99 ms": s.p99_ms if s else None,
                "slowest answer ms": self.slowest_ms(ANSWERED), "slowest shed ms": self.slowest_ms(SHED),
                "wrong answers": self.wrong_answers}


def crowd_run(url: str, key: str, bodies: Sequence[bytes], reference_top1: Sequence[int] | np.ndarray, *, clients: int = 200,
              seconds: float = 10.0, deadline_s: float = 10.0, content_type: str = "image/png") -> CrowdResult:
    """``clients`` clients send ``bodies`` (body ``i`` has top-1 ``reference_top1[i]``) to ``url`` for ``seconds``.

    Each request must end within ``deadline_s`` (measured from its send); a 503 makes its client wait
    the ``Retry-After`` it carries before sending again. Loopback only, as every client of the course.
    """
    if not url.startswith(("http://127.0.0.1:", "http://[::1]:")):
        raise ValueError(f"the crowd only runs against a server on loopback, not {url}")
    if clients < 1 or seconds <= 0 or deadline_s <= 0 or not bodies or len(bodies) != len(reference_top1):
        raise ValueError("need clients >= 1, seconds > 0, deadline_s > 0 and one reference top-1 per body")
    return asyncio.run(_crowd(url, key, list(bodies), [int(t) for t in reference_top1], clients, seconds, deadline_s,
                              content_type))


class _Connection:
    """One client's keep-alive HTTP/1.1 connection: a request written whole, the answer read by its Content-Length.

    Written on asyncio streams, not httpx: httpx's pool costs several ms of CPU per request with
    hundreds of connections open, and a crowd's client must not take the cores from the server.
    """

    def __init__(self, host: str, port: int):
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, head: bytes, body: bytes) -> tuple[int, dict[str, str], bytes]:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        self.writer.write(head + body)
        await self.writer.drain()
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionResetError("the server closed the connection before answering")
        status = int(status_line.split()[1])
        headers: dict[str, str] = {}
        while (line := await self.reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if "content-length" in headers:
            payload = await self.reader.readexactly(int(headers["content-length"]))
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            parts = []
            while (size := int((await self.reader.readline()).split(b";")[0], 16)) > 0:
                parts.append(await self.reader.readexactly(size))
                await self.reader.readline()
            await self.reader.readline()
            payload = b"".join(parts)
        else:
            payload = await self.reader.read()
            headers["connection"] = "close"
        if headers.get("connection", "").lower() == "close":
            self.close()
        return status, headers, payload

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None


async def _crowd(url: str, key: str, bodies: list[bytes], reference: list[int], clients: int, seconds: float,
                 deadline_s: float, content_type: str) -> CrowdResult:
    outcomes: Counter = Counter()
    latencies: dict[str, list[float]] = {}
    retry_after: Counter = Counter()
    errors: Counter = Counter()
    wrong = 0
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    heads = [(f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
              f"Content-Type: {content_type}\r\nContent-Length: {len(b)}\r\n\r\n").encode() for b in bodies]
    start = time.perf_counter()
    end = start + seconds

    async def client(i: int) -> None:
        nonlocal wrong
        conn, k = _Connection(host, port), i
        while time.perf_counter() < end:
            body_i = k % len(bodies)
            k += clients
            t0 = time.perf_counter()
            wait_s = 0.0
            try:
                async with asyncio.timeout(deadline_s):
                    status, headers, payload = await conn.request(heads[body_i], bodies[body_i])
            except TimeoutError:
                outcome = LATE
                conn.close()  # the answer may still come: this connection is unusable
            except (OSError, asyncio.IncompleteReadError, ValueError, IndexError) as e:
                outcome = FAILED
                errors[type(e).__name__] += 1
                conn.close()
            else:
                if status == 200:
                    outcome = ANSWERED
                    if int(json.loads(payload)["predictions"][0]["index"]) != reference[body_i]:
                        wrong += 1
                elif status == 503 and headers.get("retry-after"):
                    outcome = SHED
                    retry_after[headers["retry-after"]] += 1
                    with contextlib.suppress(ValueError):
                        wait_s = float(headers["retry-after"])
                elif status == 503:
                    outcome = SHED_NO_RETRY_AFTER
                else:
                    outcome = f"status {status}"
            outcomes[outcome] += 1
            latencies.setdefault(outcome, []).append((time.perf_counter() - t0) * 1000.0)
            if wait_s:
                await asyncio.sleep(min(wait_s, max(0.0, end - time.perf_counter())))
        conn.close()

    await asyncio.gather(*(client(i) for i in range(clients)))
    return CrowdResult(clients, time.perf_counter() - start, deadline_s, dict(outcomes), latencies,
                       dict(retry_after), wrong, dict(errors))


def slow_connections(url: str, key: str, body: bytes, *, watch_s: float = 15.0, content_type: str = "image/png") -> dict[str, Any]:
    """Open four connections that stall, watch them ``watch_s`` seconds: when does the server close each?

    ``silent`` sends nothing; ``half request line`` stops mid request line; ``half body`` sends its
    headers and 10 bytes of a larger body; ``idle after an answer`` sends a whole request, reads the
    answer and then says nothing. Each value is the seconds until the server closed the connection
    (and, for ``half body``, the status it answered first), or None if it was still open at the end.
    Every connection held open is one a slowloris client keeps from everybody else.
    """
    parts = urlsplit(url)
    host, port, path = parts.hostname or "127.0.0.1", parts.port or 80, parts.path or "/"
    head = (f"POST {path} HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {key}\r\n"
            f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n\r\n").encode()
    openings = {"silent": b"", "half request line": f"POST {path} HT".encode(), "half body": head + body[:10],
                "idle after an answer": head + body}

    async def watch(opening: bytes) -> dict[str, Any]:
        reader, writer = await asyncio.open_connection(host, port)
        t0 = time.perf_counter()
        writer.write(opening)
        await writer.drain()
        status, closed_s = None, None
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(watch_s):
                while True:
                    line = await reader.readline()
                    if not line:
                        closed_s = time.perf_counter() - t0
                        break
                    if status is None and line.startswith(b"HTTP/1.1 "):
                        status = int(line.split()[1])
        writer.close()
        return {"closed after s": closed_s, "answered": status}

    async def run() -> dict[str, Any]:
        results = await asyncio.gather(*(watch(o) for o in openings.values()))
        return dict(zip(openings, results))

    return asyncio.run(run())
