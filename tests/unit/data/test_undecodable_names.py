"""File and folder names that are not valid UTF-8 (any bytes but / and NUL are a name on Linux).

Decision: such a class folder is not a class (a label must be text: it goes into the model, its metadata and every
JSON answer) and is skipped with a warning; such a file is a bad file with the reason, shown with its bytes as
``\\xNN`` escapes. Nothing on the way (ingest, validation, its reports, the step cache) ends in a traceback.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from visionloop.config import ValidationPolicy
from visionloop.data.sources import ingest
from visionloop.data.validate import load_report, validate, write_report
from visionloop.pipeline.cache import folder_fingerprint


def named(parent: Path, raw: bytes) -> Path:
    """``parent / raw`` where ``raw`` is a name in bytes (Python keeps undecodable bytes as surrogates)."""
    return Path(os.fsdecode(os.fsencode(parent) + b"/" + raw))


@pytest.fixture
def folder(make_image_folder, write_png) -> Path:
    root = make_image_folder(classes=("a", "b"), per_class=20, size=8)
    write_png(named(root / "a", b"\xff.png"), size=8, seed=7)  # a misnamed file in a good class
    write_png(named(named(root, b"caf\xe9"), b"x.png"), size=8, seed=8)  # a Latin-1 folder name
    return root


def test_ingest_skips_a_class_folder_whose_name_is_not_utf8(folder, tmp_home):
    result = ingest(str(folder), tmp_home)
    assert result.classes == ["a", "b"]
    assert result.num_files == 40
    result.model_dump_json()  # every name in it is text


def test_validation_lists_the_misnamed_file_and_writes_both_reports(folder, tmp_path):
    report = validate(folder, ValidationPolicy(max_bad_fraction=0.1))
    assert report.passed, report.errors
    assert report.classes == ["a", "b"]
    assert report.bad_files == {"a/\\xff.png": "name is not valid UTF-8: rename the file"}
    assert report.total_files == 41
    assert any("caf\\xe9" in note and "not valid UTF-8" in note for note in report.warnings), report.warnings
    path = write_report(report, tmp_path / "report")
    assert load_report(path).bad_files == report.bad_files
    markdown = (path.parent / "report.md").read_text(encoding="utf-8")
    assert "`a/\\xff.png`: name is not valid UTF-8" in markdown


def test_report_of_a_root_whose_own_path_is_not_utf8(make_image_folder, tmp_path):
    root = make_image_folder(root=named(tmp_path, b"d\xe9j\xe0"), classes=("a", "b"), per_class=5, size=8)
    report = validate(root, ValidationPolicy())
    path = write_report(report, tmp_path / "report")
    assert "d\\xe9j\\xe0" in (path.parent / "report.md").read_text(encoding="utf-8")


def test_step_cache_fingerprint_of_a_folder_with_such_names(folder):
    before = folder_fingerprint(folder)
    assert folder_fingerprint(folder) == before
    named(folder / "a", b"\xff.png").unlink()
    assert folder_fingerprint(folder) != before
