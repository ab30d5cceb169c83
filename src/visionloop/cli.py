"""The ``visionloop`` command: one sub-command per lifecycle stage, and ``run`` to chain them.

The stage commands and ``run`` are generated from the dataflow declaration (``pipeline/dataflow.py``,
``pipeline/commands.py``). Stages hand over through ``<home>/latest/<stage>.json``, so
``visionloop data ingest``, then ``visionloop data validate``, … then ``visionloop promote`` does
exactly what ``visionloop run`` does.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from visionloop import __version__
from visionloop.config import Settings
from visionloop.console import STATE, JsonOpt, SetOpt, console, describe, err, settings_from
from visionloop.console import print_json as _print_json
from visionloop.delivery.commands import app as images_app
from visionloop.errors import Reported, VisionloopError
from visionloop.loop.commands import app as loop_app
from visionloop.monitoring.commands import app as monitor_app
from visionloop.pipeline.commands import add_stage_commands, run_command
from visionloop.pipeline.dataflow import STEPS

HELP = """visionloop — the production loop of an image classifier, end to end.

ingest → validate → preprocess → train → evaluate → export (ONNX) → register (MLflow) → gate → champion

Start with [bold]visionloop run[/] (the built-in digits), then look around with
[bold]visionloop models list[/] and [bold]visionloop models history[/].

Every option is also a setting: in a YAML file (--config), as VISIONLOOP_<GROUP>__<KEY> in the
environment, or as --set group.key=value. Flags win over the environment, which wins over the file.
"""

app = typer.Typer(help=HELP, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode="rich")
data_app = typer.Typer(help="Ingest, validate and preprocess image data.", no_args_is_help=True)
models_app = typer.Typer(
    help="Inspect the registry: versions, alias history, rollback, a forced promotion.", no_args_is_help=True
)
app.add_typer(data_app, name="data")
app.add_typer(models_app, name="models")
pipeline_app = typer.Typer(
    help="Kubeflow Pipelines: compile the steps of `run` into a KFP pipeline, or submit it to a cluster.",
    no_args_is_help=True,
)
app.add_typer(pipeline_app, name="pipeline")
app.add_typer(monitor_app, name="monitor")
app.add_typer(loop_app, name="loop")
app.add_typer(images_app, name="images")

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML settings file (default ./visionloop.yaml if present)."),
]
NameOpt = Annotated[str | None, typer.Option("--model-name", help=describe("registry.model_name"))]


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
    STATE["config"] = config
    STATE["home"] = home


# ------------------------------------------------------------------------------------------ the steps

# one command per declared step (data ingest … promote), and `run` over a range of them
add_stage_commands(app, {"data": data_app}, STEPS)
app.command("run")(run_command())


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


@models_app.command("promote")
def models_promote(
    version: Annotated[str, typer.Argument(help="The registered version to make champion.")],
    force: Annotated[
        bool, typer.Option("--force", help="Required: this skips the gate (use `visionloop promote` for the gate).")
    ] = False,
    reason: Annotated[str, typer.Option(help="Why; stored in the alias history.")] = "promoted by hand",
    model_name: NameOpt = None,
    sets: SetOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make VERSION the champion without the gate: an operator's override, recorded in the history.

    A running `visionloop loop` notices the promotion and runs its post-promotion analysis on it, and rolls
    it back if its live accuracy fails (see docs/loop.md)."""
    from dataclasses import asdict

    from visionloop import registry

    if not force:
        raise VisionloopError(
            "models promote skips the quality gate: add --force to mean it, or use `visionloop promote --version "
            f"{version}` to run the gate"
        )
    settings = settings_from(sets, **{"registry.model_name": model_name})
    event = registry.force_champion(settings, version, reason)
    if as_json:
        _print_json(asdict(event))
    else:
        console.print(
            f"champion: v{event.from_version} → v{event.to_version} (forced: {escape(reason)})", highlight=False
        )


# ------------------------------------------------------------------------------------------ pipeline (Kubeflow)

ImageOpt = Annotated[
    str | None,
    typer.Option(
        help="Container image every step runs in; it must have visionloop installed "
        "(default ghcr.io/visionloop/visionloop-train:0.1.0, built from deploy/docker/train.Dockerfile)."
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


@app.command("demo")
def demo_cmd(
    workdir: Annotated[
        Path, typer.Option(help="Folder for everything the demo makes (replaced if an earlier demo made it).")
    ] = Path(".visionloop-demo"),
    fast: Annotated[bool, typer.Option(help="Smaller models (about 6 s a training instead of 45 s).")] = False,
    alerting: Annotated[
        bool | None,
        typer.Option(
            "--alerting/--no-alerting",
            help="Drive the loop through Prometheus and Alertmanager (default: when both are installed).",
        ),
    ] = None,
    sets: Annotated[
        list[str] | None,
        typer.Option(
            "--set",
            help="A setting over the demo's own as KEY=VALUE (repeatable), e.g. --set "
            "loop.analysis_min_accuracy=0.999 to watch the loop roll back the retrained model.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """The whole closed loop on the built-in digits, unattended, in a few minutes.

    Trains a champion; starts serve, monitor and loop (and Prometheus + Alertmanager when installed); sends
    in-distribution traffic (no alarm), then inverted digits with feedback: drift is detected, the loop
    retrains, the gate promotes, the server reloads and accuracy on the shifted traffic recovers. Then it
    forces a bad model through and the loop rolls it back. Ends with a summary table, an HTML drift report
    and an accuracy plot, written whatever happened. Each phase checks what the loop actually did: one that
    went otherwise is shown ✗ with the reason, the phases that need it are skipped, and the demo exits 1.

    Examples:

      visionloop demo                     # or: make demo

      visionloop demo --fast --workdir /tmp/demo --json
    """
    from visionloop.console import _parse_set
    from visionloop.loop.demo import Demo, DemoFailed, print_summary

    summary = Demo(workdir, fast=fast, alerting=alerting, console=err, overrides=_parse_set(sets)).run()
    if as_json:
        _print_json(summary.to_dict())
    else:
        print_summary(summary, console)
    if not summary.ok:
        raise DemoFailed(
            f"the demo's story did not hold: {'; '.join(summary.failures)} (summary: {summary.summary_text})"
        )


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
    except Reported as exc:  # a training process has said what went wrong
        sys.exit(exc.exit_code)
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
