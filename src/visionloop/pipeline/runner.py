"""The local runner: the steps in order, in this process, timed, with their outputs handed along."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

from visionloop.config import Settings
from visionloop.pipeline import steps

StageCallback = Callable[[str, float, Any], None]


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run_pipeline(settings: Settings, show_progress: bool = True, on_stage: StageCallback | None = None) -> RunSummary:
    """ingest → validate → preprocess → train → evaluate → export → register → promote."""
    from visionloop import registry

    timings: dict[str, float] = {}
    started = time.perf_counter()

    def stage(name: str, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        timings[name] = time.perf_counter() - t0
        steps.record(settings.home, name, out)
        if on_stage is not None:
            on_stage(name, timings[name], out)
        return out

    ingested = stage("ingest", steps.ingest_step, settings)
    validated = stage("validate", steps.validate_step, ingested, settings, show_progress=show_progress)
    prepared = stage(
        "preprocess", steps.preprocess_step, validated.report_path, ingested, settings, show_progress=show_progress
    )
    work_dir = steps.new_work_dir(settings.home)
    trained = stage("train", steps.train_step, prepared.dataset_dir, settings, work_dir, show_progress=show_progress)
    try:
        evaluated = stage(
            "evaluate",
            steps.evaluate_step,
            trained.model_path,
            prepared.dataset_dir,
            trained.run_id,
            settings,
            work_dir / "evaluation",
        )
        exported = stage(
            "export",
            steps.export_step,
            trained.model_path,
            prepared.dataset_dir,
            evaluated.metrics,
            settings,
            work_dir / "export",
        )
        registered = stage("register", steps.register_step, exported.export_dir, trained.run_id, settings)
        promoted = stage("promote", steps.promote_step, registered.version, prepared.dataset_dir, settings)
    except BaseException:
        registry.set_run_status(trained.run_id, "FAILED")
        raise
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
        aliases=promoted.aliases,
        promoted=promoted.promoted,
        gate_reasons=promoted.reasons,
        champion_version=registry.alias_version(settings, registry.CHAMPION),
        run_id=trained.run_id,
        work_dir=str(work_dir),
        stage_seconds={k: round(v, 3) for k, v in timings.items()},
        total_seconds=round(time.perf_counter() - started, 3),
    )
