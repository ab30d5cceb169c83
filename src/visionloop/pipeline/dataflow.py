"""The dataflow, declared once: the steps in order, what feeds what, and how each one is run.

Everything that runs steps reads ``STEPS``: the local runner (``visionloop run`` and its
``--from``/``--to`` ranges), the stage commands (``visionloop data ingest`` … ``visionloop promote``,
generated in ``cli.py``), the Kubeflow components (generated in ``kubeflow.py``) and the PyTorchJob
(which runs ``visionloop run --to train`` / ``--to promote``). Adding a step is one entry here and
its function in ``steps.py``; see docs/pipeline.md.

Each entry says:

- ``run``: the step function (typed parameters in, a pydantic output model out);
- ``wiring``: which upstream output feeds each parameter, ``From(step, field)`` (``field=None``: the
  whole output), or ``Scratch(name)``: a folder for the step's own files (the run's work folder
  locally, a scratch folder in a Kubeflow pod). ``settings`` and ``show_progress`` are given to any
  step function that takes them. An output field named like one of the step's wired inputs is that
  input handed on (``TrainOutput.dataset_dir``), which is how a later step gets the data the model
  was trained on;
- ``settings``: the settings the output depends on (part of the cache key);
- ``files``: what the output points at, hashed in the cache so a damaged file is never reused;
- ``in_run``: whether it logs into the MLflow run that ``train`` starts (``execute`` then owns the
  run's status: see ``steps.run_status``);
- the CLI (``command``, ``flags``, ``describe``) and Kubeflow (``kfp``) details.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from rich.markup import escape as esc

from visionloop.config import Settings
from visionloop.data.sources import IngestResult
from visionloop.errors import ConfigError
from visionloop.pipeline import steps


@dataclass(frozen=True)
class From:
    """A parameter fed by ``step``'s output: one ``field`` of it, or all of it (``field=None``)."""

    step: str
    field: str | None = None


@dataclass(frozen=True)
class Scratch:
    """A folder for the step's own files: ``<the run's work folder>/<name>`` locally, a scratch folder in a pod."""

    name: str


Wire = From | Scratch


@dataclass(frozen=True)
class Kfp:
    """How a step appears in the Kubeflow pipeline.

    ``artifact``: (name, type) of the output artifact that carries the output's files and JSON (None: the
    output has no files); ``parameters``: output fields that travel as KFP parameters instead (small
    values such as the MLflow run id); ``metrics``: name of a ``dsl.Metrics`` output with the numbers
    ``numbers(output)`` gives (the KFP UI shows them); ``gpu``: the step takes the ``gpus`` limit.
    """

    artifact: tuple[str, str] | None = None
    parameters: tuple[str, ...] = ()
    metrics: str | None = None
    numbers: Callable[[Any], dict[str, float]] | None = None
    gpu: bool = False


@dataclass(frozen=True)
class Step:
    name: str
    run: Callable[..., BaseModel]
    output: type[BaseModel]
    wiring: Mapping[str, Wire] = field(default_factory=dict)
    settings: tuple[str, ...] = ()
    files: tuple[str, ...] = ()  # "field" or "field/name" of the output
    cached: bool = True
    in_run: bool = False
    # a cached output is only reused while this still holds (the registry lives outside the cache)
    still_valid: Callable[[Settings, Any], bool] | None = None
    # more of the cache key than the inputs' JSON, from the step's arguments: e.g. the ingested folder's content
    content: Callable[[dict[str, Any]], Any] | None = None
    # the CLI: command path, the settings that become its options, lines for people
    command: tuple[str, ...] = ()
    help: str = ""
    flags: tuple[str, ...] = ()
    describe: Callable[[Any], list[str]] = lambda _out: []
    kfp: Kfp = Kfp()

    def upstream(self) -> list[str]:
        """The steps whose outputs this one reads, in declaration order."""
        named = {w.step for w in self.wiring.values() if isinstance(w, From)}
        return [s.name for s in STEPS if s.name in named]

    def takes(self, parameter: str) -> bool:
        return parameter in inspect.signature(self.run).parameters

    def file_paths(self, out: BaseModel) -> list[Path]:
        paths = []
        for spec in self.files:
            name, _, rest = spec.partition("/")
            path = Path(getattr(out, name))
            paths.append(path / rest if rest else path)
        return paths


