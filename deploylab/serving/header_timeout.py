"""A deadline for request headers, which uvicorn does not have.

uvicorn closes a connection that stays idle after a response (``timeout_keep_alive``), but not one
that is sending its request headers: a client that sends them one byte at a time (slowloris), or
opens a connection and sends nothing, holds a connection -- and a file descriptor -- for as long as
it likes. nginx calls the missing setting ``client_header_timeout``. The body has its own deadline
in the app (``http_input.BODY_TIMEOUT_S``), where a 408 can still be sent.

:func:`header_timeout_protocol` returns uvicorn's h11 protocol with that deadline: from the moment a
connection opens, or a response is complete and the next request may start, the request's headers
must be complete within ``seconds``, else the connection is closed (no response is possible: h11,
like HTTP, answers only a request it has read).
"""

from __future__ import annotations

import asyncio
import logging

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger(__name__)

HEADER_TIMEOUT_S = 10.0


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

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_deadline()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.their_state is not h11.IDLE:  # a request's headers have been read
                self._cancel_header_deadline()

        def on_response_complete(self) -> None:
            self._arm_header_deadline()  # before super(): it may read a pipelined request at once
            super().on_response_complete()

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
