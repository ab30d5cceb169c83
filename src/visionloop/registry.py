"""Everything that talks to MLflow: runs, lineage, registered models, aliases, the gate, rollback.

Embedded default: a SQLite store at ``<home>/mlflow.db`` with artifacts under ``<home>/mlartifacts``.
Any ``MLFLOW_TRACKING_URI`` (an ``mlflow server``, Postgres-backed or not) works the same way.

Aliases follow MLflow's model-registry idiom: a new version gets ``challenger``; the quality gate
moves ``champion`` to it only if it clears an absolute floor and beats the current champion on the
same test set. Every alias move is appended to the registered model's tags as one
``visionloop.alias_event.NNNNNN`` JSON record (when, alias, from, to, why), which any MLflow backend
stores, so ``models history`` and ``models rollback`` work against a shared server too.

Time bounds. MLflow's HTTP client retries a failed request for minutes by default, so a registry
that went away looks like a hang. Every operation here runs with ``registry.timeout_seconds`` as
the HTTP timeout of each request, no retries (the caller, a person or a CI job, decides whether to
try again), and as SQLite's busy timeout. MLflow reads those from environment variables at each
request; they are set for the length of one operation and put back afterwards, and operations of
one process take turns, so no other Settings in the process ever sees them.

Concurrency. Two promotions (or a promotion and a rollback) of one model may run at once: two CI
jobs, the loop and a person. MLflow has no compare-and-set on aliases or tags, so each holds the
model's lock from reading the champion to writing the history event. The lock is built from two
things every backend does consistently, creating and listing registered models:

- a contender creates a registered model of its own, ``<model>.visionloop-lock.<random>`` (its
  lease; tags name the holder and the lease length), then lists ``<model>.visionloop-lock.*``;
- when its lease is the only live one, it holds the lock; otherwise it deletes its lease, waits a
  random moment and tries again. Each creates before it lists, so of two contenders the one that
  lists last sees the other's lease: two never both find themselves alone;
- a lease expires ``10 * timeout_seconds`` after the store created it, so a holder that crashed
  blocks the others only that long: whoever lists an expired lease deletes it (lease names are
  never reused, so that deletes nothing else). Expiry is judged by the store's clock (the creation
  time of one's own new lease), so clocks of different machines need not agree. A holder checks,
  by its own clock, that its lease still has time before it writes, and gives up, moving nothing,
  if not; a contender that waits longer than a lease gives up too.

Under the lock the champion is read again and, if it moved since the challenger was compared with
it, the new champion is scored before the gate decides; the next event number is read there too, so
event numbers stay unique and contiguous. Leases are registered models of their own, so ``models
list`` and ``models history`` (the versions and tags of the model itself) never show them.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import functools
import io
import json
import logging
import math
import os
import random
import re
import secrets
import socket
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

import numpy as np
from pydantic import BaseModel

from visionloop.config import GateSettings, RegistrySettings, Settings
from visionloop.errors import RegistryError
from visionloop.inference import INPUT_NAME, OUTPUT_NAMES, OnnxClassifier

CHAMPION = "champion"
CHALLENGER = "challenger"
EVENT_PREFIX = "visionloop.alias_event."
LOCK_INFIX = ".visionloop-lock."
LEASE_TAG = "visionloop.lock.lease_seconds"
HOLDER_TAG = "visionloop.lock.holder"
LEASE_TIMEOUTS = 10  # a lease lasts this many store timeouts: far longer than a gate takes under the lock

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


class GateDecision(BaseModel):
    """The gate's decision; ``visionloop promote``'s output (``steps.PromoteOutput``) extends it."""

    version: str
    promoted: bool
    challenger_accuracy: float
    champion_version: str | None
    champion_accuracy: float | None
    reasons: list[str]

    def to_dict(self) -> dict:
        return self.model_dump()


@dataclass
class RegisteredVersion:
    name: str
    version: str
    model_uri: str
    run_id: str


def _mlflow() -> Any:
    import mlflow

    return mlflow


# ---------------------------------------------------------------- time bounds


P = ParamSpec("P")
R = TypeVar("R")

# One store operation at a time per process (the serving poller runs them in worker threads): the
# environment variables set for one operation are then never put back under another one's feet.
_OPERATION = threading.RLock()
_BOUNDS: dict[str, float | None] = {
    "active": None,  # the timeout of the operation in progress, for the SQLite sessions it opens
    "connected": RegistrySettings().timeout_seconds,  # of the last connect(), for run-id calls
}
_MLFLOW_BUSY_TIMEOUT = re.compile(r"\s*PRAGMA\s+busy_timeout\s*=", re.IGNORECASE)


def _sqlite_busy_timeout(
    connection: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _executemany: bool
) -> tuple[str, Any]:
    # MLflow opens every SQLite session with "PRAGMA busy_timeout = 20000": during an operation, the
    # operation's own timeout takes its place. Other statements, and other engines, are left alone.
    timeout = _BOUNDS["active"]
    if timeout is not None and connection.dialect.name == "sqlite" and _MLFLOW_BUSY_TIMEOUT.match(statement):
        return f"PRAGMA busy_timeout = {int(timeout * 1000)}", parameters
    return statement, parameters


class _DuringOperations(logging.Filter):
    """Drops MLflow's traceback for a SQLite file that stayed locked: the RegistryError says it in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _BOUNDS["active"] is None


