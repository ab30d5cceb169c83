"""Run an exported model with ONNX Runtime. No torch here: serving and the registry gate use this."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionloop.errors import ExportError
from visionloop.fsutil import read_json

INPUT_NAME = "input"
OUTPUT_NAMES = ("probabilities", "embedding")
CHECK_PIXEL = 128  # the self-check input: every pixel mid-grey


@dataclass
class OnnxClassifier:
    """An ONNX Runtime session plus the model card that says how to feed it."""

    session: object  # onnxruntime.InferenceSession
    card: dict

    @classmethod
    def load(cls, onnx_path: Path, card_path: Path, threads: int = 0) -> OnnxClassifier:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        try:
            session = ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
            card = read_json(card_path)
        except Exception as exc:
            raise ExportError(f"cannot load ONNX model {onnx_path}: {exc}") from None
        return cls(session, card)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.card["channels"], self.card["image_size"], self.card["image_size"])

    def run(self, images: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities, embeddings) for uint8 images (N, C, H, W)."""
        if images.dtype != np.uint8:
            raise ExportError(f"images must be uint8 pixels (0-255), got {images.dtype}")
        if images.ndim != 4 or images.shape[1:] != self.input_shape:
            raise ExportError(f"images of shape {images.shape[1:]} do not fit the model input {self.input_shape}")
        probs, embeddings = [], []
        for start in range(0, len(images), batch_size):
            batch = images[start : start + batch_size].astype(np.float32) / 255.0
            p, e = self.session.run(list(OUTPUT_NAMES), {INPUT_NAME: batch})  # type: ignore[attr-defined]
            probs.append(p)
            embeddings.append(e)
        if not probs:
            width = self.session.get_outputs()[1].shape[1]  # type: ignore[attr-defined]
            return np.empty((0, len(self.card["classes"])), np.float32), np.empty((0, width), np.float32)
        return np.concatenate(probs), np.concatenate(embeddings)

    def accuracy(self, images: np.ndarray, labels: np.ndarray) -> float:
        probs, _ = self.run(images)
        return float((probs.argmax(axis=1) == labels).mean()) if len(labels) else 0.0

    def check_input(self) -> np.ndarray:
        return np.full((1, *self.input_shape), CHECK_PIXEL, dtype=np.uint8)

    def self_check(self, tolerance: float = 1e-4) -> list[str]:
        """Problems found running the model on its check input; empty when it is fit to serve.

        The outputs must have the card's shapes, be finite, sum to 1; and where the card recorded what
        the exported graph answered at export time (``onnx.check``), this load must answer the same.
        """
        try:
            probs, embedding = self.run(self.check_input())
        except Exception as exc:
            return [f"running the check input failed: {exc}"]
        problems = []
        classes = len(self.card["classes"])
        if probs.shape != (1, classes):
            problems.append(f"probabilities have shape {probs.shape}, the card says (1, {classes})")
        if not (np.isfinite(probs).all() and np.isfinite(embedding).all()):
            problems.append("outputs are not finite")
        elif abs(float(probs.sum()) - 1.0) > 1e-3:
            problems.append(f"probabilities sum to {float(probs.sum()):.4f}, not 1")
        expected = self.card.get("onnx", {}).get("check", {}).get("probabilities")
        if expected is not None and probs.shape == (1, len(expected)):
            diff = float(np.abs(probs[0] - np.asarray(expected, dtype=np.float32)).max())
            if diff > tolerance:
                problems.append(f"check input answers differ from export time by {diff:.3g} (tolerance {tolerance:g})")
        return problems
