"""A deadline for request headers, which uvicorn does not have, and strict request framing.

uvicorn closes a connection that stays idle after a response (``timeout_keep_alive``), but not one
that is sending its request headers: a client that sends them one byte at a time (slowloris), or
opens a connection and sends nothing, holds a connection -- and a file descriptor -- for as long as
it likes. nginx calls the missing setting ``client_header_timeout``. The body has its own deadline
in the app (``http_input.BODY_TIMEOUT_S``), where a 408 can still be sent.

:func:`header_timeout_protocol` returns one of uvicorn's two HTTP/1.1 protocols (:data:`HTTP_PARSERS`,
the servers' ``--http``) with that deadline: from the moment a connection opens, the request's
headers must be complete within ``seconds``, else the connection is closed (no response is
possible: HTTP answers only a request it has read). On a kept-alive connection the deadline starts
with the first byte of the next request, never when the previous response completes: an idle
connection is closed by the keep-alive timeout (:data:`KEEP_ALIVE_S`, passed to uvicorn as
``timeout_keep_alive``), which stays longer than any client of the kit keeps one idle (issue 31,
item 6: a deadline armed at response completion moved the keep-alive race to the header timeout).

Both refuse, with a 4xx answer and ``Connection: close``, what their parser alone lets through:

- request headers larger than :data:`MAX_HEADER_BYTES` (431): h11 bounds only a header block that
  arrives in pieces, so a 70 KB header line sent in one write was read whole; llhttp (httptools)
  bounds neither, so its callbacks (``on_url``, ``on_header``) and the reads of an unfinished block are counted;
- a request with both ``Content-Length`` and ``Transfer-Encoding`` (400): h11 frames it by the
  chunked encoding, a proxy in front may frame it by the length, and the rest of the body becomes a
  second, smuggled request. RFC 9112 section 6.3 allows treating it as an error; we do, and close.
  llhttp refuses it itself (400, then close), as it does a duplicate ``Content-Length``;
- a ``Transfer-Encoding`` other than exactly ``chunked``: h11 refuses it itself; for llhttp,
  which accepts ``gzip, chunked``, the protocol does (501).

The default parser is :data:`DEFAULT_HTTP`, httptools, by measurement: the custom server, smoke
student, 32 connections closed loop (``serving.loadgen``, pinned to CPU 0; the server to CPU 1), 5 s,
h11 and httptools alternated, 3 rounds each, on 2 Intel Xeon cores (AVX2, AVX-512 VNNI/BF16, AMX),
server CPU-ms per answered request: ONNX Runtime fp32 h11 0.546 / 0.540 / 0.574, httptools
0.442 / 0.404 / 0.465 (1,830 -> 2,270 answers/s); ExecuTorch int8 h11 0.580 / 0.566 / 0.572, httptools
0.418 / 0.390 / 0.415. The protections above hold on both (``tests/test_header_timeout.py``;
``tests/test_asgi_server.py`` runs each test on each parser); ``--http h11`` keeps the pure-Python parser.
Where the rest goes (py-spy, httptools, ONNX Runtime, 0.44 CPU-ms): PNG decoding and preprocessing 32%,
the model 19%, Starlette 14%, the event loop 10%, HTTP parsing and writing 9%, the hand-off to the
model's thread 9%, top-k and JSON 6%: parsing is no longer what misses the 0.30 target.
"""

from __future__ import annotations

import asyncio
import contextlib
import http
import json
import logging

import h11
import httptools
from uvicorn.protocols.http.h11_impl import H11Protocol
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0
# An idle kept-alive connection is closed after this long (uvicorn's ``timeout_keep_alive``, default 5 s).
# It must be clearly longer than any client keeps an idle connection (httpx: 5 s, ``keepalive_expiry``):
# with both at 5 s, a pooled connection was reused at the moment the server closed it, and 1 to 5 of
# 288 requests sent after idle gaps of 4.988-4.999 s failed with a transport error. nginx's default is 75 s.
KEEP_ALIVE_S = 75
MAX_HEADER_BYTES = 16 * 1024  # request target and header fields together; nginx's default allows 8 KB a line
HTTP_PARSERS = ("h11", "httptools")
DEFAULT_HTTP = "httptools"  # measured: see the module docstring


class FramingError(Exception):
    """A request this server refuses to frame: its status and a message for the client.

    Not an ``h11.RemoteProtocolError``: uvicorn would catch that and answer its generic 400.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


class StrictConnection(h11.Connection):
    """h11's server connection that refuses oversized headers and ambiguous framing (module docstring)."""

    max_header_bytes = MAX_HEADER_BYTES

    def next_event(self):  # type: ignore[override]
        event = super().next_event()
        if isinstance(event, h11.Request):
            check_framing(event, self.max_header_bytes)
        return event


