"""The monitor on real traffic: a real registry and exported digits model, the real server app writing the
store, then drift checks — in-distribution traffic stays quiet, inverted digits are drift; live accuracy
follows /feedback; `visionloop monitor check` exits 0/1/2, and 3 when the labels say the model is wrong; the server's GET /monitoring/drift and the
monitor service's GET /drift and /metrics answer with the stored result; an old version without a
profile gets one rebuilt from its dataset."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from localhost import VISIONLOOP  # tests/localhost.py
from traffic import held_out_uploads, inverted, publish, shuffled  # tests/traffic.py
from visionloop import registry
from visionloop.config import Settings, ValidationPolicy
from visionloop.data.preprocess import Dataset, PreprocessParams, preprocess
from visionloop.data.sources import write_digits
from visionloop.data.validate import validate
from visionloop.monitoring.monitor import Monitor, create_app
from visionloop.monitoring.profile import PROFILE_JSON, cache_dir
from visionloop.pipeline import steps
from visionloop.serving.app import create_app as create_server

MONITOR = {"window_size": 100, "min_window": 30, "min_feedback": 10, "accuracy_window": 100, "interval_seconds": 60}


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory, strong_export: Path, digits_dataset: Dataset) -> Settings:
    home = tmp_path_factory.mktemp("monitored")
    settings = Settings(
        home=home, registry={"model_name": "monitored"}, gate={"min_accuracy": 0.0}, serve={"poll_seconds": 0},
        monitor=MONITOR,
    )  # fmt: skip
    assert publish(settings, strong_export, digits_dataset) == "1"
    return settings


@pytest.fixture(scope="module")
def uploads(digits_dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> list[tuple[bytes, int]]:
    return shuffled(held_out_uploads(digits_dataset, tmp_path_factory.mktemp("digits-source")))


@pytest.fixture(scope="module")
def server(settings: Settings) -> Iterator[TestClient]:
    with TestClient(create_server(settings)) as client:
        yield client


def send(server: TestClient, uploads: list[tuple[bytes, int]], feedback: bool = True) -> int:
    """Predict every upload (16 per request) and send each true label; returns how many were right."""
    right = 0
    for start in range(0, len(uploads), 16):
        chunk = uploads[start : start + 16]
        files = [("file", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(chunk)]
        answer = server.post("/predict", files=files)
        assert answer.status_code == 200, answer.text
        for prediction, (_, label) in zip(answer.json()["predictions"], chunk, strict=True):
            if feedback:
                sent = server.post("/feedback", json={"request_id": prediction["request_id"], "label": label})
                assert sent.status_code == 200, sent.text
                right += sent.json()["correct"]
    server.app.state.service.predictions.flush()
    return right


def test_no_traffic_is_insufficient_data_not_a_verdict(settings):
    monitor = Monitor(settings)
    result = monitor.check()
    monitor.close()
    assert result.status == "insufficient_data" and not result.drifted
    assert result.model_version == "1" and result.reference is not None and result.reference.origin == "export"
    assert "min_window=30" in result.reasons[0]


def test_in_distribution_traffic_is_not_drift_and_live_accuracy_follows_feedback(settings, server, uploads):
    right = send(server, uploads[:100])
    monitor = Monitor(settings)
    result = monitor.check()
    monitor.close()
    assert result.status == "ok", result.reasons
    assert result.window.size == 100 and result.window.span_seconds >= 0
    names = {t.name for t in result.tests}
    assert {"ks:image_mean", "ks:image_width", "chi2:predicted_class", "mmd:embedding", "ks:prob:0"} <= names
    (live,) = result.accuracy
    assert live.model_version == "1" and live.count == 100 and live.correct == right
    assert live.judged and live.accuracy == pytest.approx(right / 100)


def test_inverted_digits_are_drift_with_reasons(settings, server, uploads):
    send(server, inverted(uploads[100:200]), feedback=False)  # drift alone: the labels stay the clean ones
    monitor = Monitor(settings)
    result = monitor.check()
    monitor.close()
    assert result.status == "drifted" and result.drifted
    assert result.reasons and any(t.drifted for t in result.tests)
    detectors = {t.detector for t in result.tests if t.drifted}
    assert "image_stats" in detectors  # mean brightness moved: the plainest reason
    # the server shows the check the monitor stored, for the version it serves
    answer = server.get("/monitoring/drift")
    assert answer.status_code == 200, answer.text
    assert answer.json()["checked_at"] == result.checked_at and answer.json()["status"] == "drifted"


def test_monitor_check_exit_codes_and_json(settings, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VISIONLOOP_", "MLFLOW_"))}
    env |= {"VISIONLOOP_HOME": str(settings.home), "VISIONLOOP_REGISTRY__MODEL_NAME": "monitored"}
    env |= {f"VISIONLOOP_MONITOR__{k.upper()}": str(v) for k, v in MONITOR.items()}
    drifted = subprocess.run([*VISIONLOOP, "monitor", "check", "--json"], env=env, capture_output=True, text=True)
    assert drifted.returncode == 1, drifted.stderr
    assert json.loads(drifted.stdout)["status"] == "drifted"
    # the window is only the newest 30 predictions: in-distribution again once they are clean
    calm = subprocess.run(
        [*VISIONLOOP, "monitor", "check", "--window-size", "30", "--set", "monitor.window_seconds=0.001"],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert calm.returncode == 0, calm.stdout + calm.stderr
    assert "insufficient_data" in calm.stdout
    broken = subprocess.run(
        [*VISIONLOOP, "monitor", "check", "--model-version", "99"], env=env, capture_output=True, text=True
    )
    assert broken.returncode == 2 and "no_reference" in broken.stdout


def test_monitor_report_writes_the_html_of_a_fresh_check(settings, tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VISIONLOOP_", "MLFLOW_"))}
    env |= {"VISIONLOOP_HOME": str(settings.home), "VISIONLOOP_REGISTRY__MODEL_NAME": "monitored"}
    env |= {f"VISIONLOOP_MONITOR__{k.upper()}": str(v) for k, v in MONITOR.items()}
    out = tmp_path / "drift.html"
    done = subprocess.run([*VISIONLOOP, "monitor", "report", "-o", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "drifted, 100 predictions" in done.stdout
    html = out.read_text()
    assert "Drift report" in html and html.count("<img") == 5 and "mmd:embedding" in html


def test_monitor_service_serves_drift_and_metrics(settings):
    with TestClient(create_app(settings)) as client:
        client.post("/check")  # the timer's first check may still be running: this one waits its turn
        drift = client.get("/drift").json()
        assert drift["status"] == "drifted"
        assert client.get("/readyz").status_code == 200
        metrics = client.get("/metrics").text
    assert 'visionloop_drift_detected{model_version="1"} 1.0' in metrics
    assert 'visionloop_live_accuracy_samples{model_version="1"}' in metrics
    assert "visionloop_drift_p_value{" in metrics and "visionloop_monitor_checks_total" in metrics


def test_labels_that_contradict_the_model_are_a_verdict_and_an_exit_code_of_their_own(settings, server, uploads):
    # in-distribution images again, every label wrong: the inputs look unchanged, the model is wrong now
    for start in range(200, 300, 20):
        chunk = uploads[start : start + 20]
        files = [("file", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(chunk)]
        answer = server.post("/predict", files=files)
        assert answer.status_code == 200, answer.text
        for prediction in answer.json()["predictions"]:
            given = (int(prediction["label"]) + 1) % 10  # contradicts the model's answer, whatever the truth
            sent = server.post("/feedback", json={"request_id": prediction["request_id"], "label": given})
            assert sent.status_code == 200 and not sent.json()["correct"], sent.text
    server.app.state.service.predictions.flush()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VISIONLOOP_", "MLFLOW_"))}
    env |= {"VISIONLOOP_HOME": str(settings.home), "VISIONLOOP_REGISTRY__MODEL_NAME": "monitored", "COLUMNS": "80"}
    env |= {f"VISIONLOOP_MONITOR__{k.upper()}": str(v) for k, v in MONITOR.items()}
    done = subprocess.run([*VISIONLOOP, "monitor", "check"], env=env, capture_output=True, text=True)
    assert done.returncode == 3, done.stdout + done.stderr
    assert "accuracy_below_floor" in done.stdout
    assert "live accuracy 0.000 on 100 labels < 0.90 (monitor.min_accuracy; v1)" in done.stdout
    # the table at 80 columns: every test's name whole, in its own cell
    assert max(len(line) for line in done.stdout.splitlines()) <= 80, done.stdout
    cells = {line.split()[0] for line in done.stdout.splitlines() if line.strip()}
    with TestClient(create_app(settings)) as client:
        client.post("/check")  # after the timer's first check, whatever it found
        drift = client.get("/drift").json()
        metrics = client.get("/metrics").text
    assert drift["status"] == "accuracy_below_floor" and drift["reasons"][0].startswith("live accuracy 0.000 on 100")
    assert drift["tests"] and {t["name"] for t in drift["tests"]} <= cells, done.stdout
    assert 'visionloop_monitor_status{status="accuracy_below_floor"} 1.0' in metrics
    assert 'visionloop_live_accuracy_below_floor{model_version="1"} 1.0' in metrics
    # the server's view of the stored check says the same
    assert server.get("/monitoring/drift").json()["status"] == "accuracy_below_floor"


def test_a_version_without_a_profile_gets_one_rebuilt_from_its_dataset(settings, strong_export, digits_dataset):
    old_export = settings.home / "old-export"  # an export made before reference profiles existed
    shutil.copytree(strong_export, old_export)
    for name in ("reference_profile.npz", PROFILE_JSON):
        (old_export / name).unlink()
    run_id = registry.start_run(settings, "old-version", {})
    version = steps.register_step(old_export, run_id, settings).version
    registry.set_run_status(run_id, "FINISHED")
    monitor = Monitor(settings)
    missing = monitor.check(version)
    assert missing.status == "no_reference" and "not under" in missing.reasons[0]
    # the same data through the same stages under this home: the same dataset version
    write_digits(settings.home / "raw")
    report = validate(settings.home / "raw", ValidationPolicy())
    params = PreprocessParams(image_size=0, channels=0, val_fraction=0.1, test_fraction=0.2, seed=0)
    folder = preprocess(report, params, settings.home / "datasets", source="digits")
    assert folder.name == digits_dataset.manifest.version
    rebuilt = monitor.check(version)
    monitor.close()
    assert rebuilt.reference is not None and rebuilt.reference.origin == "rebuilt", rebuilt.reasons
    assert rebuilt.reference.size == int((digits_dataset.split > 0).sum())
    assert (cache_dir(settings, version) / PROFILE_JSON).is_file()
