"""The loop's Prometheus metrics: every trigger and what it led to, every decision, the analysis state.

Served on the loop's own ``/metrics`` (port 8002). The rules in ``deploy/monitoring/prometheus/rules/``
(``VisionloopLoopDown``, ``VisionloopLoopRunFailed``, ``VisionloopLoopRolledBack``) and the Grafana
"Model quality" dashboard read these names as they stand.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Enum, Gauge, Histogram, ProcessCollector

from visionloop.service.metrics import HttpMetrics

PHASES = ["idle", "building", "training", "gating", "analysing", "rolling_back"]
ANALYSIS_STATES = ["none", "running", "successful", "failed", "inconclusive", "error"]
RESULTS = ["promoted", "kept", "rejected", "rolled_back", "failed", "inconclusive"]
RETRAIN_BUCKETS = (10, 20, 30, 45, 60, 90, 120, 180, 300, 600, 1200, 3600, 7200)


class LoopMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ProcessCollector(registry=r)
        self.http = HttpMetrics(r, "visionloop_loop")  # its own HTTP answers (service/guard.py)
        self.runs = Counter(
            "visionloop_loop_runs_total",
            "Loop runs that ended, by result: promoted (and kept after its analysis), kept, rejected (by the gate), "
            "rolled_back, failed, inconclusive.",
            ["result"], registry=r,
        )  # fmt: skip
        for result in RESULTS:
            self.runs.labels(result)  # every result is 0 from the start, so rate() and increase() see the first one
        self.triggers = Counter(
            "visionloop_loop_triggers_total",
            "Triggers seen, by source (alert, verdict, accuracy, schedule, manual, promotion) and action "
            "(started, busy, cooldown, waiting, ignored).",
            ["trigger", "action"], registry=r,
        )  # fmt: skip
        self.last_decision = Gauge(
            "visionloop_loop_last_decision_timestamp_seconds",
            "Unix time of the loop's last decision (a gate decision, an analysis verdict, a rollback).",
            registry=r,
        )
        self.phase = Enum("visionloop_loop_phase", "What the loop is doing now.", states=PHASES, registry=r)
        self.analysis = Enum(
            "visionloop_loop_analysis_state",
            "State of the latest post-promotion analysis.",
            states=ANALYSIS_STATES, registry=r,
        )  # fmt: skip
        self.measurements = Counter(
            "visionloop_loop_analysis_measurements_total",
            "Post-promotion analysis measurements, by result (successful, failed, inconclusive, error).",
            ["result"], registry=r,
        )  # fmt: skip
        self.analysis_accuracy = Gauge(
            "visionloop_loop_analysis_live_accuracy",
            "Live accuracy of the version under analysis at its latest measurement.",
            ["model_version"], registry=r,
        )  # fmt: skip
        self.retrain_seconds = Histogram(
            "visionloop_loop_retrain_seconds",
            "Seconds from a trigger to the gate's decision.",
            buckets=RETRAIN_BUCKETS, registry=r,
        )  # fmt: skip
        self.lock_held = Gauge(
            "visionloop_loop_lock_held", "1 while this process holds the loop lock (it is retraining).", registry=r
        )
        self.errors = Counter(
            "visionloop_loop_errors_total",
            "Failures inside the loop, by stage (trigger, build, train, gate, analysis, rollback, watch).",
            ["stage"], registry=r,
        )  # fmt: skip
        for stage in ("trigger", "build", "train", "gate", "analysis", "rollback", "watch"):
            self.errors.labels(stage)  # from 0, so the first error is an increase
        self.phase.state("idle")
        self.analysis.state("none")