# ---------------------------------------------------------------- what each step says to people


def _ingested(out: IngestResult) -> list[str]:
    return [
        f"ingested [bold]{esc(out.source)}[/] ({out.kind}): {out.num_files} files in {len(out.classes)} classes "
        f"at {esc(str(out.root))}"
    ]


def _validated(out: steps.ValidateOutput) -> list[str]:
    return [
        f"validation passed: {out.usable} usable images, {out.bad} unusable, classes {out.classes}",
        *(f"  [yellow]warning:[/] {esc(note)}" for note in out.warnings),
        f"report: {esc(str(out.report_path.parent / 'report.md'))}",
    ]


def _prepared(out: steps.PreprocessOutput) -> list[str]:
    return [
        f"dataset [bold]{out.dataset_version}[/]: {out.counts} at {out.image_size}x{out.image_size}x"
        f"{out.channels} in {esc(str(out.dataset_dir))}"
    ]


def _trained(out: steps.TrainOutput) -> list[str]:
    return [
        f"trained on {out.device}: best val accuracy {out.best_val_accuracy:.4f} at epoch {out.best_epoch} "
        f"of {out.epochs_run}; {out.parameters:,} parameters; {out.images_per_second:,.0f} img/s; "
        f"MLflow run {out.run_id}"
    ]


def _evaluated(out: steps.EvaluateOutput) -> list[str]:
    return [
        f"test accuracy {out.test_accuracy:.4f} (baseline {out.baseline_name}: {out.baseline_accuracy:.4f}), "
        f"macro F1 {out.macro_f1:.4f}, ECE {out.ece:.4f}; confusion matrix in {esc(str(out.metrics_path.parent))}"
    ]


def _exported(out: steps.ExportOutput) -> list[str]:
    return [
        f"exported {esc(str(out.export_dir / 'model.onnx'))}; parity max |diff| {out.max_abs_diff:.2e} "
        f"on {out.parity_images} images"
    ]


def _registered(out: steps.RegisterOutput) -> list[str]:
    return [f"registered {out.model_name} v{out.version} as challenger ({out.model_uri})"]


def _promoted(out: steps.PromoteOutput) -> list[str]:
    verdict = "[green]PROMOTED to champion[/]" if out.promoted else "[yellow]not promoted[/]"
    return [f"{out.model_name} v{out.version}: {verdict}", *(f"  - {esc(reason)}" for reason in out.reasons)]


def _gate_numbers(out: steps.PromoteOutput) -> dict[str, float]:
    return {
        "promoted": 1.0 if out.promoted else 0.0,
        "challenger_accuracy": out.challenger_accuracy,
        **({} if out.champion_accuracy is None else {"champion_accuracy": out.champion_accuracy}),
        "version": float(out.version),
    }


# ---------------------------------------------------------------- cache validity against the registry


def _version_still_registered(settings: Settings, out: steps.RegisterOutput) -> bool:
    from visionloop import registry

    return registry.resolve(settings, out.version) == out.version


def _decision_still_stands(settings: Settings, out: steps.PromoteOutput) -> bool:
    # the decision stands while the champion is still what it left behind (no rollback since)
    from visionloop import registry

    return registry.resolve(settings, registry.CHAMPION) == (out.version if out.promoted else out.champion_version)


def _ingested_content(args: dict[str, Any]) -> str:
    from visionloop.pipeline.cache import folder_fingerprint

    return folder_fingerprint(args["ingested"].root)


def _report_content(args: dict[str, Any]) -> str:
    # the report's path stays when the images change under it; its bytes (every file's SHA-256) do not
    from visionloop.fsutil import sha256_file

    return sha256_file(args["report_path"])


# ---------------------------------------------------------------- the declaration

