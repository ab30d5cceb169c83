"""The ``visionloop`` command: one sub-command per lifecycle stage, and ``run`` to chain them.

Stages hand over through ``<home>/latest/<stage>.json``, so ``visionloop data ingest``, then
``visionloop data validate``, … then ``visionloop promote`` does exactly what ``visionloop run`` does.
"""

from __future__ import annotations

import json
import signal
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from visionloop import __version__
from visionloop.config import Settings, load_settings
from visionloop.config import describe as describe_setting
from visionloop.errors import VisionloopError

# soft_wrap: long paths and commands stay on one line when output goes to a file or a pipe
console = Console(stderr=False, soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

HELP = """visionloop — the production loop of an image classifier, end to end.

ingest → validate → preprocess → train → evaluate → export (ONNX) → register (MLflow) → gate → champion

Start with [bold]visionloop run[/] (the built-in digits), then look around with
[bold]visionloop models list[/] and [bold]visionloop models history[/].

Every option is also a setting: in a YAML file (--config), as VISIONLOOP_<GROUP>__<KEY> in the
environment, or as --set group.key=value. Flags win over the environment, which wins over the file.
"""

app = typer.Typer(help=HELP, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="rich")
data_app = typer.Typer(help="Ingest, validate and preprocess image data.", no_args_is_help=True)
models_app = typer.Typer(help="Inspect the registry: versions, alias history, rollback.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
pipeline_app = typer.Typer(
    help="Kubeflow Pipelines: compile the steps of `run` into a KFP pipeline, or submit it to a cluster.",
    no_args_is_help=True,
)
app.add_typer(pipeline_app, name="pipeline")

_STATE: dict[str, Any] = {"config": None, "home": None}


def describe(dotted: str) -> str:
    # help texts are rendered as rich markup, which would swallow "[setting …, env …, default …]"
    return escape(describe_setting(dotted))


ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML settings file (default ./visionloop.yaml if present)."),
]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", help="Any setting as KEY=VALUE, e.g. --set train.patience=5 (repeatable)."),
]
SourceOpt = Annotated[str | None, typer.Option("--source", "-s", help=describe("data.source"))]
EpochsOpt = Annotated[int | None, typer.Option(help=describe("train.epochs"))]
BatchOpt = Annotated[int | None, typer.Option(help=describe("train.batch_size"))]
LrOpt = Annotated[float | None, typer.Option(help=describe("train.lr"))]
SeedOpt = Annotated[int | None, typer.Option(help=describe("train.seed"))]
DeviceOpt = Annotated[str | None, typer.Option(help=describe("train.device"))]
SizeOpt = Annotated[int | None, typer.Option(help=describe("data.image_size"))]
NameOpt = Annotated[str | None, typer.Option("--model-name", help=describe("registry.model_name"))]
FloorOpt = Annotated[float | None, typer.Option(help=describe("gate.min_accuracy"))]
MarginOpt = Annotated[float | None, typer.Option(help=describe("gate.min_improvement"))]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object instead of tables (for scripts and CI).")]


def _parse_set(pairs: list[str] | None) -> dict[str, Any]:
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise VisionloopError(f"--set expects KEY=VALUE, got {pair!r}")
        key, raw = pair.split("=", 1)
        out[key.strip()] = yaml.safe_load(raw) if raw else ""
    return out


def settings_from(sets: list[str] | None = None, **flags: Any) -> Settings:
    overrides = {**_parse_set(sets), **{k: v for k, v in flags.items() if v is not None}}
    if _STATE["home"] is not None:
        overrides.setdefault("home", _STATE["home"])
    return load_settings(_STATE["config"], overrides)


def _print_json(obj: Any) -> None:
    console.print_json(json.dumps(obj, default=str))


def hand_over(settings: Settings, stage: str, out: Any, as_json: bool, *lines: str) -> None:
    """Record a stage's output for the next command, then show it: one JSON object, or lines for people."""
    from visionloop.pipeline import steps

    steps.record(settings.home, stage, out)
    if as_json:
        _print_json(steps.as_json(out))
    else:
        for line in lines:
            console.print(line)


def _version(value: bool) -> None:
    if value:
        console.print(f"visionloop {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    config: ConfigOpt = None,
    home: Annotated[Path | None, typer.Option("--home", help=describe("home"))] = None,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version.")
    ] = False,
) -> None:
    _STATE["config"] = config
    _STATE["home"] = home


# ------------------------------------------------------------------------------------------ data


