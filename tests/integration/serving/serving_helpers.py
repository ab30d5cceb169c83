"""Plain helpers for the serving tests (imported by conftest.py and the test modules)."""

from __future__ import annotations

import itertools
from pathlib import Path

from visionloop import registry
from visionloop.config import Settings
from visionloop.data.preprocess import Dataset
from visionloop.pipeline import steps

_names = itertools.count(1)


def settings_for(home: Path, name: str | None = None, **serve: object) -> Settings:
    return Settings(
        home=home,
        registry={"model_name": name or f"served-{next(_names)}"},
        gate={"min_accuracy": 0.0},
        serve=serve,
    )


def publish(settings: Settings, export_dir: Path, dataset: Dataset) -> tuple[str, bool]:
    """Register an export and run the gate on the digits test split; returns (version, promoted)."""
    run_id = registry.start_run(settings, "serving-test", {})
    version = steps.register_step(export_dir, run_id, settings).version
    registry.set_run_status(run_id, "FINISHED")
    x_test, y_test = dataset.part("test")
    decision = registry.promote_if_better(settings, version, x_test, y_test)
    return version, decision.promoted
