"""Fixtures for integration tests: a real dataset and real exported models of clearly different quality.

The built-in digits (1,797 images, 10 classes) go through the real data stage; three small models are
trained and exported to ONNX: ``weak_export`` barely trains (chance level, about 10% test accuracy),
``medium_export`` trains two epochs (about 50%), ``strong_export`` four (about 85%). Each takes about
a second on one CPU thread. Tests that depend on the ordering check it on the real numbers first.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from visionloop.config import TrainSettings, ValidationPolicy
from visionloop.data.preprocess import Dataset, PreprocessParams, load_dataset, preprocess
from visionloop.data.sources import write_digits
from visionloop.data.validate import validate
from visionloop.training.export import export
from visionloop.training.train import train


@pytest.fixture(scope="session")
def digits_dataset(tmp_path_factory: pytest.TempPathFactory) -> Dataset:
    root = tmp_path_factory.mktemp("digits")
    write_digits(root / "raw")
    report = validate(root / "raw", ValidationPolicy())
    assert report.passed, report.errors
    params = PreprocessParams(image_size=0, channels=0, val_fraction=0.1, test_fraction=0.2, seed=0)
    return load_dataset(preprocess(report, params, root / "datasets", source="digits"))


def _train_and_export(dataset: Dataset, root: Path, epochs: int, lr: float) -> Path:
    settings = TrainSettings(
        epochs=epochs, lr=lr, width=8, depth=2, batch_size=64, patience=100, device="cpu", threads=1, seed=0
    )
    result = train(dataset, root / "train", settings, show_progress=False)
    out_dir = root / "export"
    export(
        result.model_path,
        dataset,
        out_dir,
        tolerance=1e-4,
        metrics={"best_val_accuracy": result.best_val_accuracy},
        train_config=settings.model_dump(),
    )
    return out_dir


@pytest.fixture(scope="session")
def weak_export(digits_dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Export folder of a model that has effectively not learned (one epoch at lr 1e-6)."""
    return _train_and_export(digits_dataset, tmp_path_factory.mktemp("weak"), epochs=1, lr=1e-6)


@pytest.fixture(scope="session")
def strong_export(digits_dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Export folder of a model trained for a few epochs."""
    return _train_and_export(digits_dataset, tmp_path_factory.mktemp("strong"), epochs=4, lr=1e-2)


@pytest.fixture(scope="session")
def medium_export(digits_dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Export folder of a model trained for fewer epochs than ``strong_export``."""
    return _train_and_export(digits_dataset, tmp_path_factory.mktemp("medium"), epochs=2, lr=1e-2)
