"""``visionloop loop``: the closed-loop service, ``loop once`` (one pass, for a CronJob) and ``loop history``."""

from __future__ import annotations

import datetime as dt
import sys
from typing import Annotated, Any

import typer
from rich.markup import escape

from visionloop.console import JsonOpt, SetOpt, console, describe, err, print_json, settings_from

HELP = """The closed loop: drift or falling accuracy → retrain → gate → promote → watch → roll back.

Without a sub-command, runs the loop service on 127.0.0.1:8002: POST /alerts takes Alertmanager's webhook
(deploy/monitoring/alertmanager/alertmanager.yml points there), a watcher looks every loop.interval_seconds at
the monitor's verdict, live accuracy, the schedule and the champion alias, and each retrain runs the pipeline
on the training data plus the labelled production images, judges the challenger on the original test set and
a held-out production slice, promotes, watches the new champion's live accuracy and rolls back if it fails.

Examples:

  visionloop loop                                   # the service: webhook, watcher, /runs, /metrics

  visionloop loop once                              # one pass (a Kubernetes CronJob): act on what it finds

  visionloop loop once --force --reason "new labels from the review team"

  visionloop loop history                           # every run: trigger, data, gate on both test sets, analysis

  VISIONLOOP_LOOP__TRIGGERS='["alert","schedule"]' VISIONLOOP_LOOP__SCHEDULE_SECONDS=86400 visionloop loop
"""

app = typer.Typer(help=HELP, rich_markup_mode="rich", invoke_without_command=True)


def _settings(sets: list[str] | None, **flags: Any) -> Any:
    return settings_from(sets, **{f"loop.{k}": v for k, v in flags.items()})


@app.callback()
def loop_service(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help=describe("loop.host"))] = None,
    port: Annotated[int | None, typer.Option(help=describe("loop.port"))] = None,
    interval_seconds: Annotated[float | None, typer.Option(help=describe("loop.interval_seconds"))] = None,
    sets: SetOpt = None,
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    from visionloop.loop.service import run_service

    settings = _settings(sets, host=host, port=port, interval_seconds=interval_seconds)

    def announce(url: str, _app: Any) -> None:
        loop = settings.loop
        err.print(
            f"[bold]visionloop loop[/]: listening on {url} — {escape(settings.registry.model_name)}, triggers "
            f"{', '.join(loop.triggers)}, a look every {loop.interval_seconds:g} s, executor {loop.executor}\n"
            f"  webhook  {url}/alerts\n  runs     {url}/runs\n  metrics  {url}/metrics\n"
            f"  health   {url}/healthz  {url}/readyz\nCtrl-C stops it.",
            highlight=False,
        )

    run_service(settings, on_started=announce)


@app.command("once")
def once_cmd(
    force: Annotated[
        bool, typer.Option("--force", help="Retrain now, whatever the triggers say (trigger manual).")
    ] = False,
    reason: Annotated[str, typer.Option(help="Why, with --force; kept in the history.")] = "manual retrain",
    json_out: JsonOpt = False,
    sets: SetOpt = None,
) -> None:
    """One pass of the loop, then exit: take up an unfinished run, or act on the first trigger that fires
    (a promotion made outside the loop, the verdict, live accuracy, the schedule), to the end of its analysis.

    Exit 0 when it decided (nothing to do, promoted, rejected, rolled back), 1 when a run failed."""
    from visionloop.loop.engine import Engine
    from visionloop.loop.triggers import Trigger

    settings = _settings(sets)
    engine = Engine(settings)
    if force:
        acks = [engine.resume(wait=True) or engine.offer(Trigger("manual", reason), wait=True)]
    else:
        acks = engine.tick(wait=True)
    runs = [engine.state.get_run(a.run_id) for a in acks if a.run_id]
    if json_out:
        print_json({"acks": [a.model_dump() for a in acks], "runs": [r.to_dict() for r in runs if r]})
    else:
        if not acks:
            console.print("nothing to do: no trigger fired")
        for ack in acks:
            console.print(
                f"{ack.trigger}: {ack.action}{' — ' + escape(ack.detail) if ack.detail else ''}", highlight=False
            )
        for run in runs:
            if run:
                _print_run(run)
    sys.exit(1 if any(r and r.result == "failed" for r in runs) else 0)


