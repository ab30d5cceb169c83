"""The pipeline's steps: plain functions with typed inputs (paths, small values) and typed outputs.

The stage commands, the local runner, the Kubeflow components and the tests call exactly these
functions; nothing here knows who called it. Which step feeds which, and everything else about
running them, is declared once in ``pipeline/dataflow.py``. Each output is a pydantic model, so there
is one serialiser for all of them (``as_json`` / ``from_json``), and a later step or a later command
picks it up from ``<home>/latest/<step>.json``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from visionloop.config import Settings
from visionloop.data.preprocess import PreprocessParams, load_dataset, load_manifest, preprocess
from visionloop.data.sources import IngestResult, ingest
from visionloop.data.synthetic import SyntheticSpec
from visionloop.data.validate import ValidationReport, load_report, validate, write_report
from visionloop.errors import DataError, RegistryError, VisionloopError
from visionloop.fsutil import atomic_write_json, read_json
from visionloop.registry import GateDecision

Output = TypeVar("Output", bound=BaseModel)


class StepOutput(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ValidateOutput(StepOutput):
    report_path: Path
    passed: bool
    usable: int
    bad: int
    classes: list[str]
    errors: list[str]
    warnings: list[str]


class PreprocessOutput(StepOutput):
    dataset_dir: Path
    dataset_version: str
    image_size: int
    channels: int
    counts: dict[str, int]
    hflip_ok: bool


class TrainOutput(StepOutput):
    model_path: Path
    run_id: str
    work_dir: Path
    dataset_dir: Path  # the input, handed on: evaluate, export and promote use the data the model was trained on
    device: str
    epochs_run: int
    best_epoch: int
    best_val_accuracy: float
    images_per_second: float
    parameters: int
    resumed_from_epoch: int | None


class EvaluateOutput(StepOutput):
    metrics_path: Path
    test_accuracy: float
    baseline_name: str
    baseline_accuracy: float
    macro_f1: float
    ece: float
    metrics: dict[str, float] = Field(default_factory=dict)


class ExportOutput(StepOutput):
    export_dir: Path
    max_abs_diff: float
    parity_images: int


class RegisterOutput(StepOutput):
    model_name: str
    version: str
    model_uri: str
    run_id: str


class PromoteOutput(GateDecision, StepOutput):
    """The gate's decision, plus the aliases the judged version holds afterwards."""

    model_name: str = ""
    aliases: list[str] = Field(default_factory=list)


# ---------------------------------------------------------------- hand-over between commands


def as_json(output: BaseModel) -> dict[str, Any]:
    return output.model_dump(mode="json")


def from_json(cls: type[Output], data: dict[str, Any]) -> Output:
    """Rebuild a step output written by ``as_json`` (paths become Paths again)."""
    return cls.model_validate(data)


def record(home: Path, step: str, output: BaseModel) -> None:
    atomic_write_json(home / "latest" / f"{step}.json", as_json(output))


def latest_raw(home: Path, step: str) -> dict[str, Any]:
    path = home / "latest" / f"{step}.json"
    if not path.is_file():
        command = {"ingest": "data ingest", "validate": "data validate", "preprocess": "data preprocess"}.get(
            step, step
        )
        raise VisionloopError(
            f"no earlier `{step}` output under {home}: run `visionloop {command}` first (or `visionloop run`)"
        )
    return read_json(path)


def latest(home: Path, step: str, cls: type[Output]) -> Output:
    return from_json(cls, latest_raw(home, step))


def new_work_dir(home: Path) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = home / "runs" / f"{stamp}-{secrets.token_hex(3)}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextmanager
def run_status(run_id: str, finish: bool = True) -> Iterator[None]:
    """The one owner of an MLflow run's status around work done in it.

    An error marks the run FAILED, Ctrl-C or SIGTERM (KeyboardInterrupt) KILLED; success marks it
    FINISHED unless ``finish`` is False (a runner that goes on to the next step in the same run).
    Whatever ran first in the run — a stage command, ``visionloop run``, a KFP component, rank 0 under
    torchrun — the run never stays RUNNING once the process has stopped working in it.
    """
    from visionloop import registry

    try:
        yield
    except KeyboardInterrupt:
        _set_status_quietly(registry, run_id, "KILLED")  # `train --resume` sets it RUNNING again
        raise
    except BaseException:
        _set_status_quietly(registry, run_id, "FAILED")
        raise
    if finish:
        registry.set_run_status(run_id, "FINISHED")


def _set_status_quietly(registry: Any, run_id: str, status: str) -> None:
    # the store may be what failed: the step's own error is the one to report
    with suppress(Exception):
        registry.set_run_status(run_id, status)


# ---------------------------------------------------------------- the steps


def ingest_step(settings: Settings) -> IngestResult:
    data = settings.data
    spec = SyntheticSpec(
        classes=data.synthetic_classes,
        per_class=data.synthetic_per_class,
        size=data.synthetic_size,
        channels=data.synthetic_channels,
        seed=data.split_seed,
    )
    return ingest(data.source, settings.home, synthetic=spec, hflip=data.hflip, limits=data)


