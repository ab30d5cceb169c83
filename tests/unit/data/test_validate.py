"""Validation on real folders: undecodable files, bombs, duplicates, label conflicts, policy."""

from __future__ import annotations

import shutil

import pytest

from visionloop.config import ValidationPolicy
from visionloop.data.validate import ValidationReport, inspect_file, load_report, validate, write_report
from visionloop.errors import DataError

POLICY = ValidationPolicy()


def usable_paths(report: ValidationReport) -> set[str]:
    return {record.path for record in report.files}


def test_clean_folder_passes(make_image_folder):
    root = make_image_folder(classes=("a", "b", "c"), per_class=6, size=12)
    report = validate(root, POLICY)
    assert report.passed, report.errors
    assert report.errors == []
    assert report.warnings == []
    assert report.classes == ["a", "b", "c"]
    assert report.total_files == 18
    assert len(report.files) == 18
    assert report.per_class == {"a": 6, "b": 6, "c": 6}
    assert report.modes == {"RGB": 18}
    assert report.sizes["width_min"] == report.sizes["height_max"] == 12
    assert report.imbalance_ratio == 1.0
    assert report.bad_files == {} and report.duplicates_removed == {} and report.label_conflicts == {}
    record = next(r for r in report.files if r.path == "a/a_000.png")
    assert (record.label, record.mode, record.width, record.height) == ("a", "RGB", 12, 12)
    assert len(record.sha256) == 64


