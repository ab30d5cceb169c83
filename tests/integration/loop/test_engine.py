"""The loop's engine in one process against real parts: the digits pipeline into a real MLflow store, the real
server app writing the real prediction store (images kept, labels with the feedback token), the retrain through
the local runner, the two-test-set gate, the post-promotion analysis and the rollback.

A flood of wrong labels (near-copies of training images, labelled wrong, sent with the token) retrains a
challenger the gate refuses on the original test set, and labels without the token are refused and never used.
The whole loop with real processes (drift → retrain → promotion → analysis → rollback) is tests/e2e/test_demo.py."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from traffic import held_out_uploads, shuffled  # tests/traffic.py
from visionloop import registry
from visionloop.config import Settings
from visionloop.data.preprocess import Dataset
from visionloop.loop.engine import Engine
from visionloop.loop.triggers import Trigger
from visionloop.pipeline.runner import run_pipeline
from visionloop.serving.app import create_app as create_server

TOKEN = "feedback-secret"
TRAIN = {"epochs": 12, "width": 16, "depth": 2, "threads": 1, "patience": 100, "lr": 1e-2, "batch_size": 64}
LOOP = {
    "min_labels": 50, "min_new_labels": 10, "cooldown_seconds": 0, "analysis_count": 2,
    "analysis_interval_seconds": 0.5, "analysis_min_feedback": 10, "analysis_min_accuracy": 0.6,
    "min_production_test": 10, "old_test_tolerance": 0.02, "triggers": ["alert", "verdict", "accuracy"],
}  # fmt: skip


def make_settings(home: Path, **loop: object) -> Settings:
    return Settings(
        home=home, registry={"model_name": "looped"}, train=TRAIN, gate={"min_accuracy": 0.5},
        serve={"poll_seconds": 0, "feedback_token": TOKEN}, loop={**LOOP, **loop},
    )  # fmt: skip


def send(server: TestClient, uploads: list[tuple[bytes, int]], token: str | None = TOKEN, wrong: bool = False) -> int:
    """Predict each upload and send its label (or a wrong one); how many predictions were right."""
    right = 0
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for start in range(0, len(uploads), 16):
        chunk = uploads[start : start + 16]
        files = [("file", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(chunk)]
        answer = server.post("/predict", files=files)
        assert answer.status_code == 200, answer.text
        for prediction, (_, label) in zip(answer.json()["predictions"], chunk, strict=True):
            given = (label + 1) % 10 if wrong else label
            sent = server.post(
                "/feedback", json={"request_id": prediction["request_id"], "label": given}, headers=headers
            )
            assert sent.status_code == 200, sent.text
            right += int(prediction["label"] == str(label))
    server.app.state.service.predictions.flush()
    return right


@pytest.fixture(scope="module")
def uploads(digits_dataset: Dataset, tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[tuple[bytes, int]]]:
    folder = tmp_path_factory.mktemp("digits-source")
    return {
        "train": shuffled(held_out_uploads(digits_dataset, folder, "train")),
        "test": shuffled(held_out_uploads(digits_dataset, folder, "test")),
    }


@pytest.fixture
def champion(tmp_path: Path) -> Iterator[tuple[Settings, TestClient]]:
    settings = make_settings(tmp_path / "home")
    summary = run_pipeline(settings, show_progress=False)
    assert summary.promoted and summary.model_version == "1"
    with TestClient(create_server(settings)) as server:
        yield settings, server


def nudged(uploads: list[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
    """Near-copies of training images (one pixel changed, so new bytes): what a poisoner would send."""
    out = []
    for data, label in uploads:
        with Image.open(io.BytesIO(data)) as img:
            pixels = np.array(img.convert("L"))
        pixels[0, 0] = 255 - pixels[0, 0]
        buffer = io.BytesIO()
        Image.fromarray(pixels, "L").save(buffer, format="PNG")
        out.append((buffer.getvalue(), label))
    return out


def test_poisoned_labels_cannot_promote_a_worse_model(champion, uploads):
    settings, server = champion
    poison = nudged(uploads["train"])
    # without the token the labels are refused and never stored
    answer = server.post("/predict", files=[("file", ("x.png", poison[0][0], "image/png"))])
    request_id = answer.json()["predictions"][0]["request_id"]
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        refused = server.post("/feedback", json={"request_id": request_id, "label": 3}, headers=headers)
        assert refused.status_code == 401, refused.text
    send(server, poison, wrong=True)  # a flood of wrong labels, with the token
    engine = Engine(settings)
    ack = engine.offer(Trigger("manual", "poisoning test"), wait=True)
    run = engine.state.get_run(ack.run_id)
    assert run.result == "rejected", run.data
    lineage = run.data["lineage"]
    assert lineage["train"] + lineage["test"] == len(poison)  # the unauthenticated label is not among them
    gate = run.data["gate"]
    assert not gate["promoted"]
    drop = gate["champion"]["original"] - gate["challenger"]["original"]
    assert drop > settings.loop.old_test_tolerance, gate
    assert any("original test set" in r and "beyond the tolerance" in r for r in gate["reasons"])
    assert registry.alias_version(settings, registry.CHAMPION) == "1"
    assert registry.version_tags(settings, "2")["loop.gate.decision"] == "rejected"
    engine.close()