def validate_step(ingested: IngestResult, settings: Settings, show_progress: bool = False) -> ValidateOutput:
    report = validate(ingested.root, settings.validation, show_progress=show_progress)
    key = hashlib.sha256(str(ingested.root).encode()).hexdigest()[:12]
    report_path = write_report(report, settings.home / "reports" / key)
    if not report.passed:
        raise DataError(f"validation failed: {'; '.join(report.errors)} (report: {report_path.parent / 'report.md'})")
    return ValidateOutput(
        report_path=report_path,
        passed=report.passed,
        usable=len(report.files),
        bad=len(report.bad_files),
        classes=report.classes,
        errors=report.errors,
        warnings=report.warnings,
    )


def preprocess_step(
    report_path: Path, ingested: IngestResult, settings: Settings, show_progress: bool = False
) -> PreprocessOutput:
    report: ValidationReport = load_report(report_path)
    # the images are where ingest put them in this process (a Kubeflow pod has its own copy), not
    # necessarily where the report was written
    report.root = str(ingested.root)
    params = PreprocessParams(
        image_size=settings.data.image_size,
        channels=settings.data.channels,
        val_fraction=settings.data.val_fraction,
        test_fraction=settings.data.test_fraction,
        seed=settings.data.split_seed,
    )
    folder = preprocess(
        report,
        params,
        settings.home / "datasets",
        source=ingested.source,
        hflip_ok=ingested.hflip_ok,
        show_progress=show_progress,
    )
    manifest = load_manifest(folder)
    counts = {split: sum(per_class.values()) for split, per_class in manifest.counts.items()}
    return PreprocessOutput(
        dataset_dir=folder,
        dataset_version=manifest.version,
        image_size=manifest.image_size,
        channels=manifest.channels,
        counts=counts,
        hflip_ok=manifest.hflip_ok,
    )


def train_step(
    dataset_dir: Path,
    settings: Settings,
    work_dir: Path | None = None,
    resume_run_id: str | None = None,
    show_progress: bool = True,
    finish_run: bool = True,
    run_tags: dict[str, str] | None = None,
) -> TrainOutput:
    """Train with MLflow tracking; ``resume_run_id`` continues an interrupted run from its checkpoint;
    ``run_tags`` go on a new run (the closed loop's run id, trigger and reason).

    The run ends FINISHED (or stays RUNNING with ``finish_run=False``, for the steps that log into it
    next), FAILED on an error and KILLED on an interrupt: see ``run_status``."""
    from visionloop import registry
    from visionloop.training.train import train

    work_dir = work_dir or new_work_dir(settings.home)
    dataset = load_dataset(dataset_dir)
    manifest = dataset.manifest
    if resume_run_id is None:
        run_id = registry.start_run(
            settings,
            run_name=work_dir.name,
            tags={"dataset_version": manifest.version, "visionloop.work_dir": str(work_dir), **(run_tags or {})},
        )
    else:
        registry.connect(settings)
        run_id = resume_run_id
        registry.set_run_status(run_id, "RUNNING")
    atomic_write_json(
        settings.home / "latest" / "train_started.json",
        {"run_id": run_id, "work_dir": str(work_dir), "dataset_dir": str(dataset_dir)},
    )
    hflip = manifest.hflip_ok if settings.data.hflip is None else settings.data.hflip
    with run_status(run_id, finish=finish_run):
        if resume_run_id is None:
            flat = {
                f"{group}.{k}": v
                for group in ("data", "train", "gate")
                for k, v in getattr(settings, group).model_dump().items()
            }
            extra = {"dataset_version": manifest.version, "image_size": manifest.image_size}
            registry.log_params(run_id, {**flat, **extra, "channels": manifest.channels})
            images, labels = dataset.part("train")
            registry.log_dataset_input(run_id, images, labels, manifest.version, manifest.source)

        def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
            registry.log_metrics(run_id, metrics, step=epoch)

        result = train(
            dataset,
            work_dir / "train",
            settings.train,
            hflip=hflip,
            resume=resume_run_id is not None,
            on_epoch=on_epoch,
            show_progress=show_progress,
        )
        if resume_run_id is None:
            registry.log_params(
                run_id,
                {
                    "model.width": result.spec.width,
                    "model.depth": result.spec.depth,
                    "model.parameters": result.parameters,
                    "device": result.device,
                    "hflip": hflip,
                },
            )
        registry.log_metrics(
            run_id,
            {
                "best_val_accuracy": result.best_val_accuracy,
                "best_epoch": result.best_epoch,
                "train_images_per_second": result.images_per_second,
                "softmax_temperature": result.temperature,
            },
        )
        from visionloop.training.evaluate import plot_history

        curves = work_dir / "train" / "training_curves.png"
        plot_history(result.history, curves)
        atomic_write_json(work_dir / "train" / "history.json", result.history)
        # checkpoints stay on disk; the weights travel with the registered model
        registry.log_artifact(run_id, curves, "training")
        registry.log_artifact(run_id, work_dir / "train" / "history.json", "training")
    return TrainOutput(
        model_path=result.model_path,
        run_id=run_id,
        work_dir=work_dir,
        dataset_dir=dataset_dir,
        device=result.device,
        epochs_run=result.epochs_run,
        best_epoch=result.best_epoch,
        best_val_accuracy=result.best_val_accuracy,
        images_per_second=result.images_per_second,
        parameters=result.parameters,
        resumed_from_epoch=result.resumed_from_epoch,
    )


