"""Step caching in the local runner: unchanged steps are reused, changed or damaged ones run again."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from visionloop import registry
from visionloop.config import Settings, TrainSettings
from visionloop.pipeline.cache import StepCache, code_version, folder_fingerprint
from visionloop.pipeline.runner import RunSummary, run_pipeline

pytestmark = pytest.mark.slow

CACHEABLE = ["validate", "preprocess", "train", "evaluate", "export", "register", "promote"]


def runs_of(settings: Settings) -> list[Any]:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.registry.experiment)
    return client.search_runs([experiment.experiment_id])


def run(settings: Settings, **kwargs: Any) -> tuple[RunSummary, dict[str, bool]]:
    cached: dict[str, bool] = {}
    summary = run_pipeline(
        settings, show_progress=False, on_stage=lambda name, _s, _o, hit: cached.__setitem__(name, hit), **kwargs
    )
    return summary, cached


def test_unchanged_second_run_reuses_every_step_and_registers_nothing(tiny_settings: Callable[..., Settings]):
    settings = tiny_settings()
    first, first_hits = run(settings)
    assert not any(first_hits.values()) and first.cached_steps == []
    second, second_hits = run(settings)
    assert second.cached_steps == CACHEABLE
    assert second_hits == {"ingest": False, **dict.fromkeys(CACHEABLE, True)}  # ingest always looks at the data
    assert (second.model_version, second.run_id, second.work_dir) == (first.model_version, first.run_id, first.work_dir)
    assert second.test_accuracy == first.test_accuracy
    assert [v["version"] for v in registry.list_versions(settings)] == ["1"]
    assert len(runs_of(settings)) == 1
    assert second.aliases == ["champion", "challenger"] and second.champion_version == "1"


def test_no_cache_runs_everything_and_registers_a_challenger(tiny_settings: Callable[..., Settings]):
    settings = tiny_settings()
    run(settings)
    again, hits = run(settings, use_cache=False)
    assert again.cached_steps == [] and not any(hits.values())
    assert again.model_version == "2" and again.aliases == ["challenger"]
    # and the cache now holds the fresh outputs: a third run reuses v2's steps
    third, _ = run(settings)
    assert third.cached_steps == CACHEABLE and third.model_version == "2"


def test_a_changed_setting_reruns_its_step_and_everything_after_it(tiny_settings: Callable[..., Settings]):
    settings = tiny_settings()
    first, _ = run(settings)
    longer = tiny_settings(train=TrainSettings(epochs=3, width=8, depth=2, batch_size=32, threads=1))
    second, _ = run(longer)
    assert second.cached_steps == ["validate", "preprocess"]
    assert second.epochs_run == 3 and second.model_version == "2"
    assert second.dataset_version == first.dataset_version


@pytest.mark.parametrize(
    ("damage", "rerun", "new_version"),
    [
        # the model is gone: train runs again, and so does everything that used it (a new MLflow run)
        ("delete-model", ["train", "evaluate", "export", "register", "promote"], True),
        # the dataset is rebuilt from the validated files; same content, same version: the rest stands
        ("truncate-dataset", ["preprocess"], False),
        # the export is written again, identical; the registry holds its own copy, so nothing is re-registered
        ("corrupt-onnx", ["export"], False),
    ],
)
def test_a_missing_or_corrupted_cached_output_is_detected_and_recomputed(
    tiny_settings: Callable[..., Settings], damage: str, rerun: list[str], new_version: bool
):
    settings = tiny_settings()
    first, _ = run(settings)
    work = Path(first.work_dir)
    dataset = settings.home / "datasets" / first.dataset_version / "data.npz"
    onnx = work / "export" / "model.onnx"
    if damage == "delete-model":
        (work / "train" / "model.pt").unlink()
    elif damage == "truncate-dataset":
        dataset.write_bytes(dataset.read_bytes()[:100])
    else:
        onnx.write_bytes(onnx.read_bytes()[:-10] + b"0123456789")
    second, hits = run(settings)
    assert [step for step in CACHEABLE if not hits[step]] == rerun
    assert second.model_version == ("2" if new_version else "1")
    assert dataset.stat().st_size > 100 and onnx.is_file()
    third, _ = run(settings)  # and everything is intact again
    assert third.cached_steps == CACHEABLE


def test_a_rolled_back_champion_makes_the_gate_judge_again(tiny_settings: Callable[..., Settings]):
    settings = tiny_settings()
    run(settings)
    run(settings, use_cache=False)  # v2: a tie, challenger only
    import mlflow

    # the champion moves without a new version being registered (as an operator's alias edit would)

    mlflow.MlflowClient(tracking_uri=settings.tracking_uri).delete_registered_model_alias(
        settings.registry.model_name, "champion"
    )
    third, hits = run(settings)
    assert hits["register"] is True and hits["promote"] is False  # the decision no longer describes the registry
    assert third.promoted is True and third.champion_version == "2"


def test_a_registered_version_deleted_from_the_registry_is_registered_again(tiny_settings: Callable[..., Settings]):
    settings = tiny_settings()
    run(settings)
    import mlflow

    mlflow.MlflowClient(tracking_uri=settings.tracking_uri).delete_model_version(settings.registry.model_name, "1")
    second, hits = run(settings)
    assert hits["export"] is True and hits["register"] is False
    assert second.model_version == "2"


def test_store_and_lookup(tmp_path: Path):
    cache = StepCache(tmp_path / "home")
    output = tmp_path / "out.bin"
    output.write_bytes(b"abc")
    key = cache.key("step", {"a": 1}, "x")
    assert key == cache.key("step", {"a": 1}, "x") and key != cache.key("step", {"a": 2}, "x")
    assert cache.lookup("step", key) is None
    cache.store("step", key, {"path": str(output)}, [output])
    hit = cache.lookup("step", key)
    assert hit is not None and hit.output == {"path": str(output)}
    assert StepCache(tmp_path / "home", enabled=False).lookup("step", key) is None
    output.write_bytes(b"abd")
    assert cache.lookup("step", key) is None  # changed output: invalid, and the entry is dropped
    assert not list((tmp_path / "home" / "cache" / "steps").iterdir())


def test_fingerprints(tmp_path: Path):
    assert len(code_version()) == 16
    root = tmp_path / "data"
    (root / "a").mkdir(parents=True)
    (root / "a" / "x.png").write_bytes(b"1")
    before = folder_fingerprint(root)
    assert folder_fingerprint(root) == before
    (root / "a" / "y.png").write_bytes(b"2")
    assert folder_fingerprint(root) != before
