"""Raw HTTP/1.1 on a plain socket, for the tests that send what no HTTP library would (smuggling shapes,
oversized headers): the bytes go out as given and everything the server answers is read until it closes."""

from __future__ import annotations

import socket
import time


def exchange(port: int, request: bytes, timeout_s: float = 10.0) -> bytes:
    """Send raw bytes on a new connection; everything the server answers until it closes (or ``timeout_s``)."""
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout_s) as sock:
        sock.sendall(request)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                chunk = sock.recv(65536)
            except (TimeoutError, ConnectionResetError):
                break
            if not chunk:
                break
            answer += chunk
    return answer


def head(key: str, extra: str = "", target: str = "/ping", method: str = "GET") -> bytes:
    """A request's head with the bearer ``key`` and ``extra`` header lines (each ending in CRLF)."""
    return f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {key}\r\n{extra}\r\n".encode()


def smuggling_shape(key: str, path: str = "/predictions/student") -> bytes:
    """A POST with both Content-Length and Transfer-Encoding whose body hides a second request (a /ping)."""
    body = b"0\r\n\r\n" + head(key)
    return head(key, f"Content-Type: image/png\r\nContent-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n",
                path, "POST") + body


def read_response(sock: socket.socket) -> bytes:
    """One whole response from a kept-alive connection: its head, then as many body bytes as its
    Content-Length says (a server may write the head and the body in separate segments). b"" if closed."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")), 0)
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return head + b"\r\n\r\n" + body
