"""Fixtures for the training-stack tests: one small real dataset and one small trained model.

The dataset goes through the real data stage (synthetic source -> validate -> preprocess), so the
training tests see exactly what the pipeline would hand them. Training uses one CPU thread: fast on
a busy 2-core machine and bit-for-bit repeatable.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from visionloop.config import TrainSettings, ValidationPolicy
from visionloop.data.preprocess import Dataset, PreprocessParams, load_dataset, preprocess
from visionloop.data.synthetic import SyntheticSpec, generate
from visionloop.data.validate import validate
from visionloop.training.train import TrainResult, train


def build_synthetic_dataset(
    root: Path, classes: int = 3, per_class: int = 30, size: int = 16, seed: int = 0
) -> Dataset:
    raw = root / "raw"
    generate(SyntheticSpec(classes=classes, per_class=per_class, size=size, channels=3, seed=seed), raw)
    report = validate(raw, ValidationPolicy())
    assert report.passed, report.errors
    params = PreprocessParams(image_size=0, channels=0, val_fraction=0.1, test_fraction=0.2, seed=seed)
    return load_dataset(preprocess(report, params, root / "datasets", source="synthetic", hflip_ok=True))


def _tiny_settings(**overrides: object) -> TrainSettings:
    values: dict[str, object] = {
        "epochs": 3,
        "width": 8,
        "depth": 2,
        "batch_size": 32,
        "patience": 100,
        "device": "cpu",
        "threads": 1,
        "seed": 0,
    }
    values.update(overrides)
    return TrainSettings(**values)


@pytest.fixture(scope="session")
def tiny_settings() -> Callable[..., TrainSettings]:
    """``tiny_settings(epochs=4, ...)``: a width-8, depth-2 model on one CPU thread, no early stop."""
    return _tiny_settings


@pytest.fixture(scope="session")
def make_dataset() -> Callable[..., Dataset]:
    """``make_dataset(root, classes=3, per_class=30, size=16, seed=0)`` through the real data stage."""
    return build_synthetic_dataset


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    """3 classes x 30 synthetic 16x16 RGB images: 63 train, 9 val, 18 test."""
    return build_synthetic_dataset(tmp_path_factory.mktemp("tiny-dataset"))


@pytest.fixture(scope="session")
def trained(tiny_dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """One small model trained on ``tiny_dataset``; treat its files as read-only."""
    return train(tiny_dataset, tmp_path_factory.mktemp("trained"), _tiny_settings(epochs=2), show_progress=False)
