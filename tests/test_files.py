import pytest

from deploylab import config
from deploylab.files import atomic_path, atomic_write_json, sha256_file, shown


def test_failed_write_keeps_the_old_file(tmp_path):
    target = tmp_path / "model.bin"
    target.write_bytes(b"good")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_bytes(b"half-writ")
            raise RuntimeError("interrupted")
    assert target.read_bytes() == b"good"
    assert list(tmp_path.iterdir()) == [target]  # no temporary file left behind


def test_atomic_json_and_hash(tmp_path):
    p = atomic_write_json(tmp_path / "a" / "b.json", {"x": 1})
    assert p.read_text() == '{\n  "x": 1\n}\n'
    # sha256 of the exact bytes above
    import hashlib

    assert sha256_file(p) == hashlib.sha256(p.read_bytes()).hexdigest()


def test_shown_paths_are_relative_to_the_repo_or_a_name(tmp_path):
    assert shown(config.ROOT / "models" / "workshop" / "student.pt") == "models/workshop/student.pt"
    assert shown(tmp_path / "scratch" / "student_fp32.onnx") == "student_fp32.onnx"
