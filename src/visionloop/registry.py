"""Everything that talks to MLflow: runs, lineage, registered models, aliases, the gate, rollback.

Embedded default: a SQLite store at ``<home>/mlflow.db`` with artifacts under ``<home>/mlartifacts``.
Any ``MLFLOW_TRACKING_URI`` (an ``mlflow server``, Postgres-backed or not) works the same way.

Aliases follow MLflow's model-registry idiom: a new version gets ``challenger``; the quality gate
moves ``champion`` to it only if it clears an absolute floor and beats the current champion on the
same test set. Every alias move is appended to the registered model's tags as one
``visionloop.alias_event.NNNNNN`` JSON record (when, alias, from, to, why), which any MLflow backend
stores, so ``models history`` and ``models rollback`` work against a shared server too.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import json
import os
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from visionloop.config import GateSettings, Settings
from visionloop.errors import RegistryError
from visionloop.inference import INPUT_NAME, OUTPUT_NAMES, OnnxClassifier

CHAMPION = "champion"
CHALLENGER = "challenger"
EVENT_PREFIX = "visionloop.alias_event."

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
# MLflow's INFO lines ("Creating initial MLflow database tables", "Created version 2") would bury
# our own output; warnings and errors still come through. MLflow reads this when it is imported.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


@dataclass
class AliasEvent:
    seq: int
    time: str
    alias: str
    from_version: str | None
    to_version: str
    kind: str  # promote | rollback
    reason: str


@dataclass
class GateDecision:
    version: str
    promoted: bool
    challenger_accuracy: float
    champion_version: str | None
    champion_accuracy: float | None
    reasons: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RegisteredVersion:
    name: str
    version: str
    model_uri: str
    run_id: str


def _mlflow() -> Any:
    import mlflow

    return mlflow


def _point_at(uri: str) -> None:
    """Make ``uri`` MLflow's current store without leaking it into the environment.

    ``mlflow.set_tracking_uri`` also writes MLFLOW_TRACKING_URI to os.environ (for subprocesses), which
    would make every later Settings in this process (whose empty ``registry.tracking_uri`` defers to
    that variable) point at this store instead of its own home. The variable is put back as it was.
    """
    before = os.environ.get("MLFLOW_TRACKING_URI")
    _mlflow().set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def connect(settings: Settings) -> Any:
    """Point MLflow at the configured store and experiment; returns an MlflowClient."""
    mlflow = _mlflow()
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    _point_at(uri)
    client = mlflow.MlflowClient()
    try:
        experiment = client.get_experiment_by_name(settings.registry.experiment)
        if experiment is None:
            # keep artifacts beside the embedded store, not in ./mlruns of whatever folder we run in
            location = settings.artifact_root.as_uri() if uri.startswith("sqlite:") else None
            client.create_experiment(settings.registry.experiment, artifact_location=location)
    except Exception as exc:
        raise RegistryError(f"cannot reach the MLflow store at {uri}: {exc}") from None
    mlflow.set_experiment(settings.registry.experiment)
    return client


def start_run(settings: Settings, run_name: str, tags: dict[str, str]) -> str:
    mlflow = _mlflow()
    connect(settings)
    run = mlflow.MlflowClient().create_run(
        mlflow.get_experiment_by_name(settings.registry.experiment).experiment_id,
        run_name=run_name,
        tags=tags,
    )
    return run.info.run_id


@contextmanager
def active_run(run_id: str) -> Iterator[Any]:
    """Re-open a run for one step; it is marked FAILED if the step raises."""
    mlflow = _mlflow()
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def log_params(run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    _mlflow().MlflowClient().log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])


def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(dt.datetime.now().timestamp() * 1000)
    clean = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and np.isfinite(v)]
    _mlflow().MlflowClient().log_batch(run_id, metrics=clean)


def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    _mlflow().MlflowClient().log_artifact(run_id, str(path), artifact_path)


def log_artifacts(run_id: str, folder: Path, artifact_path: str | None = None) -> None:
    _mlflow().MlflowClient().log_artifacts(run_id, str(folder), artifact_path)


def log_dataset_input(run_id: str, images: np.ndarray, labels: np.ndarray, version: str, source: str) -> None:
    """Record the dataset version as the run's input (MLflow lineage: Datasets used)."""
    from mlflow.entities import DatasetInput, InputTag

    mlflow = _mlflow()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "source can be interpreted in multiple ways": it is a label
        dataset = mlflow.data.from_numpy(images, targets=labels, source=source, name=version, digest=version)
    # through the client, not mlflow.log_input: re-opening the run would mark it FINISHED mid-training
    entity = DatasetInput(dataset._to_mlflow_entity(), tags=[InputTag("mlflow.data.context", "training")])
    mlflow.MlflowClient().log_inputs(run_id, datasets=[entity])


