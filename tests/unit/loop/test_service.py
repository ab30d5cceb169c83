"""``visionloop loop``'s HTTP side through the real FastAPI app (TestClient, its lifespan and watcher running):
health, the run history, Alertmanager's webhook (what is ignored, what waits for labels, what is refused and
why), the bearer token, the trigger log and /metrics. Nothing is registered, so the watcher finds nothing to do
and no trigger here trains a model.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from visionloop.config import Settings
from visionloop.loop.engine import Engine
from visionloop.loop.metrics import RESULTS
from visionloop.loop.service import create_app
from visionloop.loop.triggers import Trigger

TOKEN = "s3cret-webhook-token"


def alert(name: str = "VisionloopDriftDetected", status: str = "firing", **labels: str) -> dict[str, Any]:
    return {
        "status": status,
        "labels": {"alertname": name, "service": "visionloop", "severity": "warning", "model_version": "1", **labels},
        "annotations": {"summary": f"{name} on model version 1"},
        "startsAt": "2026-03-02T10:15:00Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://prometheus:9090/graph?g0.expr=visionloop_drift_detected",
        "fingerprint": "8c4a3f1e2b7d9a05",
    }


def payload(*alerts: dict[str, Any], version: str = "4", status: str = "firing") -> dict[str, Any]:
    return {
        "version": version,
        "groupKey": '{}/{service="visionloop"}:{alertname="VisionloopDriftDetected"}',
        "truncatedAlerts": 0,
        "status": status,
        "receiver": "visionloop-loop",
        "groupLabels": {"alertname": "VisionloopDriftDetected"},
        "commonLabels": {"service": "visionloop"},
        "commonAnnotations": {},
        "externalURL": "http://alertmanager:9093",
        "alerts": list(alerts) or [alert()],
    }


def make_settings(home: Path, **loop: object) -> Settings:
    # the watcher looks once at start-up and then not for an hour; digits is the (quick, built-in) base dataset
    return Settings(home=home, data={"source": "digits"}, loop={"interval_seconds": 3600, **loop})


@pytest.fixture(scope="module")
def clean_env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """No VISIONLOOP_* variable or ./visionloop.yaml from the caller may steer the settings (one app per module:
    each start-up costs the watcher's first look at the MLflow store)."""
    with pytest.MonkeyPatch.context() as mp:
        for name in list(os.environ):
            if name.startswith("VISIONLOOP_") or name == "MLFLOW_TRACKING_URI":
                mp.delenv(name)
        root = tmp_path_factory.mktemp("loop-service")
        mp.chdir(root)
        yield root


def open_client(settings: Settings) -> Iterator[TestClient]:
    engine = Engine(settings)
    with TestClient(create_app(settings, engine)) as client:
        yield client
    engine.store.close()
    engine.state.close()


@pytest.fixture(scope="module")
def home(clean_env: Path) -> Path:
    return clean_env / "home"


@pytest.fixture(scope="module")
def client(home: Path) -> Iterator[TestClient]:
    yield from open_client(make_settings(home))


@pytest.fixture(scope="module")
def guarded(clean_env: Path) -> Iterator[TestClient]:
    yield from open_client(make_settings(clean_env / "home", webhook_token=TOKEN))  # the same store and MLflow


def samples(client: TestClient, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one metric family on /metrics, by their sorted labels."""
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


# ------------------------------------------------------------------------------------------- health, history
def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "alive", "run": None}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"ready": True, "run": None}


def test_the_history_is_empty(client):
    assert client.get("/runs").json() == []  # no trigger here starts a run


def test_the_history_takes_a_limit(client):
    assert client.get("/runs", params={"limit": 5}).json() == []
    refused = client.get("/runs", params={"limit": 0})
    assert refused.status_code == 422 and refused.json()["error"].startswith("invalid request: query.limit: ")


def test_an_unknown_run_is_404_json(client):
    response = client.get("/runs/nope")
    assert response.status_code == 404 and response.json() == {"error": "no loop run nope"}


# ------------------------------------------------------------------------------------------- the webhook
def test_alerts_the_loop_does_not_act_on_are_acknowledged_and_ignored(client):
    body = payload(alert(status="resolved"), alert("VisionloopHighErrorRate"), alert(service="billing"))
    response = client.post("/alerts", json=body)
    assert response.status_code == 200
    ack = response.json()
    assert ack["trigger"] == "alert" and ack["action"] == "ignored" and ack["run_id"] is None
    assert ack["reason"] == "firing: VisionloopDriftDetected, VisionloopHighErrorRate"
    assert "loop.alerts" in ack["detail"]
    assert client.get("/triggers").json()[0] == ack
    assert client.get("/runs").json() == []


def test_a_trigger_not_in_loop_triggers_is_ignored(clean_env):
    settings = make_settings(clean_env / "verdict-only", triggers=["verdict"])
    engine = Engine(settings)
    try:
        ack = engine.offer(Trigger("alert", "VisionloopDriftDetected firing"))
        assert (ack.action, ack.detail, ack.run_id) == ("ignored", "trigger alert is not in loop.triggers", None)
        assert engine.state.runs(settings.registry.model_name) == []
    finally:
        engine.store.close()
        engine.state.close()


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{not json", id="malformed-json"),
        pytest.param(b"[]", id="not-an-object"),
        pytest.param(payload(version="3"), id="version-3"),
        pytest.param({k: v for k, v in payload().items() if k != "alerts"}, id="no-alerts"),
        pytest.param(payload(alert(status="pending")), id="unknown-status"),
    ],
)
def test_a_malformed_payload_is_422_json(client, body):
    acks = len(client.get("/triggers").json())
    if isinstance(body, bytes):
        response = client.post("/alerts", content=body, headers={"Content-Type": "application/json"})
    else:
        response = client.post("/alerts", json=body)
    assert response.status_code == 422
    assert response.headers["content-type"] == "application/json"
    assert list(response.json()) == ["error"] and response.json()["error"].startswith("invalid request: ")
    assert "alertname" not in response.text  # one line naming the field; the body is never echoed back
    assert len(client.get("/triggers").json()) == acks  # nothing was acknowledged


def test_version_3_is_refused_by_its_version_field(client):
    error = client.post("/alerts", json=payload(version="3")).json()["error"]
    assert error.startswith("invalid request: body.version: ")


@pytest.mark.parametrize(
    "headers",
    [
        pytest.param({}, id="no-header"),
        pytest.param({"Authorization": "Bearer wrong"}, id="wrong-token"),
        pytest.param({"Authorization": TOKEN}, id="no-bearer-scheme"),
        pytest.param({"Authorization": f"Basic {TOKEN}"}, id="basic-scheme"),
        pytest.param({"Authorization": "Bearer "}, id="empty-token"),
        pytest.param({"Authorization": f"Bearer {TOKEN}x"}, id="longer-token"),
    ],
)
def test_the_webhook_token_is_required(guarded, headers):
    acks = len(guarded.get("/triggers").json())
    response = guarded.post("/alerts", json=payload(alert(status="resolved")), headers=headers)
    assert response.status_code == 401
    assert response.json() == {"error": "POST needs Authorization: Bearer <loop.webhook_token>"}
    manual = guarded.post("/runs", json={"reason": "by hand"}, headers=headers)
    assert manual.status_code == 401 and "error" in manual.json()
    assert len(guarded.get("/triggers").json()) == acks  # refused before anything was acknowledged
    assert guarded.get("/runs").json() == []  # reading needs no token


def test_the_right_token_is_let_in(guarded):
    response = guarded.post(
        "/alerts", json=payload(alert(status="resolved")), headers={"Authorization": f"Bearer {TOKEN}"}
    )
    assert response.status_code == 200 and response.json()["action"] == "ignored"


def test_without_a_token_set_no_header_is_needed(client):
    assert client.post("/alerts", json=payload(alert(status="resolved"))).status_code == 200
    with_one = client.post("/alerts", json=payload(alert(status="resolved")), headers={"Authorization": "Bearer x"})
    assert with_one.status_code == 200


# ------------------------------------------------------------------------------------------- triggers, metrics
def test_every_result_is_counted_from_zero(guarded):
    runs = samples(guarded, "visionloop_loop_runs_total")
    assert runs == {(("result", result),): 0.0 for result in RESULTS}
    assert samples(guarded, "visionloop_loop_lock_held") == {(): 0.0}
    assert samples(guarded, "visionloop_loop_phase")[(("visionloop_loop_phase", "idle"),)] == 1.0


def test_metrics_count_every_trigger_by_source_and_action(client):
    ignored, waiting = (("action", "ignored"), ("trigger", "alert")), (("action", "waiting"), ("trigger", "alert"))
    before = samples(client, "visionloop_loop_triggers_total")
    client.post("/alerts", json=payload(alert(status="resolved")))
    client.post("/alerts", json=payload(alert("Watchdog")))
    client.post("/alerts", json=payload())
    after = samples(client, "visionloop_loop_triggers_total")
    assert set(after) == {ignored, waiting}  # only what was posted
    assert after[ignored] - before.get(ignored, 0) == 2.0
    assert after[waiting] - before.get(waiting, 0) == 1.0
    assert samples(client, "visionloop_loop_runs_total") == {(("result", r),): 0.0 for r in RESULTS}  # none ran


def test_the_trigger_log_is_newest_first(client):
    client.post("/alerts", json=payload(alert(status="resolved")))
    client.post("/alerts", json=payload())
    client.post("/alerts", json=payload(alert("Watchdog")))
    acks = client.get("/triggers").json()
    assert [a["action"] for a in acks[:3]] == ["ignored", "waiting", "ignored"]
    assert acks[0]["reason"] == "firing: Watchdog" and acks[2]["reason"] == "firing: VisionloopDriftDetected"
    assert "VisionloopDriftDetected firing since" in acks[1]["reason"]
    assert all(a["at"] >= b["at"] for a, b in itertools.pairwise(acks))
    assert set(acks[0]) == {"at", "trigger", "reason", "action", "detail", "run_id"}


def test_a_drift_alert_without_labelled_production_data_waits(client, home):
    response = client.post("/alerts", json=payload())
    assert response.status_code == 200
    ack = response.json()
    assert ack["trigger"] == "alert" and ack["action"] == "waiting" and ack["run_id"] is None
    assert "VisionloopDriftDetected" in ack["reason"] and "2026-03-02T10:15:00Z" in ack["reason"]
    assert ack["detail"] == "0 usable labelled production images, loop.min_labels is 50"
    assert client.get("/runs").json() == []  # waiting starts no run
    assert list(home.glob("datasets/ds-*/manifest.json")), "the base dataset was prepared in the home to count labels"
    assert client.get("/readyz").json() == {"ready": True, "run": None}
    again = client.post("/alerts", json=payload())
    assert again.json()["action"] == "waiting"  # not "busy": the loop lock was let go
