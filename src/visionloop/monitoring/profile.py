"""A model version's reference profile: what its traffic should look like, for the drift tests.

Made at export time from the held-out splits (validation + test) and registered with the version
(``reference_profile.npz`` + ``reference_profile.json`` beside the model card, and a summary in the
card). It holds a bounded sample of the held-out images' statistics (``stats.image_statistics``, measured
exactly as the server measures uploads), the model's softmax outputs and embeddings on them, their true
labels, and summaries (class mix, confidence histogram, per-statistic quantiles) for people.

A version registered before profiles existed gets one built on first use from its dataset version
(``origin: rebuilt``), with the same code; the monitor caches every profile under
``<home>/monitoring/references/<model>/v<version>/``.
"""

from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from visionloop.errors import VisionloopError
from visionloop.fsutil import atomic_dir
from visionloop.monitoring.schema import ReferenceInfo
from visionloop.monitoring.stats import Sample, image_statistics

if TYPE_CHECKING:
    from visionloop.config import Settings
    from visionloop.data.preprocess import Dataset
    from visionloop.inference import OnnxClassifier

PROFILE_NPZ = "reference_profile.npz"
PROFILE_JSON = "reference_profile.json"
FORMAT_VERSION = 1
REFERENCE_SPLITS = ("val", "test")
CONFIDENCE_EDGES = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0]


class ProfileError(VisionloopError):
    """A reference profile cannot be read, found or built."""


@dataclass
class ReferenceProfile:
    classes: list[str]
    channels: int
    sample: Sample
    labels: np.ndarray  # true class of each sampled image
    created_at: float
    origin: Literal["export", "rebuilt"]
    splits: list[str]
    dataset_version: str

    def __len__(self) -> int:
        return len(self.sample)

    def info(self, now: float | None = None) -> ReferenceInfo:
        now = time.time() if now is None else now
        return ReferenceInfo(
            size=len(self), created_at=self.created_at, age_seconds=max(0.0, now - self.created_at),
            origin=self.origin, splits=self.splits,
        )  # fmt: skip

    def summary(self) -> dict:
        """What the model card and people read: sizes, class mix, confidence histogram, statistic quantiles."""
        predicted = self.sample.predicted
        shares = np.bincount(predicted, minlength=len(self.classes)) / max(1, len(predicted))
        confidence, _ = np.histogram(self.sample.confidence, bins=CONFIDENCE_EDGES)
        quantiles = {
            name: {q: round(float(np.quantile(values, float(q))), 6) for q in ("0.05", "0.5", "0.95")}
            for name, values in self.sample.stats.items()
            if len(values)
        }
        return {
            "format_version": FORMAT_VERSION,
            "size": len(self),
            "created_at": self.created_at,
            "origin": self.origin,
            "splits": self.splits,
            "dataset_version": self.dataset_version,
            "embedding_width": int(self.sample.embeddings.shape[1]),
            "statistics": sorted(self.sample.stats),
            "accuracy": round(float((predicted == self.labels).mean()), 6) if len(self) else None,
            "predicted_class_share": {c: round(float(s), 6) for c, s in zip(self.classes, shares, strict=True)},
            "confidence_histogram": {"edges": CONFIDENCE_EDGES, "counts": confidence.tolist()},
            "quantiles": quantiles,
            "files": [PROFILE_NPZ, PROFILE_JSON],
        }

    def write_files(self, folder: Path) -> None:
        """Write the two files into ``folder``, which the caller makes appear at once (export's own temp dir)."""
        arrays = {f"stat__{name}": values for name, values in self.sample.stats.items()}
        np.savez_compressed(
            folder / PROFILE_NPZ, probabilities=self.sample.probabilities, embeddings=self.sample.embeddings,
            labels=self.labels, **arrays,
        )  # fmt: skip
        meta = {"classes": self.classes, "channels": self.channels, **self.summary()}
        (folder / PROFILE_JSON).write_text(json.dumps(meta, indent=2), encoding="utf-8")

    def save(self, folder: Path) -> Path:
        """Write ``folder`` (npz + json) all at once; an existing folder is replaced."""
        with atomic_dir(folder) as tmp:
            self.write_files(tmp)
        return folder

    @classmethod
    def load(cls, folder: Path) -> ReferenceProfile:
        try:
            meta = json.loads((folder / PROFILE_JSON).read_text(encoding="utf-8"))
            with np.load(folder / PROFILE_NPZ, allow_pickle=False) as npz:
                stats = {key.removeprefix("stat__"): npz[key] for key in npz.files if key.startswith("stat__")}
                sample = Sample(stats, npz["probabilities"], npz["embeddings"])
                labels = npz["labels"]
        except FileNotFoundError:
            raise ProfileError(f"no reference profile in {folder}") from None
        except Exception as exc:
            raise ProfileError(f"reference profile in {folder} is damaged: {exc}") from None
        return cls(
            meta["classes"], int(meta["channels"]), sample, labels, float(meta["created_at"]), meta["origin"],
            list(meta["splits"]), meta.get("dataset_version", ""),
        )  # fmt: skip


