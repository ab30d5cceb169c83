"""The Kubeflow pipeline as compiled (structure, parameters, resources) and ``visionloop pipeline`` as a user runs it.

No cluster here: the compiled IR is read back as YAML; ``pipeline submit`` is run against a closed port, a
socket that never answers, and a small stand-in for the Kubeflow Pipelines REST API (``/apis/v2beta1``)
on 127.0.0.1 that records what kfp.Client sends. Running the pipeline itself is
tests/integration/test_kubeflow_local.py (KFP's local runner, a real MLflow store).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from visionloop.config import Settings
from visionloop.errors import ConfigError
from visionloop.pipeline import kubeflow

REPO = Path(__file__).resolve().parents[3]
COMMITTED = REPO / "deploy" / "kubeflow" / "visionloop-pipeline.yaml"
REGENERATE = "visionloop pipeline compile --output deploy/kubeflow/visionloop-pipeline.yaml"

_SCRIPT = Path(sys.executable).with_name("visionloop")
COMMAND = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "visionloop.cli"]

# what each step consumes and produces: (input artifacts, output artifacts, output parameters)
ARTIFACTS = {
    "ingest": ({}, {"raw": "system.Dataset"}, set()),
    "validate": ({"raw": "system.Dataset"}, {"report": "system.Artifact"}, set()),
    "preprocess": ({"raw": "system.Dataset", "report": "system.Artifact"}, {"dataset": "system.Dataset"}, set()),
    "train": ({"dataset": "system.Dataset"}, {"model": "system.Model"}, {"run_id"}),
    "evaluate": (
        {"model": "system.Model", "dataset": "system.Dataset"},
        {"metrics": "system.Metrics", "evaluation": "system.Artifact"},
        set(),
    ),
    "export": (
        {"model": "system.Model", "dataset": "system.Dataset", "evaluation": "system.Artifact"},
        {"onnx_model": "system.Model"},
        set(),
    ),
    "register": ({"onnx_model": "system.Model"}, {}, {"model_name", "version", "model_uri"}),
    "promote": ({"dataset": "system.Dataset"}, {"gate": "system.Metrics", "decision": "system.Artifact"}, set()),
}


def normalised(text: str) -> str:
    # sdkVersion names the kfp that compiled the file (kfp-2.17.0); a patch release of kfp that compiles
    # the same IR must not fail the test. The IR holds no timestamps or paths.
    return "\n".join("sdkVersion: <any>" if line.startswith("sdkVersion:") else line for line in text.splitlines())


@pytest.fixture(scope="module")
def compiled(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = kubeflow.compile_pipeline(tmp_path_factory.mktemp("kfp") / "pipeline.yaml")
    return yaml.safe_load(path.read_text())


def executor(spec: dict[str, Any], step: str) -> dict[str, Any]:
    return spec["deploymentSpec"]["executors"][f"exec-{step}"]["container"]


def cli_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VISIONLOOP_", "MLFLOW_", "KF_PIPELINES_"))}
    env["HOME"] = str(tmp_path)  # kfp.Client reads ~/.config/kfp/context.json
    env["VISIONLOOP_HOME"] = str(tmp_path / "home")
    return env


def visionloop(tmp_path: Path, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*COMMAND, *args], cwd=tmp_path, env=cli_env(tmp_path), capture_output=True, text=True, timeout=timeout
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------- the compiled IR


def test_committed_pipeline_is_compiled_from_the_current_code(tmp_path: Path) -> None:
    fresh = kubeflow.compile_pipeline(tmp_path / "visionloop-pipeline.yaml").read_text()
    assert COMMITTED.is_file(), f"{COMMITTED} is missing; run `{REGENERATE}` from the repository root"
    assert normalised(COMMITTED.read_text()) == normalised(fresh), (
        f"{COMMITTED.relative_to(REPO)} is out of date with src/visionloop/pipeline/kubeflow.py; "
        f"run `{REGENERATE}` from the repository root and commit the result"
    )


def test_pipeline_runs_the_eight_steps_in_order(compiled: dict[str, Any]) -> None:
    tasks = compiled["root"]["dag"]["tasks"]
    assert set(tasks) == set(kubeflow.STEPS)
    for before, step in zip(kubeflow.STEPS, kubeflow.STEPS[1:], strict=False):
        assert before in tasks[step].get("dependentTasks", []), f"{step} does not wait for {before}"
    assert "dependentTasks" not in tasks["ingest"]
    for step in kubeflow.STEPS:
        # the component calls, by name, the declared step the CLI and the local runner call
        code = executor(compiled, step)["command"]  # sh -ec 'python3 -m kfp.dsl.executor_main ...' <source>
        assert any(f"kubeflow.run_step('{step}'" in part for part in code), f"{step} does not run step {step}"
        assert tasks[step]["cachingOptions"] == {}, f"{step} may be served from KFP's cache"


@pytest.mark.parametrize("step", kubeflow.STEPS)
def test_steps_hand_over_datasets_and_models_as_artifacts(compiled: dict[str, Any], step: str) -> None:
    wanted_in, wanted_out, wanted_params = ARTIFACTS[step]
    component = compiled["components"][f"comp-{step}"]

    def types(definitions: dict[str, Any]) -> dict[str, str]:
        return {k: v["artifactType"]["schemaTitle"] for k, v in definitions.get("artifacts", {}).items()}

    assert types(component.get("inputDefinitions", {})) == wanted_in
    assert types(component.get("outputDefinitions", {})) == wanted_out
    assert set(component.get("outputDefinitions", {}).get("parameters", {})) == wanted_params


def test_run_id_and_version_travel_as_parameters(compiled: dict[str, Any]) -> None:
    tasks = compiled["root"]["dag"]["tasks"]
    for step in ("evaluate", "export", "register", "promote"):
        source = tasks[step]["inputs"]["parameters"]["run_id"]["taskOutputParameter"]
        assert source == {"outputParameterKey": "run_id", "producerTask": "train"}
    version = tasks["promote"]["inputs"]["parameters"]["version"]["taskOutputParameter"]
    assert version == {"outputParameterKey": "version", "producerTask": "register"}
    assert tasks["export"]["inputs"]["artifacts"]["evaluation"]["taskOutputArtifact"]["producerTask"] == "evaluate"
    outputs = compiled["root"]["outputDefinitions"]["artifacts"]
    assert {k: v["artifactType"]["schemaTitle"] for k, v in outputs.items()} == {
        "metrics": "system.Metrics",
        "gate": "system.Metrics",
    }


def test_settings_tracking_uri_and_resources_are_run_parameters(compiled: dict[str, Any]) -> None:
    params = compiled["root"]["inputDefinitions"]["parameters"]
    assert {k: (v["parameterType"], v["defaultValue"]) for k, v in params.items()} == {
        "settings_json": ("STRING", "{}"),
        "tracking_uri": ("STRING", ""),
        "cpu": ("STRING", "2"),
        "memory": ("STRING", "8Gi"),
        "gpus": ("STRING", "0"),
    }
    assert set(kubeflow.RUN_PARAMETERS) | {"settings_json"} == set(params)
    tasks = compiled["root"]["dag"]["tasks"]
    for step in kubeflow.STEPS:
        container = executor(compiled, step)
        assert container["image"] == kubeflow.DEFAULT_IMAGE
        resources = container["resources"]
        assert resources["resourceCpuLimit"] == "{{$.inputs.parameters['pipelinechannel--cpu']}}"
        assert resources["resourceMemoryLimit"] == "{{$.inputs.parameters['pipelinechannel--memory']}}"
        wired = tasks[step]["inputs"]["parameters"]
        assert wired["pipelinechannel--cpu"] == {"componentInputParameter": "cpu"}
        assert wired["settings_json"] == {"componentInputParameter": "settings_json"}
        if step in ("train", "evaluate", "export", "register", "promote"):
            assert wired["tracking_uri"] == {"componentInputParameter": "tracking_uri"}
        if step == "train":
            assert resources["accelerator"]["resourceType"] == "nvidia.com/gpu"
            assert resources["accelerator"]["resourceCount"] == "{{$.inputs.parameters['pipelinechannel--gpus']}}"
        else:
            assert "accelerator" not in resources, f"{step} asks for a GPU"


def test_compile_command_writes_the_ir_with_the_image_asked_for(tmp_path: Path) -> None:
    out = tmp_path / "deploy" / "pipeline.yaml"
    result = visionloop(
        tmp_path, "pipeline", "compile", "--output", str(out), "--image", "reg.example/vl:1.2", "--json"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "output": str(out),
        "image": "reg.example/vl:1.2",
        "steps": list(kubeflow.STEPS),
    }
    spec = yaml.safe_load(out.read_text())
    assert {executor(spec, step)["image"] for step in kubeflow.STEPS} == {"reg.example/vl:1.2"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["pipeline.yaml"]  # no temporary left behind


def test_compile_refuses_a_folder_or_a_wrong_suffix(tmp_path: Path) -> None:
    assert "is a folder" in one_error_line(visionloop(tmp_path, "pipeline", "compile", "--output", str(tmp_path)))
    line = one_error_line(visionloop(tmp_path, "pipeline", "compile", "--output", str(tmp_path / "p.json")))
    assert ".yaml" in line
    with pytest.raises(ConfigError, match="invalid container image"):
        kubeflow.build_pipeline(image="two words")


# ---------------------------------------------------------------------------------- inside a component


def test_component_settings_use_a_scratch_home_and_the_tracking_uri_parameter(tmp_path: Path) -> None:
    sent = Settings(home=Path("/somewhere/else"), data={"source": "synthetic"}, train={"epochs": 3})
    payload = json.loads(kubeflow.settings_json(sent))
    assert set(payload) == set(kubeflow.SETTINGS_GROUPS)  # no home, no serve (admin token)
    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    got = kubeflow.component_settings(kubeflow.settings_json(sent), tmp_path / "scratch", uri, needs_mlflow=True)
    assert got.home == tmp_path / "scratch"
    assert (got.data.source, got.train.epochs, got.tracking_uri) == ("synthetic", 3, uri)
    # a SQLite store keeps its artifacts beside the db, not in the scratch home of whoever connected first
    import mlflow

    experiment = mlflow.MlflowClient(tracking_uri=uri).get_experiment_by_name(got.registry.experiment)
    assert experiment.artifact_location == (tmp_path / "store" / "mlartifacts").as_uri()
    assert kubeflow.component_settings("{}", tmp_path).train.epochs == Settings().train.epochs


@pytest.mark.parametrize(
    ("payload", "message"),
    [("{not json", "invalid settings_json"), ("[1]", "JSON object"), ('{"train": {"epoch": 3}}', "epoch")],
)
def test_component_settings_reject_bad_json(tmp_path: Path, payload: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        kubeflow.component_settings(payload, tmp_path)


def test_mlflow_steps_need_a_store_every_pod_can_reach(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError, match="no MLflow tracking URI"):
        kubeflow.component_settings("{}", tmp_path, "", needs_mlflow=True)
    kubeflow.component_settings("{}", tmp_path, "", needs_mlflow=False)  # ingest, validate, preprocess
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    kubeflow.component_settings("{}", tmp_path, "", needs_mlflow=True)


@dataclass
class FakeArtifact:
    """What KFP hands a component: a folder path and a metadata dict (kfp.dsl.Artifact's two fields)."""

    path: str
    metadata: dict[str, Any] = field(default_factory=dict)


def test_an_output_packed_in_one_pod_points_at_the_next_pods_copy(tmp_path: Path) -> None:
    from visionloop.pipeline import dataflow, steps

    work = tmp_path / "train-pod" / "run"
    (work / "train").mkdir(parents=True)
    (work / "train" / "model.pt").write_bytes(b"weights")
    out = steps.TrainOutput(
        model_path=work / "train" / "model.pt",
        run_id="r1",
        work_dir=work,
        dataset_dir=tmp_path / "train-pod" / "dataset",  # handed on from preprocess: not packed
        device="cpu",
        epochs_run=1,
        best_epoch=1,
        best_val_accuracy=0.5,
        images_per_second=1.0,
        parameters=10,
        resumed_from_epoch=None,
    )
    train = dataflow.step_named("train")
    packed = FakeArtifact(str(tmp_path / "artifact"))
    kubeflow.pack(train, out, packed)
    assert packed.metadata["best_val_accuracy"] == 0.5  # numbers show in the KFP UI
    # the artifact as the evaluate pod sees it: somewhere else
    moved = tmp_path / "evaluate-pod" / "model"
    shutil.move(tmp_path / "artifact", moved)
    back = kubeflow.unpack(train, FakeArtifact(str(moved), packed.metadata))
    assert back.model_path == moved / "train" / "model.pt" and back.model_path.read_bytes() == b"weights"
    assert back.work_dir == moved and back.run_id == "r1"
    assert sorted(p.name for p in moved.iterdir()) == ["train"]  # the dataset is preprocess's artifact


def test_numbers_keeps_finite_numbers_only() -> None:
    assert kubeflow.numbers({"a": 1, "b": 0.5, "c": float("nan"), "d": "x", "e": True, "f": None}) == {
        "a": 1.0,
        "b": 0.5,
    }


# ---------------------------------------------------------------------------------- submit


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_submit_to_an_unreachable_host_fails_at_once_with_a_clear_message(tmp_path: Path) -> None:
    port = closed_port()
    result = visionloop(tmp_path, "pipeline", "submit", "--host", f"http://127.0.0.1:{port}", timeout=60)
    line = one_error_line(result)
    assert f"cannot reach Kubeflow Pipelines at http://127.0.0.1:{port}: Connection refused" in line
    assert "port-forward" in line


def test_submit_to_a_host_that_never_answers_gives_up_after_the_timeout(tmp_path: Path) -> None:
    with socket.socket() as silent:  # accepts connections (the kernel does) and never says a word
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        host = f"http://127.0.0.1:{silent.getsockname()[1]}"
        result = visionloop(tmp_path, "pipeline", "submit", "--host", host, "--timeout", "1", timeout=60)
    assert f"Kubeflow Pipelines at {host} did not answer within 1 s" in one_error_line(result)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--host", "localhost:8080"], "--host must be an http:// or https:// URL"),
        (["--param", "cpu=two"], "expected a number of cores"),
        (["--param", "memory=8GB"], "expected a size such as 8Gi"),
        (["--param", "gpus=-1"], "whole number of GPUs"),
        (["--param", "epochs=3"], "unknown pipeline parameter 'epochs'"),
        (["--param", "settings_json={}"], "--config / --set"),
        (["--param", "cpu"], "KEY=VALUE"),
        (["--set", "registry.tracking_uri=sqlite:///x.db"], "SQLite file on one machine"),
        (["--timeout", "0"], "--timeout must be a positive"),
    ],
)
def test_submit_checks_its_input_before_calling_the_cluster(tmp_path: Path, args: list[str], message: str) -> None:
    host = ["--host", f"http://127.0.0.1:{closed_port()}"]
    result = visionloop(tmp_path, "pipeline", "submit", *host, *args, timeout=60)
    assert message in one_error_line(result)


