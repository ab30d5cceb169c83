"""The MLflow registry against a real store: registration, the quality gate, history, rollback, loading.

Most tests share one SQLite store (creating MLflow's tables costs seconds) and use a registered-model
name of their own, so none sees another's versions. One test runs a real ``mlflow server``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from registry_stores import closed_port, isolate, make_settings, postgres_database, register, running_server

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


@pytest.fixture(autouse=True)
def _mlflow_env(monkeypatch):
    isolate(monkeypatch)


@pytest.fixture(scope="module")
def store_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("registry-home")


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
    assert registry.alias_version(settings, registry.CHAMPION) is None
    assert registry.aliases_of(settings, "1") == []
    with pytest.raises(RegistryError, match="has no version 1"):
        registry.dataset_version_of(settings, "1")


def test_dataset_version_of_a_registered_version(settings, weak_export):
    version = register(settings, weak_export).version
    assert (
        registry.dataset_version_of(settings, version)
        == read_json(weak_export / "model_card.json")["dataset"]["version"]
    )
    with pytest.raises(RegistryError, match=f"{settings.registry.model_name} has no version 99"):
        registry.dataset_version_of(settings, "99")
    registry.connect(settings).delete_model_version_tag(settings.registry.model_name, version, "dataset_version")
    assert registry.dataset_version_of(settings, version) is None


# ---------------------------------------------------------------- a store that is not there


def test_unreachable_tracking_server_is_a_registry_error(tmp_path, weak_export, test_set):
    # registry.timeout_seconds alone bounds MLflow's HTTP client (no MLFLOW_HTTP_* variables set here)
    uri = f"http://127.0.0.1:{closed_port()}"
    settings = make_settings(tmp_path / "home", tracking_uri=uri, timeout_seconds=3)
    with pytest.raises(RegistryError, match="cannot reach the MLflow store"):
        registry.connect(settings)
    with pytest.raises(RegistryError, match="cannot reach"):
        registry.start_run(settings, "x", {})
    with pytest.raises(RegistryError, match="cannot reach"):
        registry.promote_if_better(settings, "1", *test_set)
    with pytest.raises(RegistryError, match="cannot reach"):
        registry.history(settings)
    # "no champion" is an answer of the store; a store that does not answer is an error, never None
    for call in (
        lambda: registry.alias_version(settings, registry.CHAMPION),
        lambda: registry.aliases_of(settings, "1"),
        lambda: registry.dataset_version_of(settings, "1"),
        lambda: registry.rollback(settings),
        lambda: registry.list_versions(settings),
    ):
        with pytest.raises(RegistryError, match=f"cannot reach the MLflow store at {uri}: Connection refused"):
            call()
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ  # the bounds were the operation's, not the process's


# ---------------------------------------------------------------- a real MLflow tracking server


@pytest.fixture(scope="module")
def postgres_url() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgres"])
def backend_store_uri(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'server.db'}"
    return request.getfixturevalue("postgres_url")


@pytest.mark.slow
def test_register_and_promote_through_a_real_mlflow_server(
    tmp_path, weak_export, strong_export, test_set, accuracy, backend_store_uri
):
    with running_server(backend_store_uri, tmp_path) as server:
        settings = make_settings(tmp_path / "home", name="served-model", tracking_uri=server.url)

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
        assert any(server.artifacts.rglob("model.onnx"))
        assert not (tmp_path / "home").exists()
