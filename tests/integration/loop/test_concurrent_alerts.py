"""200 concurrent Alertmanager notifications to a real ``visionloop loop`` process: one starts a run, every
other answer names that run (busy while it runs, cool-down once it ended), never "run None is in progress".

The run is made cheap by the executor: ``loop.executor=kubeflow`` without ``loop.kfp_host`` fails at the
training phase, after the decision and the retrain folder are made, so no model is trained. The one labelled
production image a retrain needs (``loop.min_labels=1``) comes from the real server app: a prediction of an
inverted digit (not in the dataset, so usable) and its feedback label.
"""

from __future__ import annotations

import asyncio
import os
import queue
import re
import signal
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient

from localhost import VISIONLOOP  # tests/localhost.py
from traffic import held_out_uploads, inverted, publish  # tests/traffic.py
from visionloop.config import Settings
from visionloop.data.preprocess import Dataset
from visionloop.serving.app import create_app as create_server

ALERTS = 200
LOOP = {
    "min_labels": 1, "min_new_labels": 0, "executor": "kubeflow", "interval_seconds": 3600,
    "triggers": '["alert"]',
}  # fmt: skip


def notification(i: int) -> dict:
    """A version-4 webhook notification of a firing drift alert, as Alertmanager sends it."""
    labels = {"alertname": "VisionloopDriftDetected", "service": "visionloop", "model_version": "1"}
    return {
        "version": "4", "groupKey": f'{{}}:{{alertname="VisionloopDriftDetected", n="{i}"}}', "status": "firing",
        "receiver": "visionloop-loop", "groupLabels": labels, "commonLabels": labels, "commonAnnotations": {},
        "externalURL": "http://127.0.0.1:9093",
        "alerts": [{"status": "firing", "labels": labels, "annotations": {"summary": f"drift, notification {i}"},
                    "startsAt": "2026-12-08T03:00:00Z", "fingerprint": f"{i:016x}"}],
    }  # fmt: skip


@pytest.fixture
def home(tmp_path: Path, strong_export: Path, digits_dataset: Dataset) -> Path:
    settings = Settings(
        home=tmp_path / "home",
        registry={"model_name": "alerted"},
        gate={"min_accuracy": 0.0},
        serve={"poll_seconds": 0},
    )
    assert publish(settings, strong_export, digits_dataset) == "1"
    uploads = inverted(held_out_uploads(digits_dataset, tmp_path / "digits-source")[:2])
    with TestClient(create_server(settings)) as server:
        files = [("file", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(uploads)]
        answer = server.post("/predict", files=files)
        assert answer.status_code == 200, answer.text
        for prediction, (_, label) in zip(answer.json()["predictions"], uploads, strict=True):
            sent = server.post("/feedback", json={"request_id": prediction["request_id"], "label": label})
            assert sent.status_code == 200, sent.text
        server.app.state.service.predictions.flush()
    return settings.home


@pytest.fixture
def loop_url(home: Path) -> Iterator[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VISIONLOOP_", "MLFLOW_"))}
    env |= {"VISIONLOOP_HOME": str(home), "VISIONLOOP_REGISTRY__MODEL_NAME": "alerted"}
    env |= {"MLFLOW_DISABLE_TELEMETRY": "true", **{f"VISIONLOOP_LOOP__{k.upper()}": str(v) for k, v in LOOP.items()}}
    process = subprocess.Popen(
        [*VISIONLOOP, "loop", "--port", "0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    found: queue.Queue[str] = queue.Queue()
    lines: list[str] = []

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            lines.append(line)
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                found.put(match.group(1))

    threading.Thread(target=pump, daemon=True).start()
    try:
        yield found.get(timeout=120)
    except queue.Empty:
        raise AssertionError("visionloop loop did not start:\n" + "".join(lines)) from None
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


async def send_all(url: str) -> list[httpx.Response]:
    limits = httpx.Limits(max_connections=ALERTS, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as client:
        return await asyncio.gather(*(client.post("/alerts", json=notification(i)) for i in range(ALERTS)))


def test_concurrent_alerts_each_name_the_run_that_started(loop_url: str) -> None:
    answers = asyncio.run(send_all(loop_url))
    assert all(a.status_code == 200 for a in answers), {a.status_code: a.text for a in answers}
    acks = [a.json() for a in answers]
    started = [ack for ack in acks if ack["action"] == "started"]
    assert len(started) == 1, sorted({(a["action"], a["detail"]) for a in acks})
    run_id = started[0]["run_id"]
    # busy while the run goes on, cool-down once it failed (no kfp_host): either way that run, by id
    others = [ack for ack in acks if ack is not started[0]]
    wrong = [
        ack for ack in others
        if ack["action"] not in ("busy", "cooldown") or ack["run_id"] != run_id or f"run {run_id}" not in ack["detail"]
    ]  # fmt: skip
    seen = Counter((ack["action"], ack["detail"]) for ack in wrong).most_common(3)
    assert not wrong, f"{len(wrong)} of {len(others)} answers do not name run {run_id}: {seen}"
    with httpx.Client(base_url=loop_url, timeout=30) as client:
        runs = client.get("/runs").json()
    assert [run["id"] for run in runs] == [run_id]  # one decision started one run, the rest started nothing