@functools.cache
def _install_hooks() -> None:
    from sqlalchemy import event
    from sqlalchemy.engine import Engine

    event.listen(Engine, "before_cursor_execute", _sqlite_busy_timeout, retval=True)
    logging.getLogger("mlflow.store.db.utils").addFilter(_DuringOperations())


@contextmanager
def _time_bounds(timeout: float) -> Iterator[None]:
    """Within: each HTTP request to the store waits at most ``timeout`` and is not retried, and a
    locked SQLite file is waited for as long. MLflow reads these variables at every request."""
    bounds = {
        "MLFLOW_HTTP_REQUEST_TIMEOUT": str(max(1, math.ceil(timeout))),  # MLflow parses it as an int
        "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "0",
        "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "0",
    }
    with _OPERATION:
        _install_hooks()
        saved = {key: os.environ.get(key) for key in bounds}
        outer, _BOUNDS["active"] = _BOUNDS["active"], timeout
        os.environ.update(bounds)
        try:
            yield
        finally:
            _BOUNDS["active"] = outer
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value


def _store_operation(func: Callable[P, R]) -> Callable[P, R]:
    """Run ``func`` within its store's time bounds. Its first argument is the Settings; functions
    that take a run id instead act on the store of the last connect() (MLflow's current tracking
    URI), so they take that store's timeout."""

    @functools.wraps(func)
    def bounded(*args: P.args, **kwargs: P.kwargs) -> R:
        first = args[0] if args else None
        timeout = first.registry.timeout_seconds if isinstance(first, Settings) else _BOUNDS["connected"]
        with _time_bounds(timeout or RegistrySettings().timeout_seconds):
            return func(*args, **kwargs)

    return bounded


# ---------------------------------------------------------------- errors


def _reason(exc: BaseException) -> str:
    """The root cause in a few words ("Connection refused", "database is locked"), else the message.

    MLflow wraps requests' error, which wraps urllib3's, which wraps the socket's."""
    cause: BaseException | None = exc
    for _ in range(10):
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.strerror:
            return cause.strerror
        if type(cause).__name__ == "ReadTimeoutError":
            return "read timed out"
        if getattr(cause, "orig", None) is not None:  # SQLAlchemy's error: the database driver's own words
            return " ".join(str(cause.orig).split())
        cause = cause.__cause__ or cause.__context__ or getattr(cause, "reason", None)
    text = " ".join(str(exc).split())
    return text if len(text) <= 300 else text[:297] + "..."