@dataclass
class FakeKfp:
    """The few /apis/v2beta1 calls kfp.Client makes to start a run, answered like the real API server."""

    url: str = ""
    requests: list[tuple[str, str, Any]] = field(default_factory=list)
    healthz_status: int = 200
    run_error: tuple[int, dict[str, Any]] | None = None


@pytest.fixture
def fake_kfp() -> Iterator[FakeKfp]:
    state = FakeKfp()

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
            state.requests.append(("GET", self.path, None))
            if self.path.startswith("/apis/v2beta1/healthz"):
                self.reply(state.healthz_status, {"multi_user": False})
            elif self.path.startswith("/apis/v2beta1/experiments"):
                self.reply(200, {})  # no experiment of that name yet
            else:
                self.reply(404, {"error_message": "not found"})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            state.requests.append(("POST", self.path, body))
            if self.path == "/apis/v2beta1/experiments":
                self.reply(200, {"experiment_id": "exp-1", "display_name": body["display_name"]})
            elif self.path == "/apis/v2beta1/runs" and state.run_error is not None:
                self.reply(*state.run_error)
            elif self.path == "/apis/v2beta1/runs":
                self.reply(200, {"run_id": "run-42", "display_name": body["display_name"], "state": "PENDING"})
            else:
                self.reply(404, {"error_message": "not found"})

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def test_submit_starts_a_run_with_the_settings_and_parameters(tmp_path: Path, fake_kfp: FakeKfp) -> None:
    result = visionloop(
        tmp_path,
        "pipeline",
        "submit",
        *("--host", fake_kfp.url + "/"),
        *("--experiment", "nightly", "--run-name", "try 1"),
        *("--param", "tracking_uri=http://mlflow.example:5000", "--param", "gpus=1", "--param", "memory=16Gi"),
        *("--set", "data.source=synthetic", "--set", "train.epochs=7"),
        "--json",
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)  # kfp.Client's own "Run details: ..." lines stay out of stdout
    assert (out["run_id"], out["experiment"], out["run_name"]) == ("run-42", "nightly", "try 1")
    assert out["run_url"] == f"{fake_kfp.url}/#/runs/details/run-42"
    posted = {path: body for method, path, body in fake_kfp.requests if method == "POST"}
    assert posted["/apis/v2beta1/experiments"]["display_name"] == "nightly"
    run = posted["/apis/v2beta1/runs"]
    assert (run["display_name"], run["experiment_id"]) == ("try 1", "exp-1")
    params = run["runtime_config"]["parameters"]
    assert {k: params[k] for k in ("tracking_uri", "gpus", "memory")} == {
        "tracking_uri": "http://mlflow.example:5000",
        "gpus": "1",
        "memory": "16Gi",
    }
    settings = json.loads(params["settings_json"])
    assert (settings["data"]["source"], settings["train"]["epochs"]) == ("synthetic", 7)
    assert set(run["pipeline_spec"]["root"]["dag"]["tasks"]) == set(kubeflow.STEPS)


def test_submit_reports_what_the_api_refused(tmp_path: Path, fake_kfp: FakeKfp) -> None:
    fake_kfp.run_error = (400, {"error_message": "Invalid input error: pipeline spec is invalid", "code": 3})
    result = visionloop(tmp_path, "pipeline", "submit", "--host", fake_kfp.url, timeout=60)
    line = one_error_line(result)
    assert f"Kubeflow Pipelines at {fake_kfp.url} refused the run: HTTP 400: Invalid input error" in line


@pytest.mark.parametrize(("status", "message"), [(404, "ends in /pipeline"), (302, "login"), (503, "not healthy")])
def test_submit_explains_a_host_that_is_not_a_kfp_api(
    tmp_path: Path, fake_kfp: FakeKfp, status: int, message: str
) -> None:
    fake_kfp.healthz_status = status
    result = visionloop(tmp_path, "pipeline", "submit", "--host", fake_kfp.url, timeout=60)
    assert message in one_error_line(result)
    assert not [r for r in fake_kfp.requests if r[0] == "POST"]
