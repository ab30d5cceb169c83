"""The JSON a drift check answers with: ``visionloop monitor check --json``, the monitor's ``GET /drift``,
the server's ``GET /monitoring/drift`` and the rows the monitor keeps in the store are all this model.

Documented field by field in docs/monitoring.md. No numpy or scipy here: the server imports it.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

Detector = Literal["image_stats", "softmax", "class_mix", "embedding"]
ACCURACY_REASON = "live accuracy"  # how the accuracy floor's reason starts (the loop's verdict trigger skips it)
Status = Literal["ok", "drifted", "accuracy_below_floor", "insufficient_data", "no_reference", "no_model", "error"]


class TestResult(BaseModel):
    """One statistical test of the window against the reference."""

    __test__ = False  # not a pytest class

    name: str = Field(description="e.g. ks:image_mean, ks:prob:7, chi2:predicted_class, mmd:embedding")
    detector: Detector
    statistic: float = Field(description="KS D, chi-square, or MMD² (biased, RBF kernel)")
    p_value: float = Field(description="raw p-value of this test")
    adjusted_p_value: float = Field(description="after the correction within its detector's family")
    threshold: float = Field(description="the adjusted p-value under which this test counts as drift")
    drifted: bool


class WindowInfo(BaseModel):
    size: int = Field(description="predictions in the window")
    requested: int = Field(description="monitor.window_size")
    max_age_seconds: float = Field(description="monitor.window_seconds")
    first_time: float | None = Field(None, description="unix seconds of the oldest prediction in the window")
    last_time: float | None = None
    span_seconds: float = 0.0


class ReferenceInfo(BaseModel):
    size: int = Field(description="images in the reference profile")
    created_at: float = Field(description="unix seconds")
    age_seconds: float
    origin: Literal["export", "rebuilt"] = Field(
        description="export: made at training time and registered with the version; rebuilt: built on first use "
        "from the version's dataset (versions registered before profiles existed)"
    )
    splits: list[str] = Field(description="dataset splits the sample was drawn from")


class LiveAccuracy(BaseModel):
    """Accuracy of one model version on the newest feedback labels (POST /feedback)."""

    model_version: str
    count: int = Field(description="feedback labels in the window")
    correct: int
    accuracy: float | None = Field(description="correct / count; null when there is no feedback")
    judged: bool = Field(description="count >= monitor.min_feedback: enough labels to compare with the floor")
    below_floor: bool = Field(description="judged and accuracy < monitor.min_accuracy")


class DriftResult(BaseModel):
    """One drift check of the served version's newest predictions against its reference profile."""

    model_name: str
    model_version: str | None
    checked_at: float = Field(description="unix seconds")
    duration_seconds: float
    status: Status = Field(
        description="accuracy_below_floor (live accuracy of this version under monitor.min_accuracy on at least "
        "monitor.min_feedback labels) wins over drifted, ok, insufficient_data and no_reference: labels that say "
        "the model is wrong now outweigh what the input tests suspect; the other reasons stay listed"
    )
    drifted: bool = Field(description="the drift tests fired (true under accuracy_below_floor too when they did)")
    reasons: list[str] = Field(
        description="the live accuracy under the floor first, then why drifted (each detector that fired), or why "
        "there is no verdict"
    )
    window: WindowInfo
    reference: ReferenceInfo | None = None
    tests: list[TestResult] = []
    accuracy: list[LiveAccuracy] = Field([], description="per model version with feedback in the window")
    settings: dict[str, float | int | str] = Field(
        {}, description="the thresholds this check used (p_value, correction, window sizes, permutations, ...)"
    )
