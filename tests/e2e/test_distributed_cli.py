"""`visionloop train --nproc-per-node N` end to end: the real CLI starts torchrun, 2 gloo processes on CPU.

The data (3 synthetic shapes x 400 images at 16 px) is prepared once per module and copied into each
test's folder. It is easy enough that a model trained for 16 epochs classifies the test split (240
images) all but perfectly, so that the accuracy of one run is a fair stand-in for another's. (This
file is not called test_distributed.py: tests/unit/training has one, and pytest needs unique names.)
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from e2e_helpers import mlflow_client, registered_versions  # this folder is on sys.path

pytestmark = pytest.mark.slow

EPOCHS = 16
CONFIG = f"""\
data:
  source: synthetic
  synthetic_classes: 3
  synthetic_per_class: 400
  synthetic_size: 16
train:
  epochs: {EPOCHS}
  patience: 1000
  width: 16
  depth: 3
  batch_size: 32
  threads: 1
gate:
  min_accuracy: 0.0
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def prepared_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder with visionloop.yaml and a home that has been through ingest, validate and preprocess."""
    root = tmp_path_factory.mktemp("ddp-data")
    (root / "visionloop.yaml").write_text(CONFIG)
    script = Path(sys.executable).with_name("visionloop")  # as the e2e ``cli`` fixture runs it
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "visionloop.cli"]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VISIONLOOP_", "MLFLOW_"))}
    env["VISIONLOOP_HOME"] = str(root / "home")
    for stage in ("ingest", "validate", "preprocess"):
        result = subprocess.run([*command, "data", stage], cwd=root, env=env, capture_output=True, text=True)
        assert result.returncode == 0, result.stderr
    return root


@pytest.fixture
def cli(cli: Any, prepared_data: Path) -> Any:
    """The e2e ``cli`` fixture, in a copy of the prepared folder (its dataset paths still point at the original)."""
    shutil.copytree(prepared_data, cli.cwd, dirs_exist_ok=True)
    return cli


def test_two_processes_train_a_model_as_accurate_as_one_process_and_register_it(cli: Any) -> None:
    single = cli.json("train")
    single_accuracy = cli.json("evaluate")["test_accuracy"]

    trained = cli.json("train", "--nproc-per-node", "2")
    assert trained["device"] == "cpu x2 (DDP, gloo)"
    assert trained["epochs_run"] == EPOCHS and trained["resumed_from_epoch"] is None
    evaluated = cli.json("evaluate")
    # same data, seed and global batch (32 = 2 x 16): within one percentage point on the test split
    assert abs(evaluated["test_accuracy"] - single_accuracy) <= 0.01, (evaluated["test_accuracy"], single_accuracy)
    cli.json("export")
    registered = cli.json("register")
    assert registered["version"] == "1" and registered["run_id"] == trained["run_id"]
    assert registered_versions(cli.home) == ["1"]

    # rank 0 alone tracked the run: one value per epoch, and no second work folder from rank 1
    client = mlflow_client(cli.home)
    assert len(client.get_metric_history(trained["run_id"], "val_accuracy")) == EPOCHS
    assert client.get_run(trained["run_id"]).data.params["device"] == "cpu x2 (DDP, gloo)"
    work_dirs = sorted(p.name for p in (cli.home / "runs").iterdir())
    assert work_dirs == sorted(Path(out["work_dir"]).name for out in (single, trained))
    assert sorted(p.name for p in (Path(trained["work_dir"]) / "train").iterdir()) == [
        "history.json",
        "last.pt",
        "model.pt",
        "training_curves.png",
    ]


def test_bad_distributed_settings_are_one_clear_error_and_leave_nothing_behind(cli: Any) -> None:
    cases = {
        "missing rendezvous endpoint": ["--nproc-per-node", "2", "--nnodes", "2"],
        "does not divide among 2 processes": ["--nproc-per-node", "2", "--batch-size", "33"],
        "fewer than one global batch": ["--nproc-per-node", "2", "--batch-size", "1024"],
        # a second node that never comes: the rendezvous gives up after 2 s instead of hanging
        "timed out after 2 s": [
            *("--nproc-per-node", "1", "--nnodes", "2"),
            *("--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-timeout", "2"),
        ],
    }
    for problem, args in cases.items():
        started = time.monotonic()
        result = cli("train", *args, "--json", timeout=120)
        assert result.returncode != 0, (problem, result.stdout)
        assert "Traceback" not in result.stderr, result.stderr
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
        assert problem in lines[0], result.stderr
        assert result.stdout.strip() == ""
        assert time.monotonic() - started < 60
    # nothing started: no work folder, no MLflow run, no hand-over to `evaluate`, no model
    assert not (cli.home / "runs").exists()
    assert not (cli.home / "latest" / "train.json").exists()
    assert not (cli.home / "latest" / "train_started.json").exists()
    assert registered_versions(cli.home) == []


def test_interrupted_two_process_training_resumes_in_one_process(cli: Any) -> None:
    epochs = "12"
    process = cli.popen("train", "--nproc-per-node", "2", "--epochs", epochs)
    deadline = time.monotonic() + 240
    try:
        while not list(cli.home.glob("runs/*/train/last.pt")):
            assert process.poll() is None, f"ended before its first checkpoint:\n{process.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.01)
        process.send_signal(signal.SIGINT)  # to the launcher only: torchrun passes it on to both processes
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    assert process.returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "visionloop train --resume" in " ".join(stderr.split())
    assert not (cli.home / "latest" / "train.json").exists()
    started = json.loads((cli.home / "latest" / "train_started.json").read_text())
    assert mlflow_client(cli.home).get_run(started["run_id"]).info.status == "KILLED"

    # the checkpoint rank 0 wrote holds the plain module: one process continues it
    resumed = cli.json("train", "--resume", "--nproc-per-node", "1", "--epochs", epochs)
    assert resumed["device"] == "cpu"
    assert resumed["run_id"] == started["run_id"] and resumed["work_dir"] == started["work_dir"]
    assert resumed["resumed_from_epoch"] >= 1 and resumed["epochs_run"] == int(epochs)
    assert Path(resumed["model_path"]).is_file()
