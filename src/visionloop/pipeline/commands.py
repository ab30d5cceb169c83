"""The stage commands and ``visionloop run``, generated from the dataflow declaration.

Each step of ``dataflow.STEPS`` becomes a command (``visionloop data ingest`` … ``visionloop promote``)
with its declared settings as options, ``--set`` and ``--json``: it runs that one step through the
runner, which takes its inputs from what the earlier steps last recorded under ``<home>/latest/``.
``train`` adds the DDP launcher's options and ``--resume``, ``promote`` adds ``--version``; ``run``
runs a range of the steps (``--from``, ``--to``), all of them by default.
"""

from __future__ import annotations

import inspect
import json
import time
import types
from collections.abc import Callable
from typing import Annotated, Any, Literal, get_args, get_origin

import typer
from pydantic import BaseModel
from rich.markup import escape
from rich.table import Table

from visionloop.config import Settings
from visionloop.console import JsonOpt, SetOpt, console, describe, err, print_json, settings_from
from visionloop.errors import Reported
from visionloop.pipeline import dataflow, steps
from visionloop.pipeline.runner import Executor, StepsRun, run_steps, summarize

# options whose name is not the setting's last part with dashes
SHORT = {"data.source": ("--source", "-s"), "train.compile": ("--compile/--no-compile",)}

ResumeOpt = Annotated[bool, typer.Option(help="Continue the last interrupted training from its checkpoint.")]
NprocOpt = Annotated[
    int | None,
    typer.Option(
        "--nproc-per-node",
        min=1,
        help="Train data-parallel (DDP) in this many processes on this node, under torchrun: one per GPU "
        "(NCCL), or each with a share of the CPU cores (gloo). train.batch_size stays the global batch.",
    ),
]
NnodesOpt = Annotated[
    int, typer.Option(min=1, help="Nodes taking part; run the same command on each (needs --rdzv-endpoint).")
]
NodeRankOpt = Annotated[
    int | None,
    typer.Option(
        min=0,
        help="This node's rank (0..nnodes-1). Node 0, at --rdzv-endpoint, then holds rank 0: the MLflow run, "
        "checkpoints and the model. Without it the rendezvous hands out the ranks.",
    ),
]
RdzvOpt = Annotated[
    str | None,
    typer.Option(help="HOST:PORT where the nodes meet: an address of one of them, the same on every node."),
]
RdzvTimeoutOpt = Annotated[float, typer.Option(min=1, help="Seconds to wait for every node to join before failing.")]


def _param(name: str, annotation: Any, default: Any) -> inspect.Parameter:
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=annotation)


def _launcher_params() -> list[inspect.Parameter]:
    return [
        _param("nproc_per_node", NprocOpt, None),
        _param("nnodes", NnodesOpt, 1),
        _param("node_rank", NodeRankOpt, None),
        _param("rdzv_endpoint", RdzvOpt, None),
        _param("rdzv_timeout", RdzvTimeoutOpt, 300.0),
    ]


def _option_type(dotted: str) -> Any:
    """The option's type for a setting: bool, int, float or str (Literals as their values' type), or None."""
    model: Any = Settings
    *parents, leaf = dotted.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    annotation = model.model_fields[leaf].annotation
    if get_origin(annotation) is Literal:
        annotation = type(get_args(annotation)[0])
    if get_origin(annotation) in (types.UnionType,):
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    return annotation if annotation in (bool, int, float) else str


def setting_params(flags: tuple[str, ...]) -> list[inspect.Parameter]:
    """One ``--option`` per declared setting, with the setting's description, env name and default as help."""
    params = []
    for dotted in flags:
        names = SHORT.get(dotted, ("--" + dotted.rsplit(".", 1)[-1].replace("_", "-"),))
        option = typer.Option(*names, help=describe(dotted))
        params.append(_param(dotted.replace(".", "__"), Annotated[_option_type(dotted) | None, option], None))
    return params


