"""The drift tests: is a window of traffic drawn from the same distribution as the version's reference?

Four detectors, each a family of tests; the window has drifted when any detector fires. The overall
false-alarm budget of one check (``p_value``) is split evenly over the four (Bonferroni), so each
detector fires when one of its tests has an adjusted p-value under ``p_value / 4``:

1. ``image_stats``: two-sample Kolmogorov-Smirnov on every image statistic (``stats.stat_names``);
2. ``softmax``: KS on every class-probability column ("black-box shift detection", Rabanser et al.
   2019, "Failing Loudly");
3. ``class_mix``: chi-square of the window's predicted-class counts against the reference's
   (smoothed) predicted-class proportions, with a Monte-Carlo p-value (see ``chi2_class_mix``);
4. ``embedding``: MMD² with an RBF kernel (median-heuristic bandwidth) and a permutation test.

Inside a KS family the p-values are corrected for the number of tests (Bonferroni, or
Benjamini-Hochberg with ``correction="fdr_bh"``). Every p-value is valid at small windows: the KS
p-values are Smirnov's (``ks_2samp(method="asymp")``, the exact distribution of the one-sample
statistic at the effective size), the other two are Monte-Carlo/permutation p-values of the form
(1 + exceedances) / (1 + draws), which never reach 0: a permutation test with P permutations cannot
give a p-value under 1 / (P + 1), so ``DriftConfig`` refuses a permutation count that could never
reach the detector threshold.

``Reference`` prepares the reference side once (sorted columns, class counts, the reference-reference
kernel block, the permutation plan per window size), so a check costs only the window's own work.
The cold functions (``ks_tests``, ``chi2_class_mix``, ``mmd_permutation_test``) compute the same
numbers from scratch; the unit tests hold the two paths equal.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from scipy import stats as sps

from visionloop.errors import ConfigError, DataError
from visionloop.monitoring.schema import Detector, TestResult
from visionloop.monitoring.stats import Sample

if TYPE_CHECKING:
    from visionloop.config import MonitorSettings

DETECTORS: tuple[Detector, ...] = ("image_stats", "softmax", "class_mix", "embedding")
DETECTOR_LABELS = {
    "image_stats": "image statistics",
    "softmax": "class probabilities",
    "class_mix": "predicted class mix",
    "embedding": "embeddings",
}
CORRECTIONS = ("bonferroni", "fdr_bh")
MEDIAN_ROWS = 500  # rows of the reference the median heuristic looks at (all pairs among them)
PLAN_CACHE = 8  # window sizes whose permutation plan a Reference keeps
PERMUTATION_BLOCK = 100  # permutations evaluated per matrix product; a clear non-drift stops after the first
SMIRNOV_ABOVE = 0.1  # KS p-values above this (by Kolmogorov's limit) skip the slow finite-size distribution
SMIRNOV_BELOW_SIZE = 30  # ... except at effective sizes under this, where every column gets it
MC_BLOCK = 500  # class-mix Monte-Carlo draws per block; a clear non-drift stops after the first
CLASS_SMOOTHING = 0.5  # pseudo-count per class (Jeffreys) for the reference's predicted-class proportions


@dataclass(frozen=True)
class DriftConfig:
    p_value: float = 0.01  # overall false-alarm budget per check, Bonferroni-split over the 4 detectors
    correction: str = "bonferroni"  # or "fdr_bh": within a detector's family of KS tests
    permutations: int = 500  # MMD permutations: p >= 1/(P+1), so P must be >= 4/p_value for MMD to fire at all
    seed: int = 0

    def __post_init__(self) -> None:
        if not 0 < self.p_value < 1:
            raise ConfigError(f"drift p_value must be between 0 and 1, not {self.p_value}")
        if self.correction not in CORRECTIONS:
            raise ConfigError(f"drift correction must be one of {', '.join(CORRECTIONS)}, not {self.correction!r}")
        smallest = 1.0 / (self.permutations + 1)
        if smallest >= self.threshold:
            need = math.ceil(1.0 / self.threshold)
            raise ConfigError(
                f"monitor.mmd_permutations={self.permutations} can never detect drift: a permutation test's smallest "
                f"p-value is 1/(permutations+1) = {smallest:.3g}, not under the per-detector threshold "
                f"{self.threshold:.3g} (monitor.p_value / {len(DETECTORS)}); use at least {need} permutations"
            )

    @property
    def threshold(self) -> float:
        """The adjusted p-value under which one detector fires."""
        return self.p_value / len(DETECTORS)

    @property
    def class_mix_draws(self) -> int:
        """Monte-Carlo draws of the class-mix test: enough that its p-value can go well under the threshold."""
        return max(1000, math.ceil(10.0 / self.threshold))

    @classmethod
    def from_settings(cls, monitor: MonitorSettings) -> DriftConfig:
        return cls(p_value=monitor.p_value, correction=monitor.correction, permutations=monitor.mmd_permutations)


@dataclass
class Verdict:
    tests: list[TestResult]
    drifted: bool
    reasons: list[str]
    detectors: dict[str, bool] = field(default_factory=dict)  # detector -> fired


# ------------------------------------------------------------------------------------------------ corrections
def adjust(p_values: np.ndarray, correction: str) -> np.ndarray:
    """p-values adjusted for testing a family of them: Bonferroni min(1, k·p) or Benjamini-Hochberg."""
    p = np.asarray(p_values, dtype=np.float64)
    if len(p) == 0:
        return p
    if correction == "bonferroni":
        return np.minimum(1.0, p * len(p))
    if correction == "fdr_bh":
        return sps.false_discovery_control(p, method="bh")
    raise ConfigError(f"unknown correction {correction!r}")


# ------------------------------------------------------------------------------------------------ KS
def _ks_floor(n: int, m: int) -> float:
    """The smallest two-sided two-sample KS p-value there is: 2 / C(n+m, m), both samples wholly apart."""
    log_choose = math.lgamma(n + m + 1) - math.lgamma(n + 1) - math.lgamma(m + 1)
    return min(1.0, 2.0 * math.exp(-log_choose))


def _ks_pvalue(d: np.ndarray, n: int, m: int) -> np.ndarray:
    """Smirnov's two-sided p-value, as ``scipy.stats.ks_2samp(method="asymp")`` computes it (``kstwo`` at the
    effective size), floored at the exact distribution's smallest value (the formula says 0 for D = 1).

    ``kstwo`` is slow (a recursion per value), and most columns of a clean window are nowhere near a
    threshold: where Kolmogorov's limit already says p > 0.1 (ten times the largest per-detector threshold a
    sane budget gives) that value is kept; only the others get the finite-size distribution, and so does every
    column of a small window (effective size under 30), where the limit is poor and ``kstwo`` cheap.
    """
    big, small = max(n, m), min(n, m)
    en = big * small / (big + small)
    d = np.asarray(d, dtype=np.float64)
    p = sps.kstwobign.sf(d * math.sqrt(en))
    near = (p <= SMIRNOV_ABOVE) | (en < SMIRNOV_BELOW_SIZE)
    if near.any():
        p[near] = sps.kstwo.sf(d[near], np.round(en))
    return np.clip(p, _ks_floor(n, m), 1.0)


def _ks_d_sorted(reference_sorted: np.ndarray, window: np.ndarray) -> float:
    """sup |F_ref - F_win| from the sorted reference column: only the window's points need a search.

    Between two window points F_win is constant and F_ref monotone, so the supremum is reached at a
    window point, from the right (both ECDFs at it) or from the left (both just before it).
    """
    n, m = len(reference_sorted), len(window)
    w = np.sort(window)
    win_right = np.searchsorted(w, w, side="right") / m
    win_left = np.searchsorted(w, w, side="left") / m
    ref_right = np.searchsorted(reference_sorted, w, side="right") / n
    ref_left = np.searchsorted(reference_sorted, w, side="left") / n
    return float(max(np.abs(ref_right - win_right).max(), np.abs(ref_left - win_left).max()))


def ks_tests(reference: np.ndarray, window: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Cold path: KS D and raw p-value of each column of ``window`` (m, k) against ``reference`` (n, k)."""
    reference, window = np.atleast_2d(reference.T).T, np.atleast_2d(window.T).T
    d = np.empty(reference.shape[1])
    for j in range(reference.shape[1]):
        if np.ptp(reference[:, j]) == 0 and np.ptp(window[:, j]) == 0 and reference[0, j] == window[0, j]:
            d[j] = 0.0  # the same constant on both sides: nothing to test (p = 1)
            continue
        d[j] = sps.ks_2samp(reference[:, j], window[:, j], method="asymp").statistic
    # the p-value of ks_2samp(method="asymp"), computed as the prepared path does (see _ks_pvalue)
    return d, _ks_pvalue(d, len(reference), len(window))