def train_untracked(settings: Settings, dataset_dir: Path, work_dir: Path, resume: bool) -> None:
    """DDP ranks other than 0: the same train() call as ``train_step`` makes, without MLflow or files."""
    from visionloop.training.train import train

    dataset = load_dataset(dataset_dir)
    hflip = dataset.manifest.hflip_ok if settings.data.hflip is None else settings.data.hflip  # as train_step
    train(dataset, work_dir / "train", settings.train, hflip=hflip, resume=resume, show_progress=False)


def evaluate_step(
    model_path: Path, dataset_dir: Path, run_id: str, settings: Settings, out_dir: Path
) -> EvaluateOutput:
    import torch

    from visionloop import registry
    from visionloop.training.evaluate import evaluate
    from visionloop.training.train import load_model, predict_proba

    dataset = load_dataset(dataset_dir)
    model, _ = load_model(model_path)
    x_test, _ = dataset.part("test")
    probs = predict_proba(model, torch.from_numpy(x_test)).numpy()
    report = evaluate(probs, dataset, out_dir, title=f"test confusion matrix — {dataset.manifest.version}")
    registry.connect(settings)
    registry.log_metrics(run_id, report.metrics())
    registry.log_artifacts(run_id, out_dir, "evaluation")
    return EvaluateOutput(
        metrics_path=out_dir / "metrics.json",
        test_accuracy=report.accuracy,
        baseline_name=report.baseline_name,
        baseline_accuracy=report.baseline_accuracy,
        macro_f1=report.macro_f1,
        ece=report.ece,
        metrics=report.metrics(),
    )


def export_step(
    model_path: Path, dataset_dir: Path, metrics: dict[str, float], settings: Settings, out_dir: Path
) -> ExportOutput:
    from visionloop.training.export import export

    dataset = load_dataset(dataset_dir)
    result = export(
        model_path,
        dataset,
        out_dir,
        tolerance=settings.gate.parity_tolerance,
        metrics=metrics,
        train_config=settings.train.model_dump(),
        reference_size=settings.monitor.reference_size,
    )
    return ExportOutput(export_dir=out_dir, max_abs_diff=result.max_abs_diff, parity_images=result.parity_images)


def register_step(export_dir: Path, run_id: str, settings: Settings) -> RegisterOutput:
    from visionloop import registry

    card = read_json(export_dir / "model_card.json")
    metrics = card.get("metrics", {})
    tags = {
        "dataset_version": card["dataset"]["version"],
        "test_accuracy": f"{metrics.get('test_accuracy', float('nan')):.6f}",
        "baseline_test_accuracy": f"{metrics.get('baseline_test_accuracy', float('nan')):.6f}",
        "onnx_parity_max_abs_diff": f"{card['onnx']['parity_max_abs_diff']:.3g}",
    }
    registry.connect(settings)
    registry.log_metrics(run_id, {"onnx_parity_max_abs_diff": card["onnx"]["parity_max_abs_diff"]})
    out = registry.register_onnx(settings, run_id, export_dir, card, tags)
    return RegisterOutput(model_name=out.name, version=out.version, model_uri=out.model_uri, run_id=out.run_id)


def trained_dataset(settings: Settings, version: str) -> Path:
    """The dataset folder registered ``version`` was trained and evaluated on (by its dataset_version tag)."""
    from visionloop import registry

    dataset_version = registry.dataset_version_of(settings, version)
    if not dataset_version:
        raise RegistryError(f"{settings.registry.model_name} v{version} has no dataset_version tag")
    folder = settings.home / "datasets" / dataset_version
    if not (folder / "manifest.json").is_file():
        raise DataError(
            f"v{version} was trained on dataset {dataset_version}, which is not under {settings.home / 'datasets'}: "
            "promote it from the home that trained it, or preprocess the same data with the same settings there"
        )
    return folder


def promote_step(version: str, dataset_dir: Path, settings: Settings) -> PromoteOutput:
    """The gate, scoring challenger and champion on ``dataset_dir``: the data the challenger was trained
    and evaluated on (anything else is refused, so two commands cannot judge on different test sets)."""
    from visionloop import registry

    dataset = load_dataset(dataset_dir)
    trained_on = registry.dataset_version_of(settings, version)
    if trained_on and trained_on != dataset.manifest.version:
        raise DataError(
            f"v{version} was trained and evaluated on dataset {trained_on}, not {dataset.manifest.version}: "
            "the gate scores on the challenger's own test split"
        )
    x_test, y_test = dataset.part("test")
    decision = registry.promote_if_better(settings, version, x_test, y_test)
    aliases = registry.aliases_of(settings, version)
    return PromoteOutput(**decision.to_dict(), model_name=settings.registry.model_name, aliases=aliases)
