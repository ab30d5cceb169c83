"""The monitor's Prometheus metrics: every drift test, the verdict, live accuracy, and the monitor's own health.

Names follow Prometheus conventions (``_total`` counters, ``_seconds``, ratios 0-1), so the rules in
``deploy/monitoring/prometheus/rules/`` and the Grafana dashboards read them as they stand. Each gauge
is set from the latest check only: a version that is no longer served, or a test that no longer runs,
disappears instead of freezing at its last value.
"""

from __future__ import annotations

from typing import get_args

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

from visionloop.config import MonitorSettings
from visionloop.monitoring.schema import DriftResult, Status
from visionloop.service.metrics import HttpMetrics

CHECK_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TEST_LABELS = ["model_version", "test", "detector"]


class MonitorMetrics:
    def __init__(self, monitor: MonitorSettings) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)  # process_resident_memory_bytes: the monitor's memory stays flat
        self.http = HttpMetrics(r, "visionloop_monitor")  # its own HTTP answers (service/guard.py)
        self.statistic = Gauge("visionloop_drift_statistic", "Drift test statistic.", TEST_LABELS, registry=r)
        self.p_value = Gauge(
            "visionloop_drift_p_value", "Drift test p-value after the multiple-testing correction.", TEST_LABELS,
            registry=r,
        )  # fmt: skip
        self.test_detected = Gauge(
            "visionloop_drift_test_detected", "1 when this drift test's adjusted p-value is under its threshold.",
            TEST_LABELS, registry=r,
        )  # fmt: skip
        self.detected = Gauge(
            "visionloop_drift_detected", "1 when the latest check found drift (the overall verdict).",
            ["model_version"], registry=r,
        )  # fmt: skip
        self.window_size = Gauge(
            "visionloop_drift_window_size", "Predictions in the latest check's window.", ["model_version"], registry=r
        )
        self.window_span = Gauge(
            "visionloop_drift_window_span_seconds", "Time from the oldest to the newest prediction in the window.",
            ["model_version"], registry=r,
        )  # fmt: skip
        self.accuracy = Gauge(
            "visionloop_live_accuracy", "Accuracy on the newest feedback labels (ratio).", ["model_version"], registry=r
        )
        self.accuracy_samples = Gauge(
            "visionloop_live_accuracy_samples", "Feedback labels the live accuracy is measured on.",
            ["model_version"], registry=r,
        )  # fmt: skip
        self.below_floor = Gauge(
            "visionloop_live_accuracy_below_floor",
            "1 when the version's live accuracy is under monitor.min_accuracy on at least monitor.min_feedback labels "
            "(the check's status is then accuracy_below_floor for the served version), 0 when judged and above.",
            ["model_version"], registry=r,
        )  # fmt: skip
        self.status = Gauge(
            "visionloop_monitor_status", "1 for the latest check's status (ok, drifted, accuracy_below_floor, ...), "
            "0 for the others.", ["status"], registry=r,
        )  # fmt: skip
        self.accuracy_floor = Gauge(
            "visionloop_live_accuracy_floor", "monitor.min_accuracy: the live accuracy alert's floor.", registry=r
        )
        self.accuracy_min_samples = Gauge(
            "visionloop_live_accuracy_min_samples", "monitor.min_feedback: labels needed before accuracy is judged.",
            registry=r,
        )  # fmt: skip
        self.reference_age = Gauge(
            "visionloop_reference_age_seconds", "Age of the served version's reference profile.", ["model_version"],
            registry=r,
        )  # fmt: skip
        self.errors = Counter(
            "visionloop_monitor_errors", "Monitor failures by stage (registry, store, reference, drift).", ["stage"],
            registry=r,
        )  # fmt: skip
        self.checks = Counter("visionloop_monitor_checks", "Drift checks by status.", ["status"], registry=r)
        self.last_check = Gauge(
            "visionloop_monitor_last_check_timestamp_seconds", "When the latest check finished.", registry=r
        )
        self.check_seconds = Histogram(
            "visionloop_monitor_check_duration_seconds", "Time one drift check takes.", buckets=CHECK_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.interval = Gauge(
            "visionloop_monitor_interval_seconds", "monitor.interval_seconds: how often a check runs.", registry=r
        )
        self.accuracy_floor.set(monitor.min_accuracy)
        self.accuracy_min_samples.set(monitor.min_feedback)
        self.interval.set(monitor.interval_seconds)

    def observe(self, result: DriftResult) -> None:
        for gauge in (self.statistic, self.p_value, self.test_detected, self.detected, self.window_size):
            gauge.clear()
        for gauge in (self.window_span, self.accuracy, self.accuracy_samples, self.reference_age, self.below_floor):
            gauge.clear()
        self.checks.labels(result.status).inc()
        for status in get_args(Status):
            self.status.labels(status).set(int(status == result.status))
        self.last_check.set(result.checked_at)
        self.check_seconds.observe(result.duration_seconds)
        for live in result.accuracy:
            self.accuracy_samples.labels(live.model_version).set(live.count)
            if live.accuracy is not None:
                self.accuracy.labels(live.model_version).set(live.accuracy)
            if live.judged:
                self.below_floor.labels(live.model_version).set(int(live.below_floor))
        version = result.model_version
        if version is None:
            return
        self.window_size.labels(version).set(result.window.size)
        self.window_span.labels(version).set(result.window.span_seconds)
        if result.reference is not None:
            self.reference_age.labels(version).set(result.reference.age_seconds)
        if result.tests:  # the drift tests ran (under accuracy_below_floor too): their verdict is known
            self.detected.labels(version).set(int(result.drifted))
        for test in result.tests:
            labels = (version, test.name, test.detector)
            self.statistic.labels(*labels).set(test.statistic)
            self.p_value.labels(*labels).set(test.adjusted_p_value)
            self.test_detected.labels(*labels).set(int(test.drifted))
