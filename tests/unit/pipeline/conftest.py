"""Fixtures for the pipeline tests: tiny synthetic settings in a fresh home, and a clean environment.

- ``tiny_settings(home=None, **groups)``: Settings on 3 classes x 30 synthetic 16-pixel images, a
  width-8, depth-2 CNN trained for 2 epochs on one thread, and a gate floor of 0 (so a first model is promoted);
  ``groups`` replace whole setting groups (``data=DataSettings(...)``); home defaults to
  ``<tmp_path>/home``.
- ``make_settings(home, **groups)``: the same, for module-scoped fixtures (session-scoped).
- ``module_env``: a clean environment for module-scoped fixtures.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from visionloop.config import DataSettings, GateSettings, Settings, TrainSettings


def clear_visionloop_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No VISIONLOOP_* or MLFLOW_TRACKING_URI from the caller's shell may steer a test."""
    for name in list(os.environ):
        if name.startswith("VISIONLOOP_") or name == "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(name)


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    clear_visionloop_env(monkeypatch)


def make_tiny_settings(home: Path, **groups: object) -> Settings:
    values: dict[str, object] = {
        "home": home,
        "data": DataSettings(source="synthetic", synthetic_classes=3, synthetic_per_class=30, synthetic_size=16),
        # one torch thread: on a small shared machine a second one spins waiting for a busy core
        "train": TrainSettings(epochs=2, width=8, depth=2, batch_size=32, threads=1),
        "gate": GateSettings(min_accuracy=0.0),
    }
    values.update(groups)
    return Settings(**values)


@pytest.fixture(scope="session")
def make_settings() -> Callable[..., Settings]:
    return make_tiny_settings


@pytest.fixture
def tiny_settings(tmp_path: Path) -> Callable[..., Settings]:
    def make(home: Path | None = None, **groups: object) -> Settings:
        return make_tiny_settings(home if home is not None else tmp_path / "home", **groups)

    return make


@pytest.fixture(scope="module")
def module_env() -> Iterator[pytest.MonkeyPatch]:
    """A clean environment for module-scoped fixtures (the autouse one is per test)."""
    with pytest.MonkeyPatch.context() as monkeypatch:
        clear_visionloop_env(monkeypatch)
        yield monkeypatch
