"""``visionloop demo``: the whole closed loop on the built-in digits, unattended, in a few minutes.

1. train the first champion (the pipeline, in this process);
2. start ``visionloop serve``, ``visionloop monitor`` and ``visionloop loop`` as real processes (and
   Prometheus + Alertmanager with the repository's rules where they are installed, so the drift alert
   reaches the loop's webhook as in production; otherwise the loop acts on the monitor's verdict);
3. in-distribution traffic with feedback: no alarm;
4. shifted traffic (the digits inverted, dark on light) with feedback: drift is detected, the loop
   retrains on the training data plus the labelled production images, the gate promotes, the server
   reloads, and the new champion's accuracy on shifted images it never saw is measured;
5. a bad model forced through (``registry.force_champion``): the loop's post-promotion analysis fails
   on live accuracy and rolls it back, the reason in the alias history;
6. a summary: each phase's time, samples to detect, accuracy before and after, and the paths of the
   HTML drift report and the accuracy plot.

Every number it prints was measured in this run. Traffic and feedback go over HTTP like a client's.
Each phase checks what the loop actually did (its runs over ``GET /runs``, the version the server answers
with) against the outcome the story expects; one that went otherwise is shown ✗ with the reason, the phases
that need it are skipped, the summary (``summary.json``, ``summary.txt``), report and plot are written
anyway, and ``visionloop demo`` exits 1.
"""

from __future__ import annotations

import contextlib
import hashlib
import html
import io
import json
import os
import secrets
import shutil
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import requests
import yaml
from PIL import Image, ImageOps
from rich.console import Console
from rich.live import Live
from rich.table import Table
from rich.text import Text

from visionloop.config import Settings, _merge, _nest, load_settings
from visionloop.errors import VisionloopError
from visionloop.fsutil import atomic_write_json
from visionloop.loop import localstack
from visionloop.loop.localstack import Process, wait_until

MARKER = ".visionloop-demo"
FAST_TRAIN = {"epochs": 12, "width": 16, "depth": 2, "patience": 100, "lr": 1e-2}


PhaseStatus = Literal["passed", "failed", "skipped"]


@dataclass
class PhaseRecord:
    name: str
    seconds: float
    detail: str  # what happened; for a failed phase, what the loop did instead of what the story expects
    status: PhaseStatus = "passed"


@dataclass
class Summary:
    workdir: str
    alerting: bool
    ok: bool = False  # every phase passed
    failures: list[str] = field(default_factory=list)  # "phase: why", one per failed phase
    phases: list[PhaseRecord] = field(default_factory=list)
    accuracy: dict[str, float] = field(default_factory=dict)
    samples_to_detect: int | None = None
    seconds_to_detect: float | None = None
    seconds_to_new_champion: float | None = None
    versions: dict[str, str] = field(default_factory=dict)
    trigger: str = ""
    rollback_reason: str = ""
    report: str = ""
    plot: str = ""
    summary_json: str = ""
    summary_text: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def demo_settings(workdir: Path, fast: bool) -> dict[str, Any]:
    """The settings file every process of the demo reads (the monitor checks and the loop looks often).

    ``loop.min_labels`` is what makes the retrain's story hold: the retrained model learns the inverted digits
    from the labelled production images alone. Measured with FAST_TRAIN on the digits (accuracy on inverted
    images of the test split, three seeds): 150 shifted labels 0.50-0.67 (the post-promotion analysis then
    fails on 100 labels, as it did), 300 labels 0.91-0.92, 450 labels 0.94-0.95. With 500 the trigger waits
    until that many are labelled, however fast the alert or the verdict arrives on a busy machine.
    """
    return {
        "home": str(workdir / "home"),
        "train": FAST_TRAIN if fast else {},
        "gate": {"min_accuracy": 0.8 if fast else 0.9},
        "serve": {
            "poll_seconds": 2, "feedback_token": secrets.token_hex(12), "admin_token": secrets.token_hex(12),
            "max_wait_ms": 1,
        },
        "monitor": {
            "interval_seconds": 2, "window_size": 200, "min_window": 40, "min_feedback": 20, "accuracy_window": 100,
            "mmd_permutations": 400,
        },
        "loop": {
            "interval_seconds": 1, "cooldown_seconds": 3600, "min_labels": 500, "min_new_labels": 20,
            "min_production_test": 20, "analysis_count": 3 if fast else 4, "analysis_interval_seconds": 2 if fast else 3,
            "analysis_min_feedback": 20, "analysis_min_accuracy": 0.8 if fast else 0.9, "analysis_failure_limit": 1,
            "old_test_tolerance": 0.02,
        },
    }  # fmt: skip


