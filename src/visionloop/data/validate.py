"""Validate an image folder before anything learns from it.

Every file is opened and fully decoded (a truncated PNG or JPEG fails here, not in the middle of
training). The report counts undecodable files, image modes and sizes, images per class, exact
duplicates by content hash (a copy in two classes is a label conflict; copies in one class are kept
once, so no copy can land in both the training and the test split), and class imbalance. The
policy decides what fails the run; what is merely odd is a warning.
"""

from __future__ import annotations

import hashlib
import statistics
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image

from visionloop.config import ValidationPolicy
from visionloop.data.sources import _visible
from visionloop.data.transform import check_finite_image
from visionloop.errors import DataError
from visionloop.fsutil import atomic_dir, atomic_write_json, printable_name, read_json, utf8_name
from visionloop.progress import progress


@dataclass
class FileRecord:
    path: str  # relative to the class root
    label: str
    sha256: str
    mode: str
    width: int
    height: int


@dataclass
class ValidationReport:
    root: str
    classes: list[str]
    files: list[FileRecord]  # the usable files, after exclusions
    total_files: int
    bad_files: dict[str, str]  # path -> why it was excluded
    duplicates_removed: dict[str, str]  # path -> the kept copy (same class)
    label_conflicts: dict[str, list[str]]  # sha256 -> paths in different classes (all excluded)
    stray_files: list[str]  # files outside any class folder
    per_class: dict[str, int]
    modes: dict[str, int]
    sizes: dict[str, float]  # min/median/max of width and height
    imbalance_ratio: float
    passed: bool
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ValidationReport:
        return cls(**{**data, "files": [FileRecord(**f) for f in data["files"]]})

    @property
    def bad_fraction(self) -> float:
        return len(self.bad_files) / self.total_files if self.total_files else 0.0


