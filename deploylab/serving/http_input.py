"""The HTTP door every Python server of the course shares: the bearer check, the bounded body read, error answers.

The custom ASGI server (lesson 07), Ray Serve's replicas and LitServe's front door (lesson 08) all
receive a Starlette ``Request`` (or raw ASGI messages) and must refuse the same things the same way
before :func:`deploylab.serving.protocol.decode_http` sees a byte:

- :func:`authorized` -- the ``Authorization: Bearer <key>`` header compared in constant time;
- :func:`read_body` -- the body, refused with 413 as soon as it is known to be too large and with 408
  when it does not arrive in time (uvicorn, Ray Serve and LitServe have no body timeout of their own);
- :func:`error_response` -- a 4xx as :class:`~deploylab.serving.protocol.BadRequest`'s JSON, a 5xx
  in the same shape.
"""

from __future__ import annotations

import asyncio
import hmac
import json
from collections.abc import AsyncIterator, Mapping

from .protocol import BadRequest

BODY_TIMEOUT_S = 10.0  # the whole body must arrive within this; uvicorn itself has no such timeout
MAX_REQUEST_BYTES = 1 << 20  # the outer limit, as TorchServe's max_request_size; protocol.LIMITS is the inner one
UNAUTHORIZED = "missing or wrong bearer token: send 'Authorization: Bearer <key from the key file>'"


def expected_header(key: str) -> bytes:
    """The exact ``Authorization`` value a request must carry; refuses keys too short to be secret."""
    if len(key) < 16:
        raise ValueError("the bearer key must be at least 16 characters (use secrets.token_urlsafe)")
    return f"Bearer {key}".encode()


def authorized(headers: Mapping[str, str], expected: bytes) -> bool:
    """``headers`` (case-insensitive, as Starlette's) carry the expected bearer token; constant-time compare."""
    return hmac.compare_digest(headers.get("authorization", "").encode(), expected)


async def read_chunks(chunks: AsyncIterator[bytes], content_length: str | None, limit: int, timeout_s: float) -> bytes:
    """Join ``chunks`` into the body: 413 once it is known to exceed ``limit``, 408 when it takes over ``timeout_s``.

    A body shorter than its Content-Length, or one sent a byte at a time, would otherwise hold the
    connection (and a worker) forever.
    """
    if content_length and content_length.isdigit() and int(content_length) > limit:
        raise BadRequest(f"request too large: {int(content_length):,} bytes, the server's limit is {limit:,}", 413)
    parts, n = [], 0
    try:
        async with asyncio.timeout(timeout_s):
            async for chunk in chunks:
                n += len(chunk)
                if n > limit:
                    raise BadRequest(f"request too large: over {limit:,} bytes, the server's limit", 413)
                parts.append(chunk)
    except TimeoutError:
        raise BadRequest(f"the request body did not arrive within {timeout_s:.0f} s ({n:,} bytes so far)", 408) from None
    return b"".join(parts)


async def read_body(request, limit: int = MAX_REQUEST_BYTES, timeout_s: float = BODY_TIMEOUT_S) -> bytes:
    """The body of a Starlette ``request``, bounded in size and time (see :func:`read_chunks`)."""
    from starlette.requests import ClientDisconnect

    try:
        return await read_chunks(request.stream(), request.headers.get("content-length"), limit, timeout_s)
    except ClientDisconnect:
        raise BadRequest("the client went away before sending the whole body") from None


def error_body(code: int, message: str) -> bytes:
    """The JSON body of an error answer: a 4xx is a :class:`BadRequest`, anything else the same shape."""
    if 400 <= code < 500:
        return BadRequest(message, code).body().encode()
    kind = "ServiceUnavailable" if code == 503 else "ServerError"
    return json.dumps({"code": code, "type": kind, "message": message}).encode()


def error_response(code: int, message: str, headers: Mapping[str, str] | None = None):
    """A Starlette ``Response`` carrying :func:`error_body`."""
    from starlette.responses import Response

    return Response(error_body(code, message), status_code=code, media_type="application/json", headers=dict(headers or {}))