def _failure(uri: str, exc: BaseException) -> RegistryError:
    """One message naming the store: what it answered, or that it could not be reached."""
    from mlflow.exceptions import MlflowException, RestException

    if isinstance(exc, RegistryError):
        return exc
    # MLflow reports a connection that failed, and a SQLite file that stayed locked, with these codes
    unanswered = ("INTERNAL_ERROR", "TEMPORARILY_UNAVAILABLE")
    answered = isinstance(exc, RestException) or (isinstance(exc, MlflowException) and exc.error_code not in unanswered)
    if answered:
        return RegistryError(f"the MLflow store at {uri} refused the request: {_reason(exc)}")
    return RegistryError(f"cannot reach the MLflow store at {uri}: {_reason(exc)}")


@contextmanager
def _store_errors(uri: str) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        raise _failure(uri, exc) from None


def _missing(exc: Exception) -> bool:
    """Whether the store itself answered that the thing asked for does not exist."""
    return getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


# ---------------------------------------------------------------- connecting


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


def _client(settings: Settings) -> Any:
    """A client of the configured store for registry work: it creates no experiment, changes no global."""
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        Path(uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    return _mlflow().MlflowClient(tracking_uri=uri, registry_uri=uri)


@_store_operation
def connect(settings: Settings) -> Any:
    """Point MLflow at the configured store and experiment; returns an MlflowClient."""
    mlflow = _mlflow()
    uri = settings.tracking_uri
    client = _client(settings)
    _point_at(uri)
    _BOUNDS["connected"] = settings.registry.timeout_seconds
    try:
        experiment = client.get_experiment_by_name(settings.registry.experiment)
        if experiment is None:
            # keep artifacts beside the embedded store, not in ./mlruns of whatever folder we run in
            location = settings.artifact_root.as_uri() if uri.startswith("sqlite:") else None
            client.create_experiment(settings.registry.experiment, artifact_location=location)
    except Exception as exc:
        raise _failure(uri, exc) from None
    mlflow.set_experiment(settings.registry.experiment)
    return client


@_store_operation
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


@_store_operation
def log_params(run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    _mlflow().MlflowClient().log_batch(run_id, params=[Param(k, str(v)[:6000]) for k, v in params.items()])


@_store_operation
def log_metrics(run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(dt.datetime.now().timestamp() * 1000)
    clean = [Metric(k, float(v), now, step) for k, v in metrics.items() if v is not None and np.isfinite(v)]
    _mlflow().MlflowClient().log_batch(run_id, metrics=clean)


@_store_operation
def log_artifact(run_id: str, path: Path, artifact_path: str | None = None) -> None:
    _mlflow().MlflowClient().log_artifact(run_id, str(path), artifact_path)


@_store_operation
def log_artifacts(run_id: str, folder: Path, artifact_path: str | None = None) -> None:
    _mlflow().MlflowClient().log_artifacts(run_id, str(folder), artifact_path)


@_store_operation
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


@_store_operation
def set_run_status(run_id: str, status: str) -> None:
    """RUNNING again on resume; FINISHED at the end; FAILED / KILLED when a step stops early."""
    client = _mlflow().MlflowClient()
    if status == "RUNNING":
        client.update_run(run_id, status="RUNNING")
    else:
        client.set_terminated(run_id, status)


# registered beside model.onnx; the reference profile is missing from exports made before monitoring
EXTRA_FILES = ("model_card.json", "model_card.md", "weights.pt", "reference_profile.npz", "reference_profile.json")


@_store_operation
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
                extra_files=[str(export_dir / f) for f in EXTRA_FILES if (export_dir / f).is_file()],
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


# ---------------------------------------------------------------- reading the registry


def _aliases(client: Any, name: str) -> dict[str, str]:
    """The model's aliases as the store holds them now; none when the model does not exist (yet).

    Read from the registered model rather than asked alias by alias: a missing alias comes back as
    INVALID_PARAMETER_VALUE from both SQLite and a server, the code a malformed request gets too."""
    try:
        model = client.get_registered_model(name)
    except Exception as exc:
        if _missing(exc):
            return {}
        raise
    return {alias: str(version) for alias, version in (model.aliases or {}).items()}


def _registered_model(client: Any, name: str) -> Any:
    try:
        return client.get_registered_model(name)
    except Exception as exc:
        if _missing(exc):
            raise RegistryError(f"no registered model named {name!r} (run `visionloop run` first)") from None
        raise


def _events(client: Any, name: str) -> list[AliasEvent]:
    model = _registered_model(client, name)
    events = [AliasEvent(**json.loads(v)) for k, v in model.tags.items() if k.startswith(EVENT_PREFIX)]
    return sorted(events, key=lambda e: e.seq)


def _download(name: str, ref: str, dest: Path) -> Path:
    mlflow = _mlflow()
    uri = f"models:/{name}@{ref}" if not ref.isdigit() else f"models:/{name}/{ref}"
    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dest)))
    except Exception as exc:
        raise RegistryError(f"cannot download {uri} from {mlflow.get_tracking_uri()}: {_reason(exc)}") from None


