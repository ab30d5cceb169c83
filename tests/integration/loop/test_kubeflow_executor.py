"""The loop with ``loop.executor: kubeflow``: the retrain folder goes to an object store (moto's S3 server on
127.0.0.1), the pipeline is submitted through the real ``kfp.Client`` and waited for, and the version it registered
is judged by the loop's own gate.

No Kubeflow cluster runs here, so the Kubeflow Pipelines API is a stand-in on 127.0.0.1 that answers the calls
``kfp.Client`` makes and, for each submitted run, does what the cluster's pods would: runs our pipeline (``visionloop
run``) with the run's ``settings_json`` and ``tracking_uri`` parameters, in a home of its own (a pod's scratch
folder), against a real ``mlflow server``. The run's state goes RUNNING → SUCCEEDED or FAILED with that process."""

from __future__ import annotations

import json
import subprocess
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml
from fastapi.testclient import TestClient
from registry_stores import isolate, running_server

from localhost import VISIONLOOP  # tests/localhost.py
from traffic import held_out_uploads, inverted, publish, shuffled  # tests/traffic.py
from visionloop import registry
from visionloop.config import Settings
from visionloop.errors import ConfigError
from visionloop.loop.engine import Engine
from visionloop.loop.retrain import train_kubeflow
from visionloop.loop.triggers import Trigger
from visionloop.serving.app import create_app as create_server

TOKEN = "kfp-token"
TRAIN = {"epochs": 8, "width": 16, "depth": 2, "threads": 1, "patience": 100, "lr": 1e-2}


