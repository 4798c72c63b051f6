"""The header deadline and strict framing of :mod:`deploylab.serving.header_timeout`, on both of uvicorn's parsers,
driven in-process through a recording transport: the cases a real socket cannot time exactly (a pipelined request
that begins in the read that ends the one before), in well under a second each. ``test_asgi_server`` runs the
same protections against real servers on loopback."""

from __future__ import annotations

import asyncio

import pytest
from uvicorn.config import Config
from uvicorn.server import ServerState

from deploylab.serving.header_timeout import HTTP_PARSERS, MAX_HEADER_BYTES, header_timeout_protocol

DEADLINE_S = 0.1


async def echo(scope, receive, send) -> None:
    """Answer 200 with the request body after ``ok``."""
    body, more = b"", True
    while more:
        message = await receive()
        body, more = body + message.get("body", b""), message.get("more_body", False)
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", str(len(body) + 2).encode())]})
    await send({"type": "http.response.body", "body": b"ok" + body})


class Recorder(asyncio.Transport):
    """A transport that keeps what the server writes and whether it closed."""

    def __init__(self) -> None:
        super().__init__()
        self.written, self.closed = b"", False

    def write(self, data) -> None:
        self.written += bytes(data)

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name, default=None):
        return {"sockname": ("127.0.0.1", 8080), "peername": ("127.0.0.1", 50000)}.get(name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def talk(parser: str, *steps: bytes | float) -> Recorder:
    """Open a connection to the protocol, send each ``bytes`` step (a float step: wait that long), then wait past the deadline."""
    async def run() -> Recorder:
        config = Config(echo, log_level="warning", timeout_keep_alive=5)
        config.load()
        protocol = header_timeout_protocol(DEADLINE_S, parser)(config=config, server_state=ServerState(), app_state={},
                                                               _loop=asyncio.get_running_loop())
        transport = Recorder()
        protocol.connection_made(transport)
        for step in steps:
            if isinstance(step, float):
                await asyncio.sleep(step)
            elif not transport.closed:
                protocol.data_received(step)
                await asyncio.sleep(0.01)
        await asyncio.sleep(DEADLINE_S * 1.5)
        closed_by_server = transport.closed
        protocol.connection_lost(None)  # the client goes: uvicorn closes the transport too
        transport.closed = closed_by_server
        return transport
    return asyncio.run(run())


def post(body: bytes = b"x", extra: bytes = b"") -> bytes:
    return b"POST /p HTTP/1.1\r\nHost: x\r\n" + extra + b"Content-Length: %d\r\n\r\n" % len(body) + body


@pytest.mark.parametrize("parser", HTTP_PARSERS)
def test_an_idle_kept_alive_connection_outlives_the_deadline_and_half_a_next_request_does_not(parser):
    answered = talk(parser, post(), DEADLINE_S * 2, post())
    assert answered.written.count(b"HTTP/1.1 200") == 2 and not answered.closed
    cut = talk(parser, post(), DEADLINE_S * 2, b"GET /p HT")
    assert cut.written.count(b"HTTP/1.1 200") == 1 and cut.closed


@pytest.mark.parametrize("parser", HTTP_PARSERS)
def test_a_pipelined_request_that_begins_in_the_previous_read_has_a_deadline(parser):
    t = talk(parser, post() + post(), post() + b"GET /p HT")
    assert t.written.count(b"HTTP/1.1 200") == 3 and t.closed


@pytest.mark.parametrize("parser", HTTP_PARSERS)
def test_headers_over_the_limit_are_refused_in_one_read_and_in_pieces(parser):
    whole = talk(parser, post(extra=b"X-Big: " + b"a" * (2 * MAX_HEADER_BYTES) + b"\r\n"))
    assert whole.written.startswith(b"HTTP/1.1 431") and whole.closed
    # never finished: refused as it grows (not just closed by the deadline); h11 answers 400, from its incomplete-event bound
    pieces = talk(parser, b"GET /p HTTP/1.1\r\nX-Big: ", *[b"a" * 4096] * (MAX_HEADER_BYTES // 4096 + 2))
    assert pieces.written[:12] in (b"HTTP/1.1 431", b"HTTP/1.1 400") and pieces.closed
    fits = talk(parser, post(extra=b"X-Fits: " + b"a" * (MAX_HEADER_BYTES // 2) + b"\r\n"))
    assert fits.written.startswith(b"HTTP/1.1 200") and not fits.closed


@pytest.mark.parametrize("parser", HTTP_PARSERS)
@pytest.mark.parametrize("encoding", [b"gzip, chunked", b"identity", b"chunked, chunked"])
def test_a_transfer_encoding_other_than_chunked_is_refused_and_closed(parser, encoding):
    t = talk(parser, b"POST /p HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: " + encoding + b"\r\n\r\n0\r\n\r\n")
    assert t.written[:12] in (b"HTTP/1.1 400", b"HTTP/1.1 501") and t.written.count(b"HTTP/1.1") == 1 and t.closed


def test_an_unknown_parser_or_a_deadline_of_zero_is_refused():
    with pytest.raises(ValueError, match="parser"):
        header_timeout_protocol(1.0, "picohttp")
    with pytest.raises(ValueError, match="> 0"):
        header_timeout_protocol(0.0, "httptools")
