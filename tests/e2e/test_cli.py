"""The ``visionloop`` command end to end: the installed console script, run as a subprocess.

Every test gets its own home (``VISIONLOOP_HOME=<tmp_path>/home``) and works in ``tmp_path``; the
data is tiny so that a whole training run costs seconds, most of them Python imports.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import typer
from e2e_helpers import mlflow_client, registered_versions  # this folder is on sys.path

from visionloop.cli import app

pytestmark = pytest.mark.slow

TINY_SETTINGS = [
    *("--set", "data.synthetic_classes=3"),
    *("--set", "data.synthetic_per_class=30"),
    *("--set", "data.synthetic_size=16"),
    *("--set", "train.width=8"),
    *("--set", "train.depth=2"),
    *("--set", "train.batch_size=32"),
    # one torch thread: on a small shared machine, OpenMP threads that wait for a busy core spin,
    # and a second thread would make these tiny models many times slower, not faster
    *("--set", "train.threads=1"),
]
TINY_RUN = ["--source", "synthetic", *TINY_SETTINGS, "--epochs", "2", "--min-accuracy", "0"]

TINY_CONFIG = """\
data:
  source: synthetic
  synthetic_classes: 3
  synthetic_per_class: 30
  synthetic_size: 16
train:
  epochs: {epochs}
  patience: 1000
  width: 8
  depth: 2
  batch_size: 32
  threads: 1
gate:
  min_accuracy: 0.0
