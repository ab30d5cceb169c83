"""Where does the time of `visionloop run` go, and is the CNN paying for itself?

Runs the real local runner (``visionloop.pipeline.runner.run_pipeline``, the function behind
``visionloop run``) on a data source (the embedded ``digits`` by default) in a store that is new
unless ``--home`` says otherwise, and prints:

- the wall time of each stage (ingest, validate, preprocess, train, evaluate, export, register,
  promote), the time spent outside the stages, the whole run, and each stage's share of it;
- the CNN's test accuracy beside the scikit-learn baseline's, both from the same run on the same
  test split, and the ratio of error rates (baseline error / CNN error: above 1 means the CNN makes
  fewer mistakes), with the training time of each side;
- the import time of ``visionloop.pipeline.runner`` + ``mlflow`` in a fresh interpreter, beside the
  start-up of an interpreter that imports nothing (the baseline), since a user waits for both;
- with ``--repeat N``, the pipeline N times in the same store: the second run finds every step
  cached (nothing changed: no training, no new registered version) and ends with "first run X s,
  second run Y s, ratio"; with ``--no-cache`` the second run runs every step again and only finds
  the source and the dataset version on disk, the MLflow tables created and torch/MLflow imported.

Every number is measured in this run. Settings come from the same places as the CLI's (a YAML file
given with --config or ./visionloop.yaml, VISIONLOOP_* variables), then this script's options.

    .venv/bin/python benchmarks/pipeline.py                 # one run, package defaults
    .venv/bin/python benchmarks/pipeline.py --repeat 2 --epochs 5 --json-out pipeline.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from _common import print_load  # benchmarks/ is on sys.path when a script runs
from visionloop.config import load_settings
from visionloop.pipeline.runner import RunSummary, run_pipeline

STAGES = ("ingest", "validate", "preprocess", "train", "evaluate", "export", "register", "promote")
IMPORT_CODE = "import visionloop.pipeline.runner, mlflow"
EMPTY_CODE = "pass"

console = Console()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time each stage of `visionloop run` and compare the CNN with the scikit-learn baseline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--source", default="digits", help="data source, as for `visionloop run --source`")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (default: the package default)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default=None, help="training device")
    parser.add_argument("--home", type=Path, default=None, help="project home (default: a new temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary home afterwards")
    parser.add_argument("--config", type=Path, default=None, help="YAML settings file, as for the CLI")
    parser.add_argument("--repeat", type=int, default=1, help="run the pipeline this many times in the same store")
    parser.add_argument("--no-cache", action="store_true", help="run every step every time (no step cache)")
    parser.add_argument("--import-repeats", type=int, default=3, help="fresh interpreters per import timing")
    parser.add_argument("--progress", action="store_true", help="show the training progress bar")
    parser.add_argument("--json-out", type=Path, default=None, help="write every number to this JSON file")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.import_repeats < 1:
        parser.error("--repeat and --import-repeats must be at least 1")
    return args


def finite_or_none(value: Any) -> Any:
    """JSON has no inf or NaN: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [finite_or_none(v) for v in value]
    return value


def time_subprocess(code: str, repeats: int) -> list[float]:
    """Wall seconds of ``python -c code`` in fresh interpreters (start-up included)."""
    seconds = []
    for _ in range(repeats):
        started = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        seconds.append(time.perf_counter() - started)
    return seconds


