"""The corpus of bad requests (``bad_inputs/`` next to this module): each one must get a 4xx.

``cases.json`` lists every case: a file of the folder, inline text, or text repeated to a large
body made on the fly (no multi-megabyte file in git), with why it is bad and, where the corpus says
so, the exact status it must get. The same corpus is sent to every server (lessons 05-07 and the
tests), through :func:`run_bad_inputs`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .api import Client
from .processes import ServeError

CORPUS_DIR = Path(__file__).with_name("bad_inputs")


@dataclass(frozen=True)
class BadInput:
    """One bad request of the corpus and the status class it must get."""

    name: str
    body: bytes
    content_type: str | None
    why: str
    expect: int | None = None  # an exact 4xx if the corpus says so, else any 4xx
    frontend: bool = False  # refused by TorchServe's Java frontend (no handler involved): its 413 has an empty body


def bad_inputs(folder: str | os.PathLike = CORPUS_DIR) -> list[BadInput]:
    """Read the corpus: ``cases.json`` lists each request (a file in the folder, or inline text)."""
    folder = Path(folder)
    cases = json.loads((folder / "cases.json").read_text())
    out = []
    for c in cases:
        if "file" in c:
            body = (folder / c["file"]).read_bytes()
        elif "repeat" in c:  # a large body made on the fly: no multi-megabyte file in git
            body = c.get("prefix", "").encode() + c["text"].encode() * int(c["repeat"]) + c.get("suffix", "").encode()
        else:
            body = c.get("text", "").encode()
        out.append(BadInput(c["name"], body, c.get("content_type"), c["why"], c.get("expect"), bool(c.get("frontend", False))))
    if len(out) < 20:
        raise ServeError(f"the bad-input corpus in {folder} has {len(out)} cases; the lesson expects at least 20")
    return out


def run_bad_inputs(client: Client, model: str, cases: Iterable[BadInput]) -> list[dict[str, Any]]:
    """Send every bad request; one row each with the status, whether it is an acceptable 4xx, and the message."""
    rows = []
    for case in cases:
        r = client.predict(model, case.body, case.content_type)
        try:
            message = r.json().get("message", r.text)
        except ValueError:
            message = r.text
        ok = 400 <= r.status_code < 500 and (case.expect is None or r.status_code == case.expect)
        is_json = r.headers.get("content-type", "").startswith("application/json")
        rows.append({"case": case.name, "status": r.status_code, "ok": ok and (is_json or case.frontend), "json": is_json,
                     "message": str(message)[:120] or "(empty body)", "answered by": "frontend" if case.frontend else "handler"})
    return rows