"""

RUN_KEYS = {
    "test_accuracy",
    "baseline_accuracy",
    "baseline_name",
    "dataset_version",
    "model_name",
    "model_version",
    "aliases",
    "gate_decision",
    "gate_reasons",
    "champion_version",
    "run_id",
}


# ---------------------------------------------------------------------------------- helpers


def dataset_dirs(home: Path) -> list[str]:
    folder = home / "datasets"
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def temp_leftovers(home: Path) -> list[str]:
    return [str(p) for p in home.rglob("*") if ".tmp" in p.name] if home.exists() else []


def assert_clean_failure(result: Any, home: Path, problem: str, datasets_before: list[str] | None = None) -> None:
    """Non-zero exit, one ``error:`` line on stderr naming the problem, no traceback, nothing half-made."""
    assert result.returncode != 0, result.stdout
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error:"), result.stderr
    assert problem.lower() in lines[0].lower(), result.stderr
    assert result.stdout.strip() == "", result.stdout  # no partial JSON for a script to misread
    assert dataset_dirs(home) == (datasets_before or [])
    assert temp_leftovers(home) == []
    assert registered_versions(home) == []


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ---------------------------------------------------------------------------------- run


def test_run_prints_one_json_object_a_rerun_is_cached_and_no_cache_registers_version_2(cli: Any) -> None:
    result = cli.ok("run", "--json", *TINY_RUN)
    assert len(result.stdout.strip().splitlines()) == 1
    first = json.loads(result.stdout)
    assert set(first) >= RUN_KEYS
    assert first["dataset_version"].startswith("ds-")
    # measured on these 90 images: CNN 0.333 after 2 epochs (chance, 3 balanced classes), SVC 0.556
    assert first["test_accuracy"] >= 1 / 3 - 1e-9 and first["baseline_accuracy"] >= 0.5
    assert first["model_name"] == "visionloop-classifier"
    assert first["model_version"] == "1"
    assert first["gate_decision"] == "promoted"
    assert set(first["aliases"]) == {"champion", "challenger"}
    assert first["champion_version"] == "1"
    assert "Traceback" not in result.stderr

    # nothing changed: every step after ingest is reused, nothing is trained or registered, and it says so
    cached = cli.ok("run", *TINY_RUN)
    for step in ("validate", "preprocess", "train", "evaluate", "export", "register", "promote"):
        assert re.search(rf"{step} .*cached: unchanged, not run", cached.stderr), cached.stderr
    assert "cached" in cached.stdout
    again = cli.json("run", *TINY_RUN)
    assert again["cached_steps"] == ["validate", "preprocess", "train", "evaluate", "export", "register", "promote"]
    assert (again["model_version"], again["run_id"]) == ("1", first["run_id"])
    assert registered_versions(cli.home) == ["1"]

    second = cli.json("run", "--no-cache", *TINY_RUN)
    assert second["cached_steps"] == []
    assert second["dataset_version"] == first["dataset_version"]
    assert second["model_version"] == "2"
    assert second["run_id"] != first["run_id"]
    # same data, same seed: the same accuracy, and a tie does not replace the champion
    assert second["test_accuracy"] == first["test_accuracy"]
    assert second["gate_decision"] == "rejected"
    assert second["aliases"] == ["challenger"]
    assert second["champion_version"] == "1"
    assert registered_versions(cli.home) == ["1", "2"]


def test_a_better_model_is_promoted_and_rollback_restores_the_previous_champion(cli: Any) -> None:
    # digits at 8x8 learn fast: 1 epoch is barely past chance, 5 epochs are far better (same split)
    digits = ["--source", "digits", "--image-size", "8", *("--set", "train.width=8", "--set", "train.depth=2")]
    digits += ["--set", "train.threads=1"]
    weak = cli.json("run", *digits, "--epochs", "1", "--min-accuracy", "0")
    strong = cli.json("run", *digits, "--epochs", "5", "--min-accuracy", "0")
    assert weak["gate_decision"] == "promoted" and weak["model_version"] == "1"
    assert strong["dataset_version"] == weak["dataset_version"]
    assert strong["test_accuracy"] > weak["test_accuracy"] + 0.2
    assert strong["gate_decision"] == "promoted", strong["gate_reasons"]
    assert any("beats champion v1" in reason for reason in strong["gate_reasons"])
    assert strong["model_version"] == "2" and strong["champion_version"] == "2"

    listed = cli.json("models", "list")
    assert [(row["version"], row["aliases"], row["gate"]) for row in listed] == [
        ("1", [], "promoted"),
        ("2", ["challenger", "champion"], "promoted"),
    ]
    assert [row["run_id"] for row in listed] == [weak["run_id"], strong["run_id"]]

    rolled = cli("models", "rollback", "--reason", "canary errors")
    assert rolled.returncode == 0, rolled.stderr
    assert "v2" in rolled.stdout and "v1" in rolled.stdout

    events = cli.json("models", "history")
    assert [(e["seq"], e["alias"], e["from_version"], e["to_version"], e["kind"]) for e in events] == [
        (1, "champion", None, "1", "promote"),
        (2, "champion", "1", "2", "promote"),
        (3, "champion", "2", "1", "rollback"),
    ]
    assert events[2]["reason"].startswith("canary errors")
    listed = cli.json("models", "list")
    assert [(row["version"], row["aliases"]) for row in listed] == [("1", ["champion"]), ("2", ["challenger"])]

    # v1 was the first champion: there is nothing earlier to go back to
    again = cli("models", "rollback", "--json")
    assert again.returncode != 0
    assert "Traceback" not in again.stderr
    assert again.stderr.strip().startswith("error:") and "no earlier champion" in again.stderr
    assert len(cli.json("models", "history")) == 3  # the refused rollback moved nothing

    # an operator's override skips the gate only when meant (--force), and is recorded as one
    unforced = cli("models", "promote", "2")
    assert unforced.returncode == 2 and "add --force" in unforced.stderr and "Traceback" not in unforced.stderr
    forced = cli.json("models", "promote", "2", "--force", "--reason", "hotfix")
    assert (forced["kind"], forced["from_version"], forced["to_version"]) == ("promote", "1", "2")
    assert forced["reason"] == "forced: hotfix"

    # the loop, once: it takes the forced promotion as its starting point and finds nothing to act on
    once = cli.json("loop", "once")
    assert once == {"acks": [], "runs": []}
    assert "no loop runs yet" in cli.ok("loop", "history").stdout
    missing = cli("loop", "history", "--run", "lr-nope")
    assert missing.returncode == 2 and "no loop run lr-nope" in missing.stderr


def test_stage_by_stage_commands_do_what_run_does(cli: Any) -> None:
    (cli.cwd / "visionloop.yaml").write_text(TINY_CONFIG.format(epochs=2))  # picked up from the cwd
    ingested = cli.json("data", "ingest")
    assert (ingested["kind"], ingested["num_files"], len(ingested["classes"])) == ("synthetic", 90, 3)
    validated = cli.json("data", "validate")
    assert validated["passed"] is True and validated["usable"] == 90
    prepared = cli.json("data", "preprocess")
    assert prepared["dataset_version"].startswith("ds-")
    assert dataset_dirs(cli.home) == [prepared["dataset_version"]]

    # evaluating before training is refused, and leaves the dataset alone
    assert_clean_failure(cli("evaluate", "--json"), cli.home, "visionloop train", [prepared["dataset_version"]])

    trained = cli.json("train")
    assert trained["epochs_run"] == 2 and trained["resumed_from_epoch"] is None
    assert trained["dataset_dir"] == prepared["dataset_dir"]
    evaluated = cli.json("evaluate")
    assert evaluated["test_accuracy"] >= 1 / 3 - 1e-9  # measured 0.333 (chance) after 2 epochs
    exported = cli.json("export")
    assert (Path(exported["export_dir"]) / "model.onnx").is_file()
    registered = cli.json("register")
    assert registered["version"] == "1" and registered["run_id"] == trained["run_id"]
    promoted = cli.json("promote")
    assert promoted["promoted"] is True
    assert promoted["challenger_accuracy"] == pytest.approx(evaluated["test_accuracy"])
    assert set(promoted["aliases"]) == {"champion", "challenger"}

    listed = cli.json("models", "list")
    assert [(r["version"], r["aliases"], r["dataset_version"], r["gate"]) for r in listed] == [
        ("1", ["challenger", "champion"], prepared["dataset_version"], "promoted")
    ]
    run = mlflow_client(cli.home).get_run(trained["run_id"])
    assert run.info.status == "FINISHED"  # as `visionloop run` leaves it
    assert [i.dataset.name for i in run.inputs.dataset_inputs] == [prepared["dataset_version"]]
    assert run.data.metrics["test_accuracy"] == pytest.approx(evaluated["test_accuracy"])


# ---------------------------------------------------------------------------------- help


def _command_tree(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    # typer ships its own copy of click, so look at the shape, not at click's classes
    yield path, command
    for name, sub in getattr(command, "commands", {}).items():
        yield from _command_tree(sub, (*path, name))


COMMANDS = dict(_command_tree(typer.main.get_command(app)))


def test_every_stage_has_a_command() -> None:
    assert {" ".join(path) for path in COMMANDS} >= {
        "",
        "data ingest",
        "data validate",
        "data preprocess",
        "train",
        "evaluate",
        "export",
        "register",
        "promote",
        "run",
        "models list",
        "models history",
        "models rollback",
        "models promote",
        "serve",
        "monitor",
        "loop",
        "loop once",
        "loop history",
        "demo",
    }


@pytest.mark.parametrize("path", list(COMMANDS), ids=lambda p: " ".join(p) or "visionloop")
def test_help_exits_0_and_mentions_every_option(cli: Any, path: tuple[str, ...]) -> None:
    cli.env["COLUMNS"] = "220"  # one line per option description: nothing wraps mid-name
    result = cli.ok(*path, "--help")
    assert "Traceback" not in result.stderr
    assert "Usage: visionloop" in result.stdout
    command = COMMANDS[path]
    for param in command.params:
        if param.param_type_name == "option" and not param.hidden:
            for name in [*param.opts, *param.secondary_opts]:
                if name.startswith("--"):
                    assert name in result.stdout, f"{name} missing from `{' '.join(path)} --help`"
            # options backed by a setting say which setting and which environment variable
            if param.help and "env VISIONLOOP_" in param.help:
                env_name = param.help.split("env ", 1)[1].split(",", 1)[0]
                assert env_name in result.stdout, f"{env_name} missing from `{' '.join(path)} --help`"
    for name in getattr(command, "commands", {}):
        assert name in result.stdout


def test_version(cli: Any) -> None:
    from visionloop import __version__

    assert cli.ok("--version").stdout.strip() == f"visionloop {__version__}"


# ---------------------------------------------------------------------------------- bad input


def run_on(source: str) -> list[str]:
    return ["run", "--json", "--source", source, *TINY_SETTINGS, "--epochs", "2", "--min-accuracy", "0"]


def _missing_path(tmp: Path, make_folder: Callable[..., Path]) -> tuple[list[str], str]:
    return run_on(str(tmp / "no-such-folder")), "not found"


def _markup_in_path(tmp: Path, make_folder: Callable[..., Path]) -> tuple[list[str], str]:
    # the message is text, not rich markup: the path comes out exactly as given
    return run_on(str(tmp / "no[/such]one[bold]")), str(tmp / "no[/such]one[bold]")


def _empty_folder(tmp: Path, make_folder: Callable[..., Path]) -> tuple[list[str], str]:
    (tmp / "empty").mkdir()
    return run_on(str(tmp / "empty")), "empty"


def _loose_files(tmp: Path, make_folder: Callable[..., Path]) -> tuple[list[str], str]:
    root = make_folder(tmp / "loose", classes=("a",), per_class=3) / "a"
    return run_on(str(root)), "no class folders"


def _single_class(tmp: Path, make_folder: Callable[..., Path]) -> tuple[list[str], str]:
    return run_on(str(make_folder(tmp / "one-class", classes=("only",), per_class=8))), "at least 2 classes"


def _not_images(tmp: Path, make_folder: Callable[..., Path]) -> tuple[list[str], str]:
    for label in ("cats", "dogs"):
        for i in range(8):
            path = tmp / "texts" / label / f"{label}_{i}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"plain text {i}, renamed .png\n")
    return run_on(str(tmp / "texts")), "not usable images"


def _not_an_archive(tmp: Path, make_folder: Callable[..., Path]) -> tuple[list[str], str]:
    (tmp / "x.zip").write_text("this is not a zip file\n")
    return run_on(str(tmp / "x.zip")), "not a zip or tar"


def _unreachable_url(tmp: Path, make_folder: Callable[..., Path]) -> tuple[list[str], str]:
    url = f"http://127.0.0.1:{closed_port()}/data.zip"
    return run_on(url), f"could not reach {url}"


def _setting(*args: str, problem: str) -> Callable[..., tuple[list[str], str]]:
    return lambda tmp, make_folder: (["run", "--json", "--source", "synthetic", *TINY_SETTINGS, *args], problem)


def _bad_yaml(tmp: Path, make_folder: Callable[..., Path]) -> tuple[list[str], str]:
    (tmp / "bad.yaml").write_text("train: [epochs: 1\n  nope: : :\n")
    return ["--config", str(tmp / "bad.yaml"), "run", "--json", *TINY_RUN], "could not read settings"


def _missing_config(tmp: Path, make_folder: Callable[..., Path]) -> tuple[list[str], str]:
    return ["--config", str(tmp / "missing.yaml"), "run", "--json", *TINY_RUN], "config file not found"


def _command(*args: str, problem: str) -> Callable[..., tuple[list[str], str]]:
    return lambda tmp, make_folder: ([*args, "--json"], problem)


def _serve(*args: str, problem: str) -> Callable[..., tuple[list[str], str]]:
    return lambda tmp, make_folder: (["serve", *args], problem)


BAD_INPUT = {
    "missing-path": _missing_path,
    "markup-in-path": _markup_in_path,
    "empty-folder": _empty_folder,
    "loose-files-only": _loose_files,
    "single-class": _single_class,
    "not-images": _not_images,
    "zip-not-archive": _not_an_archive,
    "unreachable-url": _unreachable_url,
    "epochs-0": _setting("--epochs", "0", problem="train.epochs"),
    "channels-2": _setting("--set", "data.channels=2", problem="data.channels"),
    "unknown-key": _setting("--set", "nosuch.key=1", problem="nosuch"),
    "epochs-not-int": _setting("--set", "train.epochs=abc", problem="train.epochs"),
    "set-without-value": _setting("--set", "train.epochs", problem="KEY=VALUE"),
    "flag-not-int": _setting("--epochs", "abc", problem="Invalid value for '--epochs'"),
    "unknown-option": _setting("--no-such-option", problem="No such option: --no-such-option"),
    "invalid-yaml": _bad_yaml,
    "missing-config": _missing_config,
    "rollback-no-registry": _command("models", "rollback", problem="no champion"),
    "list-no-registry": _command("models", "list", problem="no registered model"),
    "history-no-registry": _command("models", "history", problem="no registered model"),
    "resume-nothing": _command("train", "--resume", problem="nothing to resume"),
    "evaluate-before-train": _command("evaluate", problem="visionloop train"),
    "validate-before-ingest": _command("data", "validate", problem="visionloop data ingest"),
    "promote-before-register": _command("promote", problem="visionloop register"),
    "serve-port-out-of-range": _serve("--port", "70000", problem="serve.port"),
    "serve-negative-wait": _serve("--max-wait-ms", "-1", problem="serve.max_wait_ms"),
    "serve-batch-0": _serve("--max-batch-size", "0", problem="serve.max_batch_size"),
}


@pytest.mark.parametrize("case", list(BAD_INPUT))
def test_bad_input_is_one_clear_error_line_and_leaves_nothing_behind(
    cli: Any, tmp_path: Path, make_image_folder: Callable[..., Path], case: str
) -> None:
    args, problem = BAD_INPUT[case](tmp_path, make_image_folder)
    result = cli(*args)
    assert_clean_failure(result, cli.home, problem)


# ---------------------------------------------------------------------------------- interrupt


def signal_at_first_checkpoint(cli: Any, signum: int, *args: str) -> tuple[int, str]:
    """Start ``visionloop *args``, send ``signum`` once the first epoch is checkpointed; (exit code, stderr)."""
    process = cli.popen(*args)
    deadline = time.monotonic() + 240
    try:
        while not list(cli.home.glob("runs/*/train/last.pt")):
            assert process.poll() is None, f"{args} ended before its first checkpoint:\n{process.stderr.read()}"
            assert time.monotonic() < deadline, "no checkpoint within 240 s"
            time.sleep(0.01)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return process.returncode, stderr


def test_interrupted_training_resumes_in_the_same_mlflow_run(cli: Any) -> None:
    epochs = 40
    (cli.cwd / "visionloop.yaml").write_text(TINY_CONFIG.format(epochs=epochs))
    for stage in ("ingest", "validate", "preprocess"):
        cli.ok("data", stage)

    returncode, stderr = signal_at_first_checkpoint(cli, signal.SIGINT, "train")
    assert returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "visionloop train --resume" in " ".join(stderr.split())  # however the console wrapped it
    assert temp_leftovers(cli.home) == []
    assert not (cli.home / "latest" / "train.json").exists()  # an unfinished training is not handed on
    started = json.loads((cli.home / "latest" / "train_started.json").read_text())
    assert mlflow_client(cli.home).get_run(started["run_id"]).info.status == "KILLED"

    resumed = cli.json("train", "--resume")
    # every stage command ends the run it worked in; the next step in the run opens it again
    assert mlflow_client(cli.home).get_run(started["run_id"]).info.status == "FINISHED"
    assert resumed["resumed_from_epoch"] >= 1
    assert resumed["epochs_run"] == epochs
    assert resumed["run_id"] == started["run_id"]
    assert resumed["work_dir"] == started["work_dir"]
    # now the finished training is handed on to `evaluate`, from the interrupted run's folder
    handed_on = json.loads((cli.home / "latest" / "train.json").read_text())
    assert (handed_on["run_id"], handed_on["work_dir"]) == (started["run_id"], started["work_dir"])
    assert Path(handed_on["model_path"]).is_file()

    # a stage command that fails leaves the run FAILED, not RUNNING
    Path(handed_on["model_path"]).write_bytes(b"not a model")
    assert cli("evaluate").returncode != 0
    assert mlflow_client(cli.home).get_run(started["run_id"]).info.status == "FAILED"


def test_sigterm_during_run_stops_cleanly_and_training_can_resume(cli: Any) -> None:
    """Kubernetes stops a pod with SIGTERM: the run unwinds like Ctrl-C and leaves a usable checkpoint."""
    epochs = 40
    (cli.cwd / "visionloop.yaml").write_text(TINY_CONFIG.format(epochs=epochs))
    returncode, stderr = signal_at_first_checkpoint(cli, signal.SIGTERM, "run")
    assert returncode == 130, stderr
    assert "Traceback" not in stderr, stderr
    assert "visionloop train --resume" in " ".join(stderr.split())
    assert temp_leftovers(cli.home) == []
    assert registered_versions(cli.home) == []
    started = json.loads((cli.home / "latest" / "train_started.json").read_text())
    assert mlflow_client(cli.home).get_run(started["run_id"]).info.status == "KILLED"

    resumed = cli.json("train", "--resume")
    assert resumed["run_id"] == started["run_id"] and resumed["epochs_run"] == epochs
    for stage in ("evaluate", "export", "register"):
        cli.ok(stage)
    assert cli.json("promote")["aliases"] == ["champion", "challenger"]
