"""A `visionloop loop` killed (SIGKILL, no cleanup) during a retrain, and again during the analysis after the
promotion: each restart takes up the run where the store says it was — training resumes from its checkpoint in
the same MLflow run, the analysis keeps its measurements — with one promotion at most, the history intact and no
MLflow run left RUNNING."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import yaml
from fastapi.testclient import TestClient

from traffic import held_out_uploads, inverted, shuffled  # tests/traffic.py
from visionloop import registry
from visionloop.config import load_settings
from visionloop.data.preprocess import load_dataset
from visionloop.loop.localstack import Process, start_service, wait_until
from visionloop.pipeline.runner import run_pipeline
from visionloop.serving.app import create_app as create_server

pytestmark = pytest.mark.slow
TOKEN = "fault-token"


@pytest.fixture
def prepared(tmp_path: Path) -> Iterator[tuple[Path, dict[str, str]]]:
    """A champion, 300 labelled shifted images in the store, and the settings file a loop process reads."""
    config = tmp_path / "visionloop.yaml"
    config.write_text(yaml.safe_dump({
        "home": str(tmp_path / "home"), "registry": {"model_name": "faulty"},
        "train": {"epochs": 16, "width": 16, "depth": 2, "patience": 100, "lr": 1e-2, "threads": 1},
        "gate": {"min_accuracy": 0.5}, "serve": {"poll_seconds": 0, "feedback_token": TOKEN},
        "loop": {"triggers": [], "interval_seconds": 0.5, "lock_seconds": 3, "min_labels": 50,
                 "analysis_count": 3, "analysis_interval_seconds": 2, "analysis_min_feedback": 1000,
                 "old_test_tolerance": 0.05, "min_production_test": 10},
    }))  # fmt: skip
    settings = load_settings(config)
    assert run_pipeline(settings, show_progress=False).model_version == "1"
    dataset = load_dataset(next((settings.home / "datasets").iterdir()))
    shifted = inverted(shuffled(held_out_uploads(dataset, tmp_path / "digits", "train")))[:300]
    with TestClient(create_server(settings)) as server:
        for start in range(0, len(shifted), 16):
            chunk = shifted[start : start + 16]
            files = [("file", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(chunk)]
            answer = server.post("/predict", files=files).json()
            for prediction, (_, label) in zip(answer["predictions"], chunk, strict=True):
                body = {"request_id": prediction["request_id"], "label": label}
                assert (
                    server.post("/feedback", json=body, headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
                )
        server.app.state.service.predictions.flush()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VISIONLOOP_", "MLFLOW_"))}
    env["VISIONLOOP_CONFIG"] = str(config)
    yield config, env


def test_a_loop_killed_in_training_and_in_analysis_finishes_its_run_once(prepared, tmp_path):
    config, env = prepared
    settings = load_settings(config)
    logs = tmp_path / "logs"
    logs.mkdir()
    processes: list[Process] = []

    def start(name: str) -> str:
        process, url = start_service(name, ["loop"], env, logs)
        processes.append(process)
        return url

    def get(url: str, run_id: str) -> dict:
        return httpx.get(f"{url}/runs/{run_id}", timeout=10).json()

    try:
        url = start("loop-1")
        run_id = httpx.post(f"{url}/runs", json={"reason": "fault test"}, timeout=60).json()["run_id"]
        run = wait_until("training with a checkpoint", lambda: (r := get(url, run_id))["phase"] == "training"
                         and (Path(r["data"]["work_dir"]) / "train" / "last.pt").is_file() and r, 300, every=0.1)  # fmt: skip
        processes[-1].kill()  # mid-training: the MLflow run is left RUNNING by the dead process
        (tagged,) = registry.runs_tagged(settings, "visionloop.loop_run", run_id)
        assert tagged[1] == "RUNNING"

        url = start("loop-2")
        run = wait_until("the analysis to have a measurement", lambda: (r := get(url, run_id))["phase"] == "analysing"
                         and r["data"]["analysis"]["measurements"] and r, 300, every=0.1)  # fmt: skip
        processes[-1].kill()

        url = start("loop-3")
        run = wait_until("the run to end", lambda: (r := get(url, run_id))["phase"] == "done" and r, 120)
    finally:
        for process in processes:
            process.stop()

    assert run["result"] == "inconclusive", json.dumps(run["data"])[:2000]  # too little feedback: kept
    assert [r["phase"] for r in run["data"]["resumed"]] == ["training", "analysing"]
    assert len(run["data"]["analysis"]["measurements"]) == settings.loop.analysis_count
    version = run["data"]["version"]
    promotions = [e for e in registry.history(settings) if e.kind == "promote" and e.to_version == version]
    assert len(promotions) == 1 and registry.alias_version(settings, registry.CHAMPION) == version
    assert [v["version"] for v in registry.list_versions(settings)] == ["1", version]  # registered once
    (resumed,) = registry.runs_tagged(settings, "visionloop.loop_run", run_id)  # the same run, resumed
    assert resumed == (tagged[0], "FINISHED")
    import mlflow

    client = mlflow.MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.registry.experiment)
    assert {r.info.status for r in client.search_runs([experiment.experiment_id])} == {"FINISHED"}
    assert client.get_run(tagged[0]).data.metrics.get("best_epoch") is not None
    assert "resuming training of MLflow run" in (logs / "loop-2.log").read_text()
