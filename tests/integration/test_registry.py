"""The MLflow registry against a real store: registration, the quality gate, history, rollback, loading.

Most tests share one SQLite store (creating MLflow's tables costs seconds) and use a registered-model
name of their own, so none sees another's versions. One test runs a real ``mlflow server``.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from visionloop import registry
from visionloop.config import GateSettings, Settings, TrainSettings, ValidationPolicy
from visionloop.data.preprocess import PreprocessParams, load_dataset, preprocess
from visionloop.data.synthetic import SyntheticSpec, generate
from visionloop.data.validate import validate
from visionloop.errors import RegistryError
from visionloop.fsutil import read_json
from visionloop.inference import OnnxClassifier
from visionloop.training.export import export
from visionloop.training.train import train

_names = itertools.count(1)


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    # the store under test is the one in Settings, never one a developer has configured
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key in [k for k in os.environ if k.startswith("VISIONLOOP_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


@pytest.fixture(scope="module")
def store_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("registry-home")


def make_settings(home: Path, name: str | None = None, tracking_uri: str = "", **gate: float) -> Settings:
    return Settings(
        home=home,
        registry={"model_name": name or f"model-{next(_names)}", "tracking_uri": tracking_uri},
        gate={"min_accuracy": 0.0, **gate},
    )


@pytest.fixture
def settings(store_home) -> Settings:
    """A fresh registered-model name in the shared SQLite store; gate floor 0 unless a test says otherwise."""
    return make_settings(store_home)


@pytest.fixture(scope="module")
def test_set(digits_dataset) -> tuple[np.ndarray, np.ndarray]:
    return digits_dataset.part("test")


@pytest.fixture(scope="module")
def accuracy(test_set, weak_export, medium_export, strong_export) -> dict[str, float]:
    """Test accuracy of each export, measured with ONNX Runtime the way the gate measures it."""
    x, y = test_set
    result = {}
    for name, folder in (("weak", weak_export), ("medium", medium_export), ("strong", strong_export)):
        result[name] = OnnxClassifier.load(folder / "model.onnx", folder / "model_card.json").accuracy(x, y)
    # the scenarios below need a clear ordering; fail loudly here if training ever stops giving one
    assert result["weak"] + 0.1 < result["medium"] < result["strong"] - 0.1, result
    return result


def register(settings: Settings, export_dir: Path) -> registry.RegisteredVersion:
    """What the pipeline's register step does: a run, the model logged into it, a registered version."""
    card = read_json(export_dir / "model_card.json")
    run_id = registry.start_run(settings, "test-run", {"dataset_version": card["dataset"]["version"]})
    tags = {"dataset_version": card["dataset"]["version"], "test_accuracy": "0.123456"}
    version = registry.register_onnx(settings, run_id, export_dir, card, tags)
    registry.set_run_status(run_id, "FINISHED")
    return version


def version_tags(settings: Settings, version: str) -> dict[str, str]:
    client = registry.connect(settings)
    return dict(client.get_model_version(settings.registry.model_name, version).tags)


# ---------------------------------------------------------------- the gate's rule on its own


@pytest.mark.parametrize(
    ("challenger", "champion", "champion_version", "gate", "promoted", "reason"),
    [
        (0.80, None, None, GateSettings(min_accuracy=0.9), False, "below the floor"),
        (0.80, 0.10, "1", GateSettings(min_accuracy=0.9), False, "below the floor"),
        (0.90, None, None, GateSettings(min_accuracy=0.9), True, "no champion"),
        (0.50, None, "3", GateSettings(min_accuracy=0.0), True, "cannot be scored"),
        (0.91, 0.90, "2", GateSettings(min_accuracy=0.5), True, "beats champion v2"),
        (0.90, 0.90, "2", GateSettings(min_accuracy=0.5), False, "does not beat champion v2"),
        (0.89, 0.90, "2", GateSettings(min_accuracy=0.5), False, "does not beat champion v2"),
        (0.92, 0.90, "2", GateSettings(min_accuracy=0.5, min_improvement=0.05), False, ">= 0.0500"),
        (0.95, 0.90, "2", GateSettings(min_accuracy=0.5, min_improvement=0.05), True, "beats champion v2"),
        (0.96, 0.90, "2", GateSettings(min_accuracy=0.5, min_improvement=0.05), True, "beats champion v2"),
        (1.00, 1.00, "2", GateSettings(min_accuracy=0.5, min_improvement=0.0), False, "does not beat"),
    ],
    ids=[
        "floor-no-champion",
        "floor-before-champion",
        "at-floor-no-champion",
        "champion-unscorable",
        "better",
        "tie",
        "worse",
        "better-but-under-margin",
        "better-by-exactly-the-margin",
        "better-by-more-than-margin",
        "tie-at-perfect",
    ],
)
def test_decide(challenger, champion, champion_version, gate, promoted, reason):
    decision, reasons = registry.decide(challenger, champion, champion_version, gate)
    assert decision is promoted
    assert any(reason in r for r in reasons), reasons
    if not reason.startswith("below"):
        assert "clears the floor" in reasons[0]