def _settings_of(flags: tuple[str, ...], values: dict[str, Any]) -> Settings:
    sets = values.pop("sets")
    return settings_from(sets, **{dotted: values.pop(dotted.replace(".", "__")) for dotted in flags})


def _command(body: Callable[..., None], params: list[inspect.Parameter], doc: str) -> Callable[..., None]:
    """A typer command with the signature ``params``: typer reads options from the signature and annotations."""

    def command(**values: Any) -> None:
        body(values)

    full = [*params, _param("sets", SetOpt, None), _param("as_json", JsonOpt, False)]
    command.__signature__ = inspect.Signature(full, return_annotation=None)  # type: ignore[attr-defined]
    command.__annotations__ = {p.name: p.annotation for p in full} | {"return": None}
    command.__doc__ = doc
    return command


def show(step: dataflow.Step, out: BaseModel, as_json: bool) -> None:
    if as_json:
        print_json(steps.as_json(out))
    else:
        for line in step.describe(out):
            console.print(line, highlight=False)


def interrupted_hint(settings: Settings, since: float) -> str:
    resume_from = settings.home / "latest" / "train_started.json"
    if resume_from.is_file() and resume_from.stat().st_mtime >= since:
        return (
            "the last finished epoch is checkpointed: continue with `visionloop train --resume` "
            "(or `visionloop run --resume`, which then goes on to evaluate, export, register and promote)"
        )
    return "stopped before training started; nothing to resume"


def training_plan(settings: Settings, resume: bool, launch: dict[str, Any], show_progress: bool) -> tuple[dict, dict]:
    """(overrides, executors) for the train step: resume the interrupted run, and/or train under torchrun."""
    from visionloop.training import launch as launcher

    overrides: dict[str, dict[str, Any]] = {}
    if resume:
        data, work_dir, run_id = launcher.where_to_train(settings, None, resume=True)
        overrides["train"] = {"dataset_dir": data, "work_dir": work_dir, "resume_run_id": run_id}
    defaults = {"nproc_per_node": None, "nnodes": 1, "node_rank": None, "rdzv_endpoint": None}
    if all(launch.get(k) == v for k, v in defaults.items()):
        return overrides, {}  # one process, this one: no torchrun (and no torch imported to decide so)
    from visionloop.training.distributed import Launch

    spec = Launch(launch.pop("nproc_per_node") or 1, **launch)
    spec.check()
    if spec.world_size == 1 and spec.rdzv_endpoint is None:
        return overrides, {}

    def under_torchrun(_step: dataflow.Step, args: dict[str, Any], _finish: bool) -> BaseModel:
        data = None if resume else args["dataset_dir"]
        result = launcher.train_distributed(settings, spec, data, resume, show_progress)
        if result is None:  # this node's processes trained along; the node of rank 0 hands the model on
            raise Reported(0)
        return steps.from_json(steps.TrainOutput, result)

    executors: dict[str, Executor] = {"train": under_torchrun}
    return overrides, executors


def stage_command(step: dataflow.Step, declared: tuple[dataflow.Step, ...] = dataflow.STEPS) -> Callable[..., None]:
    """The command that runs ``step`` alone, on the outputs the steps before it last recorded."""
    extra: list[inspect.Parameter] = []
    if step.name == "train":
        extra = [_param("resume", ResumeOpt, False), *_launcher_params()]
    if step.name == "promote":
        version = typer.Option(help="Version to judge; default: the one just registered.")
        extra = [_param("version", Annotated[str | None, version], None)]

    def body(values: dict[str, Any]) -> None:
        as_json = values.pop("as_json")
        settings = _settings_of(step.flags, values)
        overrides: dict[str, Any] = {}
        executors: dict[str, Executor] = {}
        if step.name == "train":
            overrides, executors = training_plan(settings, values.pop("resume"), values, not as_json)
        if values.get("version"):
            # a version named by hand: scored on the dataset it was trained on, found by its tag
            chosen = values.pop("version")
            overrides = {"promote": {"version": chosen, "dataset_dir": steps.trained_dataset(settings, chosen)}}
            overrides["promote"]["run_id"] = None  # not necessarily the last training's run
        started = time.time()
        try:
            done = run_steps(
                settings,
                step.name,
                step.name,
                show_progress=not as_json,
                use_cache=False,
                overrides=overrides,
                executors=executors,
                declared=declared,
            )
        except KeyboardInterrupt:
            if step.name != "train":
                raise
            err.print(f"[yellow]interrupted[/]: {interrupted_hint(settings, started)}")
            raise typer.Exit(130) from None
        show(step, done.outputs[step.name], as_json)

    doc = step.help
    if step.name == "train":
        doc += TRAIN_EXAMPLES
    return _command(body, [*setting_params(step.flags), *extra], doc)


