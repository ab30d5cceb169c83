"""Atomic writes: a failed block leaves no trace, a finished one replaces the target whole."""

from __future__ import annotations

import pytest

from visionloop.fsutil import atomic_dir, atomic_write_json, read_json, sha256_bytes, sha256_file


def test_atomic_dir_creates_the_target_when_the_block_finishes(tmp_path):
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        assert tmp != final
        assert tmp.parent == final.parent
        (tmp / "file.txt").write_text("done")
        assert not final.exists()  # nothing visible until the block is over
    assert (final / "file.txt").read_text() == "done"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_leaves_no_trace_when_the_block_raises(tmp_path):
    final = tmp_path / "out"
    with pytest.raises(RuntimeError, match="boom"), atomic_dir(final) as tmp:
        (tmp / "half.txt").write_text("half")
        raise RuntimeError("boom")
    assert not final.exists()
    assert list(tmp_path.iterdir()) == []


def test_atomic_dir_keeps_the_old_target_when_the_block_raises(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with pytest.raises(KeyboardInterrupt), atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
        raise KeyboardInterrupt
    assert sorted(p.name for p in final.iterdir()) == ["old.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_atomic_dir_replaces_an_existing_target(tmp_path):
    final = tmp_path / "out"
    final.mkdir()
    (final / "old.txt").write_text("old")
    with atomic_dir(final) as tmp:
        (tmp / "new.txt").write_text("new")
    assert sorted(p.name for p in final.iterdir()) == ["new.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .old or .tmp left behind


def test_atomic_dir_creates_missing_parents(tmp_path):
    final = tmp_path / "a" / "b" / "out"
    with atomic_dir(final) as tmp:
        (tmp / "x").write_text("x")
    assert (final / "x").is_file()


def test_atomic_write_json_round_trip(tmp_path):
    path = tmp_path / "nested" / "data.json"
    payload = {"b": [1, 2.5, "three"], "a": {"nested": True, "none": None}}
    atomic_write_json(path, payload)
    assert read_json(path) == payload
    atomic_write_json(path, {"replaced": 1})
    assert read_json(path) == {"replaced": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["data.json"]  # no temporary file left


def test_atomic_write_json_leaves_the_old_file_when_serialising_fails(tmp_path):
    path = tmp_path / "data.json"
    atomic_write_json(path, {"ok": 1})
    with pytest.raises(ValueError, match=r"(?i)circular"):
        atomic_write_json(path, {"loop": _self_referencing()})  # circular: json refuses it
    assert read_json(path) == {"ok": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.json"]


def _self_referencing() -> list:
    loop: list = []
    loop.append(loop)
    return loop


def test_sha256_file_matches_sha256_bytes(tmp_path):
    path = tmp_path / "blob.bin"
    data = bytes(range(256)) * 5000
    path.write_bytes(data)
    assert sha256_file(path, chunk=4096) == sha256_bytes(data)
