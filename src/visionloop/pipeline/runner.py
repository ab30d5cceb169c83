"""The local runner: the steps in order, in this process, timed, with their outputs handed along and cached."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from visionloop.config import Settings
from visionloop.pipeline import steps
from visionloop.pipeline.cache import StepCache, folder_fingerprint

# (stage name, seconds, its output, whether the output was reused from the cache)
StageCallback = Callable[[str, float, Any, bool], None]


@dataclass
class RunSummary:
    dataset_version: str
    source: str
    images: dict[str, int]
    device: str
    epochs_run: int
    test_accuracy: float
    baseline_name: str
    baseline_accuracy: float
    model_name: str
    model_version: str
    aliases: list[str]
    promoted: bool
    gate_reasons: list[str]
    champion_version: str | None
    run_id: str
    work_dir: str
    stage_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    cached_steps: list[str] = field(default_factory=list)  # reused from an earlier run, not run again

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_pipeline(
    settings: Settings, show_progress: bool = True, on_stage: StageCallback | None = None, use_cache: bool = True
) -> RunSummary:
    """ingest → validate → preprocess → train → evaluate → export → register → promote.

    Steps whose inputs, parameters and code are unchanged since a successful earlier run are not run
    again: their recorded outputs are reused (see ``pipeline/cache.py``), so an unchanged second run
    trains and registers nothing. ``use_cache=False`` runs every step (and refreshes the cache).
    Ingest always runs: it is what notices that the data changed.
    """
    from visionloop import registry

    cache = StepCache(settings.home, enabled=use_cache)
    timings: dict[str, float] = {}
    cached: list[str] = []
    started = time.perf_counter()

    def stage(
        name: str,
        run: Callable[[], Any],
        cls: type | None = None,
        key: str | None = None,
        files: Callable[[Any], list[Path]] = lambda _out: [],
        still_valid: Callable[[Any], bool] = lambda _out: True,
    ) -> Any:
        t0 = time.perf_counter()
        hit = cache.lookup(name, key) if key is not None else None
        out = steps.from_json(cls, hit.output) if hit is not None and cls is not None else None
        if out is not None and still_valid(out):
            cached.append(name)
        else:
            out = run()
            if key is not None:
                cache.store(name, key, steps.as_json(out), files(out))
        timings[name] = time.perf_counter() - t0
        steps.record(settings.home, name, out)
        if on_stage is not None:
            on_stage(name, timings[name], out, name in cached)
        return out

    ingested = stage("ingest", lambda: steps.ingest_step(settings))
    validate_key = cache.key("validate", folder_fingerprint(ingested.root), settings.validation.model_dump())
    validated = stage(
        "validate",
        lambda: steps.validate_step(ingested, settings, show_progress=show_progress),
        steps.ValidateOutput,
        validate_key,
        files=lambda out: [out.report_path],
    )
    data = settings.data.model_dump(include={"image_size", "channels", "val_fraction", "test_fraction", "split_seed"})
    preprocess_key = cache.key("preprocess", steps.as_json(validated), data, ingested.source, ingested.hflip_ok)
    prepared = stage(
        "preprocess",
        lambda: steps.preprocess_step(validated.report_path, ingested, settings, show_progress=show_progress),
        steps.PreprocessOutput,
        preprocess_key,
        files=lambda out: [out.dataset_dir / "data.npz", out.dataset_dir / "manifest.json"],
    )
    store = (settings.tracking_uri, settings.registry.experiment)
    train_key = cache.key("train", prepared.dataset_version, settings.train.model_dump(), settings.data.hflip, store)
    trained = stage(
        "train",
        lambda: steps.train_step(
            prepared.dataset_dir, settings, steps.new_work_dir(settings.home), show_progress=show_progress
        ),
        steps.TrainOutput,
        train_key,
        files=lambda out: [out.model_path],
    )
    work_dir = trained.work_dir
    try:
        # a step's key holds its inputs' outputs: a step that ran again (new MLflow run, new model) changes them
        evaluate_key = cache.key("evaluate", steps.as_json(trained))
        evaluated = stage(
            "evaluate",
            lambda: steps.evaluate_step(
                trained.model_path, prepared.dataset_dir, trained.run_id, settings, work_dir / "evaluation"
            ),
            steps.EvaluateOutput,
            evaluate_key,
            files=lambda out: [out.metrics_path],
        )
        export_key = cache.key("export", steps.as_json(evaluated), train_key, settings.gate.parity_tolerance)
        exported = stage(
            "export",
            lambda: steps.export_step(
                trained.model_path, prepared.dataset_dir, evaluated.metrics, settings, work_dir / "export"
            ),
            steps.ExportOutput,
            export_key,
            files=lambda out: [out.export_dir / "model.onnx", out.export_dir / "model_card.json"],
        )
        register_key = cache.key(
            "register", steps.as_json(exported), trained.run_id, store, settings.registry.model_name
        )
        registered = stage(
            "register",
            lambda: steps.register_step(exported.export_dir, trained.run_id, settings),
            steps.RegisterOutput,
            register_key,
            # the registry is outside the cache: the version must still be there
            still_valid=lambda out: registry.resolve(settings, out.version) == out.version,
        )
        promoted = stage(
            "promote",
            lambda: steps.promote_step(registered.version, prepared.dataset_dir, settings),
            steps.PromoteOutput,
            cache.key("promote", steps.as_json(registered), settings.gate.model_dump()),
            # the decision stands while the champion is still what it left behind (no rollback since)
            still_valid=lambda out: (
                registry.resolve(settings, registry.CHAMPION) == (out.version if out.promoted else out.champion_version)
            ),
        )
    except BaseException:
        if "train" not in cached:  # a reused run finished long ago; it is not this run's to fail
            registry.set_run_status(trained.run_id, "FAILED")
        raise
    if "train" not in cached:
        registry.set_run_status(trained.run_id, "FINISHED")
    return RunSummary(
        dataset_version=prepared.dataset_version,
        source=ingested.source,
        images=prepared.counts,
        device=trained.device,
        epochs_run=trained.epochs_run,
        test_accuracy=evaluated.test_accuracy,
        baseline_name=evaluated.baseline_name,
        baseline_accuracy=evaluated.baseline_accuracy,
        model_name=registered.model_name,
        model_version=registered.version,
        aliases=registry.aliases_of(settings, registered.version),  # now, even when the decision was cached
        promoted=promoted.promoted,
        gate_reasons=promoted.reasons,
        champion_version=registry.alias_version(settings, registry.CHAMPION),
        run_id=trained.run_id,
        work_dir=str(work_dir),
        stage_seconds={k: round(v, 3) for k, v in timings.items()},
        total_seconds=round(time.perf_counter() - started, 3),
        cached_steps=cached,
    )