@pytest.fixture
def folder_with_bad_files(make_image_folder, write_png):
    """40 good images in two classes plus one file of each kind of damage in class a."""
    root = make_image_folder(classes=("a", "b"), per_class=20, size=16)
    (root / "a" / "empty.png").write_bytes(b"")
    real = write_png(root / "a" / "real.png", size=30, seed=99).read_bytes()  # 900 pixels: under the bomb limit
    (root / "a" / "real.png").unlink()
    (root / "a" / "truncated.png").write_bytes(real[: len(real) // 2])
    (root / "a" / "notes.png").write_text("this is a text file with an image extension\n")
    write_png(root / "b" / "huge.png", size=64, seed=98)
    return root


def test_bad_files_are_listed_with_a_reason_and_excluded(folder_with_bad_files):
    policy = ValidationPolicy(max_pixels=1000, max_bad_fraction=0.2)
    report = validate(folder_with_bad_files, policy)
    assert set(report.bad_files) == {"a/empty.png", "a/truncated.png", "a/notes.png", "b/huge.png"}
    assert report.bad_files["a/empty.png"] == "empty file"
    assert "not a decodable image" in report.bad_files["a/truncated.png"]
    assert "not a decodable image" in report.bad_files["a/notes.png"]
    assert "decompression bomb" in report.bad_files["b/huge.png"]
    assert "4096 pixels" in report.bad_files["b/huge.png"]
    assert not usable_paths(report) & set(report.bad_files)
    assert report.total_files == 44
    assert len(report.files) == 40
    assert report.per_class == {"a": 20, "b": 20}
    assert report.passed, report.errors  # 4 of 44 is under the 20% allowed
    assert any("4 unusable files excluded" in note for note in report.warnings)


def test_pixel_limit_in_inspect_file(tmp_path, write_png):
    path = write_png(tmp_path / "wide.png", size=(40, 30))
    with pytest.raises(ValueError, match=r"40x30 is over the 1000-pixel limit"):
        inspect_file(path, max_pixels=1000)
    assert inspect_file(path, max_pixels=1200)[:3] == ("RGB", 40, 30)


def test_image_between_one_and_two_times_the_limit_is_refused(make_image_folder, write_png):
    # PIL only warns between max_pixels and twice that; the validator still refuses the image
    root = make_image_folder(per_class=20, size=16)
    write_png(root / "a" / "wide.png", size=(40, 30))
    report = validate(root, ValidationPolicy(max_pixels=1000))
    assert "decompression bomb" in report.bad_files["a/wide.png"]
    assert "1200 pixels" in report.bad_files["a/wide.png"]
    assert "a/wide.png" not in usable_paths(report)


def test_pil_pixel_limit_is_restored(folder_with_bad_files):
    from PIL import Image

    before = Image.MAX_IMAGE_PIXELS
    validate(folder_with_bad_files, ValidationPolicy(max_pixels=1000))
    assert before == Image.MAX_IMAGE_PIXELS


def test_too_many_bad_files_fail(folder_with_bad_files):
    report = validate(folder_with_bad_files, ValidationPolicy(max_pixels=1000, max_bad_fraction=0.05))
    assert not report.passed
    assert any("4 of 44 files" in e and "max_bad_fraction" in e for e in report.errors)
    assert report.bad_fraction == pytest.approx(4 / 44)


def test_exact_duplicates_in_one_class_are_kept_once(make_image_folder):
    root = make_image_folder(classes=("a", "b"), per_class=6)
    shutil.copy(root / "a" / "a_001.png", root / "a" / "copy1.png")
    shutil.copy(root / "a" / "a_001.png", root / "a" / "sub_copy.png")
    report = validate(root, POLICY)
    assert report.duplicates_removed == {"a/copy1.png": "a/a_001.png", "a/sub_copy.png": "a/a_001.png"}
    assert "a/a_001.png" in usable_paths(report)
    assert not usable_paths(report) & set(report.duplicates_removed)
    assert report.per_class == {"a": 6, "b": 6}
    assert report.total_files == 14
    assert report.passed
    assert any("2 exact duplicates" in note for note in report.warnings)
    assert len({r.sha256 for r in report.files}) == len(report.files)


def test_same_image_in_two_classes_is_a_label_conflict(make_image_folder):
    root = make_image_folder(classes=("a", "b"), per_class=6)
    shutil.copy(root / "a" / "a_002.png", root / "b" / "looks_like_b.png")
    shutil.copy(root / "a" / "a_002.png", root / "a" / "again.png")
    report = validate(root, POLICY)
    assert len(report.label_conflicts) == 1
    [paths] = report.label_conflicts.values()
    assert sorted(paths) == ["a/a_002.png", "a/again.png", "b/looks_like_b.png"]
    assert not usable_paths(report) & set(paths)  # every copy excluded
    assert report.per_class == {"a": 5, "b": 6}
    assert any("more than one class" in note for note in report.warnings)


def test_single_class_fails(make_image_folder):
    report = validate(make_image_folder(classes=("only",), per_class=8), POLICY)
    assert not report.passed
    assert any("at least 2 classes" in e for e in report.errors)


def test_class_below_minimum_fails(make_image_folder):
    root = make_image_folder(classes=("big", "small"), per_class=6)
    for path in sorted((root / "small").iterdir())[3:]:
        path.unlink()
    report = validate(root, ValidationPolicy(min_images_per_class=5))
    assert not report.passed
    assert any("min_images_per_class" in e and "'small': 3" in e for e in report.errors)
    assert validate(root, ValidationPolicy(min_images_per_class=3)).passed


def test_class_emptied_by_exclusions_fails(make_image_folder):
    root = make_image_folder(classes=("a", "b"), per_class=6)
    for path in (root / "b").iterdir():
        path.write_bytes(b"")
    report = validate(root, ValidationPolicy(max_bad_fraction=1.0))
    assert not report.passed
    assert report.per_class["b"] == 0
    assert any("'b': 0" in e for e in report.errors)


def test_imbalance_is_a_warning(make_image_folder):
    root = make_image_folder(classes=("many",), per_class=24)
    make_image_folder(root=root, classes=("few",), per_class=2, seed=1)
    report = validate(root, ValidationPolicy(min_images_per_class=2, max_imbalance_ratio=10))
    assert report.passed
    assert report.imbalance_ratio == 12.0
    assert any("class imbalance" in note for note in report.warnings)
    assert not any(
        "imbalance" in note
        for note in validate(root, ValidationPolicy(min_images_per_class=2, max_imbalance_ratio=20)).warnings
    )


def test_only_non_images_fail(tmp_path):
    for name in ("a", "b"):
        for i in range(6):
            (tmp_path / name).mkdir(exist_ok=True)
            (tmp_path / name / f"doc{i}.txt").write_text(f"not an image {name} {i}")
    report = validate(tmp_path, POLICY)
    assert not report.passed
    assert report.files == []
    assert len(report.bad_files) == 12
    assert any("not usable images" in e for e in report.errors)


def test_empty_class_folders_fail(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    report = validate(tmp_path, POLICY)
    assert not report.passed
    assert any("no files" in e for e in report.errors)


def test_stray_and_hidden_files(make_image_folder):
    root = make_image_folder(per_class=5)
    (root / "README.txt").write_text("loose file at the root")
    (root / "a" / ".DS_Store").write_bytes(b"\0\0")
    (root / ".git").mkdir()
    report = validate(root, POLICY)
    assert report.stray_files == ["README.txt"]
    assert report.classes == ["a", "b"]
    assert report.total_files == 10
    assert report.bad_files == {}
    assert report.passed


def test_mixed_modes_are_a_warning(make_image_folder):
    root = make_image_folder(classes=("a",), per_class=5, mode="L")
    make_image_folder(root=root, classes=("b",), per_class=5, mode="RGBA", seed=1)
    report = validate(root, POLICY)
    assert report.passed
    assert report.modes == {"L": 5, "RGBA": 5}
    assert any("mixed image modes" in note for note in report.warnings)


def test_write_report_and_load_report_round_trip(folder_with_bad_files, tmp_path):
    report = validate(folder_with_bad_files, ValidationPolicy(max_pixels=1000, max_bad_fraction=0.05))
    out = tmp_path / "reports" / "validation"
    path = write_report(report, out)
    assert path == out / "report.json"
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.md"]
    loaded = load_report(path)
    assert loaded == report
    markdown = (out / "report.md").read_text(encoding="utf-8")
    assert "FAILED" in markdown
    assert "a/truncated.png" in markdown
    assert "| a | 20 |" in markdown
    # writing again replaces the folder whole
    write_report(validate(folder_with_bad_files, ValidationPolicy(max_pixels=10_000, max_bad_fraction=0.2)), out)
    assert load_report(path).passed
    assert sorted(p.name for p in out.parent.iterdir()) == ["validation"]


def test_load_report_on_missing_or_damaged_file(tmp_path):
    with pytest.raises(DataError, match="cannot read validation report"):
        load_report(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"root": "x"}')
    with pytest.raises(DataError, match="cannot read validation report"):
        load_report(tmp_path / "bad.json")
    (tmp_path / "garbage.json").write_text("{not json")
    with pytest.raises(DataError, match="cannot read validation report"):
        load_report(tmp_path / "garbage.json")


def test_os_metadata_is_neither_a_class_nor_a_bad_file(make_image_folder, tmp_home):
    # what a zip made on macOS or a folder browsed on Windows carries along; ingest ignores it too
    from visionloop.data.sources import ingest

    root = make_image_folder(per_class=5)
    (root / "__MACOSX" / "a").mkdir(parents=True)
    (root / "__MACOSX" / "a" / "._a_000.png").write_bytes(b"\0\5\26\7 AppleDouble")
    (root / "a" / "Thumbs.db").write_bytes(b"\xd0\xcf\x11\xe0 thumbnail cache")
    result = ingest(str(root), tmp_home)
    report = validate(result.root, POLICY)
    assert report.classes == result.classes == ["a", "b"]
    assert report.total_files == result.num_files == 10
    assert report.bad_files == {}
    assert report.passed, report.errors


def test_inspect_file_does_not_read_the_whole_file_into_memory(tmp_path, write_png):
    """A small image followed by 24 MiB of trailing bytes (Pillow stops at the image's end): decoding and hashing
    stream from the path, so the peak of Python allocations stays far below the file's size."""
    import hashlib
    import tracemalloc

    path = write_png(tmp_path / "padded.png", size=8)
    with path.open("ab") as fh:
        for _ in range(24):
            fh.write(bytes(1 << 20))
    tracemalloc.start()
    try:
        mode, width, height, digest = inspect_file(path, max_pixels=1000)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert (mode, width, height) == ("RGB", 8, 8)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()  # the hash is still of the whole file
    assert peak < 4 << 20, peak