@app.command("history")
def history_cmd(
    limit: Annotated[int, typer.Option(min=1, max=1000, help="Newest this many runs.")] = 20,
    run_id: Annotated[str | None, typer.Option("--run", help="One run in full.")] = None,
    json_out: JsonOpt = False,
    sets: SetOpt = None,
) -> None:
    """Every loop run, newest first: trigger and reason, the dataset it built, the gate on both test sets,
    the promotion, the analysis measurements and any rollback."""
    from visionloop.errors import VisionloopError
    from visionloop.loop.state import LoopState

    settings = _settings(sets)
    state = LoopState.from_settings(settings)
    try:
        if run_id is not None:
            found = state.get_run(run_id)
            if found is None:
                raise VisionloopError(f"no loop run {run_id}")
            runs = [found]
        else:
            runs = state.runs(settings.registry.model_name, limit=limit)
    finally:
        state.close()
    if json_out:
        print_json([r.to_dict() for r in runs])
        return
    if run_id is not None:
        _print_run(runs[0], full=True)
        return
    if not runs:
        console.print("no loop runs yet")
        return
    for run in runs:
        _print_run(run)


def _when(seconds: float | None) -> str:
    if seconds is None:
        return ""
    return dt.datetime.fromtimestamp(seconds, dt.UTC).strftime("%m-%d %H:%M:%S")


def _gate_cell(run: Any) -> str:
    gate = run.data.get("gate")
    if not gate:
        return ""
    mine, theirs = gate.get("challenger") or {}, gate.get("champion") or {}

    def pair(key: str) -> str:
        if key not in mine:
            return "—"
        other = f" (champion {theirs[key]:.3f})" if key in theirs else ""
        return f"{key} {mine[key]:.3f}{other}"

    return f"{pair('original')}, {pair('production')} → {'promoted' if gate.get('promoted') else 'refused'}"


def _analysis_cell(run: Any) -> str:
    analysis = run.data.get("analysis")
    if not analysis:
        return ""
    results = [m["result"][0].upper() for m in analysis.get("measurements", [])]
    return f"{analysis.get('phase')} {''.join(results)}"


def _print_run(run: Any, full: bool = False) -> None:
    console.print(f"[bold]{run.id}[/] {run.trigger}: {escape(run.reason)}", highlight=False)
    console.print(f"  {run.phase}{' → ' + run.result if run.result else ''}, started {_when(run.created_at)}, "
                  f"ended {_when(run.finished_at) or '—'}", highlight=False)  # fmt: skip
    data = run.data
    if data.get("lineage"):
        lin = data["lineage"]
        console.print(
            f"  data: base {lin.get('base_dataset')} ({lin.get('base_files')} files) + {lin.get('train')} production "
            f"images, {lin.get('test')} held out, {lin.get('capped', 0)} over the cap; dataset {data.get('dataset_version', '—')}",
            highlight=False,
        )
    if data.get("gate"):
        console.print(f"  gate: {_gate_cell(run)}", highlight=False)
        for reason in data["gate"].get("reasons", []):
            console.print(f"    - {escape(reason)}", highlight=False)
    if data.get("analysis"):
        analysis = data["analysis"]
        console.print(f"  analysis of v{analysis['version']}: {analysis['phase']}", highlight=False)
        for m in analysis.get("measurements", []) if full or len(analysis.get("measurements", [])) <= 12 else []:
            console.print(f"    {_when(m['at'])} {m['result']}: {escape('; '.join(m['reasons']))}", highlight=False)
    if data.get("rollback"):
        console.print(
            f"  rollback → v{data['rollback'].get('to_version')}: {escape(data['rollback']['reason'])}", highlight=False
        )
    if data.get("error"):
        console.print(f"  [red]error[/]: {escape(data['error'])}", highlight=False)
    if data.get("reasons"):
        for reason in data["reasons"]:
            console.print(f"  - {escape(reason)}", highlight=False)
