"""Preprocess validated images into one compact, versioned dataset.

- split: stratified and seeded into train / val / test (duplicates were removed by validation, so
  no image can be in two splits; ``check_no_leak`` proves it on the result);
- convert: every image to the configured channels (1 = grey via ``L``; 3 = ``RGB``, alpha dropped,
  palette expanded) and resized to a square ``image_size`` with bilinear filtering (aspect ratio is
  not kept: the model sees the whole image);
- normalisation statistics (per-channel mean and std of [0, 1] pixels) from the training split only;
- stored as ``data.npz`` (uint8 N x C x H x W, labels, split ids) plus ``manifest.json``.

The dataset version is a content hash over (file hash, label) pairs and the parameters that shape
the arrays, so the same input always gives the same id, wherever the files live.
"""

from __future__ import annotations

import hashlib
import json
import zipfile
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from visionloop.data.transform import to_array
from visionloop.data.validate import ValidationReport
from visionloop.errors import DataError
from visionloop.fsutil import atomic_dir, atomic_write_json, read_json
from visionloop.progress import progress

SPLITS = ("train", "val", "test")
FORMAT_VERSION = 1
GREY_MODES = {"1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "F"}


@dataclass(frozen=True)
class PreprocessParams:
    image_size: int  # 0 = from the data
    channels: int  # 0 = from the data
    val_fraction: float
    test_fraction: float
    seed: int


@dataclass
class DatasetManifest:
    version: str
    classes: list[str]
    image_size: int
    channels: int
    mean: list[float]
    std: list[float]
    counts: dict[str, dict[str, int]]  # split -> class -> images
    params: dict
    source: str
    hflip_ok: bool
    format_version: int = FORMAT_VERSION

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Dataset:
    """The arrays of one dataset version, loaded in memory."""

    manifest: DatasetManifest
    images: np.ndarray  # uint8 (N, C, H, W)
    labels: np.ndarray  # int64 (N,)
    split: np.ndarray  # int8 (N,): 0 train, 1 val, 2 test
    hashes: np.ndarray  # str (N,): content hash of each source file
    # int32 (N, 2): each source file's (width, height) before resizing, for monitoring's reference profile;
    # None for dataset folders written before it was kept
    sizes: np.ndarray | None = None

    def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        mask = self.split == SPLITS.index(name)
        return self.images[mask], self.labels[mask]


def resolve_shape(report: ValidationReport, image_size: int, channels: int) -> tuple[int, int]:
    """Pick the model input from the data when not set: median side rounded to 8, within [16, 64]."""
    if channels == 0:
        channels = 1 if all(mode in GREY_MODES for mode in report.modes) else 3
    if image_size == 0:
        side = max(report.sizes["width_median"], report.sizes["height_median"])
        image_size = int(min(64, max(16, 8 * round(side / 8))))
    return image_size, channels


def dataset_version(report: ValidationReport, params: PreprocessParams) -> str:
    digest = hashlib.sha256()
    for record in sorted(report.files, key=lambda r: (r.sha256, r.label)):
        digest.update(f"{record.sha256}\t{record.label}\n".encode())
    digest.update(json.dumps(asdict(params), sort_keys=True).encode())
    digest.update(f"format={FORMAT_VERSION}".encode())
    return "ds-" + digest.hexdigest()[:12]


def load_image(path: Path, image_size: int, channels: int) -> np.ndarray:
    """One image as uint8 (C, H, W) in the dataset's layout (``data/transform.py``, which serving applies too)."""
    with Image.open(path) as img:
        return to_array(img, image_size, channels)


def split_indices(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> np.ndarray:
    """Stratified, seeded split ids (0 train, 1 val, 2 test) for ``labels``."""
    index = np.arange(len(labels))
    try:
        # imported here: the CLI (and so `visionloop serve`) imports this module, and serving needs no sklearn
        from sklearn.model_selection import train_test_split

        rest, test = train_test_split(index, test_size=test_fraction, stratify=labels, random_state=seed)
        val_share = val_fraction / (1.0 - test_fraction)
        _train, val = train_test_split(rest, test_size=val_share, stratify=labels[rest], random_state=seed)
    except ValueError as exc:
        raise DataError(f"cannot make a stratified split: {exc} (add images or lower the fractions)") from None
    split = np.zeros(len(labels), dtype=np.int8)
    split[val] = 1
    split[test] = 2
    return split


def check_no_leak(dataset: Dataset) -> None:
    seen: dict[str, int] = {}
    for digest, part in zip(dataset.hashes, dataset.split, strict=True):
        if seen.setdefault(str(digest), int(part)) != int(part):
            raise DataError(f"image {digest[:12]} is in two splits: the dataset leaks")


def preprocess(
    report: ValidationReport,
    params: PreprocessParams,
    datasets_dir: Path,
    source: str = "",
    hflip_ok: bool = False,
    show_progress: bool = False,
) -> Path:
    """Build (or reuse) the dataset version for ``report``; returns its folder."""
    if not report.passed:
        raise DataError("validation failed; fix the data or the policy first: " + "; ".join(report.errors))
    image_size, channels = resolve_shape(report, params.image_size, params.channels)
    version = dataset_version(report, params)
    final = datasets_dir / version
    if (final / "manifest.json").is_file() and (final / "data.npz").is_file():
        return final  # same content and parameters: same arrays

    root = Path(report.root)
    classes = report.classes
    label_of = {name: i for i, name in enumerate(classes)}
    images = np.empty((len(report.files), channels, image_size, image_size), dtype=np.uint8)
    for i, record in enumerate(progress(report.files, f"preprocess {len(report.files)} images", show_progress)):
        try:
            images[i] = load_image(root / record.path, image_size, channels)
        except (OSError, ValueError) as exc:
            raise DataError(f"{record.path} changed since validation and no longer decodes: {exc}") from None
    labels = np.asarray([label_of[r.label] for r in report.files], dtype=np.int64)
    hashes = np.asarray([r.sha256 for r in report.files])
    sizes = np.asarray([(r.width, r.height) for r in report.files], dtype=np.int32).reshape(-1, 2)
    split = split_indices(labels, params.val_fraction, params.test_fraction, params.seed)

    train_pixels = images[split == 0].astype(np.float64) / 255.0
    mean = train_pixels.mean(axis=(0, 2, 3))
    std = np.maximum(train_pixels.std(axis=(0, 2, 3)), 1e-3)
    counts = {
        name: {c: int(((split == s) & (labels == label_of[c])).sum()) for c in classes} for s, name in enumerate(SPLITS)
    }
    manifest = DatasetManifest(
        version=version,
        classes=classes,
        image_size=image_size,
        channels=channels,
        mean=[round(float(m), 6) for m in mean],
        std=[round(float(s), 6) for s in std],
        counts=counts,
        params=asdict(params),
        source=source or report.root,
        hflip_ok=hflip_ok,
    )
    dataset = Dataset(manifest, images, labels, split, hashes, sizes)
    check_no_leak(dataset)
    with atomic_dir(final) as tmp:
        np.savez_compressed(tmp / "data.npz", images=images, labels=labels, split=split, hashes=hashes, sizes=sizes)
        atomic_write_json(tmp / "manifest.json", manifest.to_dict())
    return final


def load_manifest(path: Path) -> DatasetManifest:
    """Only the manifest of a dataset folder: cheap, for callers that need no pixels."""
    try:
        return DatasetManifest(**read_json(path / "manifest.json"))
    except FileNotFoundError:
        raise DataError(f"no dataset at {path} (run `visionloop data preprocess` first)") from None
    except (OSError, ValueError, TypeError) as exc:
        raise DataError(f"dataset manifest at {path} is damaged: {exc}") from None


def load_dataset(path: Path) -> Dataset:
    """Load a dataset folder written by ``preprocess``; a damaged one is a clear DataError."""
    manifest = load_manifest(path)
    try:
        with np.load(path / "data.npz", allow_pickle=False) as npz:
            sizes = npz["sizes"] if "sizes" in npz.files else None
            dataset = Dataset(manifest, npz["images"], npz["labels"], npz["split"], npz["hashes"], sizes)
    except FileNotFoundError:
        raise DataError(f"no dataset at {path} (run `visionloop data preprocess` first)") from None
    # a cut-short or bit-flipped data.npz fails inside zipfile with BadZipFile (not an OSError)
    except (OSError, ValueError, KeyError, TypeError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        raise DataError(f"dataset at {path} is damaged: {exc}") from None
    expected = (len(dataset.labels), manifest.channels, manifest.image_size, manifest.image_size)
    if dataset.images.shape != expected or len(dataset.split) != len(dataset.labels):
        raise DataError(f"dataset at {path} is inconsistent: images {dataset.images.shape}, expected {expected}")
    return dataset
