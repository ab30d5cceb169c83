"""The Kubeflow pipeline: the steps of ``dataflow.STEPS``, the same ones ``visionloop run`` loops over, as KFP v2 components.

Each component is a lightweight Python component (``@dsl.component``) generated from the declaration
(``component_source``): a static signature, as KFP needs, and one call, ``run_step("<step>", ...)``, that
rebuilds the settings and the step's arguments, calls the step function by name and packs its output.
KFP ships that source, and the container image must have visionloop installed (which brings kfp).

    ingest ─raw─► validate ─report─► preprocess ─dataset─► train ─model, run_id─► evaluate ─evaluation─►
    export ─onnx_model─► register ─version─► promote ─decision, gate─►

- Components may run in different pods, so each one works in a scratch ``home`` of its own. A step's
  output travels as one artifact (``Kfp.artifact``: a Dataset, Model or Artifact holding the files the
  output points at, and the output's JSON in its metadata) or as parameters (``Kfp.parameters``: the
  MLflow ``run_id``, the registered ``version``); evaluation and the gate's decision are also ``dsl.Metrics``.
  A component takes each input from the step that produced it: evaluate's dataset is preprocess's artifact,
  which train handed on.
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
import linecache
import os
import re
import shutil
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from kfp import dsl
from pydantic import BaseModel

from visionloop.config import Settings
from visionloop.errors import ConfigError, VisionloopError
from visionloop.pipeline import dataflow, steps

DEFAULT_IMAGE = "ghcr.io/visionloop/visionloop-train:0.1.0"  # deploy/docker/train.Dockerfile
PIPELINE_NAME = "visionloop"
STEPS = tuple(step.name for step in dataflow.STEPS)
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


def numbers(values: dict[str, Any]) -> dict[str, float]:
    """The finite numbers of ``values`` (KFP metrics and MLflow take nothing else)."""
    import math

    return {
        k: float(v)
        for k, v in values.items()
        if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(float(v))
    }


OUTPUT_KEY = "visionloop.output"  # the step's output JSON in its artifact's metadata


def _path_fields(out: BaseModel) -> list[str]:
    return [name for name, value in out if isinstance(value, Path)]


def pack(step: dataflow.Step, out: BaseModel, artifact: Any) -> None:
    """Put what ``out`` points at into ``artifact``'s folder and the output itself, with those paths made
    relative to the folder, into its metadata. Fields handed on from an input are left to their producer."""
    root = Path(artifact.path)
    root.mkdir(parents=True, exist_ok=True)
    data = steps.as_json(out)
    copied: dict[Path, Path] = {}  # a folder copied so far -> where it is in the artifact
    own = [f for f in _path_fields(out) if f not in step.wiring]
    own.sort(key=lambda f: not Path(getattr(out, f)).is_dir())  # folders first: files inside them come along
    for index, name in enumerate(own):
        path = Path(getattr(out, name))
        inside = next((src for src in copied if path.is_relative_to(src)), None)
        if inside is not None:
            data[name] = str(copied[inside] / path.relative_to(inside))
            continue
        folder = path if path.is_dir() else path.parent
        dest = Path(".") if index == 0 else Path(name)  # the first one fills the artifact, as a user expects
        shutil.copytree(folder, root / dest, dirs_exist_ok=True)
        copied[folder] = dest
        data[name] = str(dest if path.is_dir() else dest / path.name)
    artifact.metadata[OUTPUT_KEY] = json.dumps(data)
    artifact.metadata.update(numbers(data))


def unpack(step: dataflow.Step, artifact: Any) -> BaseModel:
    """The output ``pack`` stored, with its paths where the artifact's folder is in this pod."""
    data = json.loads(artifact.metadata[OUTPUT_KEY])
    for name in _path_fields(step.output.model_validate(data)):
        if name not in step.wiring:
            data[name] = str(Path(artifact.path) / data[name])
    return step.output.model_validate(data)