@_store_operation
def resolve(settings: Settings, ref: str) -> str | None:
    """The version number ``ref`` (an alias, or a version number) names now; None when it names none.

    Read only, for serving replicas: it creates no experiment and never writes to the store. A store
    that cannot be reached raises RegistryError, so a caller can tell "no champion yet" from "registry down".
    """
    uri = settings.tracking_uri
    client = _client(settings)
    name = settings.registry.model_name
    try:
        if not ref.isdigit():
            return _aliases(client, name).get(ref)
        return str(client.get_model_version(name, ref).version)
    except Exception as exc:
        if _missing(exc) or getattr(exc, "error_code", None) == "INVALID_PARAMETER_VALUE":
            return None
        raise RegistryError(f"cannot reach the MLflow store at {uri}: {_reason(exc)}") from None


@_store_operation
def download_version(settings: Settings, version: str, dest: Path) -> tuple[Path, Path]:
    """Download one registered version; returns (model.onnx, model_card.json) under ``dest``."""
    _point_at(settings.tracking_uri)
    folder = _download(settings.registry.model_name, version, dest)
    return folder / "model.onnx", folder / "extra_files" / "model_card.json"


@_store_operation
def load_classifier(settings: Settings, ref: str, dest: Path | None = None) -> OnnxClassifier:
    """Load a registered version (number) or alias as an ONNX Runtime classifier.

    The session holds the model in memory, so without ``dest`` the download is removed afterwards."""
    connect(settings)
    if dest is not None:
        return OnnxClassifier.load(*download_version(settings, ref, dest))
    with tempfile.TemporaryDirectory(prefix="visionloop-model-") as tmp:
        return load_classifier(settings, ref, Path(tmp))


@_store_operation
def alias_version(settings: Settings, alias: str) -> str | None:
    """The version ``alias`` points at; None only when the store answers that it points at none."""
    with _store_errors(settings.tracking_uri):
        return _aliases(_client(settings), settings.registry.model_name).get(alias)


@_store_operation
def aliases_of(settings: Settings, version: str) -> list[str]:
    """Which of champion and challenger point at ``version`` now."""
    with _store_errors(settings.tracking_uri):
        aliases = _aliases(_client(settings), settings.registry.model_name)
    return [alias for alias in (CHAMPION, CHALLENGER) if aliases.get(alias) == version]


@_store_operation
def dataset_version_of(settings: Settings, version: str) -> str | None:
    """The ``dataset_version`` tag of a registered version: the data it was trained and evaluated on."""
    name = settings.registry.model_name
    with _store_errors(settings.tracking_uri):
        try:
            found = _client(settings).get_model_version(name, version)
        except Exception as exc:
            if _missing(exc):
                raise RegistryError(f"{name} has no version {version}") from None
            raise
    return found.tags.get("dataset_version") or None


@_store_operation
def history(settings: Settings) -> list[AliasEvent]:
    with _store_errors(settings.tracking_uri):
        return _events(_client(settings), settings.registry.model_name)


# ---------------------------------------------------------------- the lock


def _lease_of(model: Any) -> tuple[float, str]:
    """(when the lease expires, in seconds by the store's clock, which stamped its creation; who holds it)."""
    seconds = float(model.tags.get(LEASE_TAG, "0") or 0)
    return model.creation_timestamp / 1000 + seconds, model.tags.get(HOLDER_TAG, "?")