def _ks_family(
    detector: Detector, names: list[str], d: np.ndarray, p: np.ndarray, config: DriftConfig
) -> list[TestResult]:
    adjusted = adjust(p, config.correction)
    return [
        TestResult(
            name=name,
            detector=detector,
            statistic=float(d_),
            p_value=float(p_),
            adjusted_p_value=float(a_),
            threshold=config.threshold,
            drifted=bool(a_ < config.threshold),
        )
        for name, d_, p_, a_ in zip(names, d, p, adjusted, strict=True)
    ]


# ------------------------------------------------------------------------------------------------ class mix
def _smoothed(counts: np.ndarray) -> np.ndarray:
    counts = np.asarray(counts, dtype=np.float64)
    return (counts + CLASS_SMOOTHING) / (counts.sum(axis=-1, keepdims=True) + CLASS_SMOOTHING * counts.shape[-1])


def chi2_class_mix(
    reference_counts: np.ndarray, window_counts: np.ndarray, draws: int, seed: int = 0, stop_at: float | None = None
) -> tuple[float, float]:
    """Chi-square of the window's predicted-class counts against the reference's smoothed proportions.

    The p-value is Monte-Carlo, not the chi-square approximation, which is poor exactly where a monitor
    looks first (windows of 20 over 10 classes: expected counts of 2, and classes the reference never
    predicted). Under "no drift" both samples come from one class distribution, best estimated by the
    pooled counts; the null draws the reference AND the window from it (the reference is a finite sample
    too: treating its proportions as exact would over-alarm when the window is not much smaller), and
    recomputes the statistic the same way, smoothing included. p = (1 + #{null >= observed}) / (1 + draws).
    With ``stop_at`` the draws run in blocks and stop once all of them could no longer give a p-value
    under it (as ``Reference.mmd`` does): the same verdict, p from the draws made.
    """
    reference_counts = np.asarray(reference_counts, dtype=np.int64)
    window_counts = np.asarray(window_counts, dtype=np.int64)
    n, m = int(reference_counts.sum()), int(window_counts.sum())
    observed = float(sps.chisquare(window_counts, m * _smoothed(reference_counts)).statistic)
    pooled = (reference_counts + window_counts) / (n + m)
    rng = np.random.default_rng([seed, n, m, 7])
    allowed = math.inf if stop_at is None else stop_at * (1 + draws) - 1
    exceeding, done = 0, 0
    while done < draws:
        size = min(MC_BLOCK, draws - done)
        ref_null = rng.multinomial(n, pooled, size=size)
        win_null = rng.multinomial(m, pooled, size=size)
        expected = m * _smoothed(ref_null)
        null = ((win_null - expected) ** 2 / expected).sum(axis=1)
        # a relative tolerance: the same statistic computed twice must count as reached
        exceeding += int((null >= observed * (1 - 1e-9)).sum())
        done += size
        if exceeding >= allowed:
            break
    return observed, (1 + exceeding) / (1 + done)