def set_run_status(run_id: str, status: str) -> None:
    """RUNNING again on resume; FINISHED at the end; FAILED / KILLED when a step stops early."""
    client = _mlflow().MlflowClient()
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status)


def register_onnx(
    settings: Settings, run_id: str, export_dir: Path, card: dict, tags: dict[str, str]
) -> RegisteredVersion:
    """Log the ONNX model (card and PyTorch weights as extra files), register it, alias it challenger."""
    import onnx
    import onnxruntime
    from mlflow.models.signature import ModelSignature
    from mlflow.types.schema import Schema, TensorSpec

    mlflow = _mlflow()
    client = connect(settings)
    channels, size = card["channels"], card["image_size"]
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, channels, size, size), INPUT_NAME)]),
        outputs=Schema(
            [
                TensorSpec(np.dtype(np.float32), (-1, len(card["classes"])), OUTPUT_NAMES[0]),
                TensorSpec(np.dtype(np.float32), (-1, card["outputs"][OUTPUT_NAMES[1]]["shape"][1]), OUTPUT_NAMES[1]),
            ]
        ),
    )
    example = {INPUT_NAME: np.full((1, channels, size, size), 0.5, dtype=np.float32)}
    name = settings.registry.model_name
    try:
        with active_run(run_id):
            info = mlflow.onnx.log_model(
                onnx.load(str(export_dir / "model.onnx")),
                name="model",
                signature=signature,
                input_example=example,
                # explicit requirements: inferring them costs seconds in a subprocess
                pip_requirements=[f"onnx=={onnx.__version__}", f"onnxruntime=={onnxruntime.__version__}"],
                extra_files=[str(export_dir / f) for f in ("model_card.json", "model_card.md", "weights.pt")],
                onnx_execution_providers=["CPUExecutionProvider"],
                save_as_external_data=False,
                metadata={"dataset_version": card["dataset"]["version"], "classes": card["classes"]},
            )
        # register_model prints "Successfully registered model ..." straight to stderr; our CLI says it better
        with contextlib.redirect_stderr(io.StringIO()):
            version = mlflow.register_model(info.model_uri, name, tags=tags)
        client.set_registered_model_alias(name, CHALLENGER, version.version)
    except RegistryError:
        raise
    except Exception as exc:
        raise RegistryError(f"registering {name} failed: {exc}") from None
    return RegisteredVersion(name, str(version.version), info.model_uri, run_id)


def _download(name: str, ref: str, dest: Path) -> Path:
    mlflow = _mlflow()
    uri = f"models:/{name}@{ref}" if not ref.isdigit() else f"models:/{name}/{ref}"
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except Exception as exc:
        raise RegistryError(f"cannot download {uri}: {exc}") from None