STEPS: tuple[Step, ...] = (
    Step(
        "ingest",
        steps.ingest_step,
        IngestResult,
        cached=False,  # it is what notices that the data changed
        command=("data", "ingest"),
        help="Fetch or generate the images and lay them out as class_name/file folders under the home.\n\n"
        "Sources: digits (built in), synthetic, a folder of class_name/image files, a .zip / .tar(.gz)\n"
        "archive of one, or an fsspec URL (file://, https://…/x.zip, s3://bucket/prefix).",
        flags=("data.source",),
        describe=_ingested,
        kfp=Kfp(artifact=("raw", "Dataset")),
    ),
    Step(
        "validate",
        steps.validate_step,
        steps.ValidateOutput,
        wiring={"ingested": From("ingest")},
        settings=("validation",),
        files=("report_path",),
        content=_ingested_content,
        command=("data", "validate"),
        help="Decode every ingested file; report bad files, sizes, modes, duplicates and imbalance; apply the policy.",
        describe=_validated,
        kfp=Kfp(artifact=("report", "Artifact")),
    ),
    Step(
        "preprocess",
        steps.preprocess_step,
        steps.PreprocessOutput,
        wiring={"report_path": From("validate", "report_path"), "ingested": From("ingest")},
        settings=("data.image_size", "data.channels", "data.val_fraction", "data.test_fraction", "data.split_seed"),
        files=("dataset_dir/data.npz", "dataset_dir/manifest.json"),
        content=_report_content,
        command=("data", "preprocess"),
        help="Split (stratified, seeded), resize, convert, compute normalisation; write a versioned dataset.",
        flags=("data.image_size", "data.split_seed"),
        describe=_prepared,
        kfp=Kfp(artifact=("dataset", "Dataset")),
    ),
    Step(
        "train",
        steps.train_step,
        steps.TrainOutput,
        wiring={"dataset_dir": From("preprocess", "dataset_dir")},
        settings=("train", "data.hflip", "tracking_uri", "registry.experiment"),
        files=("model_path",),
        in_run=True,
        command=("train",),
        help="Train the residual CNN on the latest preprocessed dataset, tracked in MLflow.",
        flags=("train.epochs", "train.batch_size", "train.lr", "train.seed", "train.device", "train.compile"),
        describe=_trained,
        kfp=Kfp(artifact=("model", "Model"), parameters=("run_id",), gpu=True),
    ),
    Step(
        "evaluate",
        steps.evaluate_step,
        steps.EvaluateOutput,
        wiring={
            "model_path": From("train", "model_path"),
            "dataset_dir": From("train", "dataset_dir"),
            "run_id": From("train", "run_id"),
            "out_dir": Scratch("evaluation"),
        },
        files=("metrics_path",),
        in_run=True,
        command=("evaluate",),
        help="Score the trained model on the test split beside a scikit-learn baseline; confusion matrix, ECE.",
        describe=_evaluated,
        kfp=Kfp(artifact=("evaluation", "Artifact"), metrics="metrics", numbers=lambda out: dict(out.metrics)),
    ),
    Step(
        "export",
        steps.export_step,
        steps.ExportOutput,
        wiring={
            "model_path": From("train", "model_path"),
            "dataset_dir": From("train", "dataset_dir"),
            "metrics": From("evaluate", "metrics"),
            "run_id": From("train", "run_id"),
            "out_dir": Scratch("export"),
        },
        settings=("gate.parity_tolerance", "monitor.reference_size"),
        files=("export_dir/model.onnx", "export_dir/model_card.json"),
        in_run=True,
        command=("export",),
        help="Export to ONNX (dynamic batch, probabilities + embedding), check parity, write the model card.",
        describe=_exported,
        kfp=Kfp(artifact=("onnx_model", "Model")),
    ),
    Step(
        "register",
        steps.register_step,
        steps.RegisterOutput,
        wiring={"export_dir": From("export", "export_dir"), "run_id": From("train", "run_id")},
        settings=("tracking_uri", "registry.model_name"),
        in_run=True,
        still_valid=_version_still_registered,
        command=("register",),
        help="Log the exported model to MLflow, register a new version and give it the alias `challenger`.",
        flags=("registry.model_name",),
        describe=_registered,
        kfp=Kfp(parameters=("model_name", "version", "model_uri")),
    ),
    Step(
        "promote",
        steps.promote_step,
        steps.PromoteOutput,
        wiring={
            "version": From("register", "version"),
            "dataset_dir": From("train", "dataset_dir"),
            "run_id": From("train", "run_id"),
        },
        settings=("gate",),
        in_run=True,
        still_valid=_decision_still_stands,
        command=("promote",),
        help="Quality gate: promote the challenger to `champion` if it clears the floor and beats the champion.",
        flags=("registry.model_name", "gate.min_accuracy", "gate.min_improvement"),
        describe=_promoted,
        kfp=Kfp(artifact=("decision", "Artifact"), metrics="gate", numbers=_gate_numbers),
    ),
)


