"""Prediction rows for the store tests (unit and PostgreSQL), imported as a plain module: tests/ is on sys.path."""

from __future__ import annotations

import numpy as np

from visionloop.monitoring.store import Prediction

CLASSES = ["cat", "dog", "fox"]
T0 = 1_700_000_000.0


def prediction(request_id: str, predicted_index: int = 0, **overrides: object) -> Prediction:
    """One prediction of model ``pets`` v1 at ``T0`` (fields overridable by name)."""
    fields = {
        "request_id": request_id,
        "time": T0,
        "endpoint": "predict",
        "model_name": "pets",
        "model_version": "1",
        "predicted_index": predicted_index,
        "predicted_label": CLASSES[predicted_index],
        "confidence": 0.875,
        "probabilities": np.eye(3, dtype=np.float32)[predicted_index] * 0.75 + 0.25 / 3,
        "embedding": np.arange(4, dtype=np.float32),
        "image_width": 32,
        "image_height": 24,
        "image_mean": 0.5,
        "image_std": 0.25,
        "image_sharpness": 0.1,
        "channel_means": np.array([0.25, 0.5, 0.75], np.float32),
        "instance": "host:1",
        **overrides,
    }
    return Prediction(**fields)  # type: ignore[arg-type]