def run_step(
    name: str,
    settings_json: str,
    tracking_uri: str = "",
    inputs: dict[str, Any] | None = None,
    parameters: dict[str, Any] | None = None,
    output: Any = None,
    metrics: Any = None,
    declared: tuple[dataflow.Step, ...] | None = None,
) -> dict[str, Any]:
    """What every component does: rebuild its arguments, call the step by name, pack its output.

    ``inputs``: upstream step name -> its artifact; ``parameters``: "step.field" -> value. Each wired
    argument comes from the step that produced it (``dataflow.resolve``). Returns the KFP parameters."""
    step = dataflow.step_named(name, declared)
    with tempfile.TemporaryDirectory(prefix=f"visionloop-{name}-") as scratch:
        settings = component_settings(settings_json, Path(scratch) / "home", tracking_uri, needs_mlflow=step.in_run)
        unpacked = {up: unpack(dataflow.step_named(up, declared), art) for up, art in (inputs or {}).items()}
        resolved: dict[str, Any] = {}  # each wired argument from the task that produced it
        for parameter, wire in step.wiring.items():
            if isinstance(wire, dataflow.From):
                source = dataflow.resolve(wire, declared)
                dotted = f"{source.step}.{source.field}"
                if parameters and dotted in parameters:
                    resolved[parameter] = parameters[dotted]
                else:
                    produced = unpacked[source.step]
                    resolved[parameter] = produced if source.field is None else getattr(produced, source.field)
        if step.takes("work_dir"):
            resolved["work_dir"] = Path(scratch) / "run"
        # the scratch folders and the settings as the runner gives them
        args = dataflow.call_args(step, {}, settings, Path(scratch), resolved)
        out = dataflow.execute(step, args, settings)
        if output is not None:
            pack(step, out, output)
    if metrics is not None:
        values = step.kfp.numbers(out) if step.kfp.numbers else numbers(steps.as_json(out))
        for key, value in numbers(values).items():
            metrics.log_metric(key, value)
    return {p: getattr(out, p) for p in step.kfp.parameters}


# ---------------------------------------------------------------- the components, generated from the declaration


def _wires(step: dataflow.Step, declared: tuple[dataflow.Step, ...]) -> tuple[list[str], list[str]]:
    """(upstream steps whose artifacts this component takes, "step.field" parameters it takes)."""
    artifacts: list[str] = []
    parameters: list[str] = []
    for wire in step.wiring.values():
        if not isinstance(wire, dataflow.From):
            continue
        source = dataflow.resolve(wire, declared)
        producer = dataflow.step_named(source.step, declared)
        if source.field is not None and source.field in producer.kfp.parameters:
            if f"{source.step}.{source.field}" not in parameters:
                parameters.append(f"{source.step}.{source.field}")
        elif source.step not in artifacts:
            artifacts.append(source.step)
    return artifacts, parameters


def component_source(step: dataflow.Step, declared: tuple[dataflow.Step, ...]) -> str:
    """The Python source of ``step``'s lightweight component: a static signature, one call of ``run_step``."""
    artifacts, parameters = _wires(step, declared)
    args = ["settings_json: str"] + (["tracking_uri: str"] if step.in_run else [])
    args += [f"{p.split('.')[1]}: str" for p in parameters]
    for up in artifacts:
        name, kind = dataflow.step_named(up, declared).kfp.artifact or (up, "Artifact")
        args.append(f"{name}: dsl.Input[dsl.{kind}]")
    if step.kfp.artifact:
        args.append(f"{step.kfp.artifact[0]}: dsl.Output[dsl.{step.kfp.artifact[1]}]")
    if step.kfp.metrics:
        args.append(f"{step.kfp.metrics}: dsl.Output[dsl.Metrics]")
    inputs = ", ".join(f"{up!r}: {(dataflow.step_named(up, declared).kfp.artifact or (up,))[0]}" for up in artifacts)
    params = ", ".join(f"{p!r}: {p.split('.')[1]}" for p in parameters)
    call = [
        f"{step.name!r}",
        "settings_json",
        *(["tracking_uri"] if step.in_run else []),
        f"inputs={{{inputs}}}",
        f"parameters={{{params}}}",
        f"output={step.kfp.artifact[0] if step.kfp.artifact else None}",
        f"metrics={step.kfp.metrics}",
    ]
    if not step.in_run:
        call[2:2] = ['""']
    returns = "None"
    body = f"kubeflow.run_step({', '.join(call)})"
    if step.kfp.parameters:
        fields = ", ".join(f"({p!r}, str)" for p in step.kfp.parameters)
        returns = f"NamedTuple('{step.name.title()}Outputs', [{fields}])"
        body = (
            f"values = {body}\n    from collections import namedtuple\n\n"
            f"    return namedtuple('{step.name.title()}Outputs', {list(step.kfp.parameters)!r})(**values)"
        )
    else:
        body = f"{body}"
    return (
        f"def {step.name}({', '.join(args)}) -> {returns}:\n"
        f'    """The visionloop step {step.name!r}: {step.help.splitlines()[0]}"""\n'
        f"    from visionloop.pipeline import kubeflow\n\n"
        f"    {body}\n"
    )


