"""Both container images built from this working tree, run and shipped for real (deploy/docker/).

The training image trains a tiny model in a read-only container against a real ``mlflow server`` and registers a
champion; the serving image serves it (KServe V2 and /predict) with docker's own health check turning healthy;
both go to a local registry and come back by digest. Bad cases: a serving container without a model and one with
an unreachable MLflow server stay up, not ready, and say why in their log; a wrong registry address and a missing
wheelhouse are one clear line each. Every slow thing happens once: the builds are session fixtures
(tests/deploy/conftest.py), the training and the serving container are module fixtures.
"""

from __future__ import annotations

import io
import json
import subprocess
import time
import urllib.request
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from localhost import VISIONLOOP, free_port  # tests/localhost.py
from visionloop import __version__
from visionloop.delivery import images

pytestmark = pytest.mark.slow

MODEL = "visionloop-classifier"  # the default registered-model name
HOME = "/var/lib/visionloop"
# loopback traffic only (--network host), a read-only root file system, writable /tmp and home (tmpfs, owned by the
# image's user) and no volume left behind
READ_ONLY = ["--network", "host", "--read-only", "--tmpfs", "/tmp", "--tmpfs", f"{HOME}:uid=10001,gid=10001"]
# the built-in digits at 8x8 with a very small network (as tests/e2e does): a training run costs seconds
TINY_TRAINING = {
    "VISIONLOOP_DATA__SOURCE": "digits",
    "VISIONLOOP_DATA__IMAGE_SIZE": "8",
    "VISIONLOOP_TRAIN__WIDTH": "8",
    "VISIONLOOP_TRAIN__DEPTH": "2",
    "VISIONLOOP_TRAIN__EPOCHS": "2",
    "VISIONLOOP_TRAIN__THREADS": "1",
    "VISIONLOOP_GATE__MIN_ACCURACY": "0",
}
OCI = ("source", "revision", "version", "title", "description", "licenses")