def check_framing(request: h11.Request, max_header_bytes: int = MAX_HEADER_BYTES) -> None:
    """Raise :class:`FramingError` for headers over ``max_header_bytes`` or both Content-Length and Transfer-Encoding."""
    size = len(request.method) + len(request.target) + sum(len(k) + len(v) + 4 for k, v in request.headers)
    if size > max_header_bytes:
        raise FramingError(f"request headers too large: {size} bytes, at most {max_header_bytes}", status=431)
    names = {name for name, _ in request.headers}  # h11 gives them lower-cased
    if b"content-length" in names and b"transfer-encoding" in names:
        raise FramingError("a request may not carry both Content-Length and Transfer-Encoding (RFC 9112, 6.3)",
                           status=400)


class _HeaderDeadline:
    """The header deadline both protocols share: armed, cancelled, and the close when it passes.

    A protocol says whether it is waiting for a request's headers (:meth:`_waiting_for_headers`);
    it has ``loop``, ``transport`` and ``client`` from uvicorn's protocol classes.
    """

    header_timeout_s: float
    _header_deadline: asyncio.TimerHandle | None = None

    def _waiting_for_headers(self) -> bool:
        raise NotImplementedError

    def _arm_header_deadline(self) -> None:
        self._cancel_header_deadline()
        self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)  # type: ignore[attr-defined]

    def _cancel_header_deadline(self) -> None:
        if self._header_deadline is not None:
            self._header_deadline.cancel()
            self._header_deadline = None

    def _headers_too_slow(self) -> None:
        self._header_deadline = None
        if self._waiting_for_headers() and not self.transport.is_closing():  # type: ignore[attr-defined]
            log.info("closed a connection from %s: no complete request headers within %.0f s",
                     self.client, self.header_timeout_s)  # type: ignore[attr-defined]
            self.transport.close()  # type: ignore[attr-defined]


def header_timeout_protocol(seconds: float = HEADER_TIMEOUT_S, parser: str = DEFAULT_HTTP) -> type[asyncio.Protocol]:
    """uvicorn's ``parser`` protocol (:data:`HTTP_PARSERS`) with the header deadline and the strict framing of the module docstring.

    Pass the class as ``uvicorn.run(app, http=header_timeout_protocol(10, "httptools"))``.
    """
    if not seconds > 0:
        raise ValueError(f"the header timeout must be > 0 s, got {seconds}")
    if parser not in HTTP_PARSERS:
        raise ValueError(f"parser must be one of {HTTP_PARSERS}, got {parser!r}")
    return _h11_protocol(float(seconds)) if parser == "h11" else _httptools_protocol(float(seconds))


def _h11_protocol(seconds: float) -> type[H11Protocol]:
    """uvicorn's h11 protocol with the header deadline and :class:`StrictConnection`."""

    class HeaderTimeoutH11Protocol(_HeaderDeadline, H11Protocol):
        """h11 with a per-request deadline for the headers (see the module docstring)."""

        header_timeout_s = float(seconds)

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.conn = StrictConnection(h11.SERVER, self.conn._max_incomplete_event_size)

        def handle_events(self) -> None:
            try:
                self._handle_events()
            except FramingError as e:
                log.info("refused a request from %s: %s", self.client, e)
                self._refuse(e.status, str(e))

        def _refuse(self, status: int, message: str) -> None:
            """Answer ``status`` with ``message`` as JSON, then close: what follows on this connection is not trusted."""
            body = json.dumps({"code": status, "type": "BadRequest", "message": message}).encode()
            headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                       (b"connection", b"close")]
            with contextlib.suppress(h11.LocalProtocolError):  # the state machine refused: close without an answer
                self.transport.write(self.conn.send(h11.Response(status_code=status, headers=headers)))
                self.transport.write(self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage()))
            self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def _handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a request's headers have been read
                self._cancel_header_deadline()

        def data_received(self, data: bytes) -> None:
            # the first byte of the next request on a kept-alive connection starts its header deadline;
            # until then the connection is idle, and uvicorn's keep-alive timeout (KEEP_ALIVE_S) applies
            if self.conn.their_state is h11.IDLE and self._header_deadline is None:
                self._arm_header_deadline()
            super().data_received(data)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if self.conn.their_state is h11.IDLE and self.conn.trailing_data[0]:  # part of a pipelined request waits
                self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_deadline()
            super().connection_lost(exc)

        def _waiting_for_headers(self) -> bool:
            return self.conn.their_state is h11.IDLE

    return HeaderTimeoutH11Protocol


