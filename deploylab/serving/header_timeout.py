"""A deadline for request headers, which uvicorn does not have, and strict request framing.

uvicorn closes a connection that stays idle after a response (``timeout_keep_alive``), but not one
that is sending its request headers: a client that sends them one byte at a time (slowloris), or
opens a connection and sends nothing, holds a connection -- and a file descriptor -- for as long as
it likes. nginx calls the missing setting ``client_header_timeout``. The body has its own deadline
in the app (``http_input.BODY_TIMEOUT_S``), where a 408 can still be sent.

:func:`header_timeout_protocol` returns uvicorn's h11 protocol with that deadline: from the moment a
connection opens, or a response is complete and the next request may start, the request's headers
must be complete within ``seconds``, else the connection is closed (no response is possible: h11,
like HTTP, answers only a request it has read). On a kept-alive connection the deadline starts
with the first byte of the next request, not when the previous response completes: an idle
connection is closed by the keep-alive timeout (:data:`KEEP_ALIVE_S`, passed to uvicorn as
``timeout_keep_alive``), which stays longer than any client of the kit keeps one idle.

The same protocol refuses, with a 4xx and ``Connection: close``, what h11 lets through:

- request headers larger than :data:`MAX_HEADER_BYTES` (431): h11 bounds only a header block that
  arrives in pieces, so a 70 KB header line sent in one write was read whole;
- a request with both ``Content-Length`` and ``Transfer-Encoding`` (400): h11 frames it by the
  chunked encoding, a proxy in front may frame it by the length, and the rest of the body becomes a
  second, smuggled request. RFC 9112 section 6.3 allows treating it as an error; we do, and close.
  (h11 already refuses any ``Transfer-Encoding`` other than exactly ``chunked``, and a malformed
  ``Content-Length``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0
# An idle kept-alive connection is closed after this long (uvicorn's ``timeout_keep_alive``, default 5 s).
# It must be clearly longer than any client keeps an idle connection (httpx: 5 s, ``keepalive_expiry``):
# with both at 5 s, a pooled connection was reused at the moment the server closed it, and 1 to 5 of
# 288 requests sent after idle gaps of 4.988-4.999 s failed with a transport error. nginx's default is 75 s.
KEEP_ALIVE_S = 75
MAX_HEADER_BYTES = 16 * 1024  # request target and header fields together; nginx's default allows 8 KB a line


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


def header_timeout_protocol(seconds: float = HEADER_TIMEOUT_S) -> type[H11Protocol]:
    """uvicorn's h11 protocol that closes a connection whose request headers take longer than ``seconds``.

    Pass the class as ``uvicorn.run(app, http=header_timeout_protocol(10))``.
    """
    if not seconds > 0:
        raise ValueError(f"the header timeout must be > 0 s, got {seconds}")

    class HeaderTimeoutH11Protocol(H11Protocol):
        """h11 with a per-request deadline for the headers (see the module docstring)."""

        header_timeout_s = float(seconds)
        _header_deadline: asyncio.TimerHandle | None = None

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

        def _arm_header_deadline(self) -> None:
            self._cancel_header_deadline()
            self._header_deadline = self.loop.call_later(self.header_timeout_s, self._headers_too_slow)

        def _cancel_header_deadline(self) -> None:
            if self._header_deadline is not None:
                self._header_deadline.cancel()
                self._header_deadline = None

        def _headers_too_slow(self) -> None:
            self._header_deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                log.info("closed a connection from %s: no complete request headers within %.0f s",
                         self.client, self.header_timeout_s)
                self.transport.close()

    return HeaderTimeoutH11Protocol