def step_named(name: str, declared: tuple[Step, ...] | None = None) -> Step:
    for step in declared or STEPS:
        if step.name == name:
            return step
    known = ", ".join(s.name for s in declared or STEPS)
    raise ConfigError(f"unknown step {name!r}; the steps are {known}")


def step_range(first: str | None, last: str | None, declared: tuple[Step, ...] | None = None) -> list[Step]:
    """The steps from ``first`` to ``last`` (both included; None: the first or the last step)."""
    declared = declared or STEPS
    names = [s.name for s in declared]
    start = names.index(step_named(first, declared).name) if first else 0
    stop = names.index(step_named(last, declared).name) if last else len(names) - 1
    if start > stop:
        raise ConfigError(f"--from {first} comes after --to {last}; the order is {' → '.join(names)}")
    return list(declared[start : stop + 1])


def resolve(wire: From, declared: tuple[Step, ...] | None = None) -> From:
    """The step that produced ``wire``'s value: a field handed on from an input is traced back to its source."""
    step = step_named(wire.step, declared)
    handed_on = step.wiring.get(wire.field) if wire.field is not None else None
    return resolve(handed_on, declared) if isinstance(handed_on, From) else wire


def call_args(
    step: Step,
    outputs: Mapping[str, BaseModel],
    settings: Settings,
    work_dir: Path | None,
    given: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The step function's arguments: ``given`` ones as they are, the other wired inputs from ``outputs``
    (by step name), and its folders."""
    args: dict[str, Any] = dict(given or {})
    for parameter, wire in step.wiring.items():
        if parameter in args:
            continue
        if isinstance(wire, Scratch):
            if work_dir is None:
                raise ConfigError(f"step {step.name} needs a work folder for {parameter}")
            args[parameter] = work_dir / wire.name
            continue
        if wire.step not in outputs:
            raise ConfigError(f"step {step.name} needs the output of {wire.step}, which has not run")
        upstream = outputs[wire.step]
        args[parameter] = upstream if wire.field is None else getattr(upstream, wire.field)
    if step.takes("settings"):
        args["settings"] = settings
    return args


def setting_value(settings: Settings, dotted: str) -> Any:
    value: Any = settings
    for part in dotted.split("."):
        value = getattr(value, part)
    return value.model_dump(mode="json") if isinstance(value, BaseModel) else value


def execute(
    step: Step,
    args: dict[str, Any],
    settings: Settings,
    *,
    show_progress: bool = False,
    finish_run: bool = True,
) -> BaseModel:
    """Run one step with ``args`` (from ``call_args``). The one place a step's MLflow run status is owned:
    a step in the run ends it FINISHED (unless ``finish_run`` is False: more steps follow in this process),
    FAILED on an error, KILLED on an interrupt."""
    kwargs = dict(args)
    run_id = kwargs.get("run_id") if step.in_run else None
    if not step.takes("run_id"):
        kwargs.pop("run_id", None)  # wired only so that this step's work ends the run as it should
    if step.takes("show_progress"):
        kwargs["show_progress"] = show_progress
    if step.takes("finish_run"):  # the step that starts the run owns it from its start (train_step)
        kwargs["finish_run"] = finish_run
    if run_id is None:
        return step.run(**kwargs)
    from visionloop import registry

    registry.connect(settings)
    registry.set_run_status(run_id, "RUNNING")
    with steps.run_status(run_id, finish=finish_run):
        return step.run(**kwargs)


def work_dir_of(outputs: Mapping[str, BaseModel]) -> Path | None:
    """The run's work folder (``TrainOutput.work_dir``), where later steps keep their files."""
    for out in outputs.values():
        if isinstance(getattr(out, "work_dir", None), Path):
            return out.work_dir
    return None
