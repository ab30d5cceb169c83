"""The dataflow declaration: one place for the step order, read by the runner, the CLI and the KFP pipeline.

The central test adds a step to the declaration (counting each split's images after preprocess) and
sees it run in the local runner, appear as a CLI command, and compile into the Kubeflow pipeline,
with no other edit.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import typer
import yaml
from typer.testing import CliRunner

from visionloop.config import Settings
from visionloop.console import STATE
from visionloop.data.preprocess import load_manifest
from visionloop.errors import ConfigError
from visionloop.pipeline import dataflow, kubeflow, steps
from visionloop.pipeline.commands import add_stage_commands, run_command
from visionloop.pipeline.runner import run_steps


class CountOutput(steps.StepOutput):
    per_split: dict[str, int]


def count_step(dataset_dir: Path, settings: Settings) -> CountOutput:
    """Count the images of each split of the dataset."""
    manifest = load_manifest(dataset_dir)
    return CountOutput(per_split={split: sum(c.values()) for split, c in manifest.counts.items()})


COUNT = dataflow.Step(
    "count",
    count_step,
    CountOutput,
    wiring={"dataset_dir": dataflow.From("preprocess", "dataset_dir")},
    command=("data", "count"),
    help="Count the images of each split.",
    describe=lambda out: [f"counted {out.per_split}"],
    kfp=dataflow.Kfp(artifact=("counts", "Artifact")),
)
EXTENDED = (*dataflow.STEPS[:3], COUNT, *dataflow.STEPS[3:])


def test_a_step_added_to_the_declaration_runs_in_the_runner(tiny_settings: Callable[..., Settings]) -> None:
    settings = tiny_settings()
    done = run_steps(settings, last="count", show_progress=False, declared=EXTENDED)
    assert done.ran == ["ingest", "validate", "preprocess", "count"]
    counted = done.outputs["count"]
    assert isinstance(counted, CountOutput)
    assert counted.per_split == done.outputs["preprocess"].counts
    assert sum(counted.per_split.values()) == 90  # 3 classes x 30 images
    assert steps.latest(settings.home, "count", CountOutput) == counted


def test_a_step_added_to_the_declaration_is_a_cli_command(
    tiny_settings: Callable[..., Settings], monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = tiny_settings()
    run_steps(settings, last="preprocess", show_progress=False)  # what the command reads its input from
    app = typer.Typer()
    data_app = typer.Typer()
    app.add_typer(data_app, name="data")
    add_stage_commands(app, {"data": data_app}, EXTENDED)
    app.command("run")(run_command(EXTENDED))
    monkeypatch.setitem(STATE, "home", settings.home)
    for name, value in (("synthetic_classes", 3), ("synthetic_per_class", 30), ("synthetic_size", 16)):
        monkeypatch.setenv(f"VISIONLOOP_DATA__{name.upper()}", str(value))
    monkeypatch.setenv("VISIONLOOP_DATA__SOURCE", "synthetic")
    runner = CliRunner()
    result = runner.invoke(app, ["data", "count", "--help"])
    assert result.exit_code == 0 and "Count the images of each split." in result.output
    result = runner.invoke(app, ["data", "count", "--json"])
    assert result.exit_code == 0, result.output
    assert sum(json.loads(result.output)["per_split"].values()) == 90
    result = runner.invoke(app, ["run", "--from", "count", "--to", "count"])
    assert result.exit_code == 0, result.output
    assert "counted {" in result.output


def test_a_step_added_to_the_declaration_compiles_into_the_kubeflow_pipeline(tmp_path: Path) -> None:
    from kfp import compiler

    path = tmp_path / "pipeline.yaml"
    compiler.Compiler().compile(kubeflow.build_pipeline(declared=EXTENDED), str(path))
    spec = yaml.safe_load(path.read_text())
    tasks = spec["root"]["dag"]["tasks"]
    assert set(tasks) == {s.name for s in EXTENDED}
    assert tasks["count"]["inputs"]["artifacts"]["dataset"]["taskOutputArtifact"]["producerTask"] == "preprocess"
    assert "count" in tasks["train"]["dependentTasks"]  # the declared order
    component = spec["components"]["comp-count"]
    assert set(component["outputDefinitions"]["artifacts"]) == {"counts"}
    code = spec["deploymentSpec"]["executors"]["exec-count"]["container"]["command"]
    assert any("kubeflow.run_step('count'" in part for part in code)


# ---------------------------------------------------------------------------------- the declaration itself


@pytest.mark.parametrize("step", dataflow.STEPS, ids=lambda s: s.name)
def test_every_wired_input_is_a_parameter_of_the_step_function(step: dataflow.Step) -> None:
    parameters = inspect.signature(step.run).parameters
    for name in step.wiring:
        # a step of the MLflow run is wired the run id so that its work ends the run as it should
        assert name in parameters or (name == "run_id" and step.in_run), (step.name, name)
    for name, parameter in parameters.items():
        handled = name in step.wiring or name in ("settings", "show_progress", "finish_run")
        assert handled or parameter.default is not inspect.Parameter.empty, (step.name, name)


def test_handed_on_fields_trace_back_to_their_producer() -> None:
    # promote scores on the data the challenger was trained on: train hands on preprocess's dataset
    assert dataflow.resolve(dataflow.From("train", "dataset_dir")) == dataflow.From("preprocess", "dataset_dir")
    assert dataflow.resolve(dataflow.From("train", "run_id")) == dataflow.From("train", "run_id")
    promote = dataflow.step_named("promote")
    assert promote.wiring["dataset_dir"] == dataflow.From("train", "dataset_dir")


def test_ranges_of_steps_and_their_errors() -> None:
    assert [s.name for s in dataflow.step_range("train", "register")] == ["train", "evaluate", "export", "register"]
    assert [s.name for s in dataflow.step_range(None, "validate")] == ["ingest", "validate"]
    with pytest.raises(ConfigError, match="unknown step 'trian'"):
        dataflow.step_range("trian", None)
    with pytest.raises(ConfigError, match="comes after"):
        dataflow.step_range("promote", "train")