# ------------------------------------------------------------------------------------------------ MMD
def _sq_dists(a: np.ndarray, b: np.ndarray, aa: np.ndarray, bb: np.ndarray) -> np.ndarray:
    d = (a * np.float32(-2.0)) @ b.T
    d += aa[:, None]
    d += bb[None, :]
    np.maximum(d, 0.0, out=d)
    return d


def _rbf(a: np.ndarray, b: np.ndarray, aa: np.ndarray, bb: np.ndarray, gamma: float) -> np.ndarray:
    """exp(-gamma |a_i - b_j|²), as few passes over the (big) result as numpy allows: the exponent is
    2γ a·b - γ|a|² - γ|b|², clipped at 0 where rounding made a distance negative."""
    g = np.float32(gamma)
    k = (a * (2 * g)) @ b.T
    k -= (g * aa)[:, None]
    k -= (g * bb)[None, :]
    np.minimum(k, 0.0, out=k)
    np.exp(k, out=k)
    return k


def _median_rows(n: int) -> np.ndarray:
    """The reference rows the median heuristic looks at: all, or ``MEDIAN_ROWS`` evenly spaced ones."""
    return np.linspace(0, n - 1, MEDIAN_ROWS).astype(int) if n > MEDIAN_ROWS else np.arange(n)


