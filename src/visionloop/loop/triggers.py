"""What starts a retrain: an Alertmanager notification, the monitor's verdict, live accuracy, a schedule.

Every trigger is a ``Trigger`` with a kind and a one-line reason; the reason travels into the loop's
history, the MLflow run's tags and the alias event of a promotion, so a person can always see why a
model was retrained. Whether a trigger *starts* anything (one retrain at a time, the cool-down, enough
new labels) is the engine's decision, not this module's.

The webhook accepts Alertmanager's webhook payload, version 4
(https://prometheus.io/docs/alerting/latest/configuration/#webhook_config), field for field.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from visionloop.config import Settings
from visionloop.monitoring.schema import ACCURACY_REASON
from visionloop.monitoring.store import PredictionStore

Kind = Literal["alert", "verdict", "accuracy", "schedule", "manual", "promotion"]


@dataclass
class Trigger:
    kind: str
    reason: str
    details: dict[str, Any] = field(default_factory=dict)


class Alert(BaseModel):
    model_config = ConfigDict(extra="allow")

    status: Literal["firing", "resolved"]
    labels: dict[str, str]
    annotations: dict[str, str] = {}
    startsAt: str  # Alertmanager's own field names (camelCase)
    endsAt: str | None = None
    generatorURL: str = ""
    fingerprint: str = ""


class AlertmanagerPayload(BaseModel):
    """Alertmanager's webhook notification (``version: "4"``); unknown extra fields are kept, not refused."""

    model_config = ConfigDict(extra="allow")

    version: Literal["4"] = Field(description='the payload format; Alertmanager sends "4"')
    groupKey: str
    truncatedAlerts: int = 0
    status: Literal["firing", "resolved"]
    receiver: str
    groupLabels: dict[str, str] = {}
    commonLabels: dict[str, str] = {}
    commonAnnotations: dict[str, str] = {}
    externalURL: str = ""
    alerts: list[Alert]


def from_alerts(payload: AlertmanagerPayload, settings: Settings) -> Trigger | None:
    """A trigger for the firing alerts the loop acts on (``loop.alerts``, ``service="visionloop"``), or None."""
    acting = [
        a
        for a in payload.alerts
        if a.status == "firing"
        and a.labels.get("alertname") in settings.loop.alerts
        and a.labels.get("service", "visionloop") == "visionloop"
    ]
    if not acting:
        return None
    first = acting[0]
    name = first.labels["alertname"]
    version = first.labels.get("model_version")
    summary = first.annotations.get("summary") or name
    names = sorted({a.labels["alertname"] for a in acting})
    reason = f"alert {', '.join(names)} firing since {first.startsAt}: {summary}"
    return Trigger(
        "alert",
        reason,
        {"alerts": names, "model_version": version, "group_key": payload.groupKey, "count": len(acting)},
    )


def from_verdict(settings: Settings, store: PredictionStore, version: str, now: float | None = None) -> Trigger | None:
    """The monitor's newest stored check of ``version``, when its drift tests fired and it is recent.

    Drift only: a check whose status is ``accuracy_below_floor`` starts a retrain here only when it drifted
    too. Live accuracy under the floor is the ``accuracy`` trigger's (the same floor and labels, read from the
    store directly), so taking "accuracy" out of ``loop.triggers`` really stops accuracy retrains, and one
    low-accuracy check is never two triggers."""
    now = time.time() if now is None else now
    check = store.latest_check(settings.registry.model_name, version)
    if check is None or not check.drifted:
        return None
    if now - check.checked_at > 3 * settings.monitor.interval_seconds + 60:
        return None  # the monitor stopped checking; a stale verdict is not acted on
    detail = "; ".join([r for r in check.reasons if not r.startswith(ACCURACY_REASON)][:3])
    return Trigger(
        "verdict",
        f"the monitor found drift in v{version} ({check.window.size} predictions): {detail}",
        {"model_version": version, "checked_at": check.checked_at},
    )


def from_accuracy(settings: Settings, store: PredictionStore, version: str) -> Trigger | None:
    """Live accuracy of ``version`` under ``monitor.min_accuracy`` on at least ``monitor.min_feedback`` labels."""
    m = settings.monitor
    for found, count, correct in store.live_accuracy(settings.registry.model_name, m.accuracy_window):
        if found == version and count >= m.min_feedback and correct / count < m.min_accuracy:
            return Trigger(
                "accuracy",
                f"live accuracy of v{version} is {correct / count:.4f} on {count} labels, under {m.min_accuracy:.4f}",
                {"model_version": version, "accuracy": correct / count, "labels": count},
            )
    return None


def from_schedule(settings: Settings, last_started: float | None, now: float | None = None) -> Trigger | None:
    every = settings.loop.schedule_seconds
    now = time.time() if now is None else now
    if every <= 0 or (last_started is not None and now - last_started < every):
        return None
    return Trigger("schedule", f"scheduled retrain (every {every:g} s)", {"schedule_seconds": every})
