"""The local runner end to end, twice in one home, on tiny synthetic data, against a real MLflow store."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from visionloop import registry
from visionloop.config import GateSettings, Settings
from visionloop.errors import ExportError
from visionloop.pipeline import steps
from visionloop.pipeline.runner import RunSummary, run_pipeline

pytestmark = pytest.mark.slow

STAGES = ["ingest", "validate", "preprocess", "train", "evaluate", "export", "register", "promote"]


@pytest.fixture(scope="module")
def two_runs(
    tmp_path_factory: pytest.TempPathFactory, module_env: pytest.MonkeyPatch, make_settings: Callable[..., Settings]
) -> dict[str, Any]:
    settings = make_settings(tmp_path_factory.mktemp("runner") / "home")
    seen: list[tuple[str, float, Any, bool]] = []
    first = run_pipeline(settings, show_progress=False, on_stage=lambda *args: seen.append(args))
    # without the step cache an unchanged second run trains and registers again (test_cache.py has the cached one)
    second = run_pipeline(settings, show_progress=False, use_cache=False)
    return {"settings": settings, "first": first, "second": second, "stages_seen": seen}


def _mlflow_client(settings: Settings) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=settings.tracking_uri)


def test_first_run_fills_the_summary_and_promotes(two_runs: dict[str, Any]) -> None:
    settings: Settings = two_runs["settings"]
    first: RunSummary = two_runs["first"]
    assert first.dataset_version.startswith("ds-")
    assert (settings.home / "datasets" / first.dataset_version / "manifest.json").is_file()
    assert first.source == "synthetic"
    assert set(first.images) == {"train", "val", "test"} and sum(first.images.values()) == 90
    assert first.device == "cpu" and first.epochs_run == 2
    # measured on these 90 images: CNN 0.333 after 2 epochs (chance, 3 balanced classes), SVC 0.556
    assert first.test_accuracy >= 1 / 3 - 1e-9 and first.baseline_accuracy >= 0.5
    assert first.baseline_name
    assert first.model_name == settings.registry.model_name
    assert first.model_version == "1"
    assert first.promoted is True
    assert set(first.aliases) == {"champion", "challenger"}
    assert first.champion_version == "1"
    assert any("no champion" in reason for reason in first.gate_reasons)
    assert first.run_id
    assert Path(first.work_dir).is_dir() and Path(first.work_dir).parent == settings.home / "runs"
    assert list(first.stage_seconds) == STAGES
    assert all(seconds >= 0 for seconds in first.stage_seconds.values())
    assert first.total_seconds >= max(first.stage_seconds.values())
    assert first.to_dict()["model_version"] == "1"


def test_on_stage_is_called_once_per_stage_in_order(two_runs: dict[str, Any]) -> None:
    seen = two_runs["stages_seen"]
    assert [name for name, _, _, _ in seen] == STAGES
    assert not any(cached for _, _, _, cached in seen)  # a first run in a new home reuses nothing
    outputs = {name: out for name, _, out, _ in seen}
    assert isinstance(outputs["train"], steps.TrainOutput)
    assert isinstance(outputs["promote"], steps.PromoteOutput)


def test_second_run_on_unchanged_data_ties_and_is_not_promoted(two_runs: dict[str, Any]) -> None:
    first: RunSummary = two_runs["first"]
    second: RunSummary = two_runs["second"]
    assert second.dataset_version == first.dataset_version
    assert second.model_version == "2"
    assert second.run_id != first.run_id
    assert second.work_dir != first.work_dir
    assert second.aliases == ["challenger"]
    # the same seed on CPU trains the same weights: a tie, and a tie does not beat the champion
    assert second.test_accuracy == first.test_accuracy
    assert second.promoted is False
    assert second.champion_version == "1"
    assert len(second.gate_reasons) == 2
    assert "clears the floor" in second.gate_reasons[0]
    assert "does not beat champion v1" in second.gate_reasons[1]


def test_the_registry_agrees_with_the_summaries(two_runs: dict[str, Any]) -> None:
    settings: Settings = two_runs["settings"]
    first, second = two_runs["first"], two_runs["second"]
    rows = registry.list_versions(settings)
    assert [(r["version"], r["aliases"], r["gate"]) for r in rows] == [
        ("1", ["champion"], "promoted"),
        ("2", ["challenger"], "rejected"),
    ]
    assert [r["run_id"] for r in rows] == [first.run_id, second.run_id]
    assert all(r["dataset_version"] == first.dataset_version for r in rows)
    events = registry.history(settings)
    assert [(e.alias, e.from_version, e.to_version, e.kind) for e in events] == [("champion", None, "1", "promote")]


def test_each_stage_output_is_recorded_for_the_next_command(two_runs: dict[str, Any]) -> None:
    home = two_runs["settings"].home
    second: RunSummary = two_runs["second"]
    assert steps.latest(home, "preprocess", steps.PreprocessOutput).dataset_version == second.dataset_version
    assert steps.latest(home, "train", steps.TrainOutput).run_id == second.run_id
    assert steps.latest(home, "register", steps.RegisterOutput).version == "2"
    promoted = steps.latest(home, "promote", steps.PromoteOutput)
    assert (promoted.version, promoted.promoted) == ("2", False)


@pytest.mark.parametrize("which", ["first", "second"])
def test_mlflow_run_is_finished_with_the_dataset_as_input(two_runs: dict[str, Any], which: str) -> None:
    summary: RunSummary = two_runs[which]
    run = _mlflow_client(two_runs["settings"]).get_run(summary.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["dataset_version"] == summary.dataset_version
    assert run.data.params["dataset_version"] == summary.dataset_version
    assert run.data.metrics["test_accuracy"] == pytest.approx(summary.test_accuracy)
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1
    assert inputs[0].dataset.name == summary.dataset_version
    assert inputs[0].dataset.digest == summary.dataset_version
    assert {t.key: t.value for t in inputs[0].tags}.get("mlflow.data.context") == "training"


def test_a_stage_that_fails_after_training_marks_the_run_failed(
    tiny_settings: Callable[..., Settings],
) -> None:
    # no ONNX export can match PyTorch to within 1e-300, so export refuses and nothing is registered
    settings = tiny_settings(gate=GateSettings(min_accuracy=0.0, parity_tolerance=1e-300))
    with pytest.raises(ExportError, match="parity_tolerance"):
        run_pipeline(settings, show_progress=False)
    run_id = steps.latest(settings.home, "train", steps.TrainOutput).run_id
    client = _mlflow_client(settings)
    assert client.get_run(run_id).info.status == "FAILED"
    assert client.search_model_versions(f"name='{settings.registry.model_name}'") == []
    assert not (settings.home / "latest" / "export.json").exists()
