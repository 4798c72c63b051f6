"""The one artefact contract: a file written atomically, its metadata last, and the checks every loader uses."""

from __future__ import annotations

import json

import pytest

from deploylab import artefacts, data


def _save(tmp_path, payload: bytes = b"weights", **meta):
    return artefacts.save(tmp_path / "m.bin", lambda tmp: tmp.write_bytes(payload),
                          {"name": "m", "profile": "smoke", "format": "blob", **meta}, tmp_path / "m.json")


def test_save_writes_the_file_then_metadata_that_describes_it(tmp_path):
    meta = _save(tmp_path)
    assert (tmp_path / "m.bin").read_bytes() == b"weights"
    assert json.loads((tmp_path / "m.json").read_text()) == meta
    assert meta["file"] == "m.bin" and meta["size_bytes"] == 7 and meta["data_sha256"] == data.DATA_SHA256
    assert {"versions", "created", "sha256"} <= set(meta) and "torch" in meta["versions"]
    assert artefacts.problems(tmp_path / "m.bin", meta, profile="smoke", kind="blob") == []


def test_a_failed_write_leaves_neither_file_nor_metadata(tmp_path):
    def broken(tmp):
        tmp.write_bytes(b"half a fi")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        artefacts.save(tmp_path / "m.bin", broken, {"name": "m"}, tmp_path / "m.json")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_previous_good_artefact(tmp_path):
    good = _save(tmp_path)

    def broken(tmp):
        raise OSError("interrupted")

    with pytest.raises(OSError):
        artefacts.save(tmp_path / "m.bin", broken, {"name": "m"}, tmp_path / "m.json")
    assert artefacts.problems(tmp_path / "m.bin", json.loads((tmp_path / "m.json").read_text())) == []
    assert json.loads((tmp_path / "m.json").read_text()) == good


def test_problems_name_each_reason_to_refuse(tmp_path):
    meta = _save(tmp_path)
    assert any("profile 'smoke', not 'full'" in p for p in artefacts.problems(tmp_path / "m.bin", meta, profile="full"))
    assert any("'blob' artefact, not a 'onnx'" in p for p in artefacts.problems(tmp_path / "m.bin", meta, kind="onnx"))
    assert any("different data" in p for p in artefacts.problems(tmp_path / "m.bin", {**meta, "data_sha256": "0" * 64}))
    (tmp_path / "m.bin").write_bytes(b"weightz")  # replaced, same size
    assert any("corrupt or replaced" in p for p in artefacts.problems(tmp_path / "m.bin", meta))
