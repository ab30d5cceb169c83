"""Hot reload against a real registry: the champion moves, the server follows without failing a request.

Each test has its own registered-model name and store, and its own server process.
"""

from __future__ import annotations

import json
import shutil
import threading
from collections import Counter
from pathlib import Path

import httpx
from serving_helpers import publish, settings_for  # this folder is on sys.path (no __init__.py)

from visionloop.fsutil import atomic_write_json
from visionloop.inference import OnnxClassifier


def hammer(url: str, png: bytes, stop: threading.Event, seen: Counter, failures: list[str]) -> None:
    """Send /predict requests back to back until ``stop``; count answers by model version."""
    with httpx.Client(base_url=url, timeout=30) as http:
        while not stop.is_set():
            try:
                response = http.post("/predict", files={"file": ("x.png", png)})
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
                continue
            if response.status_code != 200:
                failures.append(f"{response.status_code} {response.text}")
            else:
                seen[response.json()["model"]["version"]] += 1


def test_reload_moves_to_the_new_champion_under_load_without_a_failed_request(
    tmp_path, start_server, weak_export, strong_export, digits_dataset, digit_png
):
    settings = settings_for(tmp_path / "home")
    assert publish(settings, weak_export, digits_dataset) == ("1", True)
    server = start_server(settings, "--poll-seconds", "0")
    png, _ = digit_png
    stop, seen, failures = threading.Event(), Counter(), []
    workers = [threading.Thread(target=hammer, args=(server.url, png, stop, seen, failures)) for _ in range(6)]
    for worker in workers:
        worker.start()
    with server.client(timeout=60) as http:
        try:
            while sum(seen.values()) < 30 and not failures:
                threading.Event().wait(0.05)
            # the strong model beats the weak one on the test set: the gate makes it champion
            assert publish(settings, strong_export, digits_dataset) == ("2", True)
            reload = http.post("/admin/reload")
            assert reload.status_code == 200, reload.text
            assert reload.json()["result"] == "loaded" and reload.json()["version"] == "2"
            before = seen["2"]
            while seen["2"] < before + 30 and not failures:
                threading.Event().wait(0.05)
        finally:
            stop.set()
            for worker in workers:
                worker.join(timeout=60)
        assert failures == []
        assert seen["1"] > 0 and seen["2"] > 0
        assert http.get("/readyz").json()["model"]["version"] == "2"
        assert http.post("/admin/reload").json()["result"] == "unchanged"
        metrics = http.get("/metrics").text
    assert 'visionloop_model_reloads_total{result="loaded"} 2.0' in metrics  # start-up + the move
    assert "visionloop_model_info{dataset_version=" in metrics and 'model_version="2"' in metrics


def test_the_poller_notices_a_new_champion_by_itself(
    tmp_path, start_server, weak_export, strong_export, digits_dataset
):
    settings = settings_for(tmp_path / "home")
    publish(settings, weak_export, digits_dataset)
    server = start_server(settings, "--poll-seconds", "0.5")
    publish(settings, strong_export, digits_dataset)
    server.wait_for(r"reload: serving \S+ v2 \(was v1\)", timeout=60)
    with server.client() as http:
        assert http.get("/readyz").json()["model"]["version"] == "2"


def tampered(export_dir: Path, into: Path) -> Path:
    """A copy of an export whose card claims different answers on the check input than the graph gives."""
    shutil.copytree(export_dir, into)
    card = json.loads((into / "model_card.json").read_text())
    expected = card["onnx"]["check"]["probabilities"]
    card["onnx"]["check"]["probabilities"] = list(reversed(expected))
    atomic_write_json(into / "model_card.json", card)
    return into


def test_a_version_that_fails_its_check_is_refused_and_the_old_one_keeps_serving(
    tmp_path, start_server, weak_export, strong_export, digits_dataset, digit_png
):
    settings = settings_for(tmp_path / "home")
    publish(settings, weak_export, digits_dataset)
    server = start_server(settings, "--poll-seconds", "0")
    bad = tampered(strong_export, tmp_path / "bad-export")
    assert OnnxClassifier.load(bad / "model.onnx", bad / "model_card.json").self_check() != []
    assert publish(settings, bad, digits_dataset) == ("2", True)  # the gate scores the graph, which is fine
    png, _ = digit_png
    with server.client() as http:
        refused = http.post("/admin/reload")
        assert refused.status_code == 409
        body = refused.json()
        assert body["result"] == "failed" and body["version"] == "2"
        assert "check input answers differ from export time" in body["error"]
        ready = http.get("/readyz").json()
        assert ready["ready"] is True and ready["model"]["version"] == "1"
        assert "last reload failed" in ready["status"]
        answer = http.post("/predict", files={"file": ("x.png", png)})
        assert answer.status_code == 200 and answer.json()["model"]["version"] == "1"
        assert 'visionloop_model_reloads_total{result="failed"} 1.0' in http.get("/metrics").text
    assert "refused" in server.log and "v2" in server.log
    # nothing of the refused version is left on disk
    assert [p.name for p in (settings.home / "serving" / "models").iterdir() if p.name.startswith("v2-")] == []


def test_a_version_whose_card_states_a_transform_the_server_cannot_apply_is_refused(
    tmp_path, start_server, weak_export, strong_export, digits_dataset, digit_png
):
    settings = settings_for(tmp_path / "home")
    publish(settings, weak_export, digits_dataset)
    server = start_server(settings, "--poll-seconds", "0")
    bad = tmp_path / "hwc-export"
    shutil.copytree(strong_export, bad)
    card = json.loads((bad / "model_card.json").read_text())
    card["input_transform"]["layout"] = "HWC"  # a transform this server does not do: never guessed at
    atomic_write_json(bad / "model_card.json", card)
    assert publish(settings, bad, digits_dataset) == ("2", True)
    png, _ = digit_png
    with server.client() as http:
        refused = http.post("/admin/reload")
        assert refused.status_code == 409
        assert "model card input_transform: layout is 'HWC'; this server applies only 'CHW'" in refused.json()["error"]
        assert http.get("/readyz").json()["model"]["version"] == "1"
        answer = http.post("/predict", files={"file": ("x.png", png)})
        assert answer.status_code == 200 and answer.json()["model"]["version"] == "1"


def test_without_a_champion_the_server_starts_not_ready_and_becomes_ready_when_one_appears(
    tmp_path, start_server, strong_export, digits_dataset, digit_png
):
    settings = settings_for(tmp_path / "home")
    server = start_server(settings, "--poll-seconds", "0.5")
    assert "no model registered" in server.log
    png, _ = digit_png
    with server.client() as http:
        assert http.get("/healthz").status_code == 200
        not_ready = http.get("/readyz")
        assert not_ready.status_code == 503 and not_ready.json()["ready"] is False
        assert "no model registered" in not_ready.json()["status"]
        refused = http.post("/predict", files={"file": ("x.png", png)})
        assert refused.status_code == 503 and "no model loaded" in refused.json()["error"]
        assert http.get("/v2/health/ready").status_code == 503
        publish(settings, strong_export, digits_dataset)
        server.wait_for(r"reload: serving \S+ v1", timeout=60)
        assert http.get("/readyz").status_code == 200
        assert http.post("/predict", files={"file": ("x.png", png)}).status_code == 200