TRAIN_EXAMPLES = """

With --nproc-per-node N the same training runs in N processes under torchrun (DistributedDataParallel):
each takes its share of every batch, rank 0 logs to MLflow and writes checkpoints and the model.
On several machines, run the same command on each with --nnodes, --rdzv-endpoint (and --node-rank).

Examples:

  visionloop train --epochs 20

  visionloop train --nproc-per-node 2                        # 2 processes on this machine

  visionloop train --nproc-per-node 8 --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29400   # on node0

  visionloop train --resume --nproc-per-node 1               # a resume may change the process count
"""


def add_stage_commands(app: typer.Typer, groups: dict[str, typer.Typer], declared: tuple[dataflow.Step, ...]) -> None:
    """Add a command for every declared step: ``("data", "ingest")`` goes into the ``data`` group."""
    for step in declared:
        *group, name = step.command or (step.name,)
        target = groups[group[0]] if group else app
        target.command(name)(stage_command(step, declared))


# ------------------------------------------------------------------------------------------ run

RUN_FLAGS = (
    "data.source",
    "train.epochs",
    "train.seed",
    "train.device",
    "data.image_size",
    "registry.model_name",
    "gate.min_accuracy",
    "gate.min_improvement",
)
RUN_HELP = """The whole loop: ingest → validate → preprocess → train → evaluate → export → register → promote.

A step whose inputs, settings and code are unchanged since an earlier successful run is skipped and
its output reused (marked "cached"): run it twice on the same data and the second run trains and
registers nothing. --no-cache runs everything again (and registers a new challenger).

--from and --to run a part of the steps; the first one takes its inputs from what the steps before it
last recorded under the home (`--from train` trains on the last preprocessed dataset). The DDP
options train under torchrun as `visionloop train` does; --resume continues an interrupted training
if there is one.

Examples:

  visionloop run                                  # built-in digits, about 20 s on 2 CPU cores

  visionloop run --source ./my-images --epochs 40

  visionloop run --source synthetic --set data.synthetic_classes=6 --json

  visionloop run --to preprocess                  # prepare the data only

  visionloop run --from train --resume --nproc-per-node 4   # a PyTorchJob's master pod
"""
NEXT_STEPS = """next: visionloop models list · visionloop models history · visionloop run --help
      mlflow ui --backend-store-uri {uri}"""


