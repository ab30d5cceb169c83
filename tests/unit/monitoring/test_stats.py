"""The image statistics: one function measures the reference profile and the traffic alike."""

from __future__ import annotations

import numpy as np
import pytest

from visionloop.monitoring.stats import Sample, image_statistics, pixel_stats, stat_names


def test_pixel_stats_on_a_known_array():
    pixels = np.array(
        [
            np.zeros((1, 2, 2)),  # black: mean 0, std 0
            [[[0, 255], [0, 255]]],  # half black, half white: mean 0.5, std 0.5
            np.full((1, 2, 2), 51),  # 51/255 = 0.2 everywhere: std 0
        ],
        dtype=np.uint8,
    )
    mean, std, channel_means = pixel_stats(pixels)
    assert mean.shape == std.shape == (3,) and channel_means.shape == (3, 1)
    np.testing.assert_allclose(mean, [0.0, 0.5, 0.2], atol=1e-6)
    np.testing.assert_allclose(std, [0.0, 0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(channel_means[:, 0], mean, atol=1e-6)


def test_pixel_stats_are_per_image_over_all_channels():
    pixels = np.zeros((2, 3, 4, 4), dtype=np.uint8)
    pixels[0, 0] = 255  # one of three channels white
    pixels[1] = 255
    mean, std, channel_means = pixel_stats(pixels)
    np.testing.assert_allclose(mean, [1 / 3, 1.0], atol=1e-6)
    np.testing.assert_allclose(std, [np.sqrt(2) / 3, 0.0], atol=1e-6)
    np.testing.assert_allclose(channel_means, [[1, 0, 0], [1, 1, 1]], atol=1e-6)


@pytest.mark.parametrize("channels", [1, 3])
def test_image_statistics_names_match_stat_names(channels):
    pixels = np.random.default_rng(0).integers(0, 256, (5, channels, 4, 4), dtype=np.uint8)
    stats = image_statistics(pixels, np.array([[8, 6]] * 5))
    assert sorted(stats) == sorted(stat_names(channels))
    np.testing.assert_array_equal(stats["image_width"], 8)
    np.testing.assert_array_equal(stats["image_height"], 6)


def test_sample_checks_row_counts_and_takes_rows():
    probs = np.eye(3, dtype=np.float32)
    sample = Sample({"image_mean": np.arange(3.0)}, probs, np.zeros((3, 2)), times=np.arange(3.0))
    assert list(sample.predicted) == [0, 1, 2] and list(sample.confidence) == [1, 1, 1]
    part = sample.take(np.array([2, 0]))
    assert len(part) == 2 and list(part.stats["image_mean"]) == [2.0, 0.0] and list(part.times) == [2.0, 0.0]
    with pytest.raises(ValueError, match="one row per image"):
        Sample({"image_mean": np.arange(2.0)}, probs, np.zeros((3, 2)))