class Traffic:
    """The digits as their source PNGs (what a client uploads), split as the dataset split them."""

    def __init__(self, settings: Settings, folder: Path) -> None:
        from visionloop.data.preprocess import SPLITS, load_dataset
        from visionloop.data.sources import write_digits
        from visionloop.loop.retrain import base_data

        base = base_data(settings)
        dataset = load_dataset(base.dataset_dir)
        if not (folder / "raw").is_dir():
            write_digits(folder / "raw")
        split_of = {
            str(h): (SPLITS[int(s)], int(y))
            for h, s, y in zip(dataset.hashes, dataset.split, dataset.labels, strict=True)
        }
        self.parts: dict[str, list[tuple[bytes, int]]] = {name: [] for name in SPLITS}
        for path in sorted((folder / "raw").rglob("*.png")):
            data = path.read_bytes()
            found = split_of.get(hashlib.sha256(data).hexdigest())
            if found:
                self.parts[found[0]].append((data, found[1]))
        rng = np.random.default_rng(0)
        for name in SPLITS:
            order = rng.permutation(len(self.parts[name]))
            self.parts[name] = [self.parts[name][i] for i in order]

    @staticmethod
    def inverted(uploads: list[tuple[bytes, int]]) -> list[tuple[bytes, int]]:
        out = []
        for data, label in uploads:
            with Image.open(io.BytesIO(data)) as img:
                buffer = io.BytesIO()
                ImageOps.invert(img.convert("L")).save(buffer, format="PNG")
            out.append((buffer.getvalue(), label))
        return out


