"""The pipeline's steps: plain functions with typed inputs (paths, small values) and typed outputs.

The CLI sub-commands, the local runner and the tests call exactly these functions; nothing here
knows who called it. Each output is a dataclass that turns into JSON, so a later step (or a later
command) can pick it up from ``<home>/latest/<step>.json``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import secrets
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from visionloop.config import Settings
from visionloop.data.preprocess import PreprocessParams, load_dataset, load_manifest, preprocess
from visionloop.data.sources import IngestResult, ingest
from visionloop.data.synthetic import SyntheticSpec
from visionloop.data.validate import ValidationReport, load_report, validate, write_report
from visionloop.errors import DataError, VisionloopError
from visionloop.fsutil import atomic_write_json, read_json
from visionloop.registry import GateDecision


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


@dataclass
class ValidateOutput:
    report_path: Path
    passed: bool
    usable: int
    bad: int
    classes: list[str]
    errors: list[str]
    warnings: list[str]


@dataclass
class PreprocessOutput:
    dataset_dir: Path
    dataset_version: str
    image_size: int
    channels: int
    counts: dict[str, int]
    hflip_ok: bool


@dataclass
class TrainOutput:
    model_path: Path
    run_id: str
    work_dir: Path
    dataset_dir: Path
    device: str
    epochs_run: int
    best_epoch: int
    best_val_accuracy: float
    images_per_second: float
    parameters: int
    resumed_from_epoch: int | None


@dataclass
class EvaluateOutput:
    metrics_path: Path
    test_accuracy: float
    baseline_name: str
    baseline_accuracy: float
    macro_f1: float
    ece: float
    metrics: dict[str, float] = field(default_factory=dict)


@dataclass
class ExportOutput:
    export_dir: Path
    max_abs_diff: float
    parity_images: int


@dataclass
class RegisterOutput:
    model_name: str
    version: str
    model_uri: str
    run_id: str


@dataclass
class PromoteOutput(GateDecision):
    """The gate's decision, plus the aliases the judged version holds afterwards."""

    model_name: str = ""
    aliases: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- hand-over between commands


def as_json(output: Any) -> dict[str, Any]:
    return _jsonable(asdict(output))


def record(home: Path, step: str, output: Any) -> None:
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


def from_json(cls: type, data: dict[str, Any]) -> Any:
    """Rebuild a step output written by ``as_json`` (paths become Paths again)."""
    hints = cls.__annotations__
    return cls(**{k: Path(v) if "Path" in str(hints.get(k, "")) and v is not None else v for k, v in data.items()})


def latest(home: Path, step: str, cls: type) -> Any:
    return from_json(cls, latest_raw(home, step))


def new_work_dir(home: Path) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = home / "runs" / f"{stamp}-{secrets.token_hex(3)}"
    path.mkdir(parents=True, exist_ok=True)
    return path


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
    return ingest(data.source, settings.home, synthetic=spec, hflip=data.hflip)


def validate_step(ingested: IngestResult, settings: Settings, show_progress: bool = False) -> ValidateOutput:
    report = validate(ingested.root, settings.validation, show_progress=show_progress)
    key = hashlib.sha256(str(ingested.root).encode()).hexdigest()[:12]
    report_path = write_report(report, settings.home / "reports" / key)
    out = ValidateOutput(
        report_path,
        report.passed,
        len(report.files),
        len(report.bad_files),
        report.classes,
        report.errors,
        report.warnings,
    )
    if not report.passed:
        raise DataError(f"validation failed: {'; '.join(report.errors)} (report: {report_path.parent / 'report.md'})")
    return out


def preprocess_step(
    report_path: Path, ingested: IngestResult, settings: Settings, show_progress: bool = False
) -> PreprocessOutput:
    report: ValidationReport = load_report(report_path)
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
    return PreprocessOutput(folder, manifest.version, manifest.image_size, manifest.channels, counts, manifest.hflip_ok)


def train_step(
    dataset_dir: Path,
    settings: Settings,
    work_dir: Path,
    resume_run_id: str | None = None,
    show_progress: bool = True,
) -> TrainOutput:
    """Train with MLflow tracking; ``resume_run_id`` continues an interrupted run from its checkpoint."""
    from visionloop import registry
    from visionloop.training.train import train

    dataset = load_dataset(dataset_dir)
    manifest = dataset.manifest
    if resume_run_id is None:
        run_id = registry.start_run(
            settings,
            run_name=work_dir.name,
            tags={"dataset_version": manifest.version, "visionloop.work_dir": str(work_dir)},
        )
        flat = {
            f"{group}.{k}": v
            for group in ("data", "train", "gate")
            for k, v in getattr(settings, group).model_dump().items()
        }
        registry.log_params(
            run_id,
            {
                **flat,
                "dataset_version": manifest.version,
                "image_size": manifest.image_size,
                "channels": manifest.channels,
            },
        )
        images, labels = dataset.part("train")
        registry.log_dataset_input(run_id, images, labels, manifest.version, manifest.source)
    else:
        registry.connect(settings)
        run_id = resume_run_id
        registry.set_run_status(run_id, "RUNNING")
    atomic_write_json(
        settings.home / "latest" / "train_started.json",
        {"run_id": run_id, "work_dir": str(work_dir), "dataset_dir": str(dataset_dir)},
    )

    def on_epoch(epoch: int, metrics: dict[str, float]) -> None:
        registry.log_metrics(run_id, metrics, step=epoch)

    hflip = manifest.hflip_ok if settings.data.hflip is None else settings.data.hflip
    try:
        result = train(
            dataset,
            work_dir / "train",
            settings.train,
            hflip=hflip,
            resume=resume_run_id is not None,
            on_epoch=on_epoch,
            show_progress=show_progress,
        )
    except KeyboardInterrupt:
        registry.set_run_status(run_id, "KILLED")  # `train --resume` sets it RUNNING again
        raise
    except BaseException:
        registry.set_run_status(run_id, "FAILED")
        raise
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
        out_dir / "metrics.json",
        report.accuracy,
        report.baseline_name,
        report.baseline_accuracy,
        report.macro_f1,
        report.ece,
        report.metrics(),
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
    )
    return ExportOutput(out_dir, result.max_abs_diff, result.parity_images)


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
    return RegisterOutput(out.name, out.version, out.model_uri, out.run_id)


def promote_step(version: str, dataset_dir: Path, settings: Settings) -> PromoteOutput:
    from visionloop import registry

    dataset = load_dataset(dataset_dir)
    x_test, y_test = dataset.part("test")
    decision = registry.promote_if_better(settings, version, x_test, y_test)
    aliases = registry.aliases_of(settings, version)
    return PromoteOutput(**decision.to_dict(), model_name=settings.registry.model_name, aliases=aliases)