def test_decide_tie_is_never_promoted_even_with_zero_margin():
    promoted, reasons = registry.decide(0.875, 0.875, "1", GateSettings(min_accuracy=0.0, min_improvement=0.0))
    assert not promoted
    assert "+0.0000" in reasons[-1]


# ---------------------------------------------------------------- registration


def test_register_creates_version_1_with_alias_challenger_and_tags(settings, weak_export, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # artifacts must not land in ./mlruns of whatever folder we run in
    first = register(settings, weak_export)
    assert first.name == settings.registry.model_name
    assert first.version == "1"
    assert first.model_uri and first.run_id
    assert registry.alias_version(settings, registry.CHALLENGER) == "1"
    assert registry.alias_version(settings, registry.CHAMPION) is None
    tags = version_tags(settings, "1")
    card = read_json(weak_export / "model_card.json")
    assert tags["dataset_version"] == card["dataset"]["version"]
    assert tags["test_accuracy"] == "0.123456"
    assert not (tmp_path / "mlruns").exists()
    assert any(settings.artifact_root.rglob("model.onnx"))
    # the card and the PyTorch weights travel with the ONNX model
    assert any(settings.artifact_root.rglob("model_card.json"))
    assert any(settings.artifact_root.rglob("weights.pt"))

    second = register(settings, weak_export)
    assert second.version == "2"
    assert registry.alias_version(settings, registry.CHALLENGER) == "2"  # the alias moves to the newest

    rows = registry.list_versions(settings)
    assert [r["version"] for r in rows] == ["1", "2"]
    assert [r["aliases"] for r in rows] == [[], ["challenger"]]
    assert all(r["dataset_version"] == card["dataset"]["version"] for r in rows)
    assert all(r["test_accuracy"] == "0.123456" and r["gate"] == "" for r in rows)
    assert [r["run_id"] for r in rows] == [first.run_id, second.run_id]
    assert all(r["created"].endswith("+00:00") for r in rows)


def test_registered_version_records_the_run_and_dataset_lineage(settings, weak_export):
    version = register(settings, weak_export)
    client = registry.connect(settings)
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED"
    card = read_json(weak_export / "model_card.json")
    assert run.data.tags["dataset_version"] == card["dataset"]["version"]


def test_register_of_a_folder_without_a_model_is_a_registry_error(settings, weak_export, tmp_path):
    card = read_json(weak_export / "model_card.json")
    run_id = registry.start_run(settings, "broken", {})
    with pytest.raises(RegistryError, match="registering"):
        registry.register_onnx(settings, run_id, tmp_path, card, {})


# ---------------------------------------------------------------- the gate against the store


def test_first_version_is_promoted_when_there_is_no_champion(settings, weak_export, test_set, accuracy):
    version = register(settings, weak_export).version
    decision = registry.promote_if_better(settings, version, *test_set)
    assert decision.promoted
    assert decision.version == "1"
    assert decision.champion_version is None and decision.champion_accuracy is None
    assert decision.challenger_accuracy == pytest.approx(accuracy["weak"])
    assert any("no champion" in r for r in decision.reasons)
    assert registry.alias_version(settings, registry.CHAMPION) == "1"

    tags = version_tags(settings, "1")
    assert tags["gate.decision"] == "promoted"
    assert "no champion" in tags["gate.reasons"]
    assert tags["gate.challenger_accuracy"] == f"{accuracy['weak']:.6f}"
    assert tags["gate.champion_version"] == ""
    assert tags["gate.champion_accuracy"] == ""
    assert tags["gate.time"]

    [event] = registry.history(settings)
    assert (event.seq, event.alias, event.from_version, event.to_version, event.kind) == (
        1,
        "champion",
        None,
        "1",
        "promote",
    )
    assert "no champion" in event.reason
    assert registry.list_versions(settings)[0]["aliases"] == ["challenger", "champion"]
    assert registry.list_versions(settings)[0]["gate"] == "promoted"

    again = registry.promote_if_better(settings, version, *test_set)
    assert not again.promoted
    assert again.reasons == ["v1 is already the champion"]
    assert len(registry.history(settings)) == 1


def test_gate_promotes_better_rejects_worse_and_ties_then_rolls_back(
    settings, weak_export, strong_export, test_set, accuracy
):
    assert registry.promote_if_better(settings, register(settings, weak_export).version, *test_set).promoted

    better = registry.promote_if_better(settings, register(settings, strong_export).version, *test_set)
    assert better.promoted
    assert (better.version, better.champion_version) == ("2", "1")
    assert better.champion_accuracy == pytest.approx(accuracy["weak"])
    assert any("beats champion v1" in r for r in better.reasons)
    assert registry.alias_version(settings, registry.CHAMPION) == "2"
    assert version_tags(settings, "2")["gate.champion_version"] == "1"
    assert version_tags(settings, "2")["gate.champion_accuracy"] == f"{accuracy['weak']:.6f}"

    worse = registry.promote_if_better(settings, register(settings, weak_export).version, *test_set)
    assert not worse.promoted
    assert worse.version == "3"
    assert any("does not beat champion v2" in r for r in worse.reasons)
    assert registry.alias_version(settings, registry.CHAMPION) == "2"
    assert registry.alias_version(settings, registry.CHALLENGER) == "3"
    assert version_tags(settings, "3")["gate.decision"] == "rejected"

    tie = registry.promote_if_better(settings, register(settings, strong_export).version, *test_set)
    assert not tie.promoted
    assert tie.challenger_accuracy == tie.champion_accuracy == pytest.approx(accuracy["strong"])
    assert any("+0.0000" in r for r in tie.reasons)
    assert registry.alias_version(settings, registry.CHAMPION) == "2"

    events = registry.history(settings)
    assert [(e.seq, e.kind, e.from_version, e.to_version) for e in events] == [
        (1, "promote", None, "1"),
        (2, "promote", "1", "2"),
    ]
    assert [r["gate"] for r in registry.list_versions(settings)] == ["promoted", "promoted", "rejected", "rejected"]

    event = registry.rollback(settings, reason="bad canary")
    assert (event.seq, event.alias, event.kind, event.from_version, event.to_version) == (
        3,
        "champion",
        "rollback",
        "2",
        "1",
    )
    assert event.reason.startswith("bad canary")
    assert registry.alias_version(settings, registry.CHAMPION) == "1"
    assert version_tags(settings, "2")["rolled_back"] == "true"
    assert [e.kind for e in registry.history(settings)] == ["promote", "promote", "rollback"]

    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback(settings)
    assert registry.alias_version(settings, registry.CHAMPION) == "1"
    assert len(registry.history(settings)) == 3


def test_consecutive_rollbacks_walk_back_through_earlier_champions(
    settings, weak_export, medium_export, strong_export, test_set, accuracy
):
    for folder in (weak_export, medium_export, strong_export):
        assert registry.promote_if_better(settings, register(settings, folder).version, *test_set).promoted
    assert registry.alias_version(settings, registry.CHAMPION) == "3"
    first = registry.rollback(settings, "first")
    assert (first.from_version, first.to_version, first.kind) == ("3", "2", "rollback")
    assert registry.alias_version(settings, registry.CHAMPION) == "2"
    second = registry.rollback(settings, "second")
    assert (second.from_version, second.to_version, second.kind) == ("2", "1", "rollback")
    assert registry.alias_version(settings, registry.CHAMPION) == "1"
    with pytest.raises(RegistryError, match="no earlier champion"):
        registry.rollback(settings)
    assert [e.seq for e in registry.history(settings)] == [1, 2, 3, 4, 5]


def test_floor_rejects_a_first_version(store_home, strong_export, test_set, accuracy):
    settings = make_settings(store_home, min_accuracy=0.999)
    assert accuracy["strong"] < 0.999
    decision = registry.promote_if_better(settings, register(settings, strong_export).version, *test_set)
    assert not decision.promoted
    assert any("below the floor 0.9990" in r for r in decision.reasons)
    assert registry.alias_version(settings, registry.CHAMPION) is None
    assert registry.history(settings) == []
    assert version_tags(settings, "1")["gate.decision"] == "rejected"
    with pytest.raises(RegistryError, match="no champion to roll back"):
        registry.rollback(settings)


def test_margin_rejects_a_challenger_that_is_better_but_not_by_enough(
    store_home, weak_export, strong_export, test_set, accuracy
):
    settings = make_settings(store_home, min_improvement=1.0)
    assert registry.promote_if_better(settings, register(settings, weak_export).version, *test_set).promoted
    decision = registry.promote_if_better(settings, register(settings, strong_export).version, *test_set)
    assert decision.challenger_accuracy > decision.champion_accuracy
    assert not decision.promoted
    assert any("promotion needs a gain > 0 and >= 1.0000" in r for r in decision.reasons)
    assert registry.alias_version(settings, registry.CHAMPION) == "1"


def test_champion_with_other_classes_cannot_be_scored_and_is_replaced(
    settings, strong_export, test_set, tmp_path, accuracy
):
    """A champion trained on other classes is not scored on this test set; the challenger takes over."""
    raw = tmp_path / "raw"
    generate(SyntheticSpec(classes=3, per_class=20, size=16, channels=1, seed=0), raw)
    params = PreprocessParams(image_size=16, channels=1, val_fraction=0.1, test_fraction=0.2, seed=0)
    shapes = load_dataset(preprocess(validate(raw, ValidationPolicy()), params, tmp_path / "datasets"))
    trained = train(
        shapes, tmp_path / "train", TrainSettings(epochs=1, width=8, depth=2, threads=1), show_progress=False
    )
    export(trained.model_path, shapes, tmp_path / "export", tolerance=1e-4)

    first = register(settings, tmp_path / "export").version
    assert registry.promote_if_better(settings, first, *test_set).promoted
    decision = registry.promote_if_better(settings, register(settings, strong_export).version, *test_set)
    assert decision.promoted
    assert decision.champion_version == "1" and decision.champion_accuracy is None
    assert any("cannot be scored" in r for r in decision.reasons)
    assert registry.alias_version(settings, registry.CHAMPION) == "2"


# ---------------------------------------------------------------- loading


def test_load_classifier_by_alias_and_by_version(settings, weak_export, strong_export, test_set, tmp_path):
    x, y = test_set
    for folder in (weak_export, strong_export):
        registry.promote_if_better(settings, register(settings, folder).version, *test_set)
    local = {
        name: OnnxClassifier.load(folder / "model.onnx", folder / "model_card.json").run(x)[0]
        for name, folder in (("weak", weak_export), ("strong", strong_export))
    }
    for ref, expected in (("1", "weak"), ("2", "strong"), ("champion", "strong"), ("challenger", "strong")):
        classifier = registry.load_classifier(settings, ref, tmp_path / f"dl-{ref}")
        probs, embeddings = classifier.run(x)
        np.testing.assert_array_equal(probs, local[expected])
        assert classifier.card["classes"] == [str(d) for d in range(10)]
        assert embeddings.shape[0] == len(x)
    # without a destination the download goes to a fresh temporary folder
    assert registry.load_classifier(settings, "1").accuracy(x, y) == pytest.approx(
        float((local["weak"].argmax(1) == y).mean())
    )


def test_loading_an_unknown_version_or_alias_is_a_registry_error(settings, weak_export, tmp_path):
    register(settings, weak_export)
    with pytest.raises(RegistryError, match="cannot download"):
        registry.load_classifier(settings, "99", tmp_path / "a")
    with pytest.raises(RegistryError, match="cannot download"):
        registry.load_classifier(settings, "champion", tmp_path / "b")  # no champion yet
    assert registry.alias_version(settings, "no-such-alias") is None


def test_unknown_model_is_a_registry_error(settings):
    with pytest.raises(RegistryError, match="no registered model"):
        registry.history(settings)
    with pytest.raises(RegistryError, match="no registered model"):
        registry.list_versions(settings)
    with pytest.raises(RegistryError, match="no champion"):
        registry.rollback(settings)


# ---------------------------------------------------------------- a store that is not there


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unreachable_tracking_server_is_a_registry_error(tmp_path, weak_export, test_set, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    settings = make_settings(tmp_path / "home", tracking_uri=f"http://127.0.0.1:{closed_port()}")
    with pytest.raises(RegistryError, match="cannot reach the MLflow store"):
        registry.connect(settings)
    with pytest.raises(RegistryError, match="cannot reach"):
        registry.start_run(settings, "x", {})
    with pytest.raises(RegistryError, match="cannot reach"):
        registry.promote_if_better(settings, "1", *test_set)
    with pytest.raises(RegistryError, match="cannot reach"):
        registry.history(settings)


# ---------------------------------------------------------------- a real MLflow tracking server


def wait_for_health(url: str, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    """A real PostgreSQL server on 127.0.0.1 with an empty ``mlflow`` database: the production backend."""
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb is None or postgres is None:
        pytest.skip("PostgreSQL server binaries (initdb, postgres) are not installed")
    import psycopg

    root = Path(tempfile.mkdtemp(prefix="visionloop-pg-", dir="/tmp"))
    # postgres refuses to run as root: as root, the cluster belongs to the unprivileged 'postgres' user
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if run_as:
        shutil.chown(root, "postgres", "postgres")
    subprocess.run(
        [*run_as, initdb, "-D", str(root / "db"), "-U", "mlflow", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    port = closed_port()
    server = subprocess.Popen(
        [
            *run_as,
            postgres,
            "-D",
            str(root / "db"),
            "-p",
            str(port),
            "-k",
            str(root),
            "-c",
            "listen_addresses=127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                connection = psycopg.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres")
                break
            except psycopg.OperationalError:
                assert server.poll() is None, "postgres exited at start"
                assert time.monotonic() < deadline, "postgres did not accept connections within 60 s"
                time.sleep(0.2)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE mlflow")
        connection.close()
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        os.killpg(server.pid, signal.SIGINT)  # postgres' "fast shutdown"
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(params=["sqlite", "postgres"])
def backend_store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'server.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.mark.slow
def test_register_and_promote_through_a_real_mlflow_server(
    tmp_path, weak_export, strong_export, test_set, accuracy, backend_store_uri
):
    port = closed_port()
    artifacts = tmp_path / "server-artifacts"
    log = tmp_path / "server.log"
    command = [
        str(Path(sys.executable).parent / "mlflow"),
        "server",
        "--backend-store-uri",
        backend_store_uri,
        "--serve-artifacts",
        "--artifacts-destination",
        str(artifacts),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--workers",
        "1",
    ]
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    with log.open("wb") as log_file:
        server = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True
        )
    try:
        url = f"http://127.0.0.1:{port}"
        wait_for_health(f"{url}/health", server, log)
        settings = make_settings(tmp_path / "home", name="served-model", tracking_uri=url)

        first = register(settings, weak_export)
        assert first.version == "1"
        assert registry.promote_if_better(settings, first.version, *test_set).promoted
        second = register(settings, strong_export)
        decision = registry.promote_if_better(settings, second.version, *test_set)
        assert decision.promoted and decision.champion_version == "1"
        assert registry.alias_version(settings, registry.CHAMPION) == "2"
        assert [e.to_version for e in registry.history(settings)] == ["1", "2"]
        rolled_back = registry.rollback(settings, "bad canary")
        assert (rolled_back.from_version, rolled_back.to_version) == ("2", "1")
        assert registry.alias_version(settings, registry.CHAMPION) == "1"
        assert [e.kind for e in registry.history(settings)] == ["promote", "promote", "rollback"]
        registry.promote_if_better(settings, second.version, *test_set)  # the gate can promote it again
        champion = registry.load_classifier(settings, "champion", tmp_path / "download")
        assert champion.accuracy(*test_set) == pytest.approx(accuracy["strong"])
        # artifacts went through the server to its destination, not into a local store
        assert any(artifacts.rglob("model.onnx"))
        assert not (tmp_path / "home").exists()
    finally:
        # the server and its workers share the process group we started it in
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=10)
