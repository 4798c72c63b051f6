"""What the command line of every Python server of the course shares: its options and its key file.

The custom server (:mod:`.asgi`), LitServe (:mod:`.litserve_app`) and Ray Serve (:mod:`.ray_serve`)
take the same options (:func:`server_arguments`: the model and the runtime that serves it, port,
key file, batching, timeouts, HTTP parser) and write their bearer key the same way (:func:`write_key_file`:
0600, exclusive, a stale file of a server that is gone replaced).
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
from pathlib import Path

import psutil

from .batching_policy import MAX_BATCH, MAX_WAIT_MS
from .header_timeout import DEFAULT_HTTP, HEADER_TIMEOUT_S, HTTP_PARSERS, KEEP_ALIVE_S
from .http_input import BODY_TIMEOUT_S
from .predictor import RUNTIMES

LOOPBACK = ("127.0.0.1", "::1", "localhost")


def write_key_file(path: str | os.PathLike) -> str:
    """Generate a bearer key and write it to ``path``, readable by its owner only (created 0600).

    The file is created exclusively (never written through an existing file or link); one left
    behind by a server that is gone (its pid no longer runs) is removed first, one of a server
    that still runs is refused.
    """
    path = Path(path)
    if path.exists():
        try:
            owner = int(json.loads(path.read_text()).get("pid", -1))
        except (OSError, ValueError, AttributeError):
            owner = -1
        if owner > 0 and owner != os.getpid() and psutil.pid_exists(owner):
            raise SystemExit(f"{path} belongs to a running server (pid {owner}): stop it or choose another --key-file")
        path.unlink()
    key = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"inference": {"key": key}, "pid": os.getpid()}, f)
    return key


def server_arguments(description: str) -> argparse.ArgumentParser:
    """The command-line options every Python server of the course shares (model, port, key file, batching, timeouts)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--model", required=True, help="the model file (.onnx or .pte) with its .card.json next to it")
    p.add_argument("--runtime", choices=RUNTIMES, default=None,
                   help="what runs the model (default: from the file's suffix: .onnx onnxruntime, .pte executorch)")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--host", default="127.0.0.1", help="loopback only: put a TLS proxy in front to publish it")
    p.add_argument("--key-file", required=True, help="where to write the generated bearer key (0600)")
    p.add_argument("--max-batch", type=int, default=MAX_BATCH)
    p.add_argument("--max-wait-ms", type=float, default=float(MAX_WAIT_MS))
    p.add_argument("--body-timeout-s", type=float, default=BODY_TIMEOUT_S, help="a request body must arrive within this (408)")
    p.add_argument("--header-timeout-s", type=float, default=HEADER_TIMEOUT_S,
                   help="a request's headers must arrive within this, else the connection is closed")
    p.add_argument("--http", choices=HTTP_PARSERS, default=DEFAULT_HTTP,
                   help="uvicorn's HTTP parser, with the header deadline and strict framing either way (header_timeout)")
    p.add_argument("--keep-alive-s", type=int, default=KEEP_ALIVE_S,
                   help="an idle kept-alive connection is closed after this (longer than any client of the kit keeps one)")
    return p
