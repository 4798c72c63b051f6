"""Clients that stall: when does a server close a connection that sends nothing, half a request, or goes idle?

A server holds a connection (a socket, often a task or a worker) for as long as the client keeps it
open. A client that opens connections and then stalls (slowloris) can hold them all, unless the
server closes each stalled one after a timeout. :func:`slow_connections` opens four kinds at once
on plain asyncio streams and reports, for each, when the server closed it -- measured, not assumed
(lesson 08 runs it against Ray Serve's HTTP proxy; lesson 06's nginx closes what a server does not).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any
from urllib.parse import urlsplit


def slow_connections(url: str, key: str, body: bytes, *, watch_s: float = 15.0, content_type: str = "image/png") -> dict[str, Any]:
    """Open four connections that stall, watch them ``watch_s`` seconds: when does the server close each?

    ``silent`` sends nothing; ``half request line`` stops mid request line; ``half body`` sends its
    headers and 10 bytes of a larger body; ``idle after an answer`` sends a whole request, reads the
    answer and then says nothing. Each value is the seconds until the server closed the connection
    (and, for ``half body``, the status it answered first), or None if it was still open at the end.
    Every connection held open is one a slowloris client keeps from everybody else.
    """
    parts = urlsplit(url)
    if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "::1"):
        raise ValueError(f"slow connections are only opened to a server on loopback over plain HTTP, not {url}")
    host, port, path = parts.hostname, parts.port or 80, parts.path or "/"
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

    with ThreadPoolExecutor(1) as pool:  # a thread of its own: a notebook's kernel already runs an event loop
        return pool.submit(asyncio.run, run()).result()
