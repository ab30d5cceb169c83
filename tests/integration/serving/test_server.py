"""``visionloop serve`` as a real process on 127.0.0.1, serving a real champion from a real MLflow store."""

from __future__ import annotations

import base64
import sqlite3
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from visionloop.inference import OnnxClassifier


def test_predict_multipart_answers_top_k_with_request_ids(champion_server, digit_png, champion_settings):
    png, label = digit_png
    with champion_server.client() as http:
        response = http.post("/predict?top_k=2", files=[("file", ("a.png", png)), ("file", ("b.png", png))])
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model"] == {"name": champion_settings.registry.model_name, "version": "1"}
    first, second = body["predictions"]
    assert first["filename"] == "a.png" and second["filename"] == "b.png"
    assert first["request_id"] != second["request_id"]
    assert len(first["top_k"]) == 2
    assert first["top_k"][0]["probability"] >= first["top_k"][1]["probability"]
    assert first["label"] == first["top_k"][0]["label"] == str(label)
    assert first["converted"] is None


def test_predict_json_base64_matches_multipart(champion_server, digit_png):
    png, _ = digit_png
    with champion_server.client() as http:
        by_file = http.post("/predict", files={"file": ("x.png", png)}).json()["predictions"][0]
        data_url = "data:image/png;base64," + base64.b64encode(png).decode()
        by_json = http.post("/predict", json={"images": [data_url], "top_k": 1}).json()["predictions"][0]
    assert by_json["label"] == by_file["label"]
    assert by_json["confidence"] == pytest.approx(by_file["confidence"], abs=1e-6)
    assert len(by_json["top_k"]) == 1


def test_predictions_match_onnx_runtime_on_the_registered_model(champion_server, champion_settings, digits_dataset):
    from visionloop import registry

    classifier: OnnxClassifier = registry.load_classifier(champion_settings, "champion")
    x_test, _ = digits_dataset.part("test")
    expected, _ = classifier.run(x_test[:16])
    client = triton.InferenceServerClient(champion_server.url.removeprefix("http://"))
    tensor = triton.InferInput("input", list(x_test[:16].shape), "UINT8")
    tensor.set_data_from_numpy(x_test[:16])
    got = client.infer(champion_settings.registry.model_name, [tensor]).as_numpy("probabilities")
    np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_tritonclient_round_trip(champion_server, champion_settings, digits_dataset, binary):
    name = champion_settings.registry.model_name
    client = triton.InferenceServerClient(champion_server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(name)
    metadata = client.get_model_metadata(name)
    assert metadata["inputs"] == [{"name": "input", "datatype": "UINT8", "shape": [-1, 1, 16, 16]}]
    assert [o["name"] for o in metadata["outputs"]] == ["probabilities", "embedding"]

    x_test, y_test = digits_dataset.part("test")
    batch = x_test[:8]
    tensor = triton.InferInput("input", list(batch.shape), "UINT8")
    tensor.set_data_from_numpy(batch, binary_data=binary)
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("probabilities", "embedding")]
    result = client.infer(name, [tensor], outputs=outputs, request_id="req-7")
    probs = result.as_numpy("probabilities")
    assert probs.shape == (8, 10) and result.as_numpy("embedding").shape[0] == 8
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs.argmax(axis=1) == y_test[:8]).mean() >= 0.5
    response = result.get_response()
    assert response["id"] == "req-7" and response["model_version"] == "1"
    assert len(response["parameters"]["request_ids"]) == 8


@pytest.mark.parametrize(
    ("shape", "datatype", "model", "status", "message"),
    [
        ([2, 1, 8, 8], "UINT8", None, "400", "must have shape"),
        ([2, 1, 16, 16], "FP32", None, "400", "datatype UINT8"),
        ([2, 1, 16, 16], "UINT8", "no-such-model", "404", "unknown model"),
    ],
)
def test_tritonclient_receives_protocol_errors(
    champion_server, champion_settings, shape, datatype, model, status, message
):
    client = triton.InferenceServerClient(champion_server.url.removeprefix("http://"))
    tensor = triton.InferInput("input", shape, datatype)
    tensor.set_data_from_numpy(np.zeros(shape, dtype=np.uint8 if datatype == "UINT8" else np.float32))
    with pytest.raises(InferenceServerException) as caught:
        client.infer(model or champion_settings.registry.model_name, [tensor])
    assert caught.value.status() == status
    assert message in caught.value.message()


