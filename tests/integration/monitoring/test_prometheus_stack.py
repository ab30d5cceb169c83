"""deploy/monitoring on a real stack: Debian's Prometheus scraping a real `visionloop serve` (the digits champion)
and a real `visionloop monitor`, with the rules of deploy/monitoring (only their `for:` shortened), and
Alertmanager on deploy/monitoring's config sending to a webhook receiver this test runs.

In-distribution digits (with /feedback) first: every expression of the rules and of both dashboards evaluates,
and every dashboard panel has data, except the closed loop's (no `visionloop loop` runs here: those only have
to evaluate; ``stack.loop_expressions`` lists them for a test with a real loop). Then inverted digits: VisionloopDriftDetected fires in Prometheus, and
Alertmanager delivers it to the webhook as the loop would receive it (payload version 4).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from localhost import free_port  # tests/localhost.py
from prometheus_stack import (  # tests/prometheus_stack.py
    Process,
    PromAPI,
    WebhookReceiver,
    alertmanager_config,
    binary,
    loop_expressions,
    panel_queries,
    prometheus_config,
    rule_expressions,
    start_alertmanager,
    start_prometheus,
    start_visionloop,
    wait_until,
)
from traffic import held_out_uploads, inverted, publish, shuffled
from visionloop.config import Settings
from visionloop.data.preprocess import Dataset

pytestmark = pytest.mark.slow

MODEL = "stack-digits"
MONITOR = {
    "interval_seconds": 1,
    "window_size": 60,
    "min_window": 30,
    "min_feedback": 10,
    "accuracy_window": 100,
}


@dataclass
class Stack:
    serve_url: str
    monitor_url: str
    prometheus: PromAPI
    webhook: WebhookReceiver
    processes: list[Process]


def send(serve_url: str, uploads: list[tuple[bytes, int]], feedback: bool) -> None:
    """POST the PNGs to /predict, 16 a request, and (``feedback``) each true label to /feedback."""
    with httpx.Client(base_url=serve_url, timeout=60) as client:
        for start in range(0, len(uploads), 16):
            chunk = uploads[start : start + 16]
            files = [("file", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(chunk)]
            answer = client.post("/predict", files=files)
            assert answer.status_code == 200, answer.text
            if feedback:
                for prediction, (_, label) in zip(answer.json()["predictions"], chunk, strict=True):
                    sent = client.post("/feedback", json={"request_id": prediction["request_id"], "label": label})
                    assert sent.status_code == 200, sent.text


@pytest.fixture(scope="module")
def uploads(digits_dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[bytes, int]]:
    return shuffled(held_out_uploads(digits_dataset, tmp_path_factory.mktemp("stack-digits-source")))


@pytest.fixture(scope="module")
def stack(
    tmp_path_factory: pytest.TempPathFactory, strong_export: Path, digits_dataset: Dataset, uploads: list
) -> Iterator[Stack]:
    binary("prometheus"), binary("prometheus-alertmanager", "alertmanager")  # skip/fail before any work
    home = tmp_path_factory.mktemp("stack-home")
    folder = tmp_path_factory.mktemp("stack-config")
    settings = Settings(home=home, registry={"model_name": MODEL}, gate={"min_accuracy": 0.0}, monitor=MONITOR)
    assert publish(settings, strong_export, digits_dataset) == "1"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VISIONLOOP_", "MLFLOW_"))}
    env |= {"VISIONLOOP_HOME": str(home), "VISIONLOOP_REGISTRY__MODEL_NAME": MODEL, "MLFLOW_DISABLE_TELEMETRY": "true"}
    env |= {f"VISIONLOOP_MONITOR__{k.upper()}": str(v) for k, v in MONITOR.items()}
    processes: list[Process] = []
    webhook = WebhookReceiver()
    try:
        serve, serve_url = start_visionloop("visionloop serve", ["serve"], env)
        processes.append(serve)
        monitor, monitor_url = start_visionloop("visionloop monitor", ["monitor"], env)
        processes.append(monitor)
        # the loop only to be scraped: it acts on nothing here (Alertmanager notifies the test's receiver)
        loop, loop_url = start_visionloop("visionloop loop", ["loop"], env | {"VISIONLOOP_LOOP__TRIGGERS": '["alert"]'})
        processes.append(loop)
        prometheus_address, alertmanager_address = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
        processes.append(start_alertmanager(folder, alertmanager_config(folder, webhook.url), alertmanager_address))
        config = prometheus_config(
            folder, serve_url.removeprefix("http://"), monitor_url.removeprefix("http://"), prometheus_address,
            alertmanager_address, loop=loop_url.removeprefix("http://"),
        )  # fmt: skip
        processes.append(start_prometheus(folder, config, prometheus_address))
        prometheus = PromAPI(f"http://{prometheus_address}")
        wait_until(
            "the three visionloop targets to be up",
            lambda: len(prometheus.query('up{job=~"visionloop-serve|visionloop-monitor|visionloop-loop"} == 1')) == 3,
            timeout=30,
        )
        send(serve_url, uploads[:120], feedback=True)
        watchdog = {"version": "4", "groupKey": "{}:{}", "status": "firing", "receiver": "visionloop-loop",
                    "alerts": [{"status": "firing", "labels": {"alertname": "Watchdog"}, "startsAt": "2026-01-01T00:00:00Z"}]}  # fmt: skip
        assert httpx.post(f"{loop_url}/alerts", json=watchdog, timeout=30).json()["action"] == "ignored"
        yield Stack(serve_url, monitor_url, prometheus, webhook, processes)
    finally:
        for process in reversed(processes):
            process.stop()
        webhook.close()


def test_the_stack_scrapes_the_real_route_labels(stack):
    def routes() -> set[str]:
        return {s["metric"]["route"] for s in stack.prometheus.query("visionloop_http_requests_total")}

    # the traffic is sent, but the scrape that sees it may still be a second away (a /metrics request is
    # counted only from the scrape after the first one)
    wait_until("the routes of the traffic in Prometheus", lambda: {"/predict", "/feedback", "/metrics"} <= routes(), 30)
    assert stack.prometheus.query('visionloop_ready{job="visionloop-serve"} == 1')
    assert stack.prometheus.label_values("model_version", "visionloop_predictions_total") == ["1"]


def test_every_rule_and_dashboard_expression_evaluates(stack):
    """The loop's expressions too: a loop is scraped here, idle; none of its alerts fires."""
    checked = 0
    for _rule, expr in rule_expressions():
        stack.prometheus.query(expr)  # raises naming the expression on a parse or evaluation error
        checked += 1
    for dashboard, title, expr in panel_queries():
        try:
            stack.prometheus.query(expr)
        except AssertionError as exc:
            raise AssertionError(f"{dashboard} / {title}: {exc}") from None
        checked += 1
    assert checked >= 60
    loop = loop_expressions()
    assert {where for where, _ in loop} >= {f"rule {name}" for name in ("VisionloopLoopDown", "VisionloopLoopErrors")}
    assert sum(where.startswith("visionloop-model-quality / ") for where, _ in loop) >= 6
    for where, expr in loop:
        if where.startswith("rule "):
            assert stack.prometheus.query(expr) == [], f"{where} fires on an idle loop: {expr}"


