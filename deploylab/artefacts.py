"""One artefact contract for every file a lesson hands to the next: the file, then its metadata.

Checkpoints (:mod:`deploylab.models`), pruned models (:mod:`deploylab.prune`), quantized programs
(:mod:`deploylab.quantize`) and ONNX files with their model cards (:mod:`deploylab.export`) are
all saved and checked here:

- :func:`save` -- write the file to a temporary name and rename it (a crash never leaves half a
  file under the real name), hash it, then write the metadata *last* (also atomically), so that
  metadata only ever describes a complete file;
- :func:`describe` -- the metadata of a file that is already in place (an ONNX file written by
  the exporter): data hash, library versions, time, size and sha256 added to the caller's fields;
- :func:`problems` -- what disqualifies a file against its metadata: another profile, other data,
  another kind, a sha256 that differs (corrupt or replaced). Each module raises its own error
  with the fix for its kind of artefact.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import data
from .files import atomic_path, atomic_write_json, sha256_file
from .hardware import library_versions


def describe(path: Path, meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with what every artefact's metadata holds: data hash, versions, time, file, size, sha256."""
    return {
        **meta,
        "data_sha256": data.DATA_SHA256,
        "versions": library_versions(),
        "created": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "file": path.name,
        "size_bytes": path.stat().st_size,
        "sha256": sha256_file(path),
    }


def save(path: Path, write: Callable[[Path], None], meta: dict[str, Any], meta_path: Path) -> dict[str, Any]:
    """``write(tmp)`` the file, rename it to ``path``, then write its metadata to ``meta_path``; returns the metadata."""
    with atomic_path(path) as tmp:
        write(tmp)
    full = describe(path, meta)
    atomic_write_json(meta_path, full)
    return full


def problems(path: Path, meta: dict[str, Any], *, profile: str | None = None, kind: str | None = None) -> list[str]:
    """What disqualifies ``path`` against its metadata (empty when it may be used).

    ``profile``: the profile it must have been built for (None: any); ``kind``: the value its
    metadata's ``format`` must have (None: any).
    """
    found = []
    if profile is not None and meta.get("profile") != profile:
        found.append(f"it was built for profile {meta.get('profile')!r}, not {profile!r}")
    if kind is not None and meta.get("format") != kind:
        found.append(f"it is a {meta.get('format')!r} artefact, not a {kind!r}")
    if meta.get("data_sha256") != data.DATA_SHA256:
        found.append("it was made from different data (data hash differs)")
    actual = sha256_file(path)
    if meta.get("sha256") != actual:
        found.append(f"its sha256 is {actual[:12]}..., the metadata says {str(meta.get('sha256'))[:12]}... (corrupt or replaced)")
    return found