def resolve(settings: Settings, ref: str) -> str | None:
    """The version number ``ref`` (an alias, or a version number) names now; None when it names none.

    Read only, for serving replicas: it creates no experiment and never writes to the store. A store
    that cannot be reached raises RegistryError, so a caller can tell "no champion yet" from "registry down".
    """
    mlflow = _mlflow()
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    client = mlflow.MlflowClient(tracking_uri=uri)
    name = settings.registry.model_name
    try:
        found = client.get_model_version(name, ref) if ref.isdigit() else client.get_model_version_by_alias(name, ref)
    except mlflow.exceptions.MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise RegistryError(f"cannot reach the MLflow store at {uri}: {exc}") from None
    except Exception as exc:
        raise RegistryError(f"cannot reach the MLflow store at {uri}: {exc}") from None
    return str(found.version)


def download_version(settings: Settings, version: str, dest: Path) -> tuple[Path, Path]:
    """Download one registered version; returns (model.onnx, model_card.json) under ``dest``."""
    _point_at(settings.tracking_uri)
    folder = _download(settings.registry.model_name, version, dest)
    return folder / "model.onnx", folder / "extra_files" / "model_card.json"


def load_classifier(settings: Settings, ref: str, dest: Path | None = None) -> OnnxClassifier:
    """Load a registered version (number) or alias as an ONNX Runtime classifier.

    The session holds the model in memory, so without ``dest`` the download is removed afterwards."""
    connect(settings)
    if dest is not None:
        return OnnxClassifier.load(*download_version(settings, ref, dest))
    with tempfile.TemporaryDirectory(prefix="visionloop-model-") as tmp:
        return load_classifier(settings, ref, Path(tmp))


def alias_version(settings: Settings, alias: str) -> str | None:
    client = connect(settings)
    try:
        return str(client.get_model_version_by_alias(settings.registry.model_name, alias).version)
    except Exception:
        return None


def aliases_of(settings: Settings, version: str) -> list[str]:
    """Which of champion and challenger point at ``version`` now."""
    return [alias for alias in (CHAMPION, CHALLENGER) if alias_version(settings, alias) == version]


def history(settings: Settings) -> list[AliasEvent]:
    client = connect(settings)
    try:
        model = client.get_registered_model(settings.registry.model_name)
    except Exception:
        raise RegistryError(f"no registered model named {settings.registry.model_name!r}") from None
    events = [AliasEvent(**json.loads(v)) for k, v in model.tags.items() if k.startswith(EVENT_PREFIX)]
    return sorted(events, key=lambda e: e.seq)


def _move_alias(settings: Settings, alias: str, to_version: str, kind: str, reason: str) -> AliasEvent:
    client = connect(settings)
    name = settings.registry.model_name
    previous = alias_version(settings, alias)
    seq = max((e.seq for e in history(settings)), default=0) + 1
    event = AliasEvent(
        seq=seq,
        time=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        alias=alias,
        from_version=previous,
        to_version=to_version,
        kind=kind,
        reason=reason,
    )
    client.set_registered_model_alias(name, alias, to_version)
    client.set_registered_model_tag(name, f"{EVENT_PREFIX}{seq:06d}", json.dumps(asdict(event)))
    return event


def decide(
    challenger_acc: float, champion_acc: float | None, champion_version: str | None, gate: GateSettings
) -> tuple[bool, list[str]]:
    """The gate's rule, on its own so it can be read and tested: floor first, then beat the champion."""
    reasons = []
    if challenger_acc < gate.min_accuracy:
        return False, [f"test accuracy {challenger_acc:.4f} is below the floor {gate.min_accuracy:.4f}"]
    reasons.append(f"test accuracy {challenger_acc:.4f} clears the floor {gate.min_accuracy:.4f}")
    if champion_version is None:
        return True, [*reasons, "there is no champion yet"]
    if champion_acc is None:
        return True, [
            *reasons,
            f"champion v{champion_version} cannot be scored on this test set (other input shape or classes)",
        ]
    delta = challenger_acc - champion_acc
    # accuracies are ratios of counts: 0.95 - 0.90 is 0.0499999... in floating point, yet it meets a
    # 0.05 margin; the slack is far below one test image's worth of accuracy
    if delta > 0 and delta >= gate.min_improvement - 1e-9:
        return True, [
            *reasons,
            f"beats champion v{champion_version} ({champion_acc:.4f}) by {delta:+.4f} (margin {gate.min_improvement:.4f})",
        ]
    return False, [
        *reasons,
        f"does not beat champion v{champion_version} ({champion_acc:.4f}): difference {delta:+.4f}; "
        f"promotion needs a gain > 0 and >= {gate.min_improvement:.4f}",
    ]


