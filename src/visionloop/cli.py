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
    sets: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Train the residual CNN on the latest preprocessed dataset, tracked in MLflow."""
    from visionloop.fsutil import read_json
    from visionloop.pipeline import steps

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
    if resume:
        started_path = settings.home / "latest" / "train_started.json"
        if not started_path.is_file():
            raise VisionloopError("nothing to resume: no training was started under this home")
        started = read_json(started_path)
        dataset_dir, work_dir, run_id = (
            Path(started["dataset_dir"]),
            Path(started["work_dir"]),
            started["run_id"],
        )
    else:
        dataset_dir = steps.latest(settings.home, "preprocess", steps.PreprocessOutput).dataset_dir
        work_dir, run_id = steps.new_work_dir(settings.home), None
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
    sets: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """The whole loop: ingest → validate → preprocess → train → evaluate → export → register → promote.

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

    def on_stage(name: str, seconds: float, _out: Any) -> None:
        if not as_json:
            err.print(f"[green]✓[/] {name:<10} {seconds:6.2f} s")

    started = time.time()
    try:
        summary = run_pipeline(settings, show_progress=not as_json, on_stage=on_stage)
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
