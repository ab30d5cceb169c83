"""The image statistics drift is tested on, computed one way for the reference profile and for traffic.

Both sides call ``image_statistics`` on the model's uint8 input (N, C, H, W), after the input transform,
plus the size of each image as it arrived (the upload, or the source file at training time), so a
difference between them is a difference in the data, not in how it was measured.
"""

from __future__ import annotations

import numpy as np

# the names the store, the reference profile, the drift tests and the metrics use
BASE_STATS = ("image_mean", "image_std", "image_sharpness", "image_width", "image_height")


def stat_names(channels: int) -> list[str]:
    """Every image statistic for a model with ``channels`` input channels (per-channel means only above 1)."""
    return [*BASE_STATS, *(f"channel_mean_{c}" for c in range(channels if channels > 1 else 0))]


def pixel_stats(pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean, standard deviation and per-channel means (N, C) of each image's pixels on a 0-1 scale."""
    flat = pixels.reshape(len(pixels), pixels.shape[1], -1).astype(np.float32) / 255.0
    whole = flat.reshape(len(pixels), -1)
    return whole.mean(axis=1), whole.std(axis=1), flat.mean(axis=2)


def sharpness(pixels: np.ndarray) -> np.ndarray:
    """Mean absolute difference between neighbouring pixels (across and down, 0-1 scale) of each image (N, C, H, W).

    High-frequency energy: noise raises it, blur lowers it, while mean and std hardly move — without it
    mild noise (sigma 0.05) and blur (radius 0.5) went unseen at a window of 200 (benchmarks/drift.py)."""
    x = pixels.astype(np.float32) / 255.0
    across = np.abs(np.diff(x, axis=3)).mean(axis=(1, 2, 3)) if x.shape[3] > 1 else np.zeros(len(x), np.float32)
    down = np.abs(np.diff(x, axis=2)).mean(axis=(1, 2, 3)) if x.shape[2] > 1 else np.zeros(len(x), np.float32)
    return (across + down) / 2


def image_statistics(pixels: np.ndarray, sizes: np.ndarray) -> dict[str, np.ndarray]:
    """Every statistic of ``stat_names(C)`` for images (N, C, H, W) whose original (width, height) are ``sizes``."""
    mean, std, channel_means = pixel_stats(pixels)
    sizes = np.asarray(sizes, dtype=np.float32).reshape(len(pixels), 2)
    stats = {
        "image_mean": mean, "image_std": std, "image_sharpness": sharpness(pixels),
        "image_width": sizes[:, 0], "image_height": sizes[:, 1],
    }  # fmt: skip
    if pixels.shape[1] > 1:
        for c in range(pixels.shape[1]):
            stats[f"channel_mean_{c}"] = channel_means[:, c]
    return stats


class Sample:
    """What the drift tests compare: one side (the reference, or a window of traffic) as arrays."""

    def __init__(
        self,
        stats: dict[str, np.ndarray],
        probabilities: np.ndarray,
        embeddings: np.ndarray,
        times: np.ndarray | None = None,
    ) -> None:
        n = len(probabilities)
        if embeddings.shape[0] != n or any(len(v) != n for v in stats.values()):
            raise ValueError("every array of a sample must have one row per image")
        self.stats = {k: np.asarray(v, dtype=np.float64) for k, v in stats.items()}
        self.probabilities = np.asarray(probabilities, dtype=np.float32)
        self.embeddings = np.asarray(embeddings, dtype=np.float32)
        self.times = times  # unix seconds per row (traffic only)

    def __len__(self) -> int:
        return len(self.probabilities)

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(axis=1)

    @property
    def confidence(self) -> np.ndarray:
        return self.probabilities.max(axis=1)

    def take(self, index: np.ndarray) -> Sample:
        """The rows ``index`` (an int array or a boolean mask) as a new sample."""
        times = None if self.times is None else self.times[index]
        return Sample(
            {k: v[index] for k, v in self.stats.items()}, self.probabilities[index], self.embeddings[index], times
        )