class Client:
    """Predictions and feedback over HTTP, as a production client sends them; keeps every answer."""

    def __init__(self, url: str, feedback_token: str) -> None:
        self.url = url
        self.http = requests.Session()
        self.headers = {"Authorization": f"Bearer {feedback_token}"}
        self.log: list[tuple[float, str, str, bool]] = []  # (time, phase, served version, correct)

    def send(
        self, uploads: list[tuple[bytes, int]], phase: str, wrong: bool = False, batch: int = 8
    ) -> tuple[int, int]:
        """Predict ``uploads`` (``batch`` per request) and send each true label; (correct, sent)."""
        correct = 0
        for start in range(0, len(uploads), batch):
            chunk = uploads[start : start + batch]
            files = [("file", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(chunk)]
            answer = self.http.post(f"{self.url}/predict", files=files, timeout=60)
            if answer.status_code != 200:
                raise VisionloopError(f"POST /predict answered {answer.status_code}: {answer.text[:300]}")
            body = answer.json()
            for prediction, (_, label) in zip(body["predictions"], chunk, strict=True):
                given = (label + 1) % 10 if wrong else label
                sent = self.http.post(
                    f"{self.url}/feedback", json={"request_id": prediction["request_id"], "label": given},
                    headers=self.headers, timeout=30,
                )  # fmt: skip
                if sent.status_code != 200:
                    raise VisionloopError(f"POST /feedback answered {sent.status_code}: {sent.text[:300]}")
                right = prediction["label"] == str(label)
                correct += right
                self.log.append((time.time(), phase, body["model"]["version"], right))
        return correct, len(uploads)

    def served(self) -> str:
        """The version the server answers with now."""
        model = self.http.get(f"{self.url}/readyz", timeout=10).json().get("model") or {}
        return str(model.get("version", ""))


class PhaseFailed(VisionloopError):
    """The loop did something other than what this phase of the story expects; the message says what it did."""


class DemoFailed(VisionloopError):
    """A phase failed: the demo ran to the end, wrote its summary and files, and exits non-zero."""

    exit_code = 1


MARKS: dict[str, tuple[str, str]] = {"passed": ("✓", "green"), "failed": ("✗", "bold red"), "skipped": ("–", "dim")}


class Demo:
    """The story as phases, each with the outcome it expects. A phase checks what the loop actually did (its runs,
    the alias history, the version the server answers with); where that differs, the phase is shown failed with
    the reason, the phases that need it are skipped, and the story goes on. The summary, the drift report and the
    plot are written whatever happened."""

    def __init__(
        self,
        workdir: Path,
        fast: bool = False,
        alerting: bool | None = None,
        console: Console | None = None,
        overrides: dict[str, Any] | None = None,
    ) -> None:
        self.workdir = workdir.resolve()
        self.fast = fast
        self.alerting = localstack.alerting_binaries() is not None if alerting is None else alerting
        self.console = console or Console(stderr=True)
        self.overrides = overrides or {}
        self.processes: list[Process] = []
        self.status: dict[str, str] = {"phase": "starting"}
        self.summary = Summary(str(self.workdir), self.alerting)
        self.live: Live | None = None
        self.client: Client | None = None
        self.loop_url = ""
        self.monitor_url = ""

    # ------------------------------------------------------------------ the view
    def _view(self) -> Table:
        table = Table(title="visionloop demo", title_justify="left", show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column()
        for key, value in self.status.items():
            table.add_row(key, Text(value))
        for record in self.summary.phases:
            mark, style = MARKS[record.status]
            table.add_row(
                Text(f"{mark} {record.name}", style=style),
                Text(f"{record.seconds:.1f} s — {record.detail}", style="red" if record.status == "failed" else ""),
            )
        return table

    def _refresh(self) -> None:
        if self.live is not None:
            self.live.update(self._view())

    def _record(self, name: str, started: float | None, detail: str, status: PhaseStatus) -> None:
        seconds = round(time.time() - started, 1) if started is not None else 0.0
        self.summary.phases.append(PhaseRecord(name, seconds, detail, status))
        if status == "failed":
            self.summary.failures.append(f"{name}: {detail}")
        self._refresh()

    def _outcome(self, name: str) -> str | None:
        return next((r.status for r in self.summary.phases if r.name == name), None)

    # ------------------------------------------------------------------ the story
    def run(self) -> Summary:
        # the demo is self-contained: the caller's VISIONLOOP_* and MLFLOW_* (another home, a shared MLflow
        # server) must not reach it, here or in the processes it starts
        saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(("VISIONLOOP_", "MLFLOW_"))}
        try:
            self._prepare()
            with Live(self._view(), console=self.console, refresh_per_second=4, transient=False) as live:
                self.live = live
                try:
                    self._story()
                finally:  # Ctrl-C included: what was measured so far is written down
                    self._outputs()
        finally:
            for process in reversed(self.processes):
                process.stop()
            os.environ.update(saved)
        return self.summary

    def _prepare(self) -> None:
        if self.workdir.exists():
            if not (self.workdir / MARKER).is_file():
                raise VisionloopError(f"{self.workdir} exists and is not a demo folder: choose another --workdir")
            shutil.rmtree(self.workdir)
        self.workdir.mkdir(parents=True)
        (self.workdir / MARKER).write_text("made by visionloop demo; removed by the next run\n")
        self.config_path = self.workdir / "visionloop.yaml"
        config = _merge(demo_settings(self.workdir, self.fast), _nest(self.overrides))
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.settings = load_settings(self.config_path)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("VISIONLOOP_", "MLFLOW_"))}
        self.env |= {"VISIONLOOP_CONFIG": str(self.config_path), "PYTHONUNBUFFERED": "1"}
        (self.workdir / "logs").mkdir()

    def _story(self) -> None:
        phases: list[tuple[str, str, tuple[str, ...], Callable[[], str]]] = [
            ("train", "training the first champion on the digits", (), self._train),
            ("start", "starting serve, monitor, loop" + (", Prometheus, Alertmanager" if self.alerting else ""),
             ("train",), self._start),
            ("in-distribution", "in-distribution traffic with feedback", ("start",), self._in_distribution),
            ("shift → retrain → promote", "shifted traffic (inverted digits) with feedback", ("start",), self._shift),
            # the bad model is rolled back to the retrained champion: without one there is nothing to show
            ("bad model → rolled back", "training a bad model and forcing it through",
             ("shift → retrain → promote",), self._bad_model),
        ]  # fmt: skip
        for number, (name, title, needs, step) in enumerate(phases, 1):
            blocked = [n for n in needs if self._outcome(n) != "passed"]
            if blocked:
                self._record(name, None, f"skipped: needs {', '.join(blocked)}", "skipped")
                continue
            self.status["phase"] = f"{number}/{len(phases) + 1} {title}"
            self._refresh()
            started = time.time()
            try:
                detail = step()
            except Exception as exc:  # a phase that went otherwise is a result to show, not a traceback
                self._record(name, started, self._why(exc), "failed")
            else:
                self._record(name, started, detail, "passed")

    def _why(self, exc: Exception) -> str:
        """One line for the view; the traceback of anything but an expected failure goes to logs/demo.log."""
        if not isinstance(exc, VisionloopError):
            with (self.workdir / "logs" / "demo.log").open("a", encoding="utf-8") as log:
                log.write("".join(traceback.format_exception(exc)))
            return f"{type(exc).__name__}: {' '.join(str(exc).split())} (traceback in logs/demo.log)"
        return " ".join(str(exc).split())

    def _train(self) -> str:
        from visionloop.pipeline.runner import run_pipeline

        first = run_pipeline(self.settings, show_progress=False)
        self.traffic = Traffic(self.settings, self.workdir / "digits")
        self.summary.versions["first champion"] = first.model_version
        return f"v{first.model_version}, test accuracy {first.test_accuracy:.3f}"

    def _start(self) -> str:
        logs = self.workdir / "logs"
        serve, serve_url = localstack.start_service("serve", ["serve"], self.env, logs)
        self.processes.append(serve)
        monitor, self.monitor_url = localstack.start_service("monitor", ["monitor"], self.env, logs)
        self.processes.append(monitor)
        loop_env = self.env | {"VISIONLOOP_LOOP__RELOAD_URLS": json.dumps([serve_url])}
        loop_env["VISIONLOOP_LOOP__TRIGGERS"] = json.dumps(["alert"] if self.alerting else ["verdict", "accuracy"])
        loop, self.loop_url = localstack.start_service("loop", ["loop"], loop_env, logs)
        self.processes.append(loop)
        if self.alerting:
            targets = {"visionloop-serve": localstack.host_port(serve_url),
                       "visionloop-monitor": localstack.host_port(self.monitor_url),
                       "visionloop-loop": localstack.host_port(self.loop_url)}  # fmt: skip
            prometheus, alertmanager, prom_url, _ = localstack.start_alerting(
                self.workdir / "alerting", targets, self.loop_url, _free_port(), _free_port()
            )
            self.processes += [alertmanager, prometheus]
            self.status["prometheus"] = prom_url
        self.client = Client(serve_url, self.settings.serve.feedback_token)
        self.status |= {"serve": serve_url, "monitor": self.monitor_url, "loop": self.loop_url}
        return f"{len(self.processes)} processes, logs in {logs}"

    def _in_distribution(self) -> str:
        assert self.client is not None
        right, sent = self.client.send(self.traffic.parts["test"][:240], "in-distribution")
        self.summary.accuracy["in-distribution (first champion)"] = right / sent
        checked = self._check_after(self.monitor_url, time.time())
        runs = self._runs()
        if checked["drifted"]:
            raise PhaseFailed(f"the monitor called in-distribution traffic drift: {'; '.join(checked['reasons'])}")
        if runs:
            raise PhaseFailed(f"the loop started {len(runs)} run(s) on in-distribution traffic: {runs[0]['reason']}")
        return f"{sent} images, accuracy {right / sent:.3f}, monitor {checked['status']}, 0 loop runs: no alarm"

    def _shift(self) -> str:
        client = self.client
        assert client is not None
        seen = {r["id"] for r in self._runs()}
        shifted = self.traffic.inverted(self.traffic.parts["train"] + self.traffic.parts["val"])
        held_out = self.traffic.inverted(self.traffic.parts["test"])
        onset, sent_shifted, right_before = time.time(), 0, 0
        detected_at: float | None = None
        run: dict[str, Any] | None = None
        while run is None:
            if sent_shifted >= len(shifted):
                raise PhaseFailed(
                    f"sent all {len(shifted)} shifted images and the loop started no retrain: see logs/loop.log"
                )
            right, n = client.send(shifted[sent_shifted : sent_shifted + 16], "shifted")
            sent_shifted += n
            right_before += right
            if detected_at is None:
                drift = requests.get(f"{self.monitor_url}/drift", timeout=10).json()
                if drift.get("drifted") and drift.get("checked_at", 0) > onset:
                    detected_at = drift["checked_at"]
                    self.summary.samples_to_detect = int(
                        sum(1 for t, p, _, _ in client.log if p == "shifted" and t <= detected_at)
                    )
                    self.summary.seconds_to_detect = round(detected_at - onset, 1)
                    self.status["drift"] = (
                        f"detected after {self.summary.samples_to_detect} shifted images: "
                        + "; ".join(drift["reasons"][:2])
                    )
            runs = self._runs()
            run = next((r for r in runs if r["id"] not in seen and r["trigger"] != "promotion"), None)
            self.status["loop"] = f"{self.loop_url} — {len(runs)} runs"
            self._refresh()
        self.summary.accuracy["shifted (first champion)"] = right_before / sent_shifted
        self.summary.trigger = f"{run['trigger']}: {run['reason']}"
        self.status["phase"] += f" — loop run {run['id']}: retraining ({run['trigger']})"
        run = self._wait_run(run["id"], {"analysing", "done"})
        if "version" not in run["data"] or "analysis" not in run["data"]:  # done before any promotion
            why = run["data"].get("gate", {}).get("reasons") or run["data"].get("error") or "see logs/loop.log"
            raise PhaseFailed(f"the retrain ended {run['result']}: {why}")
        new = str(run["data"]["version"])
        self.summary.versions["retrained champion"] = new

        # follow the loop: the server answers from v{new} unless the analysis has already ended (and rolled back)
        def serving_or_done(run_id: str = run["id"]) -> str | None:
            if client.served() == new:
                return "serving"
            return "done" if self._run(run_id)["phase"] == "done" else None

        if (
            wait_until(f"the server to serve v{new} (or loop run {run['id']} to end)", serving_or_done, 120)
            == "serving"
        ):
            self.summary.seconds_to_new_champion = round(time.time() - onset, 1)
            # the new champion on shifted images no model was trained on (their originals are the test split)
            first = len(client.log)
            client.send(held_out, "recovered")
            by_new = [right for _, _, version, right in client.log[first:] if version == new]
            if by_new:
                self.summary.accuracy["shifted (retrained champion)"] = sum(by_new) / len(by_new)
        run = self._wait_run(run["id"], {"done"})
        analysis = run["data"].get("analysis", {})
        if run["result"] != "promoted" or analysis.get("phase") != "successful":
            measured = analysis.get("measurements") or [{}]
            back = run["data"].get("rollback", {}).get("to_version")
            raise PhaseFailed(
                f"v{new} was promoted, then its post-promotion analysis was {analysis.get('phase')} "
                f"({'; '.join(measured[-1].get('reasons', []))}); the loop's result: {run['result']}"
                + (f", back to v{back}" if back else "")
            )
        gate = run["data"]["gate"]
        return (
            f"v{new} promoted: original test {gate['challenger']['original']:.3f} (champion "
            f"{gate['champion']['original']:.3f}), production slice {gate['challenger']['production']:.3f} "
            f"(champion {gate['champion']['production']:.3f}); analysis {analysis['phase']}"
        )

    def _bad_model(self) -> str:
        from visionloop import registry
        from visionloop.pipeline.runner import run_pipeline

        client = self.client
        assert client is not None
        s = self.settings
        before = registry.alias_version(s, registry.CHAMPION)
        bad_settings = s.model_copy(update={"train": s.train.model_copy(update={"epochs": 1, "lr": 1e-5})})
        bad = run_pipeline(bad_settings, show_progress=False, use_cache=False).model_version
        registry.force_champion(s, bad, "demo: a bad model forced past the gate")
        self.summary.versions["bad model"] = bad
        wait_until(f"the server to serve v{bad}", lambda: client.served() == bad, 120)
        mixed = self.traffic.parts["test"] + self.traffic.inverted(self.traffic.parts["test"])
        bad_run: dict[str, Any] | None = None
        sent_bad = 0
        while bad_run is None or bad_run["phase"] != "done":
            if sent_bad > 4000:
                raise PhaseFailed(f"the loop did not decide on the forced v{bad} after {sent_bad} images: see logs")
            chunk = mixed[sent_bad % len(mixed) : sent_bad % len(mixed) + 16]
            client.send(chunk, "bad model")
            sent_bad += len(chunk)
            bad_run = next(
                (r for r in self._runs() if r["trigger"] == "promotion" and str(r["data"].get("version")) == bad), None
            )
            if bad_run:
                analysis = bad_run["data"].get("analysis", {})
                measured = " ".join(m["result"] for m in analysis.get("measurements", []))
                self.status["phase"] = f"5/6 analysis of v{bad}: {measured}"
            self._refresh()
        analysis = bad_run["data"].get("analysis", {})
        if bad_run["result"] != "rolled_back":
            raise PhaseFailed(
                f"the loop's result for the forced v{bad} was {bad_run['result']} (analysis {analysis.get('phase')}), "
                "not a rollback"
            )
        self.summary.rollback_reason = bad_run["data"]["rollback"]["reason"]
        back = str(bad_run["data"]["rollback"].get("to_version"))
        wait_until(f"the server to serve v{back}, where the loop rolled back to", lambda: client.served() == back, 120)
        if back != before:
            raise PhaseFailed(f"the loop rolled v{bad} back to v{back}, not to the champion before it (v{before})")
        return f"v{bad} rolled back to v{back}: {self.summary.rollback_reason}"

    # ------------------------------------------------------------------ what is written whatever happened
    def _outputs(self) -> None:
        """The loop's history, the accuracy plot, the drift report, then summary.json and summary.txt: each is
        written even when a phase failed (the plot and report from what exists), and a failure to write one is
        a failed phase of its own."""
        self.status["phase"] = "6/6 report and plots"
        self._refresh()
        started = time.time()
        problems: list[str] = []
        self.summary.history = self._history(problems)
        plot_path = self.workdir / "accuracy.png"
        try:
            self.summary.plot = str(plot_accuracy(self.client.log if self.client else [], plot_path))
        except Exception as exc:
            problems.append(f"accuracy plot: {self._why(exc)}")
        report_path = self.workdir / "drift-report.html"
        try:
            self.summary.report = str(self._report())
        except Exception as exc:
            why = self._why(exc)
            problems.append(f"drift report: {why}")
            report_path.write_text(
                "<!doctype html><meta charset='utf-8'><title>visionloop demo: no drift report</title>"
                f"<h1>No drift report</h1><p>{html.escape(why)}</p>",
                encoding="utf-8",
            )
            self.summary.report = str(report_path)
        detail = f"{self.summary.report}, {self.summary.plot}" + (f" — {'; '.join(problems)}" if problems else "")
        self._record("report", started, detail, "failed" if problems else "passed")
        self.summary.ok = not self.summary.failures
        self.status["phase"] = "done" if self.summary.ok else f"done — {len(self.summary.failures)} phase(s) failed"
        self.summary.summary_json = str(self.workdir / "summary.json")
        self.summary.summary_text = str(self.workdir / "summary.txt")
        atomic_write_json(Path(self.summary.summary_json), self.summary.to_dict())
        text = io.StringIO()
        print_summary(self.summary, Console(file=text, width=120, color_system=None, soft_wrap=False))
        lines = (line.rstrip() for line in text.getvalue().splitlines())  # rich pads cells to the width
        Path(self.summary.summary_text).write_text("\n".join(lines) + "\n", encoding="utf-8")
        self._refresh()

    def _history(self, problems: list[str]) -> list[dict[str, Any]]:
        """The loop's runs: from its API while it is up, else from the store it writes."""
        if self.loop_url:
            with contextlib.suppress(Exception):  # the loop has stopped: the store below has the same runs
                return self._runs()
        try:
            from visionloop.loop.state import LoopState

            state = LoopState.from_settings(self.settings)
            try:
                return [r.to_dict() for r in state.runs(self.settings.registry.model_name)]
            finally:
                state.close()
        except Exception as exc:
            problems.append(f"loop history: {self._why(exc)}")
            return []

    # ------------------------------------------------------------------ the loop's API
    def _runs(self) -> list[dict[str, Any]]:
        answer = requests.get(f"{self.loop_url}/runs", timeout=10)
        answer.raise_for_status()
        return list(answer.json())

    def _run(self, run_id: str) -> dict[str, Any]:
        answer = requests.get(f"{self.loop_url}/runs/{run_id}", timeout=10)
        answer.raise_for_status()
        return dict(answer.json())

    def _check_after(self, monitor_url: str, after: float) -> dict[str, Any]:
        def fresh() -> dict[str, Any] | None:
            found = requests.get(f"{monitor_url}/drift", timeout=10)
            body = found.json() if found.status_code == 200 else {}
            return body if body.get("checked_at", 0) > after else None

        return wait_until("a drift check of the new traffic", fresh, 60)

    def _wait_run(self, run_id: str, phases: set[str], timeout: float = 900) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            found = self._run(run_id)
            self.status["loop run"] = f"{run_id}: {found['phase']}{' → ' + found['result'] if found['result'] else ''}"
            self._refresh()
            return found if found["phase"] in phases else None

        return wait_until(f"loop run {run_id} to reach {', '.join(sorted(phases))}", reached, timeout)

    def _report(self) -> Path:
        from visionloop.monitoring.monitor import Monitor
        from visionloop.monitoring.report import write_report

        version = self.summary.versions.get("first champion")
        if version is None:
            raise VisionloopError("no drift report: no champion was trained")
        monitor = Monitor(self.settings)
        try:
            result = monitor.check(version, save=False)
            window = monitor.latest_window
            if result.reference is None or window is None:
                raise VisionloopError("no drift report: " + "; ".join(result.reasons))
            profile, _ = monitor.reference(version)
            history = monitor.store.checks(self.settings.registry.model_name, version)
        finally:
            monitor.close()
        return write_report(
            self.workdir / "drift-report.html", model_name=self.settings.registry.model_name, model_version=version,
            classes=profile.classes, reference=profile.sample, window=window.sample, latest=result, history=history,
        )  # fmt: skip


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def plot_accuracy(log: list[tuple[float, str, str, bool]], path: Path, window: int = 40) -> Path:
    """Rolling accuracy of every answer the demo got, coloured by the version that served it, phases marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not log:  # the story stopped before any traffic: an empty plot that says so, not a missing file
        fig, ax = plt.subplots(figsize=(10, 4.2), dpi=110)
        ax.text(0.5, 0.5, "no predictions were answered before the demo stopped", ha="center", va="center")
        ax.set_axis_off()
        return _save(fig, path)
    start = log[0][0]
    times = np.array([t - start for t, _, _, _ in log])
    right = np.array([c for _, _, _, c in log], dtype=float)
    rolling = np.empty_like(right)
    segment = 0  # the rolling mean restarts where the phase or the served version changes
    for i in range(len(log)):
        if i and log[i][1:3] != log[i - 1][1:3]:
            segment = i
        lo = max(segment, i - window + 1)
        rolling[i] = right[lo : i + 1].mean()
    fig, ax = plt.subplots(figsize=(10, 4.2), dpi=110)
    versions = [v for _, _, v, _ in log]
    for version in dict.fromkeys(versions):
        mask = np.array([v == version for v in versions])
        ax.scatter(times[mask], rolling[mask], s=4, label=f"served by v{version}")
    previous, row = None, 0
    for t, phase, _, _ in log:
        if phase != previous:
            ax.axvline(t - start, color="grey", lw=0.8, ls="--")
            ax.text(t - start, 1.02 + 0.04 * (row % 2), f" {phase}", fontsize=8, va="bottom")
            previous, row = phase, row + 1
    ax.set_ylim(0, 1.12)
    ax.set_xlabel("seconds since the first request")
    ax.set_ylabel(f"accuracy, rolling over {window} answers")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def print_summary(summary: Summary, console: Console) -> None:
    """The phases (✓ passed, ✗ failed and why, – skipped), the measured numbers and the paths of the files."""
    table = Table(title="visionloop demo — summary", title_justify="left")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    table.add_column("what happened")
    for record in summary.phases:
        mark, style = MARKS[record.status]
        table.add_row(
            Text(f"{mark} {record.name}", style=style),
            f"{record.seconds:.1f}",
            Text(record.detail, style="red" if record.status == "failed" else ""),
        )
    console.print(table)
    numbers = Table(show_header=False, box=None)
    numbers.add_column(style="bold")
    numbers.add_column()
    rows = [
        ("result", "every phase passed" if summary.ok else f"{len(summary.failures)} phase(s) failed"),
        *((f"failed: {f.split(':', 1)[0]}", f.split(":", 1)[1].strip()) for f in summary.failures),
        ("trigger", summary.trigger),
        ("samples to detect", f"{summary.samples_to_detect} shifted images ({summary.seconds_to_detect} s)"),
        ("onset → new champion serving", f"{summary.seconds_to_new_champion} s"),
        *((f"accuracy, {name}", f"{value:.3f}") for name, value in summary.accuracy.items()),
        ("rollback", summary.rollback_reason),
        ("drift report", summary.report),
        ("accuracy plot", summary.plot),
        ("summary", f"{summary.summary_json}, {summary.summary_text}"),
        ("history", f"visionloop --config {summary.workdir}/visionloop.yaml loop history"),
    ]
    for key, value in rows:
        numbers.add_row(key, Text(value, style="red" if key.startswith("failed") else ""))
    console.print(numbers)
