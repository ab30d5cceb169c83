"""The verdict includes live accuracy: a version whose labels say it is wrong is ``accuracy_below_floor``
(exit 3), whatever the drift tests say; the metrics and the text table carry it; the table stays whole at 80
columns."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from visionloop.config import MonitorSettings
from visionloop.monitoring.commands import EXIT, drift_table
from visionloop.monitoring.metrics import MonitorMetrics
from visionloop.monitoring.monitor import under_floor
from visionloop.monitoring.schema import DriftResult, LiveAccuracy, TestResult, WindowInfo

NAMES = [
    ("image_stats", "ks:image_mean"), ("image_stats", "ks:image_sharpness"), ("image_stats", "ks:image_width"),
    ("image_stats", "ks:channel_mean_2"), ("softmax", "ks:prob:0"), ("softmax", "ks:prob:9"),
    ("class_mix", "chi2:predicted_class"), ("embedding", "mmd:embedding"),
]  # fmt: skip


def live(version: str, count: int, correct: int, floor: float = 0.8, min_feedback: int = 20) -> LiveAccuracy:
    judged = count >= min_feedback
    accuracy = correct / count if count else None
    below = judged and accuracy is not None and accuracy < floor
    return LiveAccuracy(
        model_version=version, count=count, correct=correct, accuracy=accuracy, judged=judged, below_floor=below
    )


def result(status: str, accuracy: list[LiveAccuracy], drifted: bool = False, reasons: tuple = ()) -> DriftResult:
    tests = [
        TestResult(
            name=name, detector=detector, statistic=0.123456, p_value=1.5e-12, adjusted_p_value=1.2e-11,
            threshold=0.0025, drifted=drifted,
        )
        for detector, name in NAMES
    ] if status in ("ok", "drifted") else []  # fmt: skip
    return DriftResult(
        model_name="m", model_version="1", checked_at=1.0, duration_seconds=0.1, status=status, drifted=drifted,
        reasons=list(reasons), window=WindowInfo(size=200, requested=200, max_age_seconds=3600), tests=tests,
        accuracy=accuracy,
    )  # fmt: skip


def test_zero_accuracy_on_200_labels_with_unchanged_inputs_is_its_own_status_and_exit():
    judged = under_floor(result("ok", [live("1", 200, 0)]), 0.8)
    assert judged.status == "accuracy_below_floor" and not judged.drifted
    assert judged.reasons == ["live accuracy 0.000 on 200 labels < 0.80 (monitor.min_accuracy; v1)"]
    assert EXIT[judged.status] == 3 and sorted(EXIT.values()) == [0, 0, 0, 1, 2, 2, 3]


def test_drift_and_low_accuracy_together_list_both_reasons_and_keep_drifted():
    judged = under_floor(result("drifted", [live("1", 50, 10)], drifted=True, reasons=("embeddings: ...",)), 0.8)
    assert judged.status == "accuracy_below_floor" and judged.drifted
    assert judged.reasons[0].startswith("live accuracy 0.200 on 50 labels") and judged.reasons[1] == "embeddings: ..."


@pytest.mark.parametrize(
    ("status", "accuracy", "expected"),
    [
        ("ok", [live("1", 19, 0)], "ok"),  # too few labels to judge
        ("ok", [live("1", 200, 170)], "ok"),  # 0.85 clears 0.80
        ("ok", [live("2", 200, 0)], "ok"),  # another version's labels: history, not this verdict
        ("insufficient_data", [live("1", 200, 0)], "accuracy_below_floor"),  # labels need no drift window
        ("no_reference", [live("1", 200, 0)], "accuracy_below_floor"),
        ("error", [live("1", 200, 0)], "error"),  # nothing is known for sure
        ("no_model", [], "no_model"),
    ],
)
def test_only_the_judged_version_under_the_floor_changes_the_status(status, accuracy, expected):
    assert under_floor(result(status, accuracy), 0.8).status == expected


def test_metrics_carry_the_status_and_the_floor_verdict():
    metrics = MonitorMetrics(MonitorSettings())
    metrics.observe(under_floor(result("drifted", [live("1", 200, 0), live("2", 5, 0)], drifted=True), 0.8))
    from prometheus_client import generate_latest

    text = generate_latest(metrics.registry).decode()
    assert 'visionloop_monitor_status{status="accuracy_below_floor"} 1.0' in text
    assert 'visionloop_monitor_status{status="ok"} 0.0' in text
    assert 'visionloop_live_accuracy_below_floor{model_version="1"} 1.0' in text
    assert 'visionloop_live_accuracy_below_floor{model_version="2"}' not in text  # not judged: no verdict
    assert 'visionloop_drift_detected{model_version="1"} 1.0' in text  # the drift tests' own verdict stays
    assert 'visionloop_monitor_checks_total{status="accuracy_below_floor"} 1.0' in text


def test_the_tests_table_keeps_every_name_whole_at_80_columns():
    out = io.StringIO()
    Console(file=out, width=80, color_system=None).print(drift_table(result("drifted", [], drifted=True).tests))
    lines = out.getvalue().splitlines()
    assert max(len(line) for line in lines) <= 80
    cells = {line.split()[0] for line in lines if line.strip()}
    for _, name in NAMES:
        assert name in cells, out.getvalue()
