"""What starts a retrain: Alertmanager's webhook payload (version 4, field for field), the alerts the loop acts
on, the schedule, and the monitor's stored verdict and live accuracy read from a real SQLite prediction store.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from monitoring_rows import CLASSES, prediction  # tests/ is on sys.path (no __init__.py)
from visionloop.config import Settings
from visionloop.loop.triggers import AlertmanagerPayload, from_accuracy, from_alerts, from_schedule, from_verdict
from visionloop.monitoring.schema import DriftResult, WindowInfo
from visionloop.monitoring.store import PredictionStore

STARTS_AT = "2026-03-02T10:15:00.123456789Z"


def alert(name: str = "VisionloopDriftDetected", status: str = "firing", **labels: str) -> dict[str, Any]:
    """One alert as Alertmanager sends it in a webhook notification."""
    return {
        "status": status,
        "labels": {
            "alertname": name,
            "instance": "visionloop-monitor:8001",
            "job": "visionloop-monitor",
            "model_version": "3",
            "service": "visionloop",
            "severity": "warning",
            **labels,
        },
        "annotations": {
            "summary": f"{name}: the live traffic of model version 3 has drifted from its reference.",
            "description": "The drift check has said drifted for 15 minutes.",
            "runbook_url": "https://github.com/visionloop/visionloop/blob/main/docs/monitoring.md",
        },
        "startsAt": STARTS_AT,
        "endsAt": "0001-01-01T00:00:00Z" if status == "firing" else "2026-03-02T11:00:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=visionloop_drift_detected+%3D%3D+1&g0.tab=1",
        "fingerprint": "8c4a3f1e2b7d9a05",
    }


def payload(*alerts: dict[str, Any], status: str = "firing") -> dict[str, Any]:
    """A version-4 webhook notification, every field Alertmanager fills."""
    return {
        "version": "4",
        "groupKey": '{}/{service="visionloop"}:{alertname="VisionloopDriftDetected", model_version="3"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "visionloop-loop",
        "groupLabels": {"alertname": "VisionloopDriftDetected", "model_version": "3"},
        "commonLabels": {"alertname": "VisionloopDriftDetected", "service": "visionloop", "model_version": "3"},
        "commonAnnotations": {"summary": "drifted"},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts) or [alert()],
    }


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """No VISIONLOOP_* variable or ./visionloop.yaml from the caller may steer the settings."""
    for name in list(os.environ):
        if name.startswith("VISIONLOOP_") or name == "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(
        home=tmp_path / "home",
        registry={"model_name": "pets"},
        monitor={"interval_seconds": 30, "min_feedback": 5, "min_accuracy": 0.9, "accuracy_window": 200},
    )


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PredictionStore]:
    s = PredictionStore(f"sqlite:///{tmp_path / 'home' / 'monitoring' / 'predictions.db'}", timeout=5)
    s.record_model("pets", "1", "ds-abc", CLASSES)
    s.flush()
    yield s
    s.close()


# ------------------------------------------------------------------------------------------- the payload
def test_a_version_4_payload_parses_field_for_field():
    body = payload(alert(), alert("VisionloopLiveAccuracyLow", status="resolved"))
    body["extraField"] = {"kept": True}  # a field a later Alertmanager adds is kept, not refused
    parsed = AlertmanagerPayload.model_validate(body)
    assert parsed.version == "4" and parsed.status == "firing" and parsed.receiver == "visionloop-loop"
    assert parsed.groupKey.startswith("{}/") and parsed.truncatedAlerts == 0
    assert parsed.groupLabels == body["groupLabels"] and parsed.commonLabels == body["commonLabels"]
    assert parsed.commonAnnotations == {"summary": "drifted"} and parsed.externalURL == "http://alertmanager:9093"
    first, second = parsed.alerts
    assert first.status == "firing" and first.labels["alertname"] == "VisionloopDriftDetected"
    assert first.startsAt == STARTS_AT and first.endsAt == "0001-01-01T00:00:00Z"
    assert first.generatorURL.startswith("http://prometheus:9090/graph") and first.fingerprint == "8c4a3f1e2b7d9a05"
    assert first.annotations["summary"].startswith("VisionloopDriftDetected:")
    assert second.status == "resolved" and second.labels["alertname"] == "VisionloopLiveAccuracyLow"
    assert parsed.model_extra == {"extraField": {"kept": True}}


@pytest.mark.parametrize("version", ["3", 4, "", None])
def test_another_payload_version_is_refused(version):
    body = payload()
    body["version"] = version
    with pytest.raises(ValidationError, match="version"):
        AlertmanagerPayload.model_validate(body)


@pytest.mark.parametrize("missing", ["version", "groupKey", "status", "receiver", "alerts"])
def test_a_payload_missing_a_required_field_is_refused(missing):
    body = payload()
    del body[missing]
    with pytest.raises(ValidationError, match=missing):
        AlertmanagerPayload.model_validate(body)


@pytest.mark.parametrize("missing", ["status", "labels", "startsAt"])
def test_an_alert_missing_a_required_field_is_refused(missing):
    one = alert()
    del one[missing]
    with pytest.raises(ValidationError, match=missing):
        AlertmanagerPayload.model_validate(payload(one))


def test_an_unknown_status_is_refused():
    with pytest.raises(ValidationError, match="status"):
        AlertmanagerPayload.model_validate(payload(alert(status="pending")))


# ------------------------------------------------------------------------------------------- from_alerts
def test_a_firing_drift_alert_of_the_service_is_a_trigger(settings):
    trigger = from_alerts(AlertmanagerPayload.model_validate(payload()), settings)
    assert trigger is not None and trigger.kind == "alert"
    assert "VisionloopDriftDetected" in trigger.reason and STARTS_AT in trigger.reason
    assert "the live traffic of model version 3 has drifted" in trigger.reason  # the summary annotation
    assert trigger.details == {
        "alerts": ["VisionloopDriftDetected"],
        "model_version": "3",
        "group_key": payload()["groupKey"],
        "count": 1,
    }


def test_an_alert_without_a_summary_is_named_by_its_alertname(settings):
    one = alert()
    one["annotations"] = {}
    trigger = from_alerts(AlertmanagerPayload.model_validate(payload(one)), settings)
    assert trigger is not None and trigger.reason.endswith(": VisionloopDriftDetected")


@pytest.mark.parametrize(
    "alerts",
    [
        pytest.param([alert(status="resolved")], id="resolved"),
        pytest.param([alert("VisionloopHighErrorRate"), alert("VisionloopLoopDown")], id="other-alertnames"),
        pytest.param([alert(service="billing")], id="other-service"),
        pytest.param([alert(status="resolved"), alert("Watchdog"), alert(service="billing")], id="none-of-them-acting"),
    ],
)
def test_alerts_the_loop_does_not_act_on_are_no_trigger(settings, alerts):
    assert from_alerts(AlertmanagerPayload.model_validate(payload(*alerts)), settings) is None


def test_the_alert_names_come_from_loop_alerts(settings):
    narrowed = settings.model_copy(update={"loop": settings.loop.model_copy(update={"alerts": ["Custom"]})})
    body = AlertmanagerPayload.model_validate(payload(alert(), alert("Custom")))
    assert from_alerts(body, settings).details["alerts"] == ["VisionloopDriftDetected"]  # Custom is not in the default
    assert from_alerts(body, narrowed).details["alerts"] == ["Custom"]


def test_several_acting_alerts_are_all_named(settings):
    body = payload(
        alert(),
        alert("VisionloopLiveAccuracyLow"),
        alert(instance="visionloop-monitor-2:8001"),  # the same alert from a second monitor
        alert("VisionloopDriftDetected", status="resolved"),
        alert(service="billing"),
    )
    trigger = from_alerts(AlertmanagerPayload.model_validate(body), settings)
    assert trigger is not None
    assert trigger.details["alerts"] == ["VisionloopDriftDetected", "VisionloopLiveAccuracyLow"]
    assert trigger.details["count"] == 3  # the resolved one and the other service's are not counted
    assert "VisionloopDriftDetected, VisionloopLiveAccuracyLow firing since" in trigger.reason


def test_an_alert_without_a_service_label_counts_as_visionloop(settings):
    one = copy.deepcopy(alert())
    del one["labels"]["service"]
    assert from_alerts(AlertmanagerPayload.model_validate(payload(one)), settings) is not None


# ------------------------------------------------------------------------------------------- from_schedule
def test_the_schedule_is_off_at_zero(settings):
    assert settings.loop.schedule_seconds == 0
    assert from_schedule(settings, None, now=1e9) is None
    assert from_schedule(settings, 0.0, now=1e9) is None


def test_the_schedule_is_due_when_never_run_or_after_its_interval(settings):
    every = settings.model_copy(update={"loop": settings.loop.model_copy(update={"schedule_seconds": 3600})})
    due = from_schedule(every, None, now=1e9)
    assert due is not None and due.kind == "schedule" and "3600" in due.reason
    assert due.details == {"schedule_seconds": 3600}
    assert from_schedule(every, 1e9 - 3599, now=1e9) is None  # inside the interval
    assert from_schedule(every, 1e9 - 10, now=1e9) is None
    assert from_schedule(every, 1e9 - 3600, now=1e9) is not None  # the interval has passed
    assert from_schedule(every, 1e9 - 7200, now=1e9) is not None


# ------------------------------------------------------------------------------------------- from_verdict
def drift_check(checked_at: float, drifted: bool, version: str = "1") -> DriftResult:
    return DriftResult(
        model_name="pets", model_version=version, checked_at=checked_at, duration_seconds=0.25,
        status="drifted" if drifted else "ok", drifted=drifted,
        reasons=["ks:image_mean p=1e-05", "chi2:predicted_class p=3e-04", "mmd:embedding p=0.002", "fourth"]
        if drifted else [],
        window=WindowInfo(size=180, requested=200, max_age_seconds=3600.0),
    )  # fmt: skip


def test_no_check_is_no_verdict_trigger(settings, store):
    assert from_verdict(settings, store, "1") is None


def test_a_recent_drifted_check_is_a_trigger(settings, store):
    now = time.time()
    store.save_check(drift_check(now - 5, drifted=True))
    trigger = from_verdict(settings, store, "1", now=now)
    assert trigger is not None and trigger.kind == "verdict"
    assert "v1" in trigger.reason and "180 predictions" in trigger.reason
    assert "ks:image_mean" in trigger.reason and "mmd:embedding" in trigger.reason
    assert "fourth" not in trigger.reason  # three reasons at most
    assert trigger.details == {"model_version": "1", "checked_at": now - 5}
    assert from_verdict(settings, store, "2", now=now) is None  # another version's verdict is its own


def test_the_newest_check_decides(settings, store):
    now = time.time()
    store.save_check(drift_check(now - 20, drifted=True))
    store.save_check(drift_check(now - 10, drifted=False))
    assert from_verdict(settings, store, "1", now=now) is None


def test_an_ok_check_is_no_trigger(settings, store):
    now = time.time()
    store.save_check(drift_check(now - 1, drifted=False))
    assert from_verdict(settings, store, "1", now=now) is None


def test_a_stale_drifted_check_is_no_trigger(settings, store):
    limit = 3 * settings.monitor.interval_seconds + 60  # 150 s at interval 30
    now = time.time()
    store.save_check(drift_check(now - limit - 1, drifted=True))
    assert from_verdict(settings, store, "1", now=now) is None
    assert from_verdict(settings, store, "1", now=now - 2) is not None  # just inside the limit it counts


# ------------------------------------------------------------------------------------------- from_accuracy
def label(store: PredictionStore, correct: int, wrong: int, prefix: str = "r") -> None:
    """Predictions of class 0 for v1, with ``correct`` labels cat and ``wrong`` labels dog."""
    ids = [f"{prefix}{i}" for i in range(correct + wrong)]
    store.append([prediction(request_id) for request_id in ids])
    store.flush()
    for i, request_id in enumerate(ids):
        store.add_feedback(request_id, "cat" if i < correct else "dog")


def test_no_feedback_is_no_accuracy_trigger(settings, store):
    assert from_accuracy(settings, store, "1") is None


def test_low_live_accuracy_on_enough_labels_is_a_trigger(settings, store):
    label(store, correct=3, wrong=2)  # 0.6 on 5 labels, min_feedback 5
    trigger = from_accuracy(settings, store, "1")
    assert trigger is not None and trigger.kind == "accuracy"
    assert "0.6000 on 5 labels" in trigger.reason and "under 0.9000" in trigger.reason
    assert trigger.details == {"model_version": "1", "accuracy": 0.6, "labels": 5}
    assert from_accuracy(settings, store, "2") is None  # another version has no labels


def test_low_live_accuracy_on_too_few_labels_is_no_trigger(settings, store):
    label(store, correct=0, wrong=4)  # 0.0, but on 4 labels
    assert from_accuracy(settings, store, "1") is None


def test_live_accuracy_at_the_floor_is_no_trigger(settings, store):
    label(store, correct=9, wrong=1)  # 0.9 on 10 labels: not under 0.9
    assert from_accuracy(settings, store, "1") is None
    label(store, correct=0, wrong=1, prefix="more")  # 9 / 11 is under it
    trigger = from_accuracy(settings, store, "1")
    assert trigger is not None and trigger.details["labels"] == 11


def test_an_accuracy_verdict_is_the_accuracy_triggers_not_the_verdicts(settings, store):
    now = time.time()
    low = "live accuracy 0.000 on 200 labels < 0.90 (monitor.min_accuracy; v1)"
    quiet = drift_check(now - 2, drifted=False).model_copy(update={"status": "accuracy_below_floor", "reasons": [low]})
    store.save_check(quiet)
    assert from_verdict(settings, store, "1", now=now) is None  # no drift: the accuracy trigger's to act on
    both = drift_check(now - 1, drifted=True)
    store.save_check(both.model_copy(update={"status": "accuracy_below_floor", "reasons": [low, *both.reasons]}))
    trigger = from_verdict(settings, store, "1", now=now)
    assert trigger is not None and "ks:image_mean" in trigger.reason and "live accuracy" not in trigger.reason
