"""``visionloop monitor``: the drift service, ``monitor check`` (one shot, for CronJobs) and ``monitor report``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.markup import escape
from rich.table import Table

from visionloop.console import JsonOpt, SetOpt, console, describe, err, print_json, settings_from
from visionloop.errors import VisionloopError

HELP = """Watch production traffic: drift of the served version's inputs and outputs, and live accuracy.

Without a sub-command, runs the monitor service: a drift check every monitor.interval_seconds over the
newest monitor.window_size predictions in the shared store (monitor.store_url), against the reference
profile registered with the served version; GET /drift (the latest result as JSON), GET /metrics for
Prometheus, /healthz, /readyz.

Examples:

  visionloop monitor                                  # the service on 127.0.0.1:8001

  visionloop monitor check --json                     # one check; exit 0 ok, 1 drift, 2 error, 3 accuracy

  visionloop monitor report --output drift.html       # plots: reference against current traffic

  VISIONLOOP_MONITOR__STORE_URL=postgresql://vl:pw@db:5432/predictions visionloop monitor --host 0.0.0.0
"""

app = typer.Typer(help=HELP, rich_markup_mode="rich", invoke_without_command=True)
VersionOpt = Annotated[
    str | None,
    typer.Option("--model-version", help="Check this registered version instead of the one serve.model_ref names."),
]
# what a CronJob or a script acts on; accuracy_below_floor wins over drifted and no_reference (see schema.Status)
EXIT = {
    "ok": 0, "insufficient_data": 0, "no_model": 0, "drifted": 1, "no_reference": 2, "error": 2,
    "accuracy_below_floor": 3,
}  # fmt: skip


def _settings(sets: list[str] | None, **flags: Any) -> Any:
    return settings_from(sets, **{f"monitor.{k}": v for k, v in flags.items()})


@app.callback()
def monitor_service(
    ctx: typer.Context,
    host: Annotated[str | None, typer.Option(help=describe("monitor.host"))] = None,
    port: Annotated[int | None, typer.Option(help=describe("monitor.port"))] = None,
    interval_seconds: Annotated[float | None, typer.Option(help=describe("monitor.interval_seconds"))] = None,
    sets: SetOpt = None,
) -> None:
    if ctx.invoked_subcommand is not None:
        return
    from visionloop.monitoring.monitor import run_service

    settings = _settings(sets, host=host, port=port, interval_seconds=interval_seconds)

    def announce(url: str, _app: Any) -> None:
        err.print(
            f"[bold]visionloop monitor[/]: listening on {url} — {escape(settings.registry.model_name)}@"
            f"{escape(settings.serve.model_ref)}, a check every {settings.monitor.interval_seconds:g} s\n"
            f"  drift    {url}/drift\n  metrics  {url}/metrics\n  health   {url}/healthz  {url}/readyz\n"
            "Ctrl-C stops it.",
            highlight=False,
        )

    run_service(settings, on_started=announce)


@app.command("check")
def check_cmd(
    model_version: VersionOpt = None,
    window_size: Annotated[int | None, typer.Option(help=describe("monitor.window_size"))] = None,
    json_out: JsonOpt = False,
    sets: SetOpt = None,
) -> None:
    """One drift check now, and the served version's live accuracy against monitor.min_accuracy.

    Exit codes, for CronJobs and scripts:
    0  ok, insufficient_data or no_model: nothing to act on
    1  drifted: a drift detector fired
    2  no_reference or error: the check could not run
    3  accuracy_below_floor: live accuracy under monitor.min_accuracy on monitor.min_feedback labels or more;
    wins over 1 and 2 (no_reference) when they hold too, and every reason is listed

    Also records the result in the store, where the server's GET /monitoring/drift finds it."""
    from visionloop.monitoring.monitor import Monitor

    monitor = Monitor(_settings(sets, window_size=window_size))
    try:
        result = monitor.check(model_version)
    finally:
        monitor.close()
    if json_out:
        print_json(result.model_dump(mode="json"))
    else:
        _print_result(result)
    sys.exit(EXIT[result.status])


@app.command("report")
def report_cmd(
    output: Annotated[Path, typer.Option("--output", "-o", help="HTML file to write.")] = Path("drift-report.html"),
    model_version: VersionOpt = None,
    sets: SetOpt = None,
) -> None:
    """Write a self-contained HTML report: the verdict, every test, and plots of reference against current
    traffic (image statistics, class mix, confidence, a 2-D projection of the embeddings, p-values over time)."""
    from visionloop.monitoring.monitor import Monitor
    from visionloop.monitoring.report import write_report

    settings = _settings(sets)
    monitor = Monitor(settings)
    try:
        result = monitor.check(model_version)
        window = monitor.latest_window
        if result.model_version is None or result.reference is None or window is None:
            raise VisionloopError("no report: " + "; ".join(result.reasons))
        profile, _ = monitor.reference(result.model_version)  # prepared by the check: no second load
        name = settings.registry.model_name
        history = monitor.store.checks(name, result.model_version)
    finally:
        monitor.close()
    path = write_report(
        output, model_name=name, model_version=result.model_version, classes=profile.classes,
        reference=profile.sample, window=window.sample, latest=result, history=history,
    )  # fmt: skip
    console.print(f"report: {path} ({result.status}, {result.window.size} predictions, {len(history)} checks)")


def _print_result(result: Any) -> None:
    colour = {"ok": "green", "insufficient_data": "yellow", "no_model": "yellow"}.get(result.status, "red")
    w = result.window
    console.print(
        f"[bold]{escape(result.model_name)} v{result.model_version}[/]: [{colour}]{result.status}[/] — window "
        f"{w.size}/{w.requested} predictions over {w.span_seconds:.0f} s",
        highlight=False,
    )
    for reason in result.reasons:
        console.print(f"  - {escape(reason)}", highlight=False)
    if result.tests:
        console.print(drift_table(result.tests))
    for live in result.accuracy:
        shown = "n/a" if live.accuracy is None else f"{live.accuracy:.3f}"
        judged = "" if live.judged else " (too few labels to judge)"
        console.print(f"  live accuracy v{live.model_version}: {shown} on {live.count} labels{judged}")


def drift_table(tests: list[Any]) -> Table:
    """The tests as a table that stays whole at 80 columns (a pipe, a CronJob log, a small terminal).

    The test name is the one column that must never be cut (``ks:image_sharpness`` and ``ks:image_std`` differ
    only at the end), so it is never wrapped and is sized to its longest name; the detector is a section row
    instead of a column, and the threshold (one value per check) goes in the title. The numbers keep 4-5
    significant digits, which fit the rest of the width.
    """
    from visionloop.monitoring.drift import DETECTOR_LABELS  # scipy: only once a check has run

    thresholds = sorted({f"{t.threshold:.3g}" for t in tests})
    table = Table(box=box.SIMPLE_HEAD, title=f"drift tests (adjusted p < {', '.join(thresholds)} is drift)")
    table.add_column("test", no_wrap=True, min_width=max(len(t.name) for t in tests))
    for column in ("statistic", "p", "adjusted p"):
        table.add_column(column, justify="right", no_wrap=True)
    table.add_column("drift", no_wrap=True)
    detector = None
    for t in tests:
        if t.detector != detector:
            detector = t.detector
            table.add_row(f"[bold]{escape(DETECTOR_LABELS.get(detector, detector))}[/]")
        mark = "[red]yes[/]" if t.drifted else "no"
        table.add_row(escape(t.name), f"{t.statistic:.4g}", f"{t.p_value:.3g}", f"{t.adjusted_p_value:.3g}", mark)
    return table