@dataclass
class Cluster:
    """The stand-in Kubeflow Pipelines API and the runs it was given."""

    root: Path
    url: str = ""
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Cluster]:
    state = Cluster(tmp_path / "cluster")
    state.root.mkdir()

    def start_run(run_id: str, parameters: dict[str, str]) -> None:
        pod = state.root / run_id
        pod.mkdir()
        config = pod / "settings.yaml"
        config.write_text(yaml.safe_dump(json.loads(parameters["settings_json"])))
        log = (pod / "run.log").open("w")
        process = subprocess.Popen(
            [*VISIONLOOP, "--config", str(config), "--home", str(pod / "home"), "run", "--json",
             "--set", f"registry.tracking_uri={parameters['tracking_uri']}"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        state.runs[run_id] = {"process": process, "parameters": parameters, "log": pod / "run.log"}

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *_args: Any) -> None:
            pass

        def reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            if self.path.startswith("/apis/v2beta1/healthz"):
                self.reply(200, {"multi_user": False})
            elif self.path.startswith("/apis/v2beta1/experiments"):
                self.reply(200, {})
            elif self.path.startswith("/apis/v2beta1/runs/"):
                run_id = self.path.split("/")[4].split("?")[0]
                process = state.runs[run_id]["process"]
                code = process.poll()
                run_state = "RUNNING" if code is None else ("SUCCEEDED" if code == 0 else "FAILED")
                self.reply(200, {"run_id": run_id, "display_name": run_id, "state": run_state})
            else:
                self.reply(404, {"error_message": "not found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            if self.path == "/apis/v2beta1/experiments":
                self.reply(200, {"experiment_id": "exp-1", "display_name": body["display_name"]})
            elif self.path == "/apis/v2beta1/runs":
                run_id = f"run-{len(state.runs) + 1}"
                start_run(run_id, body["runtime_config"]["parameters"])
                self.reply(200, {"run_id": run_id, "display_name": body["display_name"], "state": "PENDING"})
            else:
                self.reply(404, {"error_message": "not found"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        for run in state.runs.values():
            if run["process"].poll() is None:
                run["process"].kill()
            run["process"].wait(30)


def test_the_loop_submits_the_pipeline_waits_and_judges_what_it_registered(
    tmp_path, monkeypatch, s3, cluster, digits_dataset, strong_export
):
    isolate(monkeypatch)
    s3.create_bucket(Bucket="retrain")
    with running_server(f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path) as mlflow_server:
        settings = Settings(
            home=tmp_path / "loop-home", registry={"model_name": "kfp-looped", "tracking_uri": mlflow_server.url},
            train=TRAIN, gate={"min_accuracy": 0.5}, serve={"poll_seconds": 0, "feedback_token": TOKEN},
            loop={"executor": "kubeflow", "kfp_host": cluster.url, "kfp_poll_seconds": 0.5,
                  "dataset_url": "s3://retrain/visionloop", "min_labels": 50, "min_production_test": 10,
                  "old_test_tolerance": 0.03, "analysis_count": 1, "analysis_interval_seconds": 0.1},
        )  # fmt: skip
        assert publish(settings, strong_export, digits_dataset) == "1"  # a champion trained on the base dataset
        shifted = inverted(shuffled(held_out_uploads(digits_dataset, tmp_path / "digits", "train")))[:300]
        with TestClient(create_server(settings)) as server:
            for start in range(0, len(shifted), 16):
                chunk = shifted[start : start + 16]
                files = [("file", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(chunk)]
                for prediction, (_, label) in zip(
                    server.post("/predict", files=files).json()["predictions"], chunk, strict=True
                ):
                    body = {"request_id": prediction["request_id"], "label": label}
                    assert (
                        server.post("/feedback", json=body, headers={"Authorization": f"Bearer {TOKEN}"}).status_code
                        == 200
                    )
            server.app.state.service.predictions.flush()

        engine = Engine(settings)
        ack = engine.offer(Trigger("manual", "kubeflow executor test"), wait=True)
        run = engine.state.get_run(ack.run_id)
        engine.close()
        (submitted,) = cluster.runs.values()
        assert submitted["process"].returncode == 0, submitted["log"].read_text()[-3000:]
        assert run.result in ("promoted", "inconclusive"), json.dumps(run.data)[:3000]
        assert run.data["gate"]["promoted"] and run.data["version"] == "2"

        # the pods trained on the uploaded folder, and their own promote step moved nothing
        pod_settings = json.loads(submitted["parameters"]["settings_json"])
        source = pod_settings["data"]["source"]
        assert source == f"s3://retrain/visionloop/{run.data['retrain']['key']}" and not pod_settings["gate"]["promote"]
        pages = s3.get_paginator("list_objects_v2").paginate(
            Bucket="retrain", Prefix=f"visionloop/{run.data['retrain']['key']}/"
        )
        names = [item["Key"] for page in pages for item in page["Contents"]]
        assert f"visionloop/{run.data['retrain']['key']}/.complete" in names
        assert (
            sum(n.endswith(".png") for n in names) == run.data["lineage"]["base_files"] + run.data["lineage"]["train"]
        )
        tags = registry.version_tags(settings, "2")
        assert tags["gate.decision"] == "rejected" and "gate.promote is false" in tags["gate.reasons"]
        assert tags["loop.gate.decision"] == "promoted" and tags["visionloop.loop_run"] == run.id
        promotions = [e for e in registry.history(settings) if e.kind == "promote"]
        assert [(e.to_version, e.reason.startswith("loop (manual")) for e in promotions] == [("1", False), ("2", True)]


def test_the_kubeflow_executor_says_what_it_is_missing(tmp_path):
    from visionloop.loop.retrain import RetrainData

    data = RetrainData(tmp_path, "rt-x", "ds-x", tmp_path, 0, 0, tmp_path / "lineage.json")
    for loop, message in (
        ({"executor": "kubeflow"}, "loop.kfp_host is empty"),
        ({"executor": "kubeflow", "kfp_host": "http://127.0.0.1:9"}, "needs loop.dataset_url"),
        (
            {"executor": "kubeflow", "kfp_host": "http://127.0.0.1:9", "dataset_url": "file:///tmp/x"},
            "needs loop.dataset_url",
        ),
    ):
        with pytest.raises(ConfigError, match=message):
            train_kubeflow(Settings(home=tmp_path, loop=loop), data, "x")
