"""Production-like traffic for the monitoring tests: the digits as their source files, and shifted copies.

``publish`` registers an export and promotes it, as the pipeline does. Uploads must be what a client would send: the original 8x8 source PNGs (the reference profile measured
those sizes), not the 16x16 arrays the dataset holds. The held-out files are found by content hash.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from visionloop import registry
from visionloop.config import Settings
from visionloop.data.preprocess import SPLITS, Dataset
from visionloop.data.sources import write_digits
from visionloop.loop.demo import Traffic
from visionloop.pipeline import steps


def held_out_uploads(dataset: Dataset, folder: Path, split: str = "test") -> list[tuple[bytes, int]]:
    """(PNG bytes as ingested, true class index) of every source file in ``split``."""
    if not (folder / "raw").is_dir():
        write_digits(folder / "raw")
    wanted = {str(h): int(label) for h, label, s in zip(dataset.hashes, dataset.labels, dataset.split, strict=True)
              if s == SPLITS.index(split)}  # fmt: skip
    out = []
    for path in sorted((folder / "raw").rglob("*.png")):
        data = path.read_bytes()
        label = wanted.get(hashlib.sha256(data).hexdigest())
        if label is not None:
            out.append((data, label))
    assert len(out) == len(wanted), "the digits source no longer matches the dataset"
    return out


# the same digits, dark on light: a shift every detector should see (the demo's own conversion)
inverted = Traffic.inverted


def shuffled(uploads: list[tuple[bytes, int]], seed: int = 0) -> list[tuple[bytes, int]]:
    order = np.random.default_rng(seed).permutation(len(uploads))
    return [uploads[i] for i in order]


def publish(settings: Settings, export_dir: Path, dataset: Dataset) -> str:
    """Register ``export_dir`` as the pipeline does and promote it on the digits test split; its version."""
    run_id = registry.start_run(settings, "monitoring-test", {})
    version = steps.register_step(export_dir, run_id, settings).version
    registry.set_run_status(run_id, "FINISHED")
    x_test, y_test = dataset.part("test")
    assert registry.promote_if_better(settings, version, x_test, y_test).promoted
    return version