def _gamma_from(sq: np.ndarray) -> float:
    """1 / the median over the pairs (i < j) of a square matrix of squared distances (its diagonal is ignored).

    Without listing the pairs: in the whole matrix each pair appears twice, after the k diagonal zeros, so
    the j-th smallest pair sits at rank k + 2j.
    """
    k = len(sq)
    pairs = k * (k - 1) // 2
    if pairs == 0:
        return 1.0
    flat = sq.astype(np.float64).ravel()
    flat[:: k + 1] = -1.0  # the diagonal first, whatever rounding left there
    ranks = [k + 2 * (pairs // 2)] if pairs % 2 else [k + 2 * (pairs // 2 - 1), k + 2 * (pairs // 2)]
    part = np.partition(flat, ranks)
    median = float(np.mean(part[ranks]))
    if median <= 0:  # (nearly) all reference points equal: fall back to the mean, then to 1
        mean = float(flat[flat > 0].sum() / (2 * pairs))
        median = mean if mean > 0 else 1.0
    return 1.0 / median


def median_gamma(x: np.ndarray) -> float:
    """1 / median squared distance between reference points: k(a, b) = exp(-|a-b|² / median).

    The median heuristic (as alibi-detect configures it: sigma² = median/2 in exp(-d²/(2 sigma²))), over
    all pairs of at most ``MEDIAN_ROWS`` evenly spaced reference rows.
    """
    rows = np.asarray(x, dtype=np.float32)[_median_rows(len(x))]
    norms = (rows * rows).sum(axis=1)
    return _gamma_from(_sq_dists(rows, rows, norms, norms))


def permutation_plan(n: int, m: int, permutations: int, seed: int) -> np.ndarray:
    """For each permutation, the pooled rows (0..n+m-1, reference first) that play the window: (P, m)."""
    rng = np.random.default_rng([seed, n, m])
    if m >= n + m - 1:
        return np.argsort(rng.random((permutations, n + m)), axis=1)[:, :m]
    # the m smallest of n+m uniform draws: a uniformly random m-subset, in O(n+m) a permutation
    return np.argpartition(rng.random((permutations, n + m)), m, axis=1)[:, :m]


def _weights(plan: np.ndarray, n: int, m: int) -> np.ndarray:
    """(n+m, P) float32: +1/n for a pooled row playing the reference, -1/m for one playing the window.

    With w such a column, the biased MMD² of that split is w^T K w, so all permutations are one product.
    """
    w = np.full((n + m, len(plan)), 1.0 / n, dtype=np.float32)
    w[plan, np.arange(len(plan))[:, None]] = -1.0 / m
    return w


def mmd_permutation_test(x: np.ndarray, y: np.ndarray, permutations: int, seed: int = 0) -> tuple[float, float]:
    """Cold path: biased MMD² of ``x`` (reference) vs ``y`` and its permutation p-value.

    The pooled kernel matrix once, every permutation as a column of weights: (K @ W) * W summed per
    column is w^T K w for all of them in one matrix product. p = (1 + #{perm >= observed}) / (1 + P).
    """
    x, y = np.asarray(x, dtype=np.float32), np.asarray(y, dtype=np.float32)
    n, m = len(x), len(y)
    z = np.concatenate([x, y])
    zz = (z * z).sum(axis=1)
    k = _sq_dists(z, z, zz, zz)  # the reference's own distances give the bandwidth, as in Reference
    rows = _median_rows(n)
    gamma = _gamma_from(k[np.ix_(rows, rows)])
    k *= -gamma
    np.exp(k, out=k)
    observed = float(k[:n, :n].mean(dtype=np.float64) + k[n:, n:].mean(dtype=np.float64)) - 2 * float(
        k[:n, n:].mean(dtype=np.float64)
    )
    w = _weights(permutation_plan(n, m, permutations, seed), n, m)
    null = np.einsum("ij,ij->j", k @ w, w, dtype=np.float64)
    return observed, _permutation_p(null, observed)


def _permutation_p(null: np.ndarray, observed: float, done: int | None = None) -> float:
    done = len(null) if done is None else done
    return (1 + int(_exceeding(null, observed))) / (1 + done)


def _exceeding(null: np.ndarray, observed: float) -> int:
    # float32 products: a permutation equal to the observed split must count as reaching it
    return int((null >= observed - 1e-6 * abs(observed) - 1e-9).sum())


@dataclass
class _Plan:
    ref_w: np.ndarray  # (n, P) float32
    win_w: np.ndarray  # (m, P) float32
    ref_term: np.ndarray  # (P,) w_r^T K_rr w_r, the part of every permuted MMD² that is the reference's alone


class Reference:
    """A reference profile's sample prepared once: sorted stats, class distribution, and the MMD reference side
    (bandwidth by the median heuristic, the reference-reference kernel block, the permutation plan) so a window
    check costs only its own kernel blocks."""

    def __init__(self, sample: Sample, num_classes: int, config: DriftConfig) -> None:
        if len(sample) < 2:
            raise DataError(f"a drift reference needs at least 2 images, this one has {len(sample)}")
        if sample.probabilities.shape[1] != num_classes:
            raise DataError(
                f"the reference's probabilities have {sample.probabilities.shape[1]} columns for {num_classes} classes"
            )
        self.config = config
        self.num_classes = num_classes
        self.size = len(sample)
        self.stat_names = sorted(sample.stats)
        self.stats_sorted = {name: np.sort(sample.stats[name]) for name in self.stat_names}
        self.probabilities_sorted = np.sort(sample.probabilities.astype(np.float64), axis=0)
        self.class_counts = np.bincount(sample.predicted, minlength=num_classes)
        self.embeddings = np.ascontiguousarray(sample.embeddings, dtype=np.float32)
        self.norms = (self.embeddings * self.embeddings).sum(axis=1)
        self.gamma = median_gamma(self.embeddings)
        self.kernel = _rbf(self.embeddings, self.embeddings, self.norms, self.norms, self.gamma)
        self.kernel_mean = float(self.kernel.mean(dtype=np.float64))
        self._plans: dict[int, _Plan] = {}

    def plan(self, m: int) -> _Plan:
        """The permutation plan of a window of ``m`` rows (made once per window size, a few kept)."""
        if m not in self._plans:
            n = self.size
            w = _weights(permutation_plan(n, m, self.config.permutations, self.config.seed), n, m)
            ref_w, win_w = np.ascontiguousarray(w[:n]), np.ascontiguousarray(w[n:])
            ref_term = np.einsum("ij,ij->j", self.kernel @ ref_w, ref_w, dtype=np.float64)
            if len(self._plans) >= PLAN_CACHE:
                self._plans.pop(next(iter(self._plans)))
            self._plans[m] = _Plan(ref_w, win_w, ref_term)
        return self._plans[m]

    def mmd(self, window: np.ndarray, stop_at: float | None = None) -> tuple[float, float]:
        """MMD² of ``window`` embeddings against the reference and its permutation p-value.

        Per window only K_rw (n x m) and K_ww (m x m) are computed; w^T K w = w_r^T K_rr w_r (cached)
        + 2 w_r^T K_rw w_w + w_w^T K_ww w_w. With ``stop_at`` (a p-value threshold) the permutations run in
        blocks and stop as soon as the full run could no longer give a p-value under it: the verdict is the
        one all permutations give, and the p-value reported is (1 + exceedances) / (1 + permutations run).
        """
        y = np.ascontiguousarray(window, dtype=np.float32)
        m = len(y)
        yy = (y * y).sum(axis=1)
        k_rw = _rbf(self.embeddings, y, self.norms, yy, self.gamma)
        k_ww = _rbf(y, y, yy, yy, self.gamma)
        observed = self.kernel_mean + float(k_ww.mean(dtype=np.float64)) - 2 * float(k_rw.mean(dtype=np.float64))
        plan = self.plan(m)
        total = self.config.permutations
        # the largest exceedance count that still gives a p-value under stop_at with all permutations
        allowed = math.inf if stop_at is None else stop_at * (1 + total) - 1
        exceeding, done = 0, 0
        while done < total:
            cols = slice(done, min(total, done + PERMUTATION_BLOCK))
            win_w, ref_w = plan.win_w[:, cols], plan.ref_w[:, cols]
            cross = np.einsum("ij,ij->j", k_rw @ win_w, ref_w, dtype=np.float64)
            own = np.einsum("ij,ij->j", k_ww @ win_w, win_w, dtype=np.float64)
            exceeding += _exceeding(plan.ref_term[cols] + 2 * cross + own, observed)
            done = cols.stop
            if exceeding >= allowed:
                break
        return observed, (1 + exceeding) / (1 + done)


# ------------------------------------------------------------------------------------------------ the check
def _check_window(reference: Reference, window: Sample) -> None:
    if len(window) < 2:
        raise DataError(f"a drift check needs at least 2 predictions in the window, got {len(window)}")
    if window.probabilities.shape[1] != reference.num_classes:
        raise DataError(
            f"the window's probabilities have {window.probabilities.shape[1]} classes, the reference "
            f"{reference.num_classes}: is the window from another model version?"
        )
    if window.embeddings.shape[1] != reference.embeddings.shape[1]:
        raise DataError(
            f"the window's embeddings are {window.embeddings.shape[1]}-d, the reference's "
            f"{reference.embeddings.shape[1]}-d: is the window from another model version?"
        )
    missing = set(reference.stat_names) - set(window.stats)
    if missing:
        raise DataError(f"the window lacks the image statistics {sorted(missing)} the reference has")


def _single(detector: Detector, name: str, statistic: float, p: float, config: DriftConfig) -> TestResult:
    return TestResult(
        name=name, detector=detector, statistic=statistic, p_value=p, adjusted_p_value=p,
        threshold=config.threshold, drifted=p < config.threshold,
    )  # fmt: skip


def _ks_cached(sorted_columns: list[np.ndarray], window_columns: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    d = np.empty(len(sorted_columns))
    for j, (ref, win) in enumerate(zip(sorted_columns, window_columns, strict=True)):
        d[j] = 0.0 if ref[0] == ref[-1] == win.min() == win.max() else _ks_d_sorted(ref, win)
    n, m = len(sorted_columns[0]), len(window_columns[0])
    return d, (_ks_pvalue(d, n, m) if len(d) else d)


def detect(reference: Reference, window: Sample, stop_early: bool = True) -> Verdict:
    """Every drift test of ``window`` against ``reference``; drifted when any detector fires.

    ``stop_early=False`` runs all MMD permutations and class-mix draws even when the first block already
    rules drift out (the verdict is the same; only those two tests' reported p-values can differ).
    """
    _check_window(reference, window)
    config = reference.config
    tests: list[TestResult] = []
    names = reference.stat_names
    d, p = _ks_cached([reference.stats_sorted[s] for s in names], [window.stats[s] for s in names])
    tests += _ks_family("image_stats", [f"ks:{s}" for s in names], d, p, config)
    probs = window.probabilities.astype(np.float64)
    d, p = _ks_cached(list(reference.probabilities_sorted.T), list(probs.T))
    tests += _ks_family("softmax", [f"ks:prob:{k}" for k in range(reference.num_classes)], d, p, config)
    counts = np.bincount(window.predicted, minlength=reference.num_classes)
    stop_at = config.threshold if stop_early else None
    chi2, p_mix = chi2_class_mix(reference.class_counts, counts, config.class_mix_draws, config.seed, stop_at)
    tests.append(_single("class_mix", "chi2:predicted_class", chi2, p_mix, config))
    mmd2, p_mmd = reference.mmd(window.embeddings, stop_at=stop_at)
    tests.append(_single("embedding", "mmd:embedding", mmd2, p_mmd, config))
    return _verdict(tests, config)


def detect_cold(reference_sample: Sample, window: Sample, num_classes: int, config: DriftConfig) -> Verdict:
    """The same check from scratch with the cold functions (no prepared reference): for tests and benchmarks."""
    names = sorted(reference_sample.stats)
    tests: list[TestResult] = []
    ref_stats = np.stack([reference_sample.stats[s] for s in names], axis=1)
    win_stats = np.stack([window.stats[s] for s in names], axis=1)
    d, p = ks_tests(ref_stats, win_stats)
    tests += _ks_family("image_stats", [f"ks:{s}" for s in names], d, p, config)
    d, p = ks_tests(reference_sample.probabilities.astype(np.float64), window.probabilities.astype(np.float64))
    tests += _ks_family("softmax", [f"ks:prob:{k}" for k in range(num_classes)], d, p, config)
    chi2, p_mix = chi2_class_mix(
        np.bincount(reference_sample.predicted, minlength=num_classes),
        np.bincount(window.predicted, minlength=num_classes),
        config.class_mix_draws,
        config.seed,
    )
    tests.append(_single("class_mix", "chi2:predicted_class", chi2, p_mix, config))
    mmd2, p_mmd = mmd_permutation_test(reference_sample.embeddings, window.embeddings, config.permutations, config.seed)
    tests.append(_single("embedding", "mmd:embedding", mmd2, p_mmd, config))
    return _verdict(tests, config)


def _verdict(tests: list[TestResult], config: DriftConfig) -> Verdict:
    fired: dict[str, bool] = {}
    reasons = []
    for detector in DETECTORS:
        family = [t for t in tests if t.detector == detector]
        failing = sorted((t for t in family if t.drifted), key=lambda t: t.adjusted_p_value)
        fired[detector] = bool(failing)
        if failing:
            worst = failing[0]
            more = f" (and {len(failing) - 1} more)" if len(failing) > 1 else ""
            reasons.append(
                f"{DETECTOR_LABELS[detector]}: {worst.name} adjusted p={worst.adjusted_p_value:.2g} "
                f"< {config.threshold:.2g}{more}"
            )
    return Verdict(tests=tests, drifted=any(fired.values()), reasons=reasons, detectors=fired)