def summary_table(summary: Any) -> Table:
    table = Table(title="visionloop run", show_header=False, title_justify="left")
    table.add_column(style="bold", no_wrap=True)
    table.add_column()
    images = " · ".join(f"{split} {summary.images[split]}" for split in ("train", "val", "test"))
    if summary.cached_steps:
        reused = ", ".join(summary.cached_steps)
        note = (
            "nothing trained, nothing new registered: the earlier run's model and gate decision stand"
            if "register" in summary.cached_steps
            else "the other steps ran"
        )
        table.add_row("cached", f"[dim]{reused}[/] unchanged, not run again ({note}; --no-cache runs all)")
    table.add_row("dataset version", summary.dataset_version)
    table.add_row("images", f"{images}  ({escape(summary.source)})")
    table.add_row("CNN test accuracy", f"{summary.test_accuracy:.4f}")
    table.add_row(f"baseline ({summary.baseline_name})", f"{summary.baseline_accuracy:.4f}  (same split, same run)")
    table.add_row("model", f"{summary.model_name} v{summary.model_version}")
    table.add_row("aliases", ", ".join(summary.aliases) or "-")
    verdict = "[green]promoted[/]" if summary.promoted else "[yellow]not promoted[/]"
    table.add_row("gate", "\n".join([verdict, *(f"- {escape(r)}" for r in summary.gate_reasons)]))
    table.add_row("champion now", f"v{summary.champion_version}" if summary.champion_version else "none")
    table.add_row("trained on", f"{summary.device}, {summary.epochs_run} epochs")
    table.add_row("time", f"{summary.total_seconds:.1f} s (train {summary.stage_seconds.get('train', 0):.1f} s)")
    table.add_row("MLflow run", summary.run_id)
    return table


def run_command(declared: tuple[dataflow.Step, ...] = dataflow.STEPS) -> Callable[..., None]:
    names = " | ".join(s.name for s in declared)
    extra = [
        _param("first", Annotated[str | None, typer.Option("--from", help=f"First step to run ({names}).")], None),
        _param("last", Annotated[str | None, typer.Option("--to", help=f"Last step to run ({names}).")], None),
        _param(
            "no_cache",
            Annotated[
                bool,
                typer.Option(
                    "--no-cache", help="Run every step, even those whose inputs, settings and code are unchanged."
                ),
            ],
            False,
        ),
        _param(
            "resume", Annotated[bool, typer.Option(help="Continue an interrupted training, if there is one.")], False
        ),
        *_launcher_params(),
    ]

    def body(values: dict[str, Any]) -> None:
        as_json = values.pop("as_json")
        first, last = values.pop("first"), values.pop("last")
        selected = [s.name for s in dataflow.step_range(first, last, declared)]
        settings = _settings_of(RUN_FLAGS, values)
        use_cache = not values.pop("no_cache")
        from visionloop.training.launch import unfinished_training

        resume = values.pop("resume") and "train" in selected and unfinished_training(settings)
        overrides, executors = training_plan(settings, resume, values, not as_json)

        def on_stage(name: str, seconds: float, _out: Any, cached: bool) -> None:
            if not as_json:
                note = "  [dim](cached: unchanged, not run)[/]" if cached else ""
                err.print(f"[green]✓[/] {name:<10} {seconds:6.2f} s{note}")

        started = time.time()
        try:
            done = run_steps(
                settings,
                first,
                last,
                show_progress=not as_json,
                on_stage=on_stage,
                use_cache=use_cache,
                overrides=overrides,
                executors=executors,
                declared=declared,
            )
        except KeyboardInterrupt:
            err.print(f"[yellow]interrupted[/]: {interrupted_hint(settings, started)}")
            raise typer.Exit(130) from None
        _show_run(settings, done, as_json, first is None and last is None, declared)

    return _command(body, [*setting_params(RUN_FLAGS), *extra], RUN_HELP)


def _show_run(
    settings: Settings, done: StepsRun, as_json: bool, complete: bool, declared: tuple[dataflow.Step, ...]
) -> None:
    if not complete:  # a part of the loop: each step's own output
        if as_json:
            print(json.dumps({name: steps.as_json(done.outputs[name]) for name in done.ran}, default=str))
        else:
            for name in done.ran:
                for line in dataflow.step_named(name, declared).describe(done.outputs[name]):
                    console.print(line, highlight=False)
        return
    summary = summarize(settings, done)
    if as_json:
        result = summary.to_dict()
        result["gate_decision"] = "promoted" if summary.promoted else "rejected"
        print(json.dumps(result, default=str))
        return
    console.print(summary_table(summary))
    uri = settings.tracking_uri
    err.print(NEXT_STEPS.format(uri=uri) if uri.startswith("sqlite") else NEXT_STEPS.splitlines()[0], highlight=False)
