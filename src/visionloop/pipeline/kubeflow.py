"""The Kubeflow pipeline: the same eight steps that ``visionloop run`` chains, as KFP v2 components.

Each component is a lightweight Python component (``@dsl.component``): KFP ships the function's source,
so every import sits inside its body, and the container image must have visionloop installed (which
brings kfp). A component rebuilds the settings, calls its step from ``visionloop.pipeline.steps``
unchanged, and copies what the step wrote into its output artifact; nothing else happens in it.

    ingest ─raw─► validate ─report─► preprocess ─dataset─► train ─model, run_id─► evaluate ─metrics─►
    export ─onnx─► register ─version─► promote ─gate─►

- Components may run in different pods, so each one works in a scratch ``home`` of its own and hands
  everything on as artifacts (``dsl.Dataset``, ``dsl.Model``, ``dsl.Artifact``) or parameters (the
  MLflow ``run_id``, the registered ``version``); evaluation and the gate's decision are ``dsl.Metrics``.
- Pipeline parameters: ``settings_json`` (the groups data, validation, train, gate and registry of
  ``Settings`` as JSON; ``{}`` means the image's defaults), ``tracking_uri`` (wins over
  ``registry.tracking_uri``), and the resources ``cpu``, ``memory``, ``gpus`` (strings: the KFP backend
  reads resource placeholders as strings). The image is fixed at compile time: ``build_pipeline(image=...)``.
- Caching is off for every task: ingest reads a source that may change under the same name, and the
  later steps write to MLflow, which a cache hit would silently skip.
"""

# No ``from __future__ import annotations`` here: KFP reads the components' annotations as objects.

import contextlib
import io
import json
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from kfp import dsl

from visionloop.config import Settings
from visionloop.errors import ConfigError, VisionloopError

DEFAULT_IMAGE = "ghcr.io/visionloop/visionloop:latest"
PIPELINE_NAME = "visionloop"
STEPS = ("ingest", "validate", "preprocess", "train", "evaluate", "export", "register", "promote")
# what travels in settings_json: the groups the steps read (not home, which is per pod, nor serve)
SETTINGS_GROUPS = ("data", "validation", "train", "gate", "registry")
GPU_RESOURCE = "nvidia.com/gpu"
# the pipeline parameters a submit may set (settings_json comes from --config / --set instead)
RUN_PARAMETERS = {
    "tracking_uri": "MLflow tracking URI every step uses (wins over registry.tracking_uri)",
    "cpu": "CPU limit of every step, e.g. 2 or 500m",
    "memory": "memory limit of every step, e.g. 8Gi or 512Mi",
    "gpus": f"{GPU_RESOURCE} limit of the train step (0 = none)",
}
_RESOURCE_FORMATS = {
    # the forms kfp's own set_cpu_limit / set_memory_limit / set_accelerator_limit accept
    "cpu": (r"([0-9]*[.])?[0-9]+m?", "a number of cores such as 2, 0.5 or 500m"),
    "memory": (r"[0-9]+(E|Ei|P|Pi|T|Ti|G|Gi|M|Mi|K|Ki)?", "a size such as 8Gi, 512Mi or 2G"),
    "gpus": (r"\d+", "a whole number of GPUs such as 0 or 1"),
}


# ---------------------------------------------------------------- helpers the components call


def settings_json(settings: Settings) -> str:
    """The part of ``settings`` a pipeline run needs, as the ``settings_json`` parameter."""
    return settings.model_dump_json(include=set(SETTINGS_GROUPS))