@contextmanager
def _model_lock(client: Any, settings: Settings) -> Iterator[Callable[[], None]]:
    """Hold the model's promotion lock (see the module docstring); yields a check that raises
    RegistryError, before anything is written, if the lease ran out in the meantime."""
    name = settings.registry.model_name
    prefix = f"{name}{LOCK_INFIX}"
    lease_seconds = LEASE_TIMEOUTS * settings.registry.timeout_seconds
    holder = f"{socket.gethostname()} pid {os.getpid()}"
    tags = {LEASE_TAG: f"{lease_seconds:g}", HOLDER_TAG: holder}
    description = f"visionloop: lock of {name} while one promotion or rollback moves its aliases"
    deadline = time.monotonic() + lease_seconds + settings.registry.timeout_seconds
    pause = 0.05
    while True:
        mine = prefix + secrets.token_hex(8)  # a new name each attempt: a deleted lease never comes back
        attempt = time.monotonic()
        lease = client.create_registered_model(mine, tags=tags, description=description)
        try:
            # LIKE reads '_' and '%' in the model's name as wildcards: keep the exact matches
            found = client.search_registered_models(f"name LIKE '{prefix}%'", max_results=1000)
            others = [m for m in found if m.name.startswith(prefix) and m.name != mine]
            now = lease.creation_timestamp / 1000  # the store's clock, which stamped the others' leases too
            live = [m for m in others if _lease_of(m)[0] > now]
            for expired in (m for m in others if _lease_of(m)[0] <= now):
                with contextlib.suppress(Exception):  # another contender may have removed it first
                    client.delete_registered_model(expired.name)
        except BaseException:
            with contextlib.suppress(Exception):
                client.delete_registered_model(mine)
            raise
        if not live:
            break
        client.delete_registered_model(mine)  # step back, so that exactly one of the contenders goes on
        if time.monotonic() > deadline:
            expires, who = _lease_of(live[0])
            raise RegistryError(
                f"{name} is locked by another promotion or rollback ({who}, lease until "
                f"{dt.datetime.fromtimestamp(expires, dt.UTC).isoformat(timespec='seconds')}); try again later"
            )
        time.sleep(random.uniform(pause, 2 * pause))
        pause = min(2 * pause, 1.0)

    def still_held() -> None:
        # by this process's own clock, from before the lease was asked for; and a little before the
        # lease ends, not at it: what follows is a few more requests
        if time.monotonic() - attempt > lease_seconds - settings.registry.timeout_seconds:
            raise RegistryError(f"the lock of {name} expired before its alias could be moved; nothing was moved")

    try:
        yield still_held
    finally:
        with contextlib.suppress(Exception):  # unreleased, it expires on its own
            client.delete_registered_model(mine)


def _move_alias(
    client: Any, name: str, alias: str, to_version: str, from_version: str | None, kind: str, reason: str
) -> AliasEvent:
    """Move ``alias`` and append its event; the caller holds the model's lock, so the number is free."""
    event = AliasEvent(
        seq=max((e.seq for e in _events(client, name)), default=0) + 1,
        time=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        alias=alias,
        from_version=from_version,
        to_version=to_version,
        kind=kind,
        reason=reason,
    )
    client.set_registered_model_alias(name, alias, to_version)
    client.set_registered_model_tag(name, f"{EVENT_PREFIX}{event.seq:06d}", json.dumps(asdict(event)))
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