def build_profile(
    classifier: OnnxClassifier,
    images: np.ndarray,
    labels: np.ndarray,
    sizes: np.ndarray,
    splits: list[str],
    max_size: int,
    seed: int = 0,
    origin: Literal["export", "rebuilt"] = "export",
    dataset_version: str = "",
) -> ReferenceProfile:
    """Run ``classifier`` on at most ``max_size`` of ``images`` (a seeded random subset) and profile them."""
    if len(images) == 0:
        raise ProfileError("no held-out images to build a reference profile from")
    keep = np.sort(np.random.default_rng(seed).permutation(len(images))[:max_size])
    images, labels, sizes = images[keep], np.asarray(labels)[keep], np.asarray(sizes)[keep]
    probabilities, embeddings = classifier.run(images)
    sample = Sample(image_statistics(images, sizes), probabilities, embeddings)
    return ReferenceProfile(
        list(classifier.card["classes"]), int(classifier.card["channels"]), sample, labels, time.time(), origin,
        splits, dataset_version,
    )  # fmt: skip


def profile_dataset(
    classifier: OnnxClassifier,
    dataset: Dataset,
    max_size: int,
    seed: int = 0,
    origin: Literal["export", "rebuilt"] = "export",
) -> ReferenceProfile:
    """The profile of ``dataset``'s validation and test splits (what the model never trained on)."""
    from visionloop.data.preprocess import SPLITS

    mask = np.isin(dataset.split, [SPLITS.index(name) for name in REFERENCE_SPLITS])
    side = dataset.manifest.image_size
    # datasets written before the source sizes were kept: the model input's size, stated as such
    sizes = dataset.sizes[mask] if dataset.sizes is not None else np.full((int(mask.sum()), 2), side, np.int32)
    profile = build_profile(
        classifier, dataset.images[mask], dataset.labels[mask], sizes, list(REFERENCE_SPLITS), max_size, seed,
        origin, dataset.manifest.version,
    )  # fmt: skip
    if dataset.sizes is None:  # unknown source sizes are not a statistic to test
        profile.sample.stats.pop("image_width")
        profile.sample.stats.pop("image_height")
    return profile


def cache_dir(settings: Settings, version: str) -> Path:
    return settings.home / "monitoring" / "references" / settings.registry.model_name / f"v{version}"


def profile_for(settings: Settings, version: str) -> ReferenceProfile:
    """The reference profile of registered ``version``: cached, else registered with it, else rebuilt."""
    from visionloop import registry
    from visionloop.inference import OnnxClassifier

    cached = cache_dir(settings, version)
    if (cached / PROFILE_JSON).is_file():
        return ReferenceProfile.load(cached)
    with tempfile.TemporaryDirectory(prefix=f"reference-v{version}-") as tmp:
        onnx_path, card_path = registry.download_version(settings, version, Path(tmp))
        if (card_path.parent / PROFILE_JSON).is_file():
            profile = ReferenceProfile.load(card_path.parent)
        else:
            profile = _rebuild(settings, version, OnnxClassifier.load(onnx_path, card_path, threads=1))
    profile.save(cached)
    return profile


def _rebuild(settings: Settings, version: str, classifier: OnnxClassifier) -> ReferenceProfile:
    from visionloop.data.preprocess import load_dataset

    dataset_version = str(classifier.card.get("dataset", {}).get("version", ""))
    folder = settings.home / "datasets" / dataset_version
    if not dataset_version or not (folder / "manifest.json").is_file():
        raise ProfileError(
            f"{settings.registry.model_name} v{version} was registered without a reference profile, and its dataset "
            f"{dataset_version or '(unknown)'} is not under {settings.home / 'datasets'} to build one from: run the "
            "monitor with the home that trained it, or re-run `visionloop run` to register a version with a profile"
        )
    return profile_dataset(classifier, load_dataset(folder), settings.monitor.reference_size, origin="rebuilt")