def refusal(status: int, message: str) -> bytes:
    """A whole HTTP/1.1 answer with ``status`` and ``message`` as JSON, announcing that the connection closes."""
    body = json.dumps({"code": status, "type": "BadRequest", "message": message}).encode()
    return (f"HTTP/1.1 {status} {http.HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


def _httptools_protocol(seconds: float) -> type[HttpToolsProtocol]:
    """uvicorn's httptools (llhttp) protocol with the header deadline and the strict framing of the module docstring.

    llhttp parses in C and calls back per piece: the deadline runs from the connection's start, or from
    the first byte of the next request (``on_message_begin``, or any byte while no request is open),
    to ``on_headers_complete``. Header bytes are counted in ``on_url`` and ``on_header`` (fields as
    they complete) and, for a header block that arrives in pieces, by the chunks read while it is open
    (llhttp buffers an unfinished field without bound). llhttp itself refuses Content-Length with
    Transfer-Encoding, a duplicate Content-Length and a malformed Transfer-Encoding (400, then close);
    a Transfer-Encoding other than exactly ``chunked`` is refused here, as h11 does.
    """

    class HeaderTimeoutHttpToolsProtocol(_HeaderDeadline, HttpToolsProtocol):
        """httptools with a per-request deadline for the headers (see the module docstring)."""

        header_timeout_s = seconds
        max_header_bytes = MAX_HEADER_BYTES

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._header_deadline: asyncio.TimerHandle | None = None
            self._headers_pending = True  # between requests or inside a request's headers: the deadline applies
            self._in_head = False  # inside a request's headers (on_message_begin .. on_headers_complete)
            self._messages = 0
            self._header_bytes = 0  # request target and header fields of this request, as llhttp hands them over
            self._buffered = 0  # bytes of the chunks read wholly inside this request's headers
            self._transfer_encoding: bytes | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_deadline()
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            """uvicorn's, with the deadline armed by the first byte of a request and every refusal answered as JSON."""
            self._unset_keepalive_if_required()
            if self._headers_pending and self._header_deadline is None:
                self._arm_header_deadline()
            messages, in_head = self._messages, self._in_head
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
                return
            except httptools.HttpParserError as e:
                cause = e.__context__ if isinstance(e.__context__, FramingError) else FramingError(f"invalid HTTP request: {e}", 400)
                self._refuse(cause.status, str(cause))
                return
            if in_head and self._in_head and self._messages == messages:  # this whole chunk was header bytes
                self._buffered += len(data)
                if self._buffered > self.max_header_bytes:
                    self._refuse(431, f"request headers too large: over {self._buffered} bytes, at most {self.max_header_bytes}")

        def _refuse(self, status: int, message: str) -> None:
            """Answer ``status`` (unless a response is under way on this connection), then close: what follows is not trusted."""
            log.info("refused a request from %s: %s", self.client, message)
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self.transport.write(refusal(status, message))
            self.transport.close()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._messages += 1
            self._in_head = self._headers_pending = True
            self._header_bytes = self._buffered = 0
            self._transfer_encoding = None
            if self._header_deadline is None:  # a pipelined request that began in the chunk that ended the last one
                self._arm_header_deadline()

        def on_url(self, url: bytes) -> None:
            self._count(len(url))
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._count(len(name) + len(value) + 4)
            if name.lower() == b"transfer-encoding":
                self._transfer_encoding = value if self._transfer_encoding is None else self._transfer_encoding + b", " + value
            super().on_header(name, value)

        def _count(self, size: int) -> None:
            """Add ``size`` header bytes; over :data:`MAX_HEADER_BYTES` stops llhttp (the raise) and answers 431."""
            self._header_bytes += size
            if self._header_bytes > self.max_header_bytes:
                raise FramingError(f"request headers too large: {self._header_bytes} bytes, at most {self.max_header_bytes}", 431)

        def on_headers_complete(self) -> None:
            self._in_head = self._headers_pending = False
            self._cancel_header_deadline()
            te = self._transfer_encoding
            if te is not None and te.strip().lower() != b"chunked":
                raise FramingError(f"Transfer-Encoding {te.decode('latin-1')!r} is not supported: only chunked", 501)
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._headers_pending = True  # the next byte on this connection starts the next request's deadline

        def _waiting_for_headers(self) -> bool:
            return self._headers_pending

    return HeaderTimeoutHttpToolsProtocol