def docker(engine: str, *args: str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([engine, *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, f"docker {' '.join(args[:3])} … exited {result.returncode}:\n{result.stderr}"
    return result


def env_args(env: dict[str, str]) -> list[str]:
    return [a for key, value in env.items() for a in ("-e", f"{key}={value}")]


def state(engine: str, name: str) -> dict:
    return json.loads(docker(engine, "inspect", "--format", "{{json .State}}", name).stdout)


def logs(engine: str, name: str) -> str:
    result = docker(engine, "logs", name, check=False)
    return result.stdout + result.stderr


@contextmanager
def container(engine: str, image: str, env: dict[str, str], *extra: str) -> Iterator[str]:
    """A detached container of ``image`` (its default command) with ``env``; removed, by name, afterwards."""
    name = f"visionloop-test-{uuid.uuid4().hex[:10]}"
    try:
        docker(engine, "run", "-d", "--name", name, *READ_ONLY, *env_args(env), *extra, image)
        yield name
    finally:
        docker(engine, "rm", "--force", "--volumes", name, check=False)


def wait_for(what: str, engine: str, name: str, condition: callable, timeout: float = 120) -> None:  # type: ignore[valid-type]
    deadline = time.monotonic() + timeout
    while not condition():
        current = state(engine, name)
        if not current["Running"]:
            pytest.fail(
                f"container exited ({current['ExitCode']}) before {what}:\n{images.tail(logs(engine, name), 30)}"
            )
        if time.monotonic() > deadline:
            pytest.fail(f"no {what} within {timeout:.0f} s:\n{images.tail(logs(engine, name), 30)}")
        time.sleep(0.5)


def status_of(url: str) -> int | None:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.RequestException:
        return None


def digit() -> np.ndarray:
    """A real handwritten digit (scikit-learn's, as the digits source writes it): uint8 8x8."""
    from sklearn.datasets import load_digits

    return np.rint(load_digits().images[0] * (255.0 / 16.0)).astype(np.uint8)


# ------------------------------------------------------------------------------------------ train, then serve


@pytest.fixture(scope="module")
def champion(docker_engine: str, train_image: str, mlflow_server: str) -> dict:
    """`visionloop run` (the training image's default command) in a read-only container, as uid 10001."""
    name = f"visionloop-test-train-{uuid.uuid4().hex[:8]}"
    env = {**TINY_TRAINING, "VISIONLOOP_REGISTRY__TRACKING_URI": mlflow_server}
    try:
        started = time.monotonic()
        result = docker(
            docker_engine, "run", "--rm", "--name", name, "--user", "10001:10001", *READ_ONLY, *env_args(env),
            train_image, timeout=900, check=False,
        )  # fmt: skip
        seconds = time.monotonic() - started
    finally:
        docker(docker_engine, "rm", "--force", "--volumes", name, check=False)
    assert result.returncode == 0, (
        f"visionloop run in {train_image} exited {result.returncode}:\n{result.stderr[-4000:]}"
    )
    import mlflow

    version = mlflow.MlflowClient(tracking_uri=mlflow_server).get_model_version_by_alias(MODEL, "champion")
    print(f"\ntraining container: {seconds:.0f} s, champion v{version.version}")
    return {"version": str(version.version), "output": result.stdout + result.stderr}


@pytest.fixture(scope="module")
def serving(docker_engine: str, serve_image: str, mlflow_server: str, champion: dict) -> Iterator[tuple[str, str]]:
    """The serving image against the MLflow server that holds the champion: (base URL, container name)."""
    port = free_port()
    env = {
        "VISIONLOOP_SERVE__HOST": "127.0.0.1",
        "VISIONLOOP_SERVE__PORT": str(port),
        "VISIONLOOP_REGISTRY__TRACKING_URI": mlflow_server,
    }
    url = f"http://127.0.0.1:{port}"
    # docker's own check (the image's HEALTHCHECK) every second instead of every 15 s, so that it turns quickly
    with container(docker_engine, serve_image, env, "--health-interval", "1s") as name:
        wait_for("ready model server", docker_engine, name, lambda: status_of(f"{url}/v2/health/ready") == 200)
        yield url, name


def test_training_container_registers_a_champion(champion: dict):
    assert champion["version"].isdigit()
    assert "Traceback" not in champion["output"], champion["output"][-3000:]


def test_serving_container_answers_v2_and_predict(docker_engine: str, serving: tuple[str, str], champion: dict):
    url, name = serving
    pixels = digit()
    body = {"inputs": [{"name": "input", "shape": [1, 1, 8, 8], "datatype": "UINT8", "data": pixels.ravel().tolist()}]}
    answer = requests.post(f"{url}/v2/models/{MODEL}/infer", json=body, timeout=30)
    assert answer.status_code == 200, answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert outputs["probabilities"]["shape"] == [1, 10]  # the ten digits
    probabilities = np.asarray(outputs["probabilities"]["data"], dtype=np.float64)
    assert probabilities.sum() == pytest.approx(1.0, abs=1e-4)

    png = io.BytesIO()
    Image.fromarray(pixels, "L").save(png, format="PNG")
    predicted = requests.post(f"{url}/predict", files={"file": ("digit.png", png.getvalue())}, timeout=30)
    assert predicted.status_code == 200, predicted.text
    result = predicted.json()
    assert result["model"] == {"name": MODEL, "version": champion["version"]}
    (prediction,) = result["predictions"]
    assert prediction["label"] in [str(d) for d in range(10)] and len(prediction["top_k"]) == 3
    # the same image through both protocols: the same model, the same answer
    assert prediction["confidence"] == pytest.approx(probabilities.max(), abs=1e-5)

    def healthy() -> bool:
        return (state(docker_engine, name).get("Health") or {}).get("Status") == "healthy"

    wait_for("'healthy' from docker's health check", docker_engine, name, healthy, timeout=90)
    assert docker(docker_engine, "exec", name, "id", "-u").stdout.strip() == "10001"


PROBE = """
import importlib, json, os
found = {}
for module in ("torch", "sklearn", "kfp", "onnx", "onnxruntime", "fastapi", "mlflow", "visionloop"):
    try:
        importlib.import_module(module)
        found[module] = True
    except ImportError:
        found[module] = False
print(json.dumps({"uid": os.getuid(), "gid": os.getgid(), "modules": found}))
"""


def probe(engine: str, image: str) -> dict:
    result = docker(engine, "run", "--rm", "--network", "none", "--read-only", "--tmpfs", "/tmp", "--entrypoint",
                    "python", image, "-c", PROBE)  # fmt: skip
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_images_hold_what_they_should_run_as_10001_and_carry_oci_labels(
    docker_engine: str, serve_image: str, train_image: str
):
    serve = probe(docker_engine, serve_image)
    assert (serve["uid"], serve["gid"]) == (10001, 10001)
    leaked = [m for m in ("torch", "sklearn", "kfp", "onnx") if serve["modules"][m]]
    assert not leaked, f"the serving image holds training libraries: {leaked}"
    assert all(serve["modules"][m] for m in ("onnxruntime", "fastapi", "mlflow", "visionloop")), serve
    train = probe(docker_engine, train_image)
    assert (train["uid"], train["gid"]) == (10001, 10001)
    assert all(train["modules"].values()), train

    revision = images.revision(Path(__file__).resolve().parents[2])
    for image, kind in ((serve_image, "serve"), (train_image, "train")):
        config = images.inspect_image(image, docker_engine)["Config"]
        labels = config["Labels"]
        assert all(f"org.opencontainers.image.{key}" in labels for key in OCI), labels
        assert labels["org.opencontainers.image.version"] == __version__
        assert labels["org.opencontainers.image.revision"] == revision
        assert labels["org.opencontainers.image.title"] == f"visionloop-{kind}"
        assert config["User"] == "10001:10001"
        assert config["Entrypoint"] == ["visionloop"]
        assert f"{HOME}" in (config.get("Volumes") or {})
        assert "VISIONLOOP_HOME=/var/lib/visionloop" in config["Env"]
    serve_config = images.inspect_image(serve_image, docker_engine)["Config"]
    train_config = images.inspect_image(train_image, docker_engine)["Config"]
    assert serve_config["Cmd"] == ["serve"] and train_config["Cmd"] == ["run"]
    assert "/healthz" in " ".join(serve_config["Healthcheck"]["Test"])
    assert not train_config.get("Healthcheck")  # a batch job
    assert set(serve_config["ExposedPorts"]) == {"8000/tcp", "8001/tcp", "8002/tcp"}
    assert set(train_config["ExposedPorts"]) == {"5000/tcp"}


def test_both_images_go_to_the_registry_and_come_back_by_digest(
    docker_engine: str, local_registry: str, serve_image: str, train_image: str
):
    pushed = subprocess.run(
        [*VISIONLOOP, "images", "push", "--registry", local_registry, "--kind", "all", "--json"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert pushed.returncode == 0, pushed.stderr
    entries = {entry["kind"]: entry for entry in json.loads(pushed.stdout)}
    assert set(entries) == {"serve", "train"}
    for kind, tag in (("serve", serve_image), ("train", train_image)):
        entry = entries[kind]
        repository, digest = entry["repository"], entry["digest"]
        assert repository == f"{local_registry}/visionloop-{kind}" and images.DIGEST.fullmatch(digest)
        # the registry itself holds the manifest under that digest, and every layer it names
        name = repository.split("/", 1)[1]
        request = urllib.request.Request(
            f"http://{local_registry}/v2/{name}/manifests/{digest}",
            headers={"Accept": "application/vnd.docker.distribution.manifest.v2+json"},
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            manifest = json.loads(response.read())
        for layer in [manifest["config"], *manifest["layers"]]:
            head = urllib.request.Request(f"http://{local_registry}/v2/{name}/blobs/{layer['digest']}", method="HEAD")
            with urllib.request.urlopen(head, timeout=10) as response:
                assert response.status == 200
        built_id = images.inspect_image(tag, docker_engine)["Id"]
        docker(docker_engine, "rmi", f"{repository}:{__version__}")  # the registry tag only: the built tag stays
        assert images.pull_by_digest(repository, digest, docker_engine) == built_id
    serve_size, train_size = images.image_size(serve_image), images.image_size(train_image)
    print("\n" + images.size_summary((serve_image, serve_size), (train_image, train_size)))
    assert serve_size < train_size


# ------------------------------------------------------------------------------------------ bad cases


def _not_ready_case(mlflow_server: str, case: str) -> tuple[dict[str, str], str]:
    if case == "no-model":
        return {"VISIONLOOP_REGISTRY__TRACKING_URI": mlflow_server, "VISIONLOOP_REGISTRY__MODEL_NAME": "absent"}, (
            "no model registered as absent@champion"
        )
    closed = f"http://127.0.0.1:{free_port()}"
    return {"VISIONLOOP_REGISTRY__TRACKING_URI": closed, "VISIONLOOP_REGISTRY__TIMEOUT_SECONDS": "3"}, (
        f"cannot reach the MLflow store at {closed}"
    )


@pytest.mark.parametrize("case", ["no-model", "unreachable-mlflow"])
def test_serving_container_without_a_model_stays_up_not_ready_and_says_why(
    docker_engine: str, serve_image: str, mlflow_server: str, case: str
):
    env, reason = _not_ready_case(mlflow_server, case)
    port = free_port()
    env |= {
        "VISIONLOOP_SERVE__HOST": "127.0.0.1",
        "VISIONLOOP_SERVE__PORT": str(port),
        "VISIONLOOP_SERVE__POLL_SECONDS": "1",
    }
    url = f"http://127.0.0.1:{port}"
    # a restart policy, so that a crash would show as restarts instead of a container that is simply gone
    with container(docker_engine, serve_image, env, "--restart", "on-failure:5") as name:
        wait_for("answer on /healthz", docker_engine, name, lambda: status_of(f"{url}/healthz") == 200)
        # the start-up attempt and at least two polls later, it is still the same process, up and saying why
        wait_for(
            f"'{reason}' three times in the log",
            docker_engine,
            name,
            lambda: logs(docker_engine, name).count(reason) >= 3,
        )
        current = state(docker_engine, name)
        assert current["Running"] and current["Restarting"] is False
        restarts = json.loads(docker(docker_engine, "inspect", "--format", "{{json .RestartCount}}", name).stdout)
        assert restarts == 0
        answer = requests.get(f"{url}/readyz", timeout=5)
        assert answer.status_code == 503
        body = answer.json()
        assert body["ready"] is False and reason in body["status"], body
        assert requests.get(f"{url}/v2/health/ready", timeout=5).status_code != 200
        log = logs(docker_engine, name)
        assert "Traceback" not in log, log[-3000:]


def test_push_to_a_wrong_registry_address_is_one_clear_line():
    closed = f"127.0.0.1:{free_port()}"
    result = subprocess.run(
        [*VISIONLOOP, "images", "push", "--registry", closed], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines == [f"error: cannot reach the registry at {closed}: connection refused"], result.stderr
    assert "Traceback" not in result.stdout + result.stderr


def test_build_without_a_wheelhouse_is_a_clear_error(tmp_path: Path):
    missing_folder = tmp_path / "no-wheels"
    result = subprocess.run(
        [*VISIONLOOP, "images", "build", "--kind", "serve", "--wheelhouse", str(missing_folder)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert lines[0].startswith(f"error: no wheelhouse for the serve image at {missing_folder / 'serve'}"), lines[0]
    assert "visionloop images wheelhouse --kind serve" in lines[0]