def run_once(settings: Any, show_progress: bool, use_cache: bool = True) -> dict[str, Any]:
    """One ``run_pipeline`` call, with our own wall clock around it and each stage's output kept."""
    stage_seconds: dict[str, float] = {}
    outputs: dict[str, Any] = {}

    def on_stage(name: str, seconds: float, out: Any, cached: bool) -> None:
        stage_seconds[name] = seconds
        outputs[name] = out
        console.print(f"  [green]✓[/] {name:<10} {seconds:7.2f} s" + ("  (cached)" if cached else ""))

    preloaded = {name: name in sys.modules for name in ("torch", "mlflow")}
    started = time.perf_counter()
    summary: RunSummary = run_pipeline(settings, show_progress=show_progress, on_stage=on_stage, use_cache=use_cache)
    wall = time.perf_counter() - started
    test_images = summary.images.get("test", 0)
    cnn_error = 1.0 - summary.test_accuracy
    baseline_error = 1.0 - summary.baseline_accuracy
    return {
        "wall_seconds": wall,
        "stage_seconds": stage_seconds,
        "outside_stages_seconds": wall - sum(stage_seconds.values()),
        "preloaded_modules": preloaded,
        "test_images": test_images,
        "cnn_test_accuracy": summary.test_accuracy,
        "cnn_test_errors": round(cnn_error * test_images),
        "baseline_name": summary.baseline_name,
        "baseline_test_accuracy": summary.baseline_accuracy,
        "baseline_test_errors": round(baseline_error * test_images),
        "error_ratio": baseline_error / cnn_error if cnn_error > 0 else math.inf,
        "baseline_fit_seconds": outputs["evaluate"].metrics.get("baseline_fit_seconds", math.nan),
        "train_images_per_second": outputs["train"].images_per_second,
        # train() counts images / seconds of the optimisation steps only; this inverts it exactly
        "train_loop_seconds": summary.images.get("train", 0) * summary.epochs_run / outputs["train"].images_per_second,
        "epochs_run": summary.epochs_run,
        "cached_steps": summary.cached_steps,
        "parameters": outputs["train"].parameters,
        "summary": summary.to_dict(),
    }


def stage_table(runs: list[dict[str, Any]]) -> Table:
    table = Table(title="wall time per stage (seconds, share of the run)", title_justify="left")
    table.add_column("stage")
    for i in range(len(runs)):
        table.add_column(f"run {i + 1} s", justify="right")
        table.add_column("share", justify="right")
    for name in (*STAGES, "outside stages", "whole run"):
        cells = []
        for run in runs:
            if name == "whole run":
                seconds = run["wall_seconds"]
            elif name == "outside stages":
                seconds = run["outside_stages_seconds"]
            else:
                seconds = run["stage_seconds"].get(name, math.nan)
            cells += [f"{seconds:.2f}", f"{100 * seconds / run['wall_seconds']:.1f}%"]
        table.add_row(name, *cells, style="bold" if name == "whole run" else None)
    return table


