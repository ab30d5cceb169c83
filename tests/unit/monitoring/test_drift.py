"""The drift tests on samples with known answers: no drift stays quiet, each kind of shift is caught by its
detector, the fast MMD equals the plain permutation loop, the prepared reference equals the cold path."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from scipy.spatial.distance import pdist

from visionloop.config import MonitorSettings
from visionloop.errors import ConfigError, DataError
from visionloop.monitoring import drift
from visionloop.monitoring.stats import Sample

CLASSES = 5
WIDTH = 8  # embedding width


def make_sample(
    n: int,
    seed: int,
    brightness: float = 0.0,
    embedding_shift: float = 0.0,
    confidence: float = 2.0,
    class_weights: np.ndarray | None = None,
    width: float = 16.0,
) -> Sample:
    """A stand-in for the model's outputs on ``n`` images: each row's class decides its logits and embedding."""
    rng = np.random.default_rng(seed)
    weights = np.full(CLASSES, 1 / CLASSES) if class_weights is None else class_weights
    label = rng.choice(CLASSES, size=n, p=weights)
    logits = rng.normal(size=(n, CLASSES))
    logits[np.arange(n), label] += confidence
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    centres = np.random.default_rng(1234).normal(size=(CLASSES, WIDTH))
    embeddings = centres[label] + rng.normal(size=(n, WIDTH)) + embedding_shift
    stats = {
        "image_mean": rng.beta(4, 4, size=n) + brightness,
        "image_std": rng.gamma(4, 0.05, size=n),
        "image_width": np.full(n, width),
        "image_height": np.full(n, 16.0),
    }
    return Sample(stats, probabilities, embeddings)


def reference_of(sample: Sample, config: drift.DriftConfig | None = None) -> drift.Reference:
    return drift.Reference(sample, CLASSES, config or drift.DriftConfig())


def fired(verdict: drift.Verdict) -> set[str]:
    return {name for name, hit in verdict.detectors.items() if hit}


def test_identical_distributions_rarely_alarm() -> None:
    # a fresh reference and window per trial: the rate the p-values promise (1% overall), not one
    # reference's luck; 200 trials at 1% expect 2 alarms, and 6 or more would happen with p < 0.005
    alarms = 0
    for trial in range(200):
        reference = reference_of(make_sample(300, seed=2 * trial))
        alarms += drift.detect(reference, make_sample(40, seed=2 * trial + 1)).drifted
    assert alarms <= 5


@pytest.mark.parametrize(
    ("window", "detector"),
    [
        ({"brightness": 0.2}, "image_stats"),
        ({"width": 32.0}, "image_stats"),
        ({"confidence": 0.0}, "softmax"),
        ({"class_weights": np.array([0.8, 0.05, 0.05, 0.05, 0.05])}, "class_mix"),
        ({"embedding_shift": 1.0}, "embedding"),
    ],
)
def test_a_clear_shift_is_caught_by_its_detector(window: dict, detector: str) -> None:
    reference = reference_of(make_sample(400, seed=0))
    verdict = drift.detect(reference, make_sample(100, seed=1, **window))
    assert verdict.drifted
    assert detector in fired(verdict)
    label = drift.DETECTOR_LABELS[detector]
    assert any(reason.startswith(f"{label}: ") and "< 0.0025" in reason for reason in verdict.reasons)


def test_a_shift_only_in_the_embeddings_fires_the_embedding_detector_alone() -> None:
    reference = reference_of(make_sample(400, seed=0))
    verdict = drift.detect(reference, make_sample(100, seed=1, embedding_shift=1.0))
    assert fired(verdict) == {"embedding"}
    assert len(verdict.reasons) == 1


def test_every_test_carries_its_numbers() -> None:
    reference = reference_of(make_sample(300, seed=0))
    verdict = drift.detect(reference, make_sample(50, seed=1))
    names = [t.name for t in verdict.tests]
    assert names == [
        "ks:image_height", "ks:image_mean", "ks:image_std", "ks:image_width",
        *(f"ks:prob:{k}" for k in range(CLASSES)), "chi2:predicted_class", "mmd:embedding",
    ]  # fmt: skip
    for test in verdict.tests:
        assert 0 < test.p_value <= 1 and test.p_value <= test.adjusted_p_value <= 1
        assert test.threshold == pytest.approx(0.01 / 4)
        assert test.drifted == (test.adjusted_p_value < test.threshold)
    assert not verdict.drifted and verdict.reasons == []


# ----------------------------------------------------------------------------------------- MMD
def naive_mmd_test(x: np.ndarray, y: np.ndarray, permutations: int, seed: int) -> tuple[float, np.ndarray, float]:
    """The textbook loop: the pooled kernel, then for each permutation the three block means of its split."""
    z = np.concatenate([x, y]).astype(np.float64)
    gamma = 1.0 / np.median(pdist(x.astype(np.float64), "sqeuclidean"))
    kernel = np.exp(-gamma * ((z[:, None, :] - z[None, :, :]) ** 2).sum(axis=2))

    def mmd2(window_rows: np.ndarray) -> float:
        mask = np.zeros(len(z), dtype=bool)
        mask[window_rows] = True
        xx, yy = kernel[~mask][:, ~mask], kernel[mask][:, mask]
        return float(xx.mean() + yy.mean() - 2 * kernel[~mask][:, mask].mean())

    observed = mmd2(np.arange(len(x), len(z)))
    null = np.array([mmd2(rows) for rows in drift.permutation_plan(len(x), len(y), permutations, seed)])
    return observed, null, (1 + int((null >= observed).sum())) / (1 + permutations)


@pytest.mark.parametrize(("shift", "m"), [(0.0, 30), (0.4, 30), (0.0, 2)])
def test_fast_mmd_equals_the_plain_permutation_loop(shift: float, m: int) -> None:
    rng = np.random.default_rng(5)
    x = rng.normal(size=(120, WIDTH)).astype(np.float32)
    y = (rng.normal(size=(m, WIDTH)) + shift).astype(np.float32)
    observed, null, p = naive_mmd_test(x, y, permutations=200, seed=3)

    cold_stat, cold_p = drift.mmd_permutation_test(x, y, permutations=200, seed=3)
    assert cold_stat == pytest.approx(observed, rel=1e-4, abs=1e-6)
    assert cold_p == p

    sample = make_sample(120, seed=0)
    reference = drift.Reference(
        Sample(sample.stats, sample.probabilities, x),
        CLASSES,
        drift.DriftConfig(p_value=0.05, permutations=200, seed=3),
    )
    cached_stat, cached_p = reference.mmd(y)
    assert cached_stat == pytest.approx(observed, rel=1e-4, abs=1e-6)
    assert cached_p == p
    # the permuted statistics themselves, through the same weights the fast path multiplies with
    weights = drift._weights(drift.permutation_plan(120, m, 200, 3), 120, m).astype(np.float64)
    z = np.concatenate([x, y]).astype(np.float64)
    kernel = np.exp(-drift.median_gamma(x) * ((z[:, None, :] - z[None, :, :]) ** 2).sum(axis=2))
    np.testing.assert_allclose(np.einsum("ij,ij->j", kernel @ weights, weights), null, rtol=1e-6, atol=1e-9)
    if shift:
        assert p == pytest.approx(1 / 201)


def test_stopping_early_keeps_the_verdict_of_all_permutations() -> None:
    reference = reference_of(make_sample(300, seed=0))
    for seed, shift in [(1, 0.0), (2, 0.0), (3, 0.15), (4, 0.3), (5, 1.0)]:
        window = make_sample(60, seed=seed, embedding_shift=shift)
        quick = drift.detect(reference, window)
        full = drift.detect(reference, window, stop_early=False)
        assert quick.detectors == full.detectors
        assert quick.tests[-1].statistic == full.tests[-1].statistic
        if not quick.detectors["embedding"]:  # stopped early or not, a p-value on the right side of the line
            assert quick.tests[-1].p_value >= quick.tests[-1].threshold


def test_the_prepared_reference_equals_the_cold_path() -> None:
    config = drift.DriftConfig()
    sample = make_sample(250, seed=0)
    reference = drift.Reference(sample, CLASSES, config)
    for window in (make_sample(40, seed=1), make_sample(40, seed=2, brightness=0.1, embedding_shift=0.3)):
        cached = drift.detect(reference, window, stop_early=False)
        cold = drift.detect_cold(sample, window, CLASSES, config)
        assert [t.name for t in cached.tests] == [t.name for t in cold.tests]
        for a, b in zip(cached.tests, cold.tests, strict=True):
            assert a.statistic == pytest.approx(b.statistic, rel=1e-5, abs=1e-9), a.name
            assert a.p_value == pytest.approx(b.p_value, rel=1e-9, abs=1e-12), a.name
            assert a.adjusted_p_value == pytest.approx(b.adjusted_p_value, rel=1e-9, abs=1e-12), a.name
            assert a.drifted == b.drifted
        assert cached.drifted == cold.drifted and cached.reasons == cold.reasons


def test_ks_matches_scipy() -> None:
    rng = np.random.default_rng(0)
    cases = [(500, 2, 0.2), (500, 20, 0.2), (300, 300, 0.2), (50, 700, 0.2), (500, 20, 1.0), (400, 200, 0.4)]
    for n, m, shift in cases:
        a, b = rng.normal(size=n), rng.normal(shift, 1.1, size=m).round(1)  # rounding: ties in the window
        expected = sps.ks_2samp(a, b, method="asymp")
        d, p = drift.ks_tests(a, b)
        fast_d = drift._ks_d_sorted(np.sort(a), b)
        assert d[0] == pytest.approx(expected.statistic) and fast_d == pytest.approx(expected.statistic)
        fast_p = drift._ks_pvalue(np.array([fast_d]), n, m)[0]
        assert p[0] == fast_p
        if expected.pvalue < 0.05:  # where a decision can hang on it: exactly scipy's value
            assert fast_p == pytest.approx(expected.pvalue, rel=1e-9)
        else:  # far from any threshold Kolmogorov's limit stands in for the finite-size distribution
            assert fast_p == pytest.approx(expected.pvalue, abs=0.05)


def test_detection_is_deterministic_for_a_seed() -> None:
    sample, window = make_sample(200, seed=0), make_sample(30, seed=1, embedding_shift=0.2)
    first = drift.detect(drift.Reference(sample, CLASSES, drift.DriftConfig(seed=7)), window, stop_early=False)
    again = drift.detect(drift.Reference(sample, CLASSES, drift.DriftConfig(seed=7)), window, stop_early=False)
    assert [t.model_dump() for t in first.tests] == [t.model_dump() for t in again.tests]


# ----------------------------------------------------------------------------------------- corrections
def test_bonferroni_and_benjamini_hochberg_adjust_as_defined() -> None:
    p = np.array([0.001, 0.01, 0.02, 0.5])
    np.testing.assert_allclose(drift.adjust(p, "bonferroni"), [0.004, 0.04, 0.08, 1.0])
    # BH: p_(i) * k / i, then the running minimum from the largest down
    np.testing.assert_allclose(drift.adjust(p, "fdr_bh"), [0.004, 0.02, 0.02 * 4 / 3, 0.5])
    rng = np.random.default_rng(0)
    for _ in range(20):
        q = rng.random(12) ** 3
        assert (drift.adjust(q, "fdr_bh") <= drift.adjust(q, "bonferroni") + 1e-15).all()


def test_benjamini_hochberg_fires_where_bonferroni_does_not() -> None:
    # four tests all at p = 0.002: Bonferroni makes each 0.008 (over 0.0025), BH keeps 0.002 (under)
    p, d = np.full(4, 0.002), np.full(4, 0.5)
    names = [f"ks:prob:{k}" for k in range(4)]
    bonferroni = drift._ks_family("softmax", names, d, p, drift.DriftConfig(correction="bonferroni"))
    bh = drift._ks_family("softmax", names, d, p, drift.DriftConfig(correction="fdr_bh"))
    assert not any(t.drifted for t in bonferroni) and all(t.drifted for t in bh)
    assert [t.adjusted_p_value for t in bonferroni] == pytest.approx([0.008] * 4)


def test_fdr_bh_runs_through_detect() -> None:
    config = drift.DriftConfig(correction="fdr_bh")
    reference = drift.Reference(make_sample(300, seed=0), CLASSES, config)
    verdict = drift.detect(reference, make_sample(80, seed=1, brightness=0.2))
    assert "image_stats" in fired(verdict)
    family = [t for t in verdict.tests if t.detector == "image_stats"]
    np.testing.assert_allclose(
        [t.adjusted_p_value for t in family], drift.adjust([t.p_value for t in family], "fdr_bh")
    )


# ----------------------------------------------------------------------------------------- edge cases
def test_a_constant_statistic_equal_on_both_sides_is_no_evidence() -> None:
    reference = reference_of(make_sample(200, seed=0))
    verdict = drift.detect(reference, make_sample(30, seed=1))
    width = next(t for t in verdict.tests if t.name == "ks:image_width")
    assert (width.statistic, width.p_value, width.drifted) == (0.0, 1.0, False)
    # the same constant statistic with another value in the window is the clearest drift there is
    changed = drift.detect(reference, make_sample(30, seed=1, width=64.0))
    width = next(t for t in changed.tests if t.name == "ks:image_width")
    assert width.statistic == 1.0 and width.drifted


@pytest.mark.parametrize("m", [2, 3])
def test_tiny_windows_do_not_crash(m: int) -> None:
    reference = reference_of(make_sample(200, seed=0))
    for window in (make_sample(m, seed=1), make_sample(m, seed=2, embedding_shift=3.0, brightness=1.0)):
        verdict = drift.detect(reference, window)
        assert len(verdict.tests) == 4 + CLASSES + 2
        assert all(0 < t.p_value <= 1 for t in verdict.tests)
    # three points wholly above every reference point: D = 1, the smallest p-value the exact test has
    mean = next(t for t in verdict.tests if t.name == "ks:image_mean")
    assert mean.statistic == 1.0 and mean.p_value == pytest.approx(2 / math.comb(200 + m, m))


def test_class_mix_small_windows_and_unseen_classes() -> None:
    # the reference never predicts class 4; a window of 20 that is all class 4 is drift, and its p-value
    # is the Monte-Carlo floor, not the chi-square approximation's 1e-100
    reference_counts = np.array([100, 100, 100, 100, 0])
    stat, p = drift.chi2_class_mix(reference_counts, np.array([0, 0, 0, 0, 20]), draws=4000)
    assert stat > 100 and p == pytest.approx(1 / 4001)
    # a window that matches the reference's mix is no evidence
    _stat, p = drift.chi2_class_mix(reference_counts, np.array([5, 5, 5, 5, 0]), draws=4000)
    assert p > 0.5


def test_mismatched_windows_are_refused_clearly() -> None:
    reference = reference_of(make_sample(100, seed=0))
    with pytest.raises(DataError, match="at least 2"):
        drift.detect(reference, make_sample(1, seed=1))
    other = make_sample(10, seed=1)
    with pytest.raises(DataError, match="8-d"):
        drift.detect(reference, Sample(other.stats, other.probabilities, other.embeddings[:, :4]))
    with pytest.raises(DataError, match="image statistics"):
        drift.detect(
            reference, Sample({"image_mean": other.stats["image_mean"]}, other.probabilities, other.embeddings)
        )


def test_config_refuses_a_permutation_count_that_can_never_fire() -> None:
    with pytest.raises(ConfigError, match="at least 400 permutations"):
        drift.DriftConfig(p_value=0.01, permutations=100)
    assert drift.DriftConfig(p_value=0.05, permutations=100).threshold == pytest.approx(0.0125)
    with pytest.raises(ConfigError, match="correction"):
        drift.DriftConfig(correction="holm")
    config = drift.DriftConfig.from_settings(MonitorSettings(p_value=0.02, correction="fdr_bh", mmd_permutations=600))
    assert (config.p_value, config.correction, config.permutations) == (0.02, "fdr_bh", 600)