@data_app.command("ingest")
def data_ingest(source: SourceOpt = None, sets: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Fetch or generate the images and lay them out as class_name/file folders under the home.

    Sources: digits (built in), synthetic, a folder of class_name/image files, a .zip / .tar(.gz)
    archive of one, or an fsspec URL (file://, https://…/x.zip, s3://bucket/prefix).
    """
    from visionloop.pipeline import steps

    settings = settings_from(sets, **{"data.source": source})
    result = steps.ingest_step(settings)
    hand_over(
        settings,
        "ingest",
        result,
        as_json,
        f"ingested [bold]{escape(result.source)}[/] ({result.kind}): {result.num_files} files in "
        f"{len(result.classes)} classes at {result.root}",
    )


@data_app.command("validate")
def data_validate(sets: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Decode every ingested file; report bad files, sizes, modes, duplicates and imbalance; apply the policy."""
    from visionloop.data.sources import IngestResult
    from visionloop.pipeline import steps

    settings = settings_from(sets)
    ingested = IngestResult.from_dict(steps.latest_raw(settings.home, "ingest"))
    out = steps.validate_step(ingested, settings, show_progress=not as_json)
    hand_over(
        settings,
        "validate",
        out,
        as_json,
        f"validation passed: {out.usable} usable images, {out.bad} unusable, classes {out.classes}",
        *(f"  [yellow]warning:[/] {escape(note)}" for note in out.warnings),
        f"report: {out.report_path.parent / 'report.md'}",
    )


@data_app.command("preprocess")
def data_preprocess(
    image_size: SizeOpt = None,
    split_seed: Annotated[int | None, typer.Option(help=describe("data.split_seed"))] = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Split (stratified, seeded), resize, convert, compute normalisation; write a versioned dataset."""
    from visionloop.data.sources import IngestResult
    from visionloop.pipeline import steps

    settings = settings_from(sets, **{"data.image_size": image_size, "data.split_seed": split_seed})
    ingested = IngestResult.from_dict(steps.latest_raw(settings.home, "ingest"))
    validated = steps.latest(settings.home, "validate", steps.ValidateOutput)
    out = steps.preprocess_step(validated.report_path, ingested, settings, show_progress=not as_json)
    hand_over(
        settings,
        "preprocess",
        out,
        as_json,
        f"dataset [bold]{out.dataset_version}[/]: {out.counts} at {out.image_size}x{out.image_size}x"
        f"{out.channels} in {out.dataset_dir}",
    )


# ------------------------------------------------------------------------------------------ model


@app.command("train")
def train_cmd(
    epochs: EpochsOpt = None,
    batch_size: BatchOpt = None,
    lr: LrOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    compile_model: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help=describe("train.compile"))
    ] = None,
    resume: Annotated[bool, typer.Option(help="Continue the last interrupted training from its checkpoint.")] = False,
    nproc_per_node: Annotated[
        int | None,
        typer.Option(
            "--nproc-per-node",
            min=1,
            help="Train data-parallel (DDP) in this many processes on this node, under torchrun: one per GPU "
            "(NCCL), or each with a share of the CPU cores (gloo). train.batch_size stays the global batch.",
        ),
    ] = None,
    nnodes: Annotated[
        int, typer.Option(min=1, help="Nodes taking part; run the same command on each (needs --rdzv-endpoint).")
    ] = 1,
    node_rank: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="This node's rank (0..nnodes-1). Node 0, at --rdzv-endpoint, then holds rank 0: the MLflow run, "
            "checkpoints and the model. Without it the rendezvous hands out the ranks.",
        ),
    ] = None,
    rdzv_endpoint: Annotated[
        str | None,
        typer.Option(help="HOST:PORT where the nodes meet: an address of one of them, the same on every node."),
    ] = None,
    rdzv_timeout: Annotated[
        float, typer.Option(min=1, help="Seconds to wait for every node to join before failing.")
    ] = 300.0,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the residual CNN on the latest preprocessed dataset, tracked in MLflow.

    With --nproc-per-node N the same training runs in N processes under torchrun (DistributedDataParallel):
    each takes its share of every batch, rank 0 logs to MLflow and writes checkpoints and the model.
    On several machines, run the same command on each with --nnodes, --rdzv-endpoint (and --node-rank).

    Examples:

      visionloop train --epochs 20

      visionloop train --nproc-per-node 2                        # 2 processes on this machine

      visionloop train --nproc-per-node 8 --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29400   # on node0

      visionloop train --resume --nproc-per-node 1               # a resume may change the process count
    """
    settings = settings_from(
        sets,
        **{
            "train.epochs": epochs,
            "train.batch_size": batch_size,
            "train.lr": lr,
            "train.seed": seed,
            "train.device": device,
            "train.compile": compile_model,
        },
    )
    if nproc_per_node is not None or nnodes > 1 or node_rank is not None or rdzv_endpoint is not None:
        worker_args = _train_args(epochs, batch_size, lr, seed, device, compile_model, resume, sets, as_json)
        launch = (nproc_per_node or 1, nnodes, node_rank, rdzv_endpoint, rdzv_timeout)
        if _train_under_torchrun(settings, resume, worker_args, *launch):
            return
    from visionloop.training import distributed

    world = distributed.world_from_env()
    if not world.distributed:
        _train_and_hand_over(settings, *_where_to_train(settings, resume), as_json)
        return
    # a process started by torchrun: rank 0 decides where the run lives and tracks it; the others train
    from visionloop.training.train import pick_device

    def plan() -> tuple[Path, Path, str | None]:
        _check_world(settings, resume, world.size)  # before rank 0 starts an MLflow run
        return _where_to_train(settings, resume)

    with distributed.process_group(pick_device(settings.train.device).type, settings.train.dist_timeout):
        try:
            dataset_dir, work_dir, run_id = distributed.from_rank0(plan)
            if world.is_rank0:
                _train_and_hand_over(settings, dataset_dir, work_dir, run_id, as_json)
            else:
                _train_untracked(settings, dataset_dir, work_dir, resume=run_id is not None)
        except VisionloopError as exc:
            if world.is_rank0:
                raise
            if distributed.reported_by_rank0(exc):
                # rank 0 reports it: leave it the time to, torchrun stops this process once it has
                time.sleep(10)
                raise typer.Exit(exc.exit_code) from None
            raise VisionloopError(f"rank {world.rank}: {exc}") from None
        except KeyboardInterrupt:
            raise typer.Exit(130) from None  # rank 0's training says what to do next


def _started_training(settings: Settings) -> dict[str, str]:
    """What `train --resume` continues: the dataset, work folder and MLflow run of the last training started."""
    from visionloop.fsutil import read_json

    started_path = settings.home / "latest" / "train_started.json"
    if not started_path.is_file():
        raise VisionloopError("nothing to resume: no training was started under this home")
    return read_json(started_path)


def _dataset_to_train(settings: Settings, resume: bool) -> Path:
    from visionloop.pipeline import steps

    if resume:
        return Path(_started_training(settings)["dataset_dir"])
    return steps.latest(settings.home, "preprocess", steps.PreprocessOutput).dataset_dir


def _check_world(settings: Settings, resume: bool, world_size: int) -> None:
    """Refuse a number of processes that cannot share the training data (see training/distributed.py)."""
    from visionloop.data.preprocess import load_manifest
    from visionloop.training.distributed import check_world

    train_images = sum(load_manifest(_dataset_to_train(settings, resume)).counts["train"].values())
    check_world(train_images, settings.train.batch_size, world_size)


def _where_to_train(settings: Settings, resume: bool) -> tuple[Path, Path, str | None]:
    """(dataset folder, work folder, MLflow run to continue): the interrupted run's, or new ones."""
    from visionloop.pipeline import steps

    if resume:
        started = _started_training(settings)
        return Path(started["dataset_dir"]), Path(started["work_dir"]), started["run_id"]
    return _dataset_to_train(settings, resume), steps.new_work_dir(settings.home), None


def _train_and_hand_over(
    settings: Settings, dataset_dir: Path, work_dir: Path, run_id: str | None, as_json: bool
) -> None:
    from visionloop.pipeline import steps

    try:
        out = steps.train_step(dataset_dir, settings, work_dir, resume_run_id=run_id, show_progress=not as_json)
    except KeyboardInterrupt:
        err.print(
            "[yellow]interrupted[/]: the last finished epoch is checkpointed; continue with `visionloop train --resume`"
        )
        raise typer.Exit(130) from None
    hand_over(
        settings,
        "train",
        out,
        as_json,
        f"trained on {out.device}: best val accuracy {out.best_val_accuracy:.4f} at epoch {out.best_epoch} "
        f"of {out.epochs_run}; {out.parameters:,} parameters; {out.images_per_second:,.0f} img/s; "
        f"MLflow run {out.run_id}",
    )


def _train_untracked(settings: Settings, dataset_dir: Path, work_dir: Path, resume: bool) -> None:
    """DDP ranks other than 0: the same train() call as steps.train_step makes, without MLflow or files."""
    from visionloop.data.preprocess import load_dataset
    from visionloop.training.train import train

    dataset = load_dataset(dataset_dir)
    hflip = dataset.manifest.hflip_ok if settings.data.hflip is None else settings.data.hflip  # as train_step
    train(dataset, work_dir / "train", settings.train, hflip=hflip, resume=resume, show_progress=False)


def _train_args(
    epochs: int | None,
    batch_size: int | None,
    lr: float | None,
    seed: int | None,
    device: str | None,
    compile_model: bool | None,
    resume: bool,
    sets: list[str] | None,
    as_json: bool,
) -> list[str]:
    """The command line each training process gets: this one, less the launcher's options."""
    args = [f"--{name}={value}" for name, value in (("config", _STATE["config"]), ("home", _STATE["home"])) if value]
    args.append("train")
    flags = {"--epochs": epochs, "--batch-size": batch_size, "--lr": lr, "--seed": seed, "--device": device}
    args += [f"{flag}={value}" for flag, value in flags.items() if value is not None]
    if compile_model is not None:
        args.append("--compile" if compile_model else "--no-compile")
    if resume:
        args.append("--resume")
    for pair in sets or []:
        args += ["--set", pair]
    return [*args, "--json"] if as_json else args


def _train_under_torchrun(
    settings: Settings,
    resume: bool,
    worker_args: list[str],
    nproc_per_node: int,
    nnodes: int,
    node_rank: int | None,
    rdzv_endpoint: str | None,
    rdzv_timeout: float,
) -> bool:
    """Start the training processes under torchrun and wait for them, after checking here what would
    fail in all of them alike. False when the world is this one process, which then trains as usual."""
    import os

    # torch's C++ side logs every failed attempt to reach a rendezvous with a stack trace; this process
    # reports a failed rendezvous in one line instead (torch reads the level once, when imported)
    user_level = os.environ.get("TORCH_CPP_LOG_LEVEL")
    os.environ["TORCH_CPP_LOG_LEVEL"] = "FATAL"
    import torch

    from visionloop.training import distributed
    from visionloop.training.train import pick_device

    del os.environ["TORCH_CPP_LOG_LEVEL"]  # the training processes log as the user asked
    if user_level is not None:
        os.environ["TORCH_CPP_LOG_LEVEL"] = user_level

    launch = distributed.Launch(nproc_per_node, nnodes, node_rank, rdzv_endpoint, rdzv_timeout)
    launch.check()
    if launch.world_size == 1 and rdzv_endpoint is None:
        return False
    if "TORCHELASTIC_RUN_ID" in os.environ:
        raise VisionloopError("already running under torchrun: drop --nproc-per-node, --nnodes and the rdzv options")
    if nnodes == 1 or node_rank == 0:  # the node of rank 0 has the data (and the checkpoint) to check
        _check_world(settings, resume, launch.world_size)
    if pick_device(settings.train.device).type == "cuda" and nproc_per_node > torch.cuda.device_count():
        raise VisionloopError(
            f"--nproc-per-node {nproc_per_node} but this node has {torch.cuda.device_count()} GPUs: "
            "start one process per GPU (or use --device cpu)"
        )
    threads = settings.train.threads or max(1, (os.cpu_count() or 1) // nproc_per_node)
    os.environ.setdefault("OMP_NUM_THREADS", str(threads))
    try:
        distributed.launch(launch, "visionloop.cli", worker_args)
    except distributed.WorkersFailed as exc:
        if exc.exit_code in (2, 130):  # a clear error, or an interrupt, that the process reported itself
            raise typer.Exit(exc.exit_code) from None
        raise
    except KeyboardInterrupt:
        raise typer.Exit(130) from None  # rank 0 said what to do next
    return True


@app.command("evaluate")
def evaluate_cmd(sets: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Score the trained model on the test split beside a scikit-learn baseline; confusion matrix, ECE."""
    from visionloop.pipeline import steps

    settings = settings_from(sets)
    trained = steps.latest(settings.home, "train", steps.TrainOutput)
    out = steps.evaluate_step(
        trained.model_path, trained.dataset_dir, trained.run_id, settings, trained.work_dir / "evaluation"
    )
    hand_over(
        settings,
        "evaluate",
        out,
        as_json,
        f"test accuracy {out.test_accuracy:.4f} (baseline {out.baseline_name}: {out.baseline_accuracy:.4f}), "
        f"macro F1 {out.macro_f1:.4f}, ECE {out.ece:.4f}; confusion matrix in {out.metrics_path.parent}",
    )


@app.command("export")
def export_cmd(sets: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Export to ONNX (dynamic batch, probabilities + embedding), check parity, write the model card."""
    from visionloop.pipeline import steps

    settings = settings_from(sets)
    trained = steps.latest(settings.home, "train", steps.TrainOutput)
    evaluated = steps.latest(settings.home, "evaluate", steps.EvaluateOutput)
    out = steps.export_step(
        trained.model_path, trained.dataset_dir, evaluated.metrics, settings, trained.work_dir / "export"
    )
    hand_over(
        settings,
        "export",
        out,
        as_json,
        f"exported {out.export_dir / 'model.onnx'}; parity max |diff| {out.max_abs_diff:.2e} on {out.parity_images} images",
    )


@app.command("register")
def register_cmd(model_name: NameOpt = None, sets: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Log the exported model to MLflow, register a new version and give it the alias `challenger`."""
    from visionloop.pipeline import steps

    settings = settings_from(sets, **{"registry.model_name": model_name})
    trained = steps.latest(settings.home, "train", steps.TrainOutput)
    exported = steps.latest(settings.home, "export", steps.ExportOutput)
    out = steps.register_step(exported.export_dir, trained.run_id, settings)
    hand_over(
        settings,
        "register",
        out,
        as_json,
        f"registered {out.model_name} v{out.version} as challenger ({out.model_uri})",
    )


@app.command("promote")
def promote_cmd(
    version: Annotated[str | None, typer.Option(help="Version to judge; default: the one just registered.")] = None,
    model_name: NameOpt = None,
    min_accuracy: FloorOpt = None,
    min_improvement: MarginOpt = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Quality gate: promote the challenger to `champion` if it clears the floor and beats the champion."""
    from visionloop.pipeline import steps

    settings = settings_from(
        sets,
        **{
            "registry.model_name": model_name,
            "gate.min_accuracy": min_accuracy,
            "gate.min_improvement": min_improvement,
        },
    )
    registered = steps.latest(settings.home, "register", steps.RegisterOutput)
    prepared = steps.latest(settings.home, "preprocess", steps.PreprocessOutput)
    out = steps.promote_step(version or registered.version, prepared.dataset_dir, settings)
    verdict = "[green]PROMOTED to champion[/]" if out.promoted else "[yellow]not promoted[/]"
    hand_over(
        settings,
        "promote",
        out,
        as_json,
        f"{out.model_name} v{out.version}: {verdict}",
        *(f"  - {escape(reason)}" for reason in out.reasons),
    )


# ------------------------------------------------------------------------------------------ run


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


NEXT_STEPS = """next: visionloop models list · visionloop models history · visionloop run --help
      mlflow ui --backend-store-uri {uri}"""


@app.command("run")
def run_cmd(
    source: SourceOpt = None,
    epochs: EpochsOpt = None,
    seed: SeedOpt = None,
    device: DeviceOpt = None,
    image_size: SizeOpt = None,
    model_name: NameOpt = None,
    min_accuracy: FloorOpt = None,
    min_improvement: MarginOpt = None,
    no_cache: Annotated[
        bool,
        typer.Option("--no-cache", help="Run every step, even those whose inputs, settings and code are unchanged."),
    ] = False,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The whole loop: ingest → validate → preprocess → train → evaluate → export → register → promote.

    A step whose inputs, settings and code are unchanged since an earlier successful run is skipped and
    its output reused (marked "cached"): run it twice on the same data and the second run trains and
    registers nothing. --no-cache runs everything again (and registers a new challenger).

    Examples:

      visionloop run                                  # built-in digits, about 20 s on 2 CPU cores

      visionloop run --source ./my-images --epochs 40

      visionloop run --source synthetic --set data.synthetic_classes=6 --json
    """
    from visionloop.pipeline.runner import run_pipeline

    settings = settings_from(
        sets,
        **{
            "data.source": source,
            "train.epochs": epochs,
            "train.seed": seed,
            "train.device": device,
            "data.image_size": image_size,
            "registry.model_name": model_name,
            "gate.min_accuracy": min_accuracy,
            "gate.min_improvement": min_improvement,
        },
    )

    def on_stage(name: str, seconds: float, _out: Any, cached: bool) -> None:
        if not as_json:
            err.print(
                f"[green]✓[/] {name:<10} {seconds:6.2f} s"
                + ("  [dim](cached: unchanged, not run)[/]" if cached else "")
            )

    started = time.time()
    try:
        summary = run_pipeline(settings, show_progress=not as_json, on_stage=on_stage, use_cache=not no_cache)
    except KeyboardInterrupt:
        resume_from = settings.home / "latest" / "train_started.json"
        hint = (
            "the last finished epoch is checkpointed: `visionloop train --resume`, then evaluate, export, "
            "register and promote (or `visionloop run` to start over)"
            if resume_from.is_file() and resume_from.stat().st_mtime >= started
            else "stopped before training started; nothing to resume"
        )
        err.print(f"[yellow]interrupted[/]: {hint}")
        raise typer.Exit(130) from None
    if as_json:
        result = summary.to_dict()
        result["gate_decision"] = "promoted" if summary.promoted else "rejected"
        print(json.dumps(result, default=str))
    else:
        console.print(summary_table(summary))
        uri = settings.tracking_uri
        err.print(
            NEXT_STEPS.format(uri=uri) if uri.startswith("sqlite") else NEXT_STEPS.splitlines()[0], highlight=False
        )


# ------------------------------------------------------------------------------------------ models


def _short_time(iso: str) -> str:
    """'2026-11-26T12:07:31+00:00' -> '2026-11-26 12:07' (UTC): the tables keep full ISO in --json."""
    return iso.replace("T", " ")[:16]


@models_app.command("list")
def models_list(model_name: NameOpt = None, sets: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Every registered version with its aliases, dataset version, test accuracy and gate decision."""
    from visionloop import registry

    settings = settings_from(sets, **{"registry.model_name": model_name})
    rows = registry.list_versions(settings)
    if as_json:
        _print_json(rows)
        return
    table = Table(title=f"{settings.registry.model_name} ({settings.tracking_uri})", title_justify="left")
    table.box = box.SIMPLE_HEAD  # fits 80 columns; `--json` has every field, run ids included
    for column in ("v", "aliases", "created (UTC)", "dataset", "test acc", "gate"):
        table.add_column(column, no_wrap=True)
    for row in rows:
        table.add_row(
            row["version"],
            ", ".join(row["aliases"]),
            _short_time(row["created"]),
            row["dataset_version"],
            f"{float(row['test_accuracy']):.4f}" if row["test_accuracy"] else "",
            row["gate"],
        )
    console.print(table)


@models_app.command("history")
def models_history(model_name: NameOpt = None, sets: SetOpt = None, as_json: JsonOpt = False) -> None:
    """Every alias move: when, which alias, from which version to which, and why."""
    from dataclasses import asdict

    from visionloop import registry

    settings = settings_from(sets, **{"registry.model_name": model_name})
    events = registry.history(settings)
    if as_json:
        _print_json([asdict(e) for e in events])
        return
    table = Table(title=f"alias history of {settings.registry.model_name}", title_justify="left", box=box.SIMPLE_HEAD)
    for column in ("#", "time", "alias", "from", "to", "kind", "reason"):
        table.add_column(column, no_wrap=column != "reason")
    for e in events:
        table.add_row(
            str(e.seq),
            _short_time(e.time),
            e.alias,
            f"v{e.from_version}" if e.from_version else "-",
            f"v{e.to_version}",
            e.kind,
            e.reason,
        )
    console.print(table)


@models_app.command("rollback")
def models_rollback(
    model_name: NameOpt = None,
    reason: Annotated[str, typer.Option(help="Why; stored in the alias history.")] = "manual rollback",
    sets: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Move `champion` back to the previous champion (recorded in the history)."""
    from dataclasses import asdict

    from visionloop import registry

    settings = settings_from(sets, **{"registry.model_name": model_name})
    event = registry.rollback(settings, reason)
    if as_json:
        _print_json(asdict(event))
    else:
        console.print(f"champion rolled back: v{event.from_version} → v{event.to_version}")


# ------------------------------------------------------------------------------------------ pipeline (Kubeflow)

ImageOpt = Annotated[
    str | None,
    typer.Option(
        help="Container image every step runs in; it must have visionloop installed "
        "(default ghcr.io/visionloop/visionloop:latest)."
    ),
]


@pipeline_app.command("compile")
def pipeline_compile(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the pipeline (KFP IR YAML).")] = Path(
        "visionloop-pipeline.yaml"
    ),
    image: ImageOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compile the Kubeflow pipeline: the eight steps of `visionloop run`, one KFP component each.

    Upload the file in the Kubeflow Pipelines UI (or use `visionloop pipeline submit`). Run parameters:
    settings_json (settings as JSON; {} = the image's defaults), tracking_uri (an MLflow server every
    pod can reach), cpu, memory (limits of every step) and gpus (nvidia.com/gpu of the train step).

    Examples:

      visionloop pipeline compile                          # ./visionloop-pipeline.yaml

      visionloop pipeline compile --output deploy/kubeflow/visionloop-pipeline.yaml

      visionloop pipeline compile --image registry.example.com/visionloop:0.1.0 -o pipeline.yaml
    """
    from visionloop.pipeline import kubeflow

    image = image or kubeflow.DEFAULT_IMAGE
    written = kubeflow.compile_pipeline(output, image)
    if as_json:
        _print_json({"output": str(written), "image": image, "steps": list(kubeflow.STEPS)})
    else:
        console.print(f"wrote {written}: {' → '.join(kubeflow.STEPS)} in {image}", highlight=False)


@pipeline_app.command("submit")
def pipeline_submit(
    host: Annotated[
        str,
        typer.Option(
            envvar="KF_PIPELINES_ENDPOINT",
            help="Kubeflow Pipelines API URL, e.g. http://localhost:8080 (a port-forward of ml-pipeline-ui) "
            "or https://kubeflow.example.com/pipeline.",
        ),
    ],
    experiment: Annotated[str, typer.Option(help="KFP experiment to file the run under (created if missing).")] = (
        "visionloop"
    ),
    run_name: Annotated[str | None, typer.Option(help="Run name in the KFP UI (default: visionloop <time>).")] = None,
    params: Annotated[
        list[str] | None,
        typer.Option("--param", help="A run parameter as KEY=VALUE: tracking_uri, cpu, memory or gpus (repeatable)."),
    ] = None,
    image: ImageOpt = None,
    namespace: Annotated[
        str | None, typer.Option(help="Kubernetes namespace of the run (multi-user Kubeflow: your profile).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the KFP API to connect or answer.")] = 10.0,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Compile the pipeline and start a run of it on a Kubeflow Pipelines cluster.

    The run gets these settings (--config, --set, VISIONLOOP_*) as settings_json. The steps need an
    MLflow server every pod can reach: --param tracking_uri=URL, --set registry.tracking_uri=URL, or
    MLFLOW_TRACKING_URI in the pods. An unreachable host fails after --timeout seconds.

    Examples:

      kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80 &

      visionloop pipeline submit --host http://localhost:8080 --param tracking_uri=http://mlflow.mlflow:5000

      visionloop pipeline submit --host http://localhost:8080 --param gpus=1 --param memory=16Gi \\
          --set data.source=s3://bucket/images --set train.epochs=40 --run-name nightly
    """
    from dataclasses import asdict

    from visionloop.pipeline import kubeflow

    settings = settings_from(sets)
    parameters = kubeflow.parse_parameters(params)
    submitted = kubeflow.submit_pipeline(
        host,
        settings,
        parameters,
        experiment=experiment,
        run_name=run_name,
        image=image or kubeflow.DEFAULT_IMAGE,
        namespace=namespace,
        timeout=timeout,
    )
    if as_json:
        _print_json(asdict(submitted))
        return
    console.print(
        f"submitted run {submitted.run_id} ({escape(submitted.run_name)}) to experiment "
        f"{escape(submitted.experiment)}\n  {submitted.run_url}",
        highlight=False,
    )
    if not (parameters.get("tracking_uri") or settings.registry.tracking_uri):
        err.print(
            "[yellow]note:[/] no tracking URI given: the steps use MLFLOW_TRACKING_URI from their pods "
            "and fail if it is unset (--param tracking_uri=URL)"
        )


# ------------------------------------------------------------------------------------------ serve


def _sample_image(settings: Settings) -> Path | None:
    """An image from the last ingested data set, for the curl line in the serve banner."""
    from visionloop.fsutil import read_json

    try:
        root = Path(read_json(settings.home / "latest" / "ingest.json")["root"])
        return next(p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith("."))
    except Exception:
        return None


@app.command("serve")
def serve_cmd(
    host: Annotated[str | None, typer.Option(help=describe("serve.host"))] = None,
    port: Annotated[int | None, typer.Option(help=describe("serve.port"))] = None,
    model_ref: Annotated[str | None, typer.Option("--model-ref", help=describe("serve.model_ref"))] = None,
    model_name: NameOpt = None,
    max_batch_size: Annotated[int | None, typer.Option(help=describe("serve.max_batch_size"))] = None,
    max_wait_ms: Annotated[float | None, typer.Option(help=describe("serve.max_wait_ms"))] = None,
    threads: Annotated[int | None, typer.Option(help=describe("serve.threads"))] = None,
    poll_seconds: Annotated[float | None, typer.Option(help=describe("serve.poll_seconds"))] = None,
    access_log: Annotated[bool, typer.Option("--access-log", help="Log every request (uvicorn access log).")] = False,
    sets: SetOpt = None,
) -> None:
    """Serve the registered champion over HTTP until Ctrl-C (or SIGTERM, which lets requests finish).

    POST /predict (multipart files or JSON base64) for people and scripts; the KServe V2 Open Inference
    Protocol under /v2 for KServe/Triton clients; /healthz, /readyz, /metrics for operators; POST
    /feedback for true labels; POST /admin/reload to pick up a new champion now (it is also polled).
    Requests are batched dynamically; the model runs on ONNX Runtime and torch is never imported.

    Examples:

      visionloop serve                                   # champion of the embedded registry on :8000

      visionloop serve --host 0.0.0.0 --port 8080 --max-batch-size 64 --max-wait-ms 5

      VISIONLOOP_SERVE__ADMIN_TOKEN=s3cret visionloop serve --poll-seconds 10
    """
    from visionloop.serving.server import serve

    settings = settings_from(
        sets,
        **{
            "serve.host": host,
            "serve.port": port,
            "serve.model_ref": model_ref,
            "registry.model_name": model_name,
            "serve.max_batch_size": max_batch_size,
            "serve.max_wait_ms": max_wait_ms,
            "serve.threads": threads,
            "serve.poll_seconds": poll_seconds,
        },
    )
    sample = _sample_image(settings)

    def announce(url: str, app_obj: Any) -> None:
        model = app_obj.state.service.holder.current
        name = settings.registry.model_name
        what = (
            f"{name} v{model.version} ({settings.serve.model_ref})"
            if model is not None
            else f"no model yet: {app_obj.state.service.holder.status}"
        )
        image = str(sample) if sample is not None else "your-image.png"
        err.print(
            f"[bold]visionloop serve[/]: listening on {url} — {escape(what)}\n"
            f"  try      curl -F file=@{image} {url}/predict\n"
            f"  docs     {url}/docs\n"
            f"  V2       {url}/v2/models/{name}   (tritonclient.http, KServe clients)\n"
            f"  health   {url}/healthz  {url}/readyz\n"
            f"  metrics  {url}/metrics\n"
            "Ctrl-C stops it; in-flight requests finish first.",
            highlight=False,
        )

    serve(settings, access_log=access_log, on_started=announce)


def _fail(message: str, code: int) -> None:
    # one line, and the message is text, not markup: a path may contain "[/x]"
    err.print(f"[bold red]error:[/] {escape(' '.join(message.split()))}", highlight=False, soft_wrap=True)
    sys.exit(code)


def _terminate(signum: int, _frame: object) -> None:
    # Kubernetes stops a pod with SIGTERM: unwind like Ctrl-C, so temporary files are removed, the
    # MLflow run is marked KILLED and the last checkpoint stays usable for --resume
    raise KeyboardInterrupt


def main() -> None:
    signal.signal(signal.SIGTERM, _terminate)
    try:
        result = app(standalone_mode=False)
    except VisionloopError as exc:
        _fail(str(exc), exc.exit_code)
    except typer.Abort:
        _fail("aborted", 130)
    except typer.TyperException as exc:  # typer's own click: usage errors, bad option values
        ctx = getattr(exc, "ctx", None)
        if type(exc).__name__ == "NoArgsIsHelpError" and ctx is not None:
            typer.echo(ctx.get_help())  # a bare group teaches instead of scolding
            sys.exit(0)
        hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
        _fail(exc.format_message() + hint, getattr(exc, "exit_code", 2))
    sys.exit(result if isinstance(result, int) else 0)


if __name__ == "__main__":
    main()