def model_table(runs: list[dict[str, Any]]) -> Table:
    table = Table(title="CNN vs scikit-learn baseline (same split, same run)", title_justify="left")
    for column in ("run", "model", "test accuracy", "test errors", "fit s", "error ratio"):
        table.add_column(column, justify="left" if column == "model" else "right")
    for i, run in enumerate(runs, 1):
        n, ratio = run["test_images"], run["error_ratio"]
        table.add_row(
            str(i),
            "CNN (train stage)",
            f"{run['cnn_test_accuracy']:.4f}",
            f"{run['cnn_test_errors']}/{n}",
            f"{run['stage_seconds']['train']:.2f}",
            "∞ (no CNN errors)" if math.isinf(ratio) else f"{ratio:.2f}×",
        )
        table.add_row(
            "",
            run["baseline_name"],
            f"{run['baseline_test_accuracy']:.4f}",
            f"{run['baseline_test_errors']}/{n}",
            f"{run['baseline_fit_seconds']:.3f}",
            "",
            end_section=True,
        )
    table.caption = "error ratio = baseline error rate / CNN error rate (above 1: the CNN makes fewer mistakes)"
    return table


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    load_start = os.getloadavg()  # 1, 5, 15 minutes: how busy the machine was before we started
    temporary = args.home is None
    home = Path(tempfile.mkdtemp(prefix="visionloop-bench-")) if temporary else args.home
    overrides = {"home": home, "data.source": args.source, "train.epochs": args.epochs, "train.device": args.device}
    settings = load_settings(args.config, overrides)
    console.print(
        f"[bold]visionloop pipeline benchmark[/]  source={settings.data.source}  epochs={settings.train.epochs}  "
        f"device={settings.train.device}  home={home}{' (new)' if temporary else ''}  python={sys.version.split()[0]}"
    )

    # Part of what a user of `visionloop run` waits for: a fresh interpreter importing the runner and
    # MLflow, beside the baseline of a fresh interpreter that imports nothing. (In this process the
    # runner imports torch and MLflow lazily, so run 1's train stage pays for them again.)
    empty = time_subprocess(EMPTY_CODE, args.import_repeats)
    imports = time_subprocess(IMPORT_CODE, args.import_repeats)
    import_table = Table(title=f"fresh interpreter, {args.import_repeats} tries each", title_justify="left")
    for column in ("command", "tries (s)", "median s"):
        import_table.add_column(column, justify="right" if column != "command" else "left")
    for code, seconds in ((EMPTY_CODE, empty), (IMPORT_CODE, imports)):
        import_table.add_row(
            f"python -c '{code}'", "  ".join(f"{s:.2f}" for s in seconds), f"{statistics.median(seconds):.2f}"
        )
    console.print(import_table)
    import_cost = statistics.median(imports) - statistics.median(empty)
    console.print(
        f"import of visionloop.pipeline.runner + mlflow: {import_cost:.2f} s over bare start-up "
        f"({statistics.median(imports) / statistics.median(empty):.1f}× a bare interpreter)"
    )

    runs = []
    try:
        for i in range(args.repeat):
            console.print(f"[bold]run {i + 1}/{args.repeat}[/]")
            runs.append(run_once(settings, args.progress, use_cache=not args.no_cache))
    finally:
        if temporary and not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    if temporary and args.keep:
        console.print(f"kept the store at {home}")

    console.print(stage_table(runs))
    first = runs[0]
    late = [name for name, loaded in first["preloaded_modules"].items() if not loaded]
    if late:
        console.print(
            f"note: run 1's stages include importing {' and '.join(late)} on first use "
            "(the runner imports them lazily, as `visionloop run` does)"
        )
    console.print(model_table(runs))
    console.print(
        f"CNN: {first['parameters']:,} parameters, {first['epochs_run']} epochs at "
        f"{first['train_images_per_second']:.0f} training images/s on {first['summary']['device']}"
    )
    for i, run in enumerate(runs, 1):
        if "train" in run["cached_steps"]:
            console.print(
                f"run {i}: {', '.join(run['cached_steps'])} cached (unchanged): nothing trained or registered"
            )
            continue
        loop, stage = run["train_loop_seconds"], run["stage_seconds"]["train"]
        console.print(
            f"run {i} train stage {stage:.2f} s: {loop:.2f} s in optimisation steps ({100 * loop / stage:.0f}%), "
            f"{stage - loop:.2f} s around them (validation, checkpoints, MLflow logging, plots, first-use imports)"
        )

    load_end = print_load(console, load_start)
    if len(runs) >= 2:
        second = runs[1]
        ratio = first["wall_seconds"] / second["wall_seconds"]
        console.print(
            f"[bold]first run {first['wall_seconds']:.2f} s, second run {second['wall_seconds']:.2f} s, "
            f"ratio {ratio:.2f}×[/] (first / second)"
        )
    else:
        ratio = None
        console.print(
            f"[bold]first run {first['wall_seconds']:.2f} s, second run not measured (pass --repeat 2), ratio n/a[/]"
        )

    if args.json_out is not None:
        result = {
            "question": "where does the time of `visionloop run` go, and is the CNN paying for itself?",
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "home": str(home),
            "load_average_1min": {"start": load_start[0], "end": load_end[0]},
            "home_kept": not temporary or args.keep,
            "import_seconds": {EMPTY_CODE: empty, IMPORT_CODE: imports, "median_difference": import_cost},
            "runs": runs,
            "first_over_second_ratio": ratio,
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(finite_or_none(result), indent=2, default=str, allow_nan=False))
        console.print(f"wrote {args.json_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
