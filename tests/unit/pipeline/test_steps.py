"""The step functions, chained by hand on tiny synthetic data in a temporary home.

Real files, a real MLflow store (SQLite under the home), real training: nothing is mocked.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

from visionloop.config import DataSettings, Settings
from visionloop.data.sources import IngestResult
from visionloop.errors import DataError, VisionloopError
from visionloop.pipeline import steps

pytestmark = pytest.mark.slow

STEP_TYPES: dict[str, type] = {
    "validate": steps.ValidateOutput,
    "preprocess": steps.PreprocessOutput,
    "train": steps.TrainOutput,
    "evaluate": steps.EvaluateOutput,
    "export": steps.ExportOutput,
    "register": steps.RegisterOutput,
    "promote": steps.PromoteOutput,
}


@pytest.fixture(scope="module")
def chain(
    tmp_path_factory: pytest.TempPathFactory, module_env: pytest.MonkeyPatch, make_settings: Callable[..., Settings]
) -> dict[str, Any]:
    """ingest → validate → preprocess → train → evaluate → export → register → promote, by hand."""
    settings = make_settings(tmp_path_factory.mktemp("steps") / "home")
    out: dict[str, Any] = {"settings": settings}
    out["ingest"] = steps.ingest_step(settings)
    out["validate"] = steps.validate_step(out["ingest"], settings)
    out["preprocess"] = steps.preprocess_step(out["validate"].report_path, out["ingest"], settings)
    work_dir = steps.new_work_dir(settings.home)
    out["train"] = steps.train_step(out["preprocess"].dataset_dir, settings, work_dir, show_progress=False)
    trained = out["train"]
    out["evaluate"] = steps.evaluate_step(
        trained.model_path, trained.dataset_dir, trained.run_id, settings, work_dir / "evaluation"
    )
    out["export"] = steps.export_step(
        trained.model_path, trained.dataset_dir, out["evaluate"].metrics, settings, work_dir / "export"
    )
    out["register"] = steps.register_step(out["export"].export_dir, trained.run_id, settings)
    out["promote"] = steps.promote_step(out["register"].version, trained.dataset_dir, settings)
    return out


def test_data_steps_return_typed_outputs(chain: dict[str, Any]) -> None:
    settings: Settings = chain["settings"]
    ingested = chain["ingest"]
    assert isinstance(ingested, IngestResult)
    assert (ingested.source, ingested.kind, ingested.num_files) == ("synthetic", "synthetic", 90)
    assert len(ingested.classes) == 3
    assert ingested.root.is_dir() and ingested.root.is_relative_to(settings.home)

    validated = chain["validate"]
    assert isinstance(validated, steps.ValidateOutput)
    assert validated.passed and validated.errors == []
    assert (validated.usable, validated.bad) == (90, 0)
    assert validated.classes == ingested.classes
    assert isinstance(validated.report_path, Path) and validated.report_path.is_file()
    assert (validated.report_path.parent / "report.md").is_file()

    prepared = chain["preprocess"]
    assert isinstance(prepared, steps.PreprocessOutput)
    assert isinstance(prepared.dataset_dir, Path)
    assert (prepared.dataset_dir / "manifest.json").is_file() and (prepared.dataset_dir / "data.npz").is_file()
    assert prepared.dataset_dir.parent == settings.home / "datasets"
    assert prepared.dataset_version.startswith("ds-") and prepared.dataset_dir.name == prepared.dataset_version
    assert (prepared.image_size, prepared.channels) == (16, 3)  # picked from the data
    assert set(prepared.counts) == {"train", "val", "test"}
    assert sum(prepared.counts.values()) == 90 and all(n > 0 for n in prepared.counts.values())
    assert prepared.hflip_ok is True  # synthetic shapes may be mirrored


def test_preprocess_again_gives_the_same_dataset_version(chain: dict[str, Any]) -> None:
    again = steps.preprocess_step(chain["validate"].report_path, chain["ingest"], chain["settings"])
    assert again == chain["preprocess"]


def test_model_steps_return_typed_outputs(chain: dict[str, Any]) -> None:
    settings: Settings = chain["settings"]
    prepared = chain["preprocess"]

    trained = chain["train"]
    assert isinstance(trained, steps.TrainOutput)
    assert trained.model_path.is_file() and trained.model_path.is_relative_to(trained.work_dir)
    assert trained.work_dir.parent == settings.home / "runs"
    assert trained.dataset_dir == prepared.dataset_dir
    assert trained.run_id and trained.device == "cpu"
    assert trained.epochs_run == 2 and 1 <= trained.best_epoch <= 2
    assert 0.0 <= trained.best_val_accuracy <= 1.0
    assert trained.parameters > 0 and trained.images_per_second > 0
    assert trained.resumed_from_epoch is None
    started = json.loads((settings.home / "latest" / "train_started.json").read_text())
    assert started == {
        "run_id": trained.run_id,
        "work_dir": str(trained.work_dir),
        "dataset_dir": str(prepared.dataset_dir),
    }

    evaluated = chain["evaluate"]
    assert isinstance(evaluated, steps.EvaluateOutput)
    assert evaluated.metrics_path.is_file()
    # measured on these 90 images: CNN 0.333 after 2 epochs (chance, 3 balanced classes), SVC 0.556
    assert evaluated.test_accuracy >= 1 / 3 - 1e-9 and evaluated.baseline_accuracy >= 0.5
    assert evaluated.baseline_name
    assert evaluated.metrics["test_accuracy"] == evaluated.test_accuracy
    assert evaluated.metrics["baseline_test_accuracy"] == evaluated.baseline_accuracy

    exported = chain["export"]
    assert isinstance(exported, steps.ExportOutput)
    for name in ("model.onnx", "model_card.json", "model_card.md", "weights.pt"):
        assert (exported.export_dir / name).is_file(), name
    assert 0.0 <= exported.max_abs_diff <= settings.gate.parity_tolerance
    assert exported.parity_images == prepared.counts["test"]

    registered = chain["register"]
    assert isinstance(registered, steps.RegisterOutput)
    assert registered.model_name == settings.registry.model_name
    assert registered.version == "1"
    assert registered.run_id == trained.run_id
    assert registered.model_uri

    promoted = chain["promote"]
    assert isinstance(promoted, steps.PromoteOutput)
    assert promoted.version == "1" and promoted.promoted is True
    assert promoted.champion_version is None and promoted.champion_accuracy is None
    # the gate scores the ONNX model on the same test split as evaluate scored the PyTorch one
    assert promoted.challenger_accuracy == pytest.approx(evaluated.test_accuracy)
    assert any("no champion" in reason for reason in promoted.reasons)
    assert set(promoted.aliases) == {"champion", "challenger"}


def test_promote_step_on_the_champion_itself_changes_nothing(chain: dict[str, Any]) -> None:
    again = steps.promote_step("1", chain["preprocess"].dataset_dir, chain["settings"])
    assert again.promoted is False
    assert again.champion_version == "1"
    assert again.reasons == ["v1 is already the champion"]
    assert set(again.aliases) == {"champion", "challenger"}


def test_record_and_latest_round_trip(chain: dict[str, Any], tmp_path: Path) -> None:
    home = tmp_path / "elsewhere"
    for step, cls in STEP_TYPES.items():
        steps.record(home, step, chain[step])
        assert (home / "latest" / f"{step}.json").is_file()
        back = steps.latest(home, step, cls)
        assert type(back) is cls
        assert back == chain[step], step
        for name in cls.model_fields:  # paths come back as paths, not strings
            assert type(getattr(back, name)) is type(getattr(chain[step], name)), (step, name)
    # ingest hands over its own model, through the raw JSON
    steps.record(home, "ingest", chain["ingest"])
    assert IngestResult.from_dict(steps.latest_raw(home, "ingest")) == chain["ingest"]


@pytest.mark.parametrize(
    ("step", "command"),
    [
        ("ingest", "visionloop data ingest"),
        ("validate", "visionloop data validate"),
        ("preprocess", "visionloop data preprocess"),
        ("train", "visionloop train"),
        ("evaluate", "visionloop evaluate"),
        ("export", "visionloop export"),
        ("register", "visionloop register"),
        ("promote", "visionloop promote"),
    ],
)
def test_latest_of_a_step_that_never_ran_names_the_command(tmp_path: Path, step: str, command: str) -> None:
    with pytest.raises(VisionloopError) as caught:
        steps.latest(tmp_path / "home", step, STEP_TYPES.get(step, dict))
    assert f"`{command}`" in str(caught.value)
    assert step in str(caught.value)


def _single_class(make_image_folder: Callable[..., Path], tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "one-class", classes=("only",), per_class=8)


def _not_images(make_image_folder: Callable[..., Path], tmp_path: Path) -> Path:
    root = tmp_path / "not-images"
    for label in ("a", "b"):
        for i in range(8):
            path = root / label / f"{label}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"this is text number {i} of {label}, not a PNG\n")
    return root


@pytest.mark.parametrize(
    ("make_source", "problem"),
    [(_single_class, "at least 2 classes"), (_not_images, "not usable images")],
    ids=["single-class", "not-images"],
)
def test_validate_step_raises_data_error_and_still_writes_the_report(
    tiny_settings: Callable[..., Settings],
    make_image_folder: Callable[..., Path],
    tmp_path: Path,
    make_source: Callable[..., Path],
    problem: str,
) -> None:
    source = make_source(make_image_folder, tmp_path)
    settings = tiny_settings(data=DataSettings(source=str(source)))
    ingested = steps.ingest_step(settings)
    assert ingested.kind == "folder"

    with pytest.raises(DataError) as caught:
        steps.validate_step(ingested, settings)
    message = str(caught.value)
    assert message.startswith("validation failed") and problem in message

    reports = list((settings.home / "reports").glob("*/report.json"))
    assert len(reports) == 1
    report = json.loads(reports[0].read_text())
    assert report["passed"] is False
    assert any(problem in e for e in report["errors"])
    markdown = reports[0].with_name("report.md")
    assert "FAILED" in markdown.read_text()
    assert str(markdown) in message  # the error says where to read more
    # nothing downstream of a failed validation exists
    assert not (settings.home / "datasets").exists()
    assert not (settings.home / "latest" / "validate.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA to make training fail")
def test_a_training_failure_marks_the_mlflow_run_failed(tiny_settings: Callable[..., Settings]) -> None:
    from visionloop import registry
    from visionloop.config import TrainSettings
    from visionloop.errors import TrainingError

    settings = tiny_settings()
    ingested = steps.ingest_step(settings)
    validated = steps.validate_step(ingested, settings)
    prepared = steps.preprocess_step(validated.report_path, ingested, settings)
    failing = settings.model_copy(update={"train": TrainSettings(epochs=1, device="cuda", threads=1)})
    with pytest.raises(TrainingError, match="no CUDA device"):
        steps.train_step(prepared.dataset_dir, failing, steps.new_work_dir(settings.home), show_progress=False)
    run_id = json.loads((settings.home / "latest" / "train_started.json").read_text())["run_id"]
    registry.connect(settings)
    assert registry._mlflow().MlflowClient().get_run(run_id).info.status == "FAILED"