def test_feedback_round_trip_is_logged_and_counted(champion_server, champion_settings, digit_png):
    png, label = digit_png
    with champion_server.client() as http:
        prediction = http.post("/predict", files={"file": ("x.png", png)}).json()["predictions"][0]
        answer = http.post("/feedback", json={"request_id": prediction["request_id"], "label": str(label)})
        assert answer.status_code == 200, answer.text
        assert answer.json()["correct"] is (prediction["label"] == str(label))
        again = http.post("/feedback", json={"request_id": prediction["request_id"], "label": str(label)})
        assert again.status_code == 409 and "already recorded" in again.json()["error"]
        metrics = http.get("/metrics").text
    assert 'visionloop_feedback_total{correct="true",model_version="1"}' in metrics
    with sqlite3.connect(champion_settings.home / "monitoring" / "predictions.db") as db:
        row = db.execute(
            "SELECT p.predicted_label, p.model_version, length(p.embedding), f.true_label, length(p.probabilities), "
            "length(p.channel_means), p.instance, p.image_key FROM predictions p "
            "JOIN feedback f USING (request_id) WHERE request_id = ?",
            (prediction["request_id"],),
        ).fetchone()
    assert row[0] == prediction["label"] and row[1] == "1" and row[2] > 0 and row[3] == str(label)
    assert row[4] == 10 * 4 and row[5] == 1 * 4  # float32 softmax over the 10 digits; one grey channel
    assert row[6].endswith(f":{champion_server.process.pid}")
    # the embedded store keeps the upload as it arrived, content-addressed under <home>/monitoring/images
    assert (champion_settings.home / "monitoring" / "images" / row[7]).read_bytes() == png


def test_feedback_needs_the_token_when_one_is_set_and_is_marked_as_authenticated(champion_settings, digit_png):
    from fastapi.testclient import TestClient

    from visionloop.serving.app import create_app

    png, label = digit_png
    settings = champion_settings.model_copy(
        update={"serve": champion_settings.serve.model_copy(update={"feedback_token": "s3cret", "poll_seconds": 0})}
    )
    with TestClient(create_app(settings)) as http:
        request_id = http.post("/predict", files={"file": ("x.png", png)}).json()["predictions"][0]["request_id"]
        body = {"request_id": request_id, "label": str(label)}
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            refused = http.post("/feedback", json=body, headers=headers)
            assert refused.status_code == 401 and "serve.feedback_token" in refused.json()["error"]
        store = http.app.state.service.predictions
        assert [x for x in store.labelled(settings.registry.model_name) if x.request_id == request_id] == []
        accepted = http.post("/feedback", json=body, headers={"Authorization": "Bearer s3cret"})
        assert accepted.status_code == 200, accepted.text
        (mine,) = [x for x in store.labelled(settings.registry.model_name) if x.request_id == request_id]
        assert mine.authenticated


def test_health_readiness_metrics_and_docs(champion_server):
    with champion_server.client() as http:
        assert http.get("/healthz").json() == {"status": "alive"}
        ready = http.get("/readyz")
        assert ready.status_code == 200 and ready.json()["ready"] is True
        metrics = http.get("/metrics")
        assert metrics.headers["content-type"].startswith("text/plain")
        for name in (
            "visionloop_batch_size_bucket",
            "visionloop_batch_queue_wait_seconds_bucket",
            "visionloop_ready 1.0",
            "visionloop_prediction_store_queue_rows",
            "visionloop_prediction_store_lag_seconds",
            'visionloop_prediction_store_errors_total{reason="queue_full"} 0.0',
        ):
            assert name in metrics.text
        assert http.get("/docs").status_code == 200
        schema = http.get("/openapi.json").json()
        assert {"/predict", "/feedback", "/v2/models/{name}/infer", "/readyz"} <= set(schema["paths"])


# ---------------------------------------------------------------- the deployment smoke test
# .github/scripts/smoke.py, which cd.yml runs against the kind cluster, passes against a real server with a champion
# (its failure paths are in tests/deploy/test_workflows.py).

SMOKE = Path(__file__).resolve().parents[3] / ".github" / "scripts" / "smoke.py"


def test_smoke_script_passes_against_a_real_server(champion_server) -> None:
    done = subprocess.run(
        [sys.executable, str(SMOKE), champion_server.url, "--timeout", "60"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    assert "GET /v2/health/ready 200" in out
    assert "model champion-model v1: input input UINT8 [-1, 1, 16, 16]" in out, out
    assert "output probabilities FP32 [2, 10]" in out, out
    assert "POST /v2/models/champion-model/infer 200 (batch 2)" in out
    assert done.stdout.rstrip().endswith(f"smoke: passed against {champion_server.url}")