def test_every_dashboard_panel_has_data_after_traffic(stack):
    # the idle loop has made no decision and runs no analysis: those two panels have nothing to show yet
    # (tests/e2e/test_demo.py drives a real loop through both)
    idle = ("visionloop_loop_analysis_live_accuracy", "visionloop_loop_last_decision_timestamp_seconds")
    queries = [(d, t, e) for d, t, e in panel_queries() if not any(name in e for name in idle)]
    assert len(queries) == len(panel_queries()) - 2

    def empty() -> list[str]:
        return [f"{d} / {t}: {e}" for d, t, e in queries if not stack.prometheus.query(e)]

    # the monitor checks every second; Prometheus scrapes every second: wait for both to have seen the traffic
    wait_until(
        "a drift check over the traffic to reach Prometheus",
        lambda: (
            stack.prometheus.query('visionloop_drift_detected{model_version="1"}')
            and stack.prometheus.query('visionloop_drift_window_size{model_version="1"} >= 60')
        ),
        timeout=60,
    )
    try:
        wait_until("every panel to have data", lambda: not empty(), timeout=30)
    except AssertionError:
        missing = empty()
        raise AssertionError("panels without data:\n" + "\n".join(missing)) from None
    # the variables' own queries list the served version and the server
    assert stack.prometheus.label_values("model_version", "visionloop_predictions_total") == ["1"]
    assert stack.prometheus.label_values("instance", 'visionloop_ready{job="visionloop-serve"}') == [
        stack.serve_url.removeprefix("http://")
    ]


def test_inverted_digits_fire_the_drift_alert_and_alertmanager_delivers_it(stack, uploads):
    send(stack.serve_url, inverted(uploads[120:200]), feedback=False)

    def drift_alert() -> dict | None:
        alerts = [a for a in stack.prometheus.alerts() if a["labels"]["alertname"] == "VisionloopDriftDetected"]
        return next((a for a in alerts if a["state"] == "firing"), None)

    alert = wait_until("VisionloopDriftDetected to fire in Prometheus", drift_alert, timeout=90)
    assert alert["labels"] | {"instance": ""} == {
        "alertname": "VisionloopDriftDetected", "severity": "warning", "service": "visionloop",
        "job": "visionloop-monitor", "model_version": "1", "instance": "",
    }  # fmt: skip
    assert alert["annotations"]["runbook_url"].endswith("/docs/monitoring.md#visionloopdriftdetected")

    def names_drift(body: dict) -> bool:
        return any(a["labels"]["alertname"] == "VisionloopDriftDetected" for a in body["alerts"])

    notification = stack.webhook.wait_for(names_drift, timeout=60)
    assert notification["path"] == "/alerts" and notification["version"] == "4"
    assert notification["receiver"] == "visionloop-loop" and notification["status"] == "firing"
    assert notification["groupLabels"] == {"alertname": "VisionloopDriftDetected", "model_version": "1"}
    (sent,) = [a for a in notification["alerts"] if a["labels"]["alertname"] == "VisionloopDriftDetected"]
    assert sent["status"] == "firing" and sent["labels"]["model_version"] == "1"
    assert sent["annotations"]["summary"] == "The live traffic of model version 1 has drifted from its reference."
    # the monitor's own answer agrees with what Prometheus alerted on
    drift = httpx.get(f"{stack.monitor_url}/drift", timeout=30).json()
    assert drift["status"] == "drifted" and drift["model_version"] == "1"
