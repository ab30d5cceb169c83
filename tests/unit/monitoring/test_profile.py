"""Reference profiles: what is saved is what is loaded, and a damaged or missing one is a clear error."""

from __future__ import annotations

import numpy as np
import pytest

from visionloop.monitoring.profile import PROFILE_JSON, PROFILE_NPZ, ProfileError, ReferenceProfile
from visionloop.monitoring.stats import Sample, image_statistics, stat_names


def make_profile(n: int = 50, classes: int = 3, channels: int = 1) -> ReferenceProfile:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (n, channels, 8, 8), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(classes), n).astype(np.float32)
    sample = Sample(image_statistics(pixels, np.full((n, 2), 8)), probs, rng.normal(size=(n, 16)))
    labels = probs.argmax(axis=1)
    return ReferenceProfile([f"c{i}" for i in range(classes)], channels, sample, labels, 1.0e9, "export", ["val"], "d1")


def test_saved_profile_loads_back_equal(tmp_path):
    profile = make_profile()
    profile.save(tmp_path / "ref")
    loaded = ReferenceProfile.load(tmp_path / "ref")
    assert loaded.classes == profile.classes and loaded.origin == "export" and loaded.dataset_version == "d1"
    assert sorted(loaded.sample.stats) == sorted(stat_names(1))
    for name, values in profile.sample.stats.items():
        np.testing.assert_array_equal(loaded.sample.stats[name], values)
    np.testing.assert_array_equal(loaded.sample.probabilities, profile.sample.probabilities)
    np.testing.assert_array_equal(loaded.labels, profile.labels)
    assert sorted(p.name for p in (tmp_path / "ref").iterdir()) == [PROFILE_JSON, PROFILE_NPZ]


def test_summary_states_class_mix_confidence_and_accuracy():
    profile = make_profile(classes=4)
    summary = profile.summary()
    assert summary["size"] == 50 and summary["accuracy"] == 1.0
    assert abs(sum(summary["predicted_class_share"].values()) - 1) < 1e-5
    assert sum(summary["confidence_histogram"]["counts"]) == 50
    assert set(summary["quantiles"]) == set(stat_names(1))


def test_per_channel_means_only_for_colour_models():
    assert "channel_mean_2" in make_profile(channels=3).sample.stats
    assert not any(name.startswith("channel_mean") for name in make_profile(channels=1).sample.stats)


def test_info_reports_age():
    info = make_profile().info(now=1.0e9 + 60)
    assert info.age_seconds == 60 and info.size == 50 and info.origin == "export"


def test_missing_and_damaged_profiles_are_clear_errors(tmp_path):
    with pytest.raises(ProfileError, match="no reference profile"):
        ReferenceProfile.load(tmp_path)
    make_profile().save(tmp_path / "ref")
    (tmp_path / "ref" / PROFILE_NPZ).write_bytes(b"not an npz")
    with pytest.raises(ProfileError, match="damaged"):
        ReferenceProfile.load(tmp_path / "ref")