def promote_if_better(
    settings: Settings, version: str, test_images: np.ndarray, test_labels: np.ndarray
) -> GateDecision:
    """Score challenger and champion with ONNX Runtime on the same test set; move champion if the gate passes."""
    client = connect(settings)
    name = settings.registry.model_name
    with tempfile.TemporaryDirectory(prefix="visionloop-gate-") as tmp:
        challenger = load_classifier(settings, version, Path(tmp) / "challenger")
        challenger_acc = challenger.accuracy(test_images, test_labels)
        champion_version = alias_version(settings, CHAMPION)
        champion_acc = None
        if champion_version == version:
            return GateDecision(
                version,
                False,
                challenger_acc,
                champion_version,
                challenger_acc,
                [f"v{version} is already the champion"],
            )
        if champion_version is not None:
            champion = load_classifier(settings, champion_version, Path(tmp) / "champion")
            if (
                champion.input_shape == challenger.input_shape
                and champion.card["classes"] == challenger.card["classes"]
            ):
                champion_acc = champion.accuracy(test_images, test_labels)
    promoted, reasons = decide(challenger_acc, champion_acc, champion_version, settings.gate)
    decision = GateDecision(version, promoted, challenger_acc, champion_version, champion_acc, reasons)
    tags = {
        "gate.decision": "promoted" if promoted else "rejected",
        "gate.reasons": " | ".join(reasons),
        "gate.challenger_accuracy": f"{challenger_acc:.6f}",
        "gate.champion_version": champion_version or "",
        "gate.champion_accuracy": "" if champion_acc is None else f"{champion_acc:.6f}",
        "gate.time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    if promoted:
        _move_alias(settings, CHAMPION, version, "promote", "; ".join(reasons))
    return decision


def rollback(settings: Settings, reason: str = "manual rollback") -> AliasEvent:
    """Move ``champion`` back to the version that was champion before the current one."""
    current = alias_version(settings, CHAMPION)
    if current is None:
        raise RegistryError(f"{settings.registry.model_name} has no champion to roll back")
    for event in reversed(history(settings)):
        if event.alias == CHAMPION and event.to_version == current and event.kind == "promote":
            if event.from_version is None:
                break
            client = connect(settings)
            client.set_model_version_tag(settings.registry.model_name, current, "rolled_back", "true")
            return _move_alias(
                settings,
                CHAMPION,
                event.from_version,
                "rollback",
                f"{reason}: v{current} -> v{event.from_version}",
            )
    raise RegistryError(f"champion v{current} has no earlier champion to roll back to")


def list_versions(settings: Settings) -> list[dict[str, Any]]:
    client = connect(settings)
    name = settings.registry.model_name
    try:
        model = client.get_registered_model(name)
    except Exception:
        raise RegistryError(f"no registered model named {name!r} (run `visionloop run` first)") from None
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in client.search_model_versions(f"name='{name}'"):
        rows.append(
            {
                "version": str(mv.version),
                "aliases": sorted(aliases.get(str(mv.version), [])),
                "created": dt.datetime.fromtimestamp(mv.creation_timestamp / 1000, dt.UTC).isoformat(
                    timespec="seconds"
                ),
                "dataset_version": mv.tags.get("dataset_version", ""),
                "test_accuracy": mv.tags.get("test_accuracy", ""),
                "gate": mv.tags.get("gate.decision", ""),
                "run_id": mv.run_id,
            }
        )
    return sorted(rows, key=lambda r: int(r["version"]))