def component_settings(settings_json: str, home: Path, tracking_uri: str = "", needs_mlflow: bool = False) -> Settings:
    """Rebuild the settings inside a component, with ``home`` a scratch folder of this component.

    A step that talks to MLflow needs a store every pod can reach: the ``tracking_uri`` parameter,
    ``registry.tracking_uri``, or MLFLOW_TRACKING_URI in the pod; never the SQLite file under a scratch home.
    """
    try:
        values = json.loads(settings_json or "{}")
        if not isinstance(values, dict):
            raise ValueError("expected a JSON object")
        values.pop("home", None)
        if tracking_uri:
            values.setdefault("registry", {})["tracking_uri"] = tracking_uri
        settings = Settings(**values, home=home)
    except ValueError as exc:  # JSON syntax and pydantic's ValidationError
        raise ConfigError(f"invalid settings_json parameter: {exc}") from None
    if needs_mlflow:
        if not (settings.registry.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")):
            raise ConfigError(
                "no MLflow tracking URI: pass the pipeline parameter tracking_uri (an MLflow server every pod "
                "can reach), set registry.tracking_uri, or set MLFLOW_TRACKING_URI in the pods"
            )
        _keep_sqlite_artifacts_beside_db(settings)
    return settings


def _keep_sqlite_artifacts_beside_db(settings: Settings) -> None:
    """A SQLite store (local runs) keeps its artifacts in ``mlartifacts`` beside the db file, as the
    embedded default does, not under the scratch home of whichever component connects first."""
    uri = settings.tracking_uri
    if uri.startswith("sqlite:///"):
        from visionloop import registry

        registry.connect(settings.model_copy(update={"home": Path(uri.removeprefix("sqlite:///")).parent}))


def copy_into(source: Path, artifact_path: str) -> None:
    """Copy a folder a step wrote into an output artifact's folder."""
    shutil.copytree(source, artifact_path, dirs_exist_ok=True)


def ingested_from(raw: Any) -> Any:
    """The ``IngestResult`` of an ingest output artifact, rooted wherever the artifact is in this pod."""
    from visionloop.data.sources import IngestResult

    meta = raw.metadata
    return IngestResult(
        root=Path(raw.path),
        source=str(meta["source"]),
        kind=str(meta["kind"]),
        hflip_ok=bool(meta["hflip_ok"]),
        classes=[str(c) for c in meta["classes"]],
        num_files=int(meta["num_files"]),
    )


def relocated_report(report_dir: str, image_root: str, scratch: Path) -> Path:
    """A copy of the validation report whose ``root`` is where the images are in this pod.

    The report stores the absolute folder it validated, which was the validate pod's copy of the images."""
    from visionloop.fsutil import atomic_write_json, read_json

    data = read_json(Path(report_dir) / "report.json")
    data["root"] = str(image_root)
    path = scratch / "report" / "report.json"
    atomic_write_json(path, data)
    return path


def numbers(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of ``values`` (KFP metrics and MLflow take nothing else)."""
    import math

    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


def log_metrics(metrics: Any, values: dict[str, Any]) -> None:
    for name, value in numbers(values).items():
        metrics.log_metric(name, value)


@contextmanager
def run_marked_failed_on_error(run_id: str) -> Iterator[None]:
    """As the local runner does: a step after train that fails marks the MLflow run FAILED."""
    try:
        yield
    except BaseException:
        from visionloop import registry

        # the store may be what failed; the step's own error is the one to report
        with contextlib.suppress(Exception):
            registry.set_run_status(run_id, "FAILED")
        raise


# ---------------------------------------------------------------- the components (imports inside)


def ingest(settings_json: str, raw: dsl.Output[dsl.Dataset]) -> None:
    """Fetch or generate the images (steps.ingest_step); the class folders become the ``raw`` Dataset."""
    import tempfile
    from pathlib import Path

    from visionloop.pipeline import kubeflow as kf
    from visionloop.pipeline import steps

    with tempfile.TemporaryDirectory(prefix="visionloop-ingest-") as scratch:
        settings = kf.component_settings(settings_json, Path(scratch))
        out = steps.ingest_step(settings)
        kf.copy_into(out.root, raw.path)
    raw.metadata.update(
        {
            "source": out.source,
            "kind": out.kind,
            "hflip_ok": out.hflip_ok,
            "classes": out.classes,
            "num_files": out.num_files,
        }
    )


def validate(settings_json: str, raw: dsl.Input[dsl.Dataset], report: dsl.Output[dsl.Artifact]) -> None:
    """Decode and check every image (steps.validate_step); fails the run when the policy fails."""
    import tempfile
    from pathlib import Path

    from visionloop.pipeline import kubeflow as kf
    from visionloop.pipeline import steps

    with tempfile.TemporaryDirectory(prefix="visionloop-validate-") as scratch:
        settings = kf.component_settings(settings_json, Path(scratch))
        out = steps.validate_step(kf.ingested_from(raw), settings)
        kf.copy_into(out.report_path.parent, report.path)
    report.metadata.update(
        {"passed": out.passed, "usable": out.usable, "bad": out.bad, "classes": out.classes, "warnings": out.warnings}
    )


def preprocess(
    settings_json: str,
    raw: dsl.Input[dsl.Dataset],
    report: dsl.Input[dsl.Artifact],
    dataset: dsl.Output[dsl.Dataset],
) -> None:
    """Split, resize and normalise (steps.preprocess_step) into the versioned ``dataset``."""
    import tempfile
    from pathlib import Path

    from visionloop.pipeline import kubeflow as kf
    from visionloop.pipeline import steps

    with tempfile.TemporaryDirectory(prefix="visionloop-preprocess-") as scratch:
        settings = kf.component_settings(settings_json, Path(scratch))
        report_path = kf.relocated_report(report.path, raw.path, Path(scratch))
        out = steps.preprocess_step(report_path, kf.ingested_from(raw), settings)
        kf.copy_into(out.dataset_dir, dataset.path)
    dataset.metadata.update(
        {
            "dataset_version": out.dataset_version,
            "image_size": out.image_size,
            "channels": out.channels,
            "counts": out.counts,
            "hflip_ok": out.hflip_ok,
        }
    )


def train(
    settings_json: str,
    tracking_uri: str,
    dataset: dsl.Input[dsl.Dataset],
    model: dsl.Output[dsl.Model],
) -> NamedTuple("TrainOutputs", [("run_id", str)]):
    """Train with MLflow tracking (steps.train_step); the weights become ``model``, the run id an output."""
    import shutil
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from visionloop.pipeline import kubeflow as kf
    from visionloop.pipeline import steps

    with tempfile.TemporaryDirectory(prefix="visionloop-train-") as scratch:
        settings = kf.component_settings(settings_json, Path(scratch), tracking_uri, needs_mlflow=True)
        out = steps.train_step(Path(dataset.path), settings, steps.new_work_dir(settings.home), show_progress=False)
        Path(model.path).mkdir(parents=True, exist_ok=True)
        for produced in (out.model_path, out.model_path.with_name("history.json")):
            shutil.copy2(produced, Path(model.path) / produced.name)
    model.metadata.update(
        {
            "framework": "pytorch",
            "run_id": out.run_id,
            "dataset_version": dataset.metadata.get("dataset_version", ""),
            "device": out.device,
            "epochs_run": out.epochs_run,
            "best_epoch": out.best_epoch,
            "best_val_accuracy": out.best_val_accuracy,
            "parameters": out.parameters,
        }
    )
    return namedtuple("TrainOutputs", ["run_id"])(out.run_id)


def evaluate(
    settings_json: str,
    tracking_uri: str,
    run_id: str,
    model: dsl.Input[dsl.Model],
    dataset: dsl.Input[dsl.Dataset],
    metrics: dsl.Output[dsl.Metrics],
    evaluation: dsl.Output[dsl.Artifact],
) -> None:
    """Score the test split beside the baseline (steps.evaluate_step); the numbers become ``metrics``."""
    import tempfile
    from pathlib import Path

    from visionloop.pipeline import kubeflow as kf
    from visionloop.pipeline import steps

    with tempfile.TemporaryDirectory(prefix="visionloop-evaluate-") as scratch:
        settings = kf.component_settings(settings_json, Path(scratch), tracking_uri, needs_mlflow=True)
        with kf.run_marked_failed_on_error(run_id):
            out = steps.evaluate_step(
                Path(model.path) / "model.pt", Path(dataset.path), run_id, settings, Path(scratch) / "evaluation"
            )
        kf.copy_into(out.metrics_path.parent, evaluation.path)
    kf.log_metrics(metrics, out.metrics)
    evaluation.metadata.update({"baseline_name": out.baseline_name, "test_accuracy": out.test_accuracy})


def export(
    settings_json: str,
    tracking_uri: str,
    run_id: str,
    model: dsl.Input[dsl.Model],
    dataset: dsl.Input[dsl.Dataset],
    metrics: dsl.Input[dsl.Metrics],
    onnx_model: dsl.Output[dsl.Model],
) -> None:
    """Export to ONNX and check parity (steps.export_step); the model folder becomes ``onnx_model``."""
    import tempfile
    from pathlib import Path

    from visionloop.pipeline import kubeflow as kf
    from visionloop.pipeline import steps

    with tempfile.TemporaryDirectory(prefix="visionloop-export-") as scratch:
        settings = kf.component_settings(settings_json, Path(scratch), tracking_uri, needs_mlflow=True)
        with kf.run_marked_failed_on_error(run_id):
            out = steps.export_step(
                Path(model.path) / "model.pt",
                Path(dataset.path),
                kf.numbers(dict(metrics.metadata)),
                settings,
                Path(scratch) / "export",
            )
        kf.copy_into(out.export_dir, onnx_model.path)
    onnx_model.metadata.update(
        {"framework": "onnx", "max_abs_diff": out.max_abs_diff, "parity_images": out.parity_images}
    )


def register(
    settings_json: str,
    tracking_uri: str,
    run_id: str,
    onnx_model: dsl.Input[dsl.Model],
) -> NamedTuple("RegisterOutputs", [("model_name", str), ("version", str), ("model_uri", str)]):
    """Log and register the ONNX model as ``challenger`` (steps.register_step)."""
    import tempfile
    from collections import namedtuple
    from pathlib import Path

    from visionloop.pipeline import kubeflow as kf
    from visionloop.pipeline import steps

    with tempfile.TemporaryDirectory(prefix="visionloop-register-") as scratch:
        settings = kf.component_settings(settings_json, Path(scratch), tracking_uri, needs_mlflow=True)
        with kf.run_marked_failed_on_error(run_id):
            out = steps.register_step(Path(onnx_model.path), run_id, settings)
    return namedtuple("RegisterOutputs", ["model_name", "version", "model_uri"])(
        out.model_name, out.version, out.model_uri
    )


def promote(
    settings_json: str,
    tracking_uri: str,
    run_id: str,
    version: str,
    dataset: dsl.Input[dsl.Dataset],
    gate: dsl.Output[dsl.Metrics],
    decision: dsl.Output[dsl.Artifact],
) -> None:
    """The quality gate (steps.promote_step): ``champion`` moves only if the challenger wins."""
    import tempfile
    from pathlib import Path

    from visionloop import registry
    from visionloop.fsutil import atomic_write_json
    from visionloop.pipeline import kubeflow as kf
    from visionloop.pipeline import steps

    with tempfile.TemporaryDirectory(prefix="visionloop-promote-") as scratch:
        settings = kf.component_settings(settings_json, Path(scratch), tracking_uri, needs_mlflow=True)
        with kf.run_marked_failed_on_error(run_id):
            out = steps.promote_step(version, Path(dataset.path), settings)
        registry.set_run_status(run_id, "FINISHED")
    atomic_write_json(Path(decision.path), steps.as_json(out))
    decision.metadata.update({"promoted": out.promoted, "aliases": out.aliases, "reasons": out.reasons})
    kf.log_metrics(
        gate,
        {
            "promoted": 1.0 if out.promoted else 0.0,
            "challenger_accuracy": out.challenger_accuracy,
            "champion_accuracy": out.champion_accuracy,  # None (no champion yet) is left out
            "version": int(out.version),
        },
    )


COMPONENT_FUNCTIONS: tuple[Callable[..., Any], ...] = (
    ingest,
    validate,
    preprocess,
    train,
    evaluate,
    export,
    register,
    promote,
)


# ---------------------------------------------------------------- the pipeline


def build_pipeline(image: str = DEFAULT_IMAGE) -> Any:
    """The KFP pipeline, with every component running in ``image`` (which must contain visionloop).

    The image is the one setting fixed at compile time: a component's ``base_image`` is part of its spec.
    """
    if not image or any(c.isspace() for c in image):
        raise ConfigError(f"invalid container image {image!r}")
    make = dsl.component(base_image=image, install_kfp_package=False)
    c = {fn.__name__: make(fn) for fn in COMPONENT_FUNCTIONS}

    class Outputs(NamedTuple):
        metrics: dsl.Metrics
        gate: dsl.Metrics

    @dsl.pipeline(
        name=PIPELINE_NAME,
        description="visionloop: ingest, validate, preprocess, train, evaluate, export (ONNX), register (MLflow) "
        "and promote an image classifier; the same steps as `visionloop run`.",
    )
    def visionloop_pipeline(
        settings_json: str = "{}",
        tracking_uri: str = "",
        cpu: str = "2",
        memory: str = "8Gi",
        gpus: str = "0",
    ) -> Outputs:
        def limited(task: Any) -> Any:
            return task.set_cpu_limit(cpu).set_memory_limit(memory).set_caching_options(False)

        mlflow = {"settings_json": settings_json, "tracking_uri": tracking_uri}
        ingested = limited(c["ingest"](settings_json=settings_json))
        validated = limited(c["validate"](settings_json=settings_json, raw=ingested.outputs["raw"]))
        prepared = limited(
            c["preprocess"](
                settings_json=settings_json, raw=ingested.outputs["raw"], report=validated.outputs["report"]
            )
        )
        dataset = prepared.outputs["dataset"]
        trained = limited(c["train"](**mlflow, dataset=dataset))
        trained.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
        run_id = trained.outputs["run_id"]
        model = trained.outputs["model"]
        evaluated = limited(c["evaluate"](**mlflow, run_id=run_id, model=model, dataset=dataset))
        exported = limited(
            c["export"](**mlflow, run_id=run_id, model=model, dataset=dataset, metrics=evaluated.outputs["metrics"])
        )
        registered = limited(c["register"](**mlflow, run_id=run_id, onnx_model=exported.outputs["onnx_model"]))
        promoted = limited(
            c["promote"](**mlflow, run_id=run_id, version=registered.outputs["version"], dataset=dataset)
        )
        return Outputs(metrics=evaluated.outputs["metrics"], gate=promoted.outputs["gate"])

    return visionloop_pipeline


def compile_pipeline(output: Path, image: str = DEFAULT_IMAGE) -> Path:
    """Write the pipeline's IR YAML to ``output`` (atomically: a reader never sees half a file)."""
    from kfp import compiler

    from visionloop.fsutil import atomic_write_bytes

    if output.is_dir():
        raise VisionloopError(f"{output} is a folder; give a file name such as {output / 'visionloop-pipeline.yaml'}")
    if output.suffix not in (".yaml", ".yml"):
        raise VisionloopError(f"the output must end in .yaml or .yml, got {output}")
    with tempfile.TemporaryDirectory(prefix="visionloop-compile-") as tmp:
        staged = Path(tmp) / "pipeline.yaml"
        compiler.Compiler().compile(build_pipeline(image), str(staged))
        data = staged.read_bytes()
    try:
        atomic_write_bytes(output, data)
    except OSError as exc:
        raise VisionloopError(f"cannot write {output}: {exc.strerror or exc}") from None
    return output


# ---------------------------------------------------------------- submitting to a cluster


@dataclass
class Submitted:
    host: str
    run_id: str
    run_url: str
    experiment: str
    run_name: str
    arguments: dict[str, str]


def parse_parameters(pairs: list[str] | None) -> dict[str, str]:
    """``--param key=value`` pairs, checked against the pipeline's parameters before anything is sent."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        key, value = key.strip(), value.strip()
        if not sep or not key:
            raise ConfigError(f"--param expects KEY=VALUE, got {pair!r}")
        if key == "settings_json":
            raise ConfigError("settings travel from --config / --set / VISIONLOOP_* (not --param settings_json)")
        if key not in RUN_PARAMETERS:
            known = ", ".join(f"{k} ({v})" for k, v in RUN_PARAMETERS.items())
            raise ConfigError(f"unknown pipeline parameter {key!r}; known: {known}")
        if key in _RESOURCE_FORMATS:
            pattern, what = _RESOURCE_FORMATS[key]
            if not re.fullmatch(pattern, value):
                raise ConfigError(f"--param {key}={value!r}: expected {what}")
        out[key] = value
    return out


def _reason(exc: BaseException) -> str:
    """The OS-level cause inside requests' and urllib3's nested wrappers ("Connection refused")."""
    found = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    return found.group(1).strip() if found else type(exc).__name__


def _check_reachable(host: str, timeout: float) -> None:
    """Fail in ``timeout`` seconds, with a plain message, when no Kubeflow Pipelines API answers at ``host``.

    kfp.Client waits without limit on a host that accepts connections and never answers, and retries."""
    import requests

    url = f"{host}/apis/v2beta1/healthz"
    try:
        response = requests.get(url, timeout=(timeout, timeout), allow_redirects=False)
    except requests.Timeout:
        raise VisionloopError(
            f"Kubeflow Pipelines at {host} did not answer within {timeout:g} s (GET {url}); check the URL, "
            "or a port-forward such as `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`"
        ) from None
    except requests.RequestException as exc:
        raise VisionloopError(
            f"cannot reach Kubeflow Pipelines at {host}: {_reason(exc)} (GET {url}); check the URL, or a port-forward "
            "such as `kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80`"
        ) from None
    status = response.status_code
    if status == 404:
        raise VisionloopError(
            f"no Kubeflow Pipelines API at {host} (GET {url} gave 404); behind the Kubeflow dashboard the "
            "host usually ends in /pipeline"
        )
    if status in (301, 302, 303, 307, 308, 401, 403):
        raise VisionloopError(
            f"Kubeflow Pipelines at {host} asks for a login (GET {url} gave {status}), which this command does "
            "not do; submit through a port-forward instead: `kubectl port-forward -n kubeflow svc/ml-pipeline-ui "
            "8080:80`, then --host http://localhost:8080"
        )
    if not 200 <= status < 300:
        # kfp.Client would retry its own health check for half a minute and then fail without a reason
        raise VisionloopError(f"Kubeflow Pipelines at {host} is not healthy: GET {url} gave {status}")


def _bound_timeouts(client: Any, timeout: float) -> None:
    """Give every call kfp.Client makes a connect/read timeout and at most one retry.

    kfp_server_api passes ``timeout=None`` (wait forever) to urllib3 unless a call says otherwise, and
    kfp.Client's methods never do; all its service APIs share this one REST client."""
    import urllib3

    rest = client._run_api.api_client.rest_client
    unbounded = rest.request

    def request(*args: Any, _request_timeout: Any = None, **kwargs: Any) -> Any:
        return unbounded(*args, _request_timeout=_request_timeout or (timeout, max(timeout, 30.0)), **kwargs)

    rest.request = request
    rest.pool_manager.clear()  # pools made so far keep urllib3's default of three retries
    rest.pool_manager.connection_pool_kw["retries"] = urllib3.Retry(total=1, read=0)


def _api_error(host: str, exc: Exception) -> VisionloopError:
    status = getattr(exc, "status", None)
    body = getattr(exc, "body", None)
    detail = ""
    if body:
        try:
            parsed = json.loads(body)
            detail = str(parsed.get("error_message") or parsed.get("message") or "").strip()
        except (ValueError, AttributeError):
            detail = str(body).strip()[:300]
    reason = detail or str(getattr(exc, "reason", "") or exc).strip()
    what = f"HTTP {status}: " if status else ""
    return VisionloopError(f"Kubeflow Pipelines at {host} refused the run: {what}{' '.join(reason.split())}")


def submit_pipeline(
    host: str,
    settings: Settings,
    parameters: dict[str, str] | None = None,
    experiment: str = "visionloop",
    run_name: str | None = None,
    image: str = DEFAULT_IMAGE,
    namespace: str | None = None,
    timeout: float = 10.0,
) -> Submitted:
    """Compile the pipeline for ``image`` and start one run of it on the Kubeflow Pipelines API at ``host``."""
    host = host.strip().rstrip("/")
    if not re.match(r"^https?://[^/\s]+", host):
        raise ConfigError(f"--host must be an http:// or https:// URL, got {host!r}")
    if timeout <= 0:
        raise ConfigError("--timeout must be a positive number of seconds")
    arguments = {"settings_json": settings_json(settings), **(parameters or {})}
    tracking = arguments.get("tracking_uri") or settings.registry.tracking_uri
    if tracking.startswith("sqlite:"):
        raise ConfigError(
            f"tracking URI {tracking} is a SQLite file on one machine; pods on a cluster need an MLflow server "
            "they can all reach: --param tracking_uri=http://mlflow.mlflow.svc:5000"
        )
    _check_reachable(host, timeout)
    run_name = run_name or f"visionloop {time.strftime('%Y-%m-%d %H-%M-%S')}"
    with tempfile.TemporaryDirectory(prefix="visionloop-submit-") as tmp:
        package = compile_pipeline(Path(tmp) / "visionloop-pipeline.yaml", image)
        import kfp
        import kfp_server_api
        import urllib3

        try:
            # kfp.Client prints "Experiment details: URL" and "Run details: URL" to stdout, which --json owns
            with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
                # "This client only works with Kubeflow Pipeline v2.0.0-beta.2 and later versions."
                warnings.simplefilter("ignore")
                # its constructor may ask /healthz once more, unbounded: the check above has just had an answer
                client = kfp.Client(host=host, **({"namespace": namespace} if namespace else {}))
                _bound_timeouts(client, timeout)
                result = client.create_run_from_pipeline_package(
                    str(package),
                    arguments=arguments,
                    run_name=run_name,
                    experiment_name=experiment,
                    namespace=namespace,
                )
        except kfp_server_api.ApiException as exc:
            raise _api_error(host, exc) from None
        except (urllib3.exceptions.HTTPError, OSError) as exc:
            raise VisionloopError(f"lost Kubeflow Pipelines at {host} while submitting: {_reason(exc)}") from None
        except ValueError as exc:  # e.g. "Multiple experiments is found with name ..."
            raise VisionloopError(f"Kubeflow Pipelines at {host}: {exc}") from None
    return Submitted(
        host=host,
        run_id=result.run_id,
        run_url=f"{host}/#/runs/details/{result.run_id}",
        experiment=experiment,
        run_name=run_name,
        arguments=arguments,
    )