@_store_operation
def promote_if_better(
    settings: Settings, version: str, test_images: np.ndarray, test_labels: np.ndarray
) -> GateDecision:
    """Score challenger and champion with ONNX Runtime on the same test set; move champion if the gate passes.

    The gate decides under the model's lock, against the champion of that moment: a promotion that
    ran meanwhile is not overwritten by a decision made against the champion it replaced."""
    name = settings.registry.model_name
    client = _client(settings)
    with _store_errors(settings.tracking_uri), tempfile.TemporaryDirectory(prefix="visionloop-gate-") as tmp:
        seen = _aliases(client, name).get(CHAMPION)  # first: a store that is not there fails fast
        challenger = _load(settings, version, Path(tmp) / f"v{version}")
        challenger_acc = challenger.accuracy(test_images, test_labels)
        scores: dict[str, float | None] = {}

        def champion_accuracy(champion_version: str) -> float | None:
            """None when the champion cannot be scored on this test set (other input shape or classes)."""
            if champion_version not in scores:
                champion = _load(settings, champion_version, Path(tmp) / f"v{champion_version}")
                comparable = (
                    champion.input_shape == challenger.input_shape
                    and champion.card["classes"] == challenger.card["classes"]
                )
                scores[champion_version] = champion.accuracy(test_images, test_labels) if comparable else None
            return scores[champion_version]

        def decision(promoted: bool, champion: str | None, champion_acc: float | None, why: list[str]) -> GateDecision:
            return GateDecision(
                version=version,
                promoted=promoted,
                challenger_accuracy=challenger_acc,
                champion_version=champion,
                champion_accuracy=champion_acc,
                reasons=why,
            )

        if seen not in (None, version):
            champion_accuracy(seen)  # the slow part, before the lock; again under it only if the champion moves
        with _model_lock(client, settings) as still_held:
            champion_version = _aliases(client, name).get(CHAMPION)
            if champion_version == version:
                return decision(False, version, challenger_acc, [f"v{version} is already the champion"])
            champion_acc = None if champion_version is None else champion_accuracy(champion_version)
            promoted, reasons = decide(challenger_acc, champion_acc, champion_version, settings.gate)
            if promoted and not settings.gate.promote:
                promoted = False
                reasons.append("gate.promote is false: champion is not moved here (the closed loop's gate decides)")
            tags = {
                "gate.decision": "promoted" if promoted else "rejected",
                "gate.reasons": " | ".join(reasons),
                "gate.challenger_accuracy": f"{challenger_acc:.6f}",
                "gate.champion_version": champion_version or "",
                "gate.champion_accuracy": "" if champion_acc is None else f"{champion_acc:.6f}",
                "gate.time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
            still_held()
            for key, value in tags.items():
                client.set_model_version_tag(name, version, key, value)
            if promoted:
                _move_alias(client, name, CHAMPION, version, champion_version, "promote", "; ".join(reasons))
    return decision(promoted, champion_version, champion_acc, reasons)


def _load(settings: Settings, ref: str, dest: Path) -> OnnxClassifier:
    return OnnxClassifier.load(*download_version(settings, ref, dest))


@_store_operation
def rollback(settings: Settings, reason: str = "manual rollback", expected: str | None = None) -> AliasEvent:
    """Move ``champion`` back to the version that was champion before the current one (only if the
    current one is ``expected``, when given)."""
    name = settings.registry.model_name
    client = _client(settings)
    with _store_errors(settings.tracking_uri), _model_lock(client, settings) as still_held:
        current = _aliases(client, name).get(CHAMPION)
        if current is None:
            raise RegistryError(f"{name} has no champion to roll back")
        if expected is not None and current != expected:
            raise _ChampionMoved(f"champion is v{current}, not v{expected}: nothing rolled back")
        for event in reversed(_events(client, name)):
            if event.alias == CHAMPION and event.to_version == current and event.kind == "promote":
                if event.from_version is None:
                    break
                still_held()
                client.set_model_version_tag(name, current, "rolled_back", "true")
                return _move_alias(
                    client,
                    name,
                    CHAMPION,
                    event.from_version,
                    current,
                    "rollback",
                    f"{reason}: v{current} -> v{event.from_version}",
                )
        raise RegistryError(f"champion v{current} has no earlier champion to roll back to")


@_store_operation
def list_versions(settings: Settings) -> list[dict[str, Any]]:
    name = settings.registry.model_name
    client = _client(settings)
    with _store_errors(settings.tracking_uri):
        model = _registered_model(client, name)
        found = client.search_model_versions(f"name='{name}'")
    aliases: dict[str, list[str]] = {}
    for alias, version in (model.aliases or {}).items():
        aliases.setdefault(str(version), []).append(alias)
    rows = []
    for mv in found:
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


# ---------------------------------------------------------------- the closed loop's registry calls

# (the challenger's accuracy on each test set, the champion's (None: not comparable), the champion's version)
Rule = Callable[[dict[str, float], dict[str, float] | None, str | None], tuple[bool, list[str]]]


class RuleDecision(BaseModel):
    """A gate decision on several named test sets (the loop's: the original test set and the production slice)."""

    version: str
    promoted: bool
    challenger: dict[str, float]
    champion_version: str | None
    champion: dict[str, float] | None
    reasons: list[str]


@_store_operation
def promote_by_rule(
    settings: Settings,
    version: str,
    test_sets: dict[str, tuple[np.ndarray, np.ndarray]],
    rule: Rule,
    reason_prefix: str = "",
    tag_prefix: str = "gate",
) -> RuleDecision:
    """Score challenger and champion on every test set with ONNX Runtime; move champion if ``rule`` says so.

    Like ``promote_if_better``, the rule decides under the model's lock against the champion of that
    moment, so two promotions never both land. A version marked ``rolled_back`` is never promoted again,
    and a version that is already the champion is reported as promoted (a retried call moves nothing)."""
    name = settings.registry.model_name
    client = _client(settings)
    with _store_errors(settings.tracking_uri), tempfile.TemporaryDirectory(prefix="visionloop-gate-") as tmp:
        seen = _aliases(client, name).get(CHAMPION)
        challenger = _load(settings, version, Path(tmp) / f"v{version}")
        mine = {key: challenger.accuracy(x, y) for key, (x, y) in test_sets.items()}
        scores: dict[str, dict[str, float] | None] = {}

        def champion_scores(champion_version: str) -> dict[str, float] | None:
            if champion_version not in scores:
                champion = _load(settings, champion_version, Path(tmp) / f"v{champion_version}")
                comparable = (
                    champion.input_shape == challenger.input_shape
                    and champion.card["classes"] == challenger.card["classes"]
                )
                scores[champion_version] = (
                    {key: champion.accuracy(x, y) for key, (x, y) in test_sets.items()} if comparable else None
                )
            return scores[champion_version]

        if seen not in (None, version):
            champion_scores(seen)  # the slow part, before the lock
        with _model_lock(client, settings) as still_held:
            champion_version = _aliases(client, name).get(CHAMPION)
            if champion_version == version:
                return RuleDecision(
                    version=version,
                    promoted=True,
                    challenger=mine,
                    champion_version=version,
                    champion=mine,
                    reasons=[f"v{version} is already the champion"],
                )
            tags = client.get_model_version(name, version).tags
            if tags.get("rolled_back") == "true":
                promoted, reasons = False, [f"v{version} was rolled back before: it is not promoted again"]
                theirs = None if champion_version is None else champion_scores(champion_version)
            else:
                theirs = None if champion_version is None else champion_scores(champion_version)
                promoted, reasons = rule(mine, theirs, champion_version)
            record = {
                f"{tag_prefix}.decision": "promoted" if promoted else "rejected",
                f"{tag_prefix}.reasons": " | ".join(reasons)[:4900],
                f"{tag_prefix}.challenger": json.dumps(mine),
                f"{tag_prefix}.champion_version": champion_version or "",
                f"{tag_prefix}.champion": json.dumps(theirs),
                f"{tag_prefix}.time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            }
            still_held()
            for key, value in record.items():
                client.set_model_version_tag(name, version, key, value)
            if promoted:
                why = "; ".join(reasons)
                _move_alias(
                    client, name, CHAMPION, version, champion_version, "promote", f"{reason_prefix}{why}"[:4900]
                )
    return RuleDecision(
        version=version,
        promoted=promoted,
        challenger=mine,
        champion_version=champion_version,
        champion=theirs,
        reasons=reasons,
    )


@_store_operation
def force_champion(settings: Settings, version: str, reason: str) -> AliasEvent:
    """Move champion to ``version`` without the gate (an operator's override), recorded in the history
    as a promotion with ``reason``; the loop's post-promotion analysis watches it like any other."""
    name = settings.registry.model_name
    client = _client(settings)
    with _store_errors(settings.tracking_uri), _model_lock(client, settings) as still_held:
        try:
            client.get_model_version(name, version)
        except Exception as exc:
            if _missing(exc):
                raise RegistryError(f"{name} has no version {version}") from None
            raise
        current = _aliases(client, name).get(CHAMPION)
        if current == version:
            raise RegistryError(f"v{version} is already the champion")
        still_held()
        client.set_model_version_tag(name, version, "gate.forced", reason[:4900])
        return _move_alias(client, name, CHAMPION, version, current, "promote", f"forced: {reason}"[:4900])


@_store_operation
def rollback_version(settings: Settings, version: str, reason: str) -> AliasEvent | None:
    """Roll champion back from ``version``, if it still is the champion; None when it no longer is.

    The loop's rollback: a retry after a crash (the alias moved, the loop's record did not) moves nothing."""
    name = settings.registry.model_name
    client = _client(settings)
    with _store_errors(settings.tracking_uri):
        if _aliases(client, name).get(CHAMPION) != version:
            return None
    try:
        return rollback(settings, reason, expected=version)
    except _ChampionMoved:
        return None


class _ChampionMoved(RegistryError):
    pass


@_store_operation
def last_event(settings: Settings, to_version: str, kind: str | None = None) -> AliasEvent | None:
    """The newest champion event that moved it to ``to_version`` (of ``kind``: promote | rollback)."""
    with _store_errors(settings.tracking_uri):
        events = _events(_client(settings), settings.registry.model_name)
    for event in reversed(events):
        if event.alias == CHAMPION and event.to_version == to_version and kind in (None, event.kind):
            return event
    return None


@_store_operation
def version_tags(settings: Settings, version: str) -> dict[str, str]:
    name = settings.registry.model_name
    with _store_errors(settings.tracking_uri):
        return dict(_client(settings).get_model_version(name, version).tags)


@_store_operation
def tag_version(settings: Settings, version: str, tags: dict[str, str]) -> None:
    name = settings.registry.model_name
    client = _client(settings)
    with _store_errors(settings.tracking_uri):
        for key, value in tags.items():
            client.set_model_version_tag(name, version, key, str(value)[:4900])


@_store_operation
def tag_run(settings: Settings, run_id: str, tags: dict[str, str]) -> None:
    client = _client(settings)
    with _store_errors(settings.tracking_uri):
        for key, value in tags.items():
            client.set_tag(run_id, key, str(value)[:4900])


def _search_runs(settings: Settings, filter_string: str) -> list[Any]:
    """The experiment's runs that match ``filter_string``, newest first (none when there is no experiment yet)."""
    client = _client(settings)
    with _store_errors(settings.tracking_uri):
        experiment = client.get_experiment_by_name(settings.registry.experiment)
        if experiment is None:
            return []
        return list(
            client.search_runs([experiment.experiment_id], filter_string=filter_string, order_by=["start_time DESC"])
        )


@_store_operation
def runs_tagged(settings: Settings, key: str, value: str) -> list[tuple[str, str]]:
    """(run id, status) of the experiment's runs whose tag ``key`` is ``value``, newest first."""
    return [(run.info.run_id, run.info.status) for run in _search_runs(settings, f"tags.`{key}` = '{value}'")]


@_store_operation
def version_of_run(settings: Settings, run_id: str) -> str | None:
    """The registered version made from MLflow run ``run_id``, if one was."""
    name = settings.registry.model_name
    client = _client(settings)
    with _store_errors(settings.tracking_uri):
        found = client.search_model_versions(f"name='{name}' and run_id='{run_id}'")
    return str(max(int(v.version) for v in found)) if found else None


@_store_operation
def runs_with_param(settings: Settings, key: str, value: str) -> list[str]:
    """Run ids of the experiment's runs whose parameter ``key`` is ``value``, newest first."""
    return [run.info.run_id for run in _search_runs(settings, f"params.`{key}` = '{value}'")]