def inspect_file(path: Path, max_pixels: int) -> tuple[str, int, int, str]:
    """Decode ``path`` fully; return (mode, width, height, sha256) or raise ValueError saying why.

    The file is never read whole into memory: Pillow decodes from the path, and the hash is taken
    in chunks, so a large file costs its decoded pixels (bounded by ``max_pixels``), not its size.
    """
    if path.stat().st_size == 0:
        raise ValueError("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ValueError(f"{width}x{height} is over the {max_pixels}-pixel limit")
                img.load()  # decodes every pixel: catches truncated files
                check_finite_image(img)  # NaN/Inf pixels (float TIFFs): bad data, not something to scale
                mode = img.mode
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ValueError(f"decompression bomb: {exc}") from None
    except ValueError:
        raise
    except Exception as exc:  # PIL raises many types for bad data
        raise ValueError(f"not a decodable image ({type(exc).__name__}: {exc})") from None
    if width < 1 or height < 1:
        raise ValueError("image has no pixels")
    with path.open("rb") as fh:
        digest = hashlib.file_digest(fh, "sha256").hexdigest()
    return mode, width, height, digest


def validate(root: Path, policy: ValidationPolicy, show_progress: bool = False) -> ValidationReport:
    """Inspect every file under ``root/<class>/``; never raises for bad data, the report says."""
    # the same rule as ingest: hidden names and OS metadata (__MACOSX, Thumbs.db) are not data
    # a name that is not valid UTF-8 (any bytes are a name on Linux) cannot be a label or a path in a
    # JSON or Markdown report: such a class folder is skipped with a warning, such a file is a bad file
    # (listed with its bytes as \xNN escapes), the same rule ingest applies
    folders = [p for p in root.iterdir() if p.is_dir() and _visible(p)]
    classes = sorted(p.name for p in folders if utf8_name(p.name))
    unnamed_classes = sorted(printable_name(p.name) for p in folders if not utf8_name(p.name))
    stray = sorted(printable_name(str(p.relative_to(root))) for p in root.iterdir() if p.is_file() and _visible(p))
    candidates: list[tuple[str, Path]] = []
    bad: dict[str, str] = {}
    for label in classes:
        for path in sorted((root / label).rglob("*")):
            parts = path.relative_to(root).parts
            if not (path.is_file() and all(_visible(Path(part)) for part in parts)):
                continue
            if all(utf8_name(part) for part in parts):
                candidates.append((label, path))
            else:
                bad[printable_name(str(path.relative_to(root)))] = "name is not valid UTF-8: rename the file"
    misnamed = len(bad)

    decoded: list[FileRecord] = []
    # PIL's global limit also guards decoding; restore it afterwards
    previous_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = policy.max_pixels
    try:
        for label, path in progress(candidates, f"validate {len(candidates)} files", show_progress):
            rel = str(path.relative_to(root))
            try:
                mode, width, height, digest = inspect_file(path, policy.max_pixels)
            except (ValueError, OSError) as exc:
                bad[rel] = str(exc)
                continue
            decoded.append(FileRecord(rel, label, digest, mode, width, height))
    finally:
        Image.MAX_IMAGE_PIXELS = previous_limit

    by_hash: dict[str, list[FileRecord]] = defaultdict(list)
    for record in decoded:
        by_hash[record.sha256].append(record)
    usable: list[FileRecord] = []
    duplicates: dict[str, str] = {}
    conflicts: dict[str, list[str]] = {}
    for digest, group in by_hash.items():
        if len({r.label for r in group}) > 1:
            conflicts[digest] = [r.path for r in group]
            continue
        usable.append(group[0])
        for extra in group[1:]:
            duplicates[extra.path] = group[0].path
    usable.sort(key=lambda r: r.path)

    per_class = {label: 0 for label in classes}
    for record in usable:
        per_class[record.label] += 1
    widths = [r.width for r in usable] or [0]
    heights = [r.height for r in usable] or [0]
    sizes = {
        "width_min": min(widths),
        "width_median": statistics.median(widths),
        "width_max": max(widths),
        "height_min": min(heights),
        "height_median": statistics.median(heights),
        "height_max": max(heights),
    }
    nonzero = [n for n in per_class.values() if n > 0]
    imbalance = max(nonzero) / min(nonzero) if nonzero else 0.0

    errors: list[str] = []
    notes: list[str] = []
    total = len(candidates) + misnamed  # the misnamed files were found, and are not usable
    if total == 0:
        errors.append("no files in any class folder")
    elif len(bad) / total > policy.max_bad_fraction:
        errors.append(
            f"{len(bad)} of {total} files ({len(bad) / total:.1%}) are not usable images, "
            f"over the {policy.max_bad_fraction:.1%} allowed (validation.max_bad_fraction)"
        )
    if len(classes) < 2:
        errors.append(f"a classifier needs at least 2 classes, found {len(classes)}: {classes}")
    thin = {c: n for c, n in per_class.items() if n < policy.min_images_per_class}
    if thin and total:
        errors.append(
            f"classes with fewer than {policy.min_images_per_class} usable images "
            f"(validation.min_images_per_class): {thin}"
        )
    if imbalance > policy.max_imbalance_ratio:
        notes.append(f"class imbalance: largest/smallest class = {imbalance:.1f}")
    if bad:
        notes.append(f"{len(bad)} unusable files excluded")
    if duplicates:
        notes.append(f"{len(duplicates)} exact duplicates within a class excluded (kept one copy each)")
    if conflicts:
        notes.append(
            f"{len(conflicts)} images appear in more than one class: every copy excluded "
            "(they would also leak across splits)"
        )
    if stray:
        notes.append(f"{len(stray)} files outside any class folder ignored")
    if unnamed_classes:
        notes.append(
            f"{len(unnamed_classes)} folders whose names are not valid UTF-8 skipped, not classes: {', '.join(unnamed_classes)}"
        )
    modes = Counter(r.mode for r in usable)
    if len(modes) > 1:
        notes.append(f"mixed image modes {dict(modes)}: preprocessing converts them all")

    return ValidationReport(
        root=str(root),
        classes=classes,
        files=usable,
        total_files=total,
        bad_files=bad,
        duplicates_removed=duplicates,
        label_conflicts=conflicts,
        stray_files=stray,
        per_class=per_class,
        modes=dict(modes),
        sizes=sizes,
        imbalance_ratio=round(imbalance, 3),
        passed=not errors,
        errors=errors,
        warnings=notes,
    )


def summary_markdown(report: ValidationReport) -> str:
    lines = [
        f"# Validation report — {'PASSED' if report.passed else 'FAILED'}",
        "",
        f"- source: `{printable_name(report.root)}`",
        f"- files: {report.total_files} found, {len(report.files)} usable, {len(report.bad_files)} unusable, "
        f"{len(report.duplicates_removed)} duplicates removed, {len(report.label_conflicts)} label conflicts",
        f"- modes: {report.modes}",
        f"- size (w x h): min {report.sizes['width_min']}x{report.sizes['height_min']}, "
        f"median {report.sizes['width_median']}x{report.sizes['height_median']}, "
        f"max {report.sizes['width_max']}x{report.sizes['height_max']}",
        f"- imbalance (largest/smallest class): {report.imbalance_ratio}",
        "",
        "| class | usable images |",
        "|---|---|",
        *[f"| {c} | {n} |" for c, n in report.per_class.items()],
    ]
    for title, items in (("Errors", report.errors), ("Warnings", report.warnings)):
        if items:
            lines += ["", f"## {title}", *[f"- {item}" for item in items]]
    if report.bad_files:
        lines += [
            "",
            "## Unusable files (first 50)",
            *[f"- `{p}`: {why}" for p, why in list(report.bad_files.items())[:50]],
        ]
    return "\n".join(lines) + "\n"


def write_report(report: ValidationReport, out_dir: Path) -> Path:
    """Write report.json and report.md into ``out_dir`` (replaced whole, never half-written)."""
    with atomic_dir(out_dir) as tmp:
        atomic_write_json(tmp / "report.json", report.to_dict())
        # the root is the user's own path, which may hold bytes that are not UTF-8
        (tmp / "report.md").write_text(summary_markdown(report), encoding="utf-8", errors="backslashreplace")
    return out_dir / "report.json"


def load_report(path: Path) -> ValidationReport:
    try:
        return ValidationReport.from_dict(read_json(path))
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise DataError(f"cannot read validation report {path}: {exc}") from None