def component_function(step: dataflow.Step, declared: tuple[dataflow.Step, ...]) -> Callable[..., Any]:
    """The component's function, compiled from ``component_source`` so that KFP can read (and ship) its source."""
    source = component_source(step, declared)
    filename = f"<visionloop component {step.name}>"
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {"dsl": dsl, "NamedTuple": NamedTuple}
    exec(compile(source, filename, "exec"), namespace)
    return namespace[step.name]


# ---------------------------------------------------------------- the pipeline


def build_pipeline(image: str = DEFAULT_IMAGE, declared: tuple[dataflow.Step, ...] | None = None) -> Any:
    """The KFP pipeline, with every component running in ``image`` (which must contain visionloop).

    The image is the one setting fixed at compile time: a component's ``base_image`` is part of its spec.
    """
    if not image or any(c.isspace() for c in image):
        raise ConfigError(f"invalid container image {image!r}")
    declared = declared or dataflow.STEPS
    make = dsl.component(base_image=image, install_kfp_package=False)
    components = {step.name: make(component_function(step, declared)) for step in declared}
    metric_outputs = [(s.name, s.kfp.metrics) for s in declared if s.kfp.metrics]

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
    ) -> NamedTuple("Outputs", [(name, dsl.Metrics) for _, name in metric_outputs]):  # type: ignore[misc]
        tasks: dict[str, Any] = {}
        for step in declared:
            artifacts, parameters = _wires(step, declared)
            kwargs: dict[str, Any] = {"settings_json": settings_json}
            if step.in_run:
                kwargs["tracking_uri"] = tracking_uri
            for dotted in parameters:
                up, field_name = dotted.split(".")
                kwargs[field_name] = tasks[up].outputs[field_name]
            for up in artifacts:
                name = (dataflow.step_named(up, declared).kfp.artifact or (up,))[0]
                kwargs[name] = tasks[up].outputs[name]
            task = components[step.name](**kwargs)
            task.set_cpu_limit(cpu).set_memory_limit(memory).set_caching_options(False)
            if step.kfp.gpu:
                task.set_accelerator_type(GPU_RESOURCE).set_accelerator_limit(gpus)
            if tasks:  # the declared order, also where no artifact says so
                task.after(list(tasks.values())[-1])
            tasks[step.name] = task
        outputs = NamedTuple("Outputs", [(name, dsl.Metrics) for _, name in metric_outputs])  # type: ignore[misc]
        return outputs(*(tasks[step].outputs[name] for step, name in metric_outputs))

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


def wait_for_run(host: str, run_id: str, timeout: float, namespace: str | None = None, poll: float = 15.0) -> str:
    """Wait for a submitted run to finish; returns its final state (SUCCEEDED, FAILED, CANCELED, …).

    Polls the run's state instead of holding one request open (``wait_for_run_completion`` does), so a
    Kubeflow API that restarts meanwhile costs one poll, not the wait."""
    import kfp
    import kfp_server_api
    import urllib3

    deadline = time.monotonic() + timeout
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        client = kfp.Client(host=host.rstrip("/"), **({"namespace": namespace} if namespace else {}))
        _bound_timeouts(client, 30.0)
        while True:
            try:
                state = str(client.get_run(run_id).state or "")
            except (kfp_server_api.ApiException, urllib3.exceptions.HTTPError, OSError):
                state = ""  # asked again at the next poll; the deadline still holds
            if state in {"SUCCEEDED", "FAILED", "CANCELED", "SKIPPED"}:
                return state
            if time.monotonic() > deadline:
                return f"still {state or 'unknown'} after {timeout:g} s"
            time.sleep(poll)
