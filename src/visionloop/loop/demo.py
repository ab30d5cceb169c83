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
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import secrets
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests
import yaml
from PIL import Image, ImageOps
from rich.console import Console
from rich.live import Live
from rich.table import Table

from visionloop.config import Settings, load_settings
from visionloop.errors import VisionloopError
from visionloop.loop import localstack
from visionloop.loop.localstack import Process, wait_until

MARKER = ".visionloop-demo"
FAST_TRAIN = {"epochs": 12, "width": 16, "depth": 2, "patience": 100, "lr": 1e-2}


@dataclass
class PhaseRecord:
    name: str
    seconds: float
    detail: str


@dataclass
class Summary:
    workdir: str
    alerting: bool
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
    history: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def demo_settings(workdir: Path, fast: bool) -> dict[str, Any]:
    """The settings file every process of the demo reads (the monitor checks and the loop looks often)."""
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
            "interval_seconds": 1, "cooldown_seconds": 3600, "min_labels": 150, "min_new_labels": 20,
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


class Demo:
    def __init__(
        self, workdir: Path, fast: bool = False, alerting: bool | None = None, console: Console | None = None
    ) -> None:
        self.workdir = workdir.resolve()
        self.fast = fast
        self.alerting = localstack.alerting_binaries() is not None if alerting is None else alerting
        self.console = console or Console(stderr=True)
        self.processes: list[Process] = []
        self.status: dict[str, str] = {"phase": "starting"}
        self.summary = Summary(str(self.workdir), self.alerting)

    # ------------------------------------------------------------------ the view
    def _view(self) -> Table:
        table = Table(title="visionloop demo", title_justify="left", show_header=False, box=None)
        table.add_column(style="bold")
        table.add_column()
        for key, value in self.status.items():
            table.add_row(key, value)
        for record in self.summary.phases:
            table.add_row(f"✓ {record.name}", f"{record.seconds:.1f} s — {record.detail}")
        return table

    def _phase(self, name: str, started: float, detail: str, live: Live) -> None:
        self.summary.phases.append(PhaseRecord(name, round(time.time() - started, 1), detail))
        live.update(self._view())

    # ------------------------------------------------------------------ the story
    def run(self) -> Summary:
        # the demo is self-contained: the caller's VISIONLOOP_* and MLFLOW_* (another home, a shared MLflow
        # server) must not reach it, here or in the processes it starts
        saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(("VISIONLOOP_", "MLFLOW_"))}
        try:
            self._prepare()
            with Live(self._view(), console=self.console, refresh_per_second=4, transient=False) as live:
                self._story(live)
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
        self.config_path.write_text(yaml.safe_dump(demo_settings(self.workdir, self.fast), sort_keys=False))
        self.settings = load_settings(self.config_path)
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("VISIONLOOP_", "MLFLOW_"))}
        self.env |= {"VISIONLOOP_CONFIG": str(self.config_path), "PYTHONUNBUFFERED": "1"}

    def _story(self, live: Live) -> None:
        from visionloop import registry
        from visionloop.pipeline.runner import run_pipeline

        s = self.settings
        # 1. the first champion
        t0 = time.time()
        self.status["phase"] = "1/6 training the first champion on the digits"
        live.update(self._view())
        first = run_pipeline(s, show_progress=False)
        traffic = Traffic(s, self.workdir / "digits")
        self.summary.versions["first champion"] = first.model_version
        self._phase("train", t0, f"v{first.model_version}, test accuracy {first.test_accuracy:.3f}", live)

        # 2. the stack
        t0 = time.time()
        self.status["phase"] = "2/6 starting serve, monitor, loop" + (
            ", Prometheus, Alertmanager" if self.alerting else ""
        )
        live.update(self._view())
        logs = self.workdir / "logs"
        logs.mkdir()
        serve, serve_url = localstack.start_service("serve", ["serve"], self.env, logs)
        self.processes.append(serve)
        monitor, monitor_url = localstack.start_service("monitor", ["monitor"], self.env, logs)
        self.processes.append(monitor)
        loop_env = self.env | {"VISIONLOOP_LOOP__RELOAD_URLS": json.dumps([serve_url])}
        if not self.alerting:
            loop_env["VISIONLOOP_LOOP__TRIGGERS"] = json.dumps(["verdict", "accuracy"])
        else:
            loop_env["VISIONLOOP_LOOP__TRIGGERS"] = json.dumps(["alert"])
        loop, loop_url = localstack.start_service("loop", ["loop"], loop_env, logs)
        self.processes.append(loop)
        if self.alerting:
            from visionloop.loop.localstack import host_port

            targets = {"visionloop-serve": host_port(serve_url), "visionloop-monitor": host_port(monitor_url),
                       "visionloop-loop": host_port(loop_url)}  # fmt: skip
            prometheus, alertmanager, prom_url, _ = localstack.start_alerting(
                self.workdir / "alerting", targets, loop_url, _free_port(), _free_port()
            )
            self.processes += [alertmanager, prometheus]
            self.status["prometheus"] = prom_url
        client = Client(serve_url, s.serve.feedback_token)
        self.status |= {"serve": serve_url, "monitor": monitor_url, "loop": loop_url}
        self._phase("start", t0, f"{len(self.processes)} processes, logs in {logs}", live)

        # 3. in-distribution traffic: no alarm
        t0 = time.time()
        self.status["phase"] = "3/6 in-distribution traffic with feedback"
        live.update(self._view())
        right, sent = client.send(traffic.parts["test"][:240], "in-distribution")
        self.summary.accuracy["in-distribution (first champion)"] = right / sent
        checked = self._check_after(monitor_url, time.time())
        if checked["drifted"]:
            raise VisionloopError(f"the monitor called in-distribution traffic drift: {checked['reasons']}")
        runs = requests.get(f"{loop_url}/runs", timeout=10).json()
        self._phase("in-distribution", t0, f"{sent} images, accuracy {right / sent:.3f}, monitor {checked['status']}, "
                    f"{len(runs)} loop runs: no alarm", live)  # fmt: skip

        # 4. shifted traffic → drift → retrain → promote
        t0 = time.time()
        self.status["phase"] = "4/6 shifted traffic (inverted digits) with feedback"
        live.update(self._view())
        shifted = traffic.inverted(traffic.parts["train"] + traffic.parts["val"])
        held_out = traffic.inverted(traffic.parts["test"])
        onset, sent_shifted, right_before = time.time(), 0, 0
        detected_at: float | None = None
        run: dict[str, Any] | None = None
        while run is None:
            if sent_shifted >= len(shifted):
                raise VisionloopError("sent every shifted image and the loop started no retrain: see the logs")
            right, n = client.send(shifted[sent_shifted : sent_shifted + 16], "shifted")
            sent_shifted += n
            right_before += right
            if detected_at is None:
                drift = requests.get(f"{monitor_url}/drift", timeout=10).json()
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
            runs = requests.get(f"{loop_url}/runs", timeout=10).json()
            run = next((r for r in runs if r["trigger"] != "promotion"), None)
            self.status["loop"] = f"{loop_url} — {len(runs)} runs"
            live.update(self._view())
        self.summary.accuracy["shifted (first champion)"] = right_before / sent_shifted
        self.summary.trigger = f"{run['trigger']}: {run['reason']}"
        self.status["phase"] = f"4/6 loop run {run['id']}: retraining ({run['trigger']})"
        live.update(self._view())
        run = self._wait_run(loop_url, run["id"], {"analysing", "done"}, live)
        if run["phase"] == "done":
            raise VisionloopError(
                f"the retrain ended {run['result']}: {run['data'].get('gate', {}).get('reasons') or run['data'].get('error')}"
            )
        new = run["data"]["version"]
        wait_until(f"the server to serve v{new}", lambda: client.served() == new, 60)
        self.summary.seconds_to_new_champion = round(time.time() - onset, 1)
        self.summary.versions["retrained champion"] = new
        # the new champion on shifted images no model was trained on (their originals are the test split)
        right, n = client.send(held_out, "recovered")
        self.summary.accuracy["shifted (retrained champion)"] = right / n
        run = self._wait_run(loop_url, run["id"], {"done"}, live)
        gate = run["data"]["gate"]
        self._phase(
            "shift → retrain → promote", t0,
            f"v{new} promoted: original test {gate['challenger']['original']:.3f} (champion "
            f"{gate['champion']['original']:.3f}), production slice {gate['challenger']['production']:.3f} "
            f"(champion {gate['champion']['production']:.3f}); analysis {run['data']['analysis']['phase']}", live,
        )  # fmt: skip

        # 5. a bad model forced through → rolled back
        t0 = time.time()
        self.status["phase"] = "5/6 training a bad model and forcing it through"
        live.update(self._view())
        bad_settings = s.model_copy(update={"train": s.train.model_copy(update={"epochs": 1, "lr": 1e-5})})
        bad = run_pipeline(bad_settings, show_progress=False, use_cache=False)
        registry.force_champion(s, bad.model_version, "demo: a bad model forced past the gate")
        self.summary.versions["bad model"] = bad.model_version
        wait_until(f"the server to serve v{bad.model_version}", lambda: client.served() == bad.model_version, 60)
        bad_run = None
        mixed = traffic.parts["test"] + held_out
        sent_bad = 0
        while bad_run is None or bad_run["phase"] != "done":
            chunk = mixed[sent_bad % len(mixed) : sent_bad % len(mixed) + 16]
            client.send(chunk, "bad model")
            sent_bad += len(chunk)
            runs = requests.get(f"{loop_url}/runs", timeout=10).json()
            bad_run = next((r for r in runs if r["trigger"] == "promotion"), None)
            if bad_run:
                analysis = bad_run["data"].get("analysis", {})
                self.status["phase"] = (
                    f"5/6 analysis of v{bad.model_version}: {' '.join(m['result'] for m in analysis.get('measurements', []))}"
                )
            live.update(self._view())
            if sent_bad > 4000:
                raise VisionloopError("the loop did not decide on the forced model: see the logs")
        if bad_run["result"] != "rolled_back":
            raise VisionloopError(f"the forced bad model ended {bad_run['result']}, not rolled back")
        self.summary.rollback_reason = bad_run["data"]["rollback"]["reason"]
        wait_until(f"the server to serve v{new} again", lambda: client.served() == new, 60)
        self._phase(
            "bad model → rolled back",
            t0,
            f"v{bad.model_version} rolled back to v{new}: {self.summary.rollback_reason}",
            live,
        )

        # 6. report and plots
        t0 = time.time()
        self.status["phase"] = "6/6 report and plots"
        live.update(self._view())
        self.summary.plot = str(plot_accuracy(client.log, self.workdir / "accuracy.png"))
        self.summary.report = str(self._report())
        self.summary.history = requests.get(f"{loop_url}/runs", timeout=10).json()
        self.status["phase"] = "done"
        self._phase("report", t0, f"{self.summary.report}, {self.summary.plot}", live)

    def _check_after(self, monitor_url: str, after: float) -> dict[str, Any]:
        def fresh() -> dict[str, Any] | None:
            found = requests.get(f"{monitor_url}/drift", timeout=10)
            body = found.json() if found.status_code == 200 else {}
            return body if body.get("checked_at", 0) > after else None

        return wait_until("a drift check of the new traffic", fresh, 60)

    def _wait_run(
        self, loop_url: str, run_id: str, phases: set[str], live: Live, timeout: float = 900
    ) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            found = requests.get(f"{loop_url}/runs/{run_id}", timeout=10).json()
            self.status["loop run"] = f"{run_id}: {found['phase']}{' → ' + found['result'] if found['result'] else ''}"
            live.update(self._view())
            return found if found["phase"] in phases else None

        return wait_until(f"loop run {run_id} to reach {', '.join(sorted(phases))}", reached, timeout)

    def _report(self) -> Path:
        from visionloop.monitoring.monitor import Monitor
        from visionloop.monitoring.report import write_report

        monitor = Monitor(self.settings)
        try:
            version = self.summary.versions["first champion"]
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
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path


def print_summary(summary: Summary, console: Console) -> None:
    table = Table(title="visionloop demo — summary", title_justify="left")
    table.add_column("phase")
    table.add_column("seconds", justify="right")
    table.add_column("what happened")
    for record in summary.phases:
        table.add_row(record.name, f"{record.seconds:.1f}", record.detail)
    console.print(table)
    numbers = Table(show_header=False, box=None)
    numbers.add_column(style="bold")
    numbers.add_column()
    numbers.add_row("trigger", summary.trigger)
    numbers.add_row("samples to detect", f"{summary.samples_to_detect} shifted images ({summary.seconds_to_detect} s)")
    numbers.add_row("onset → new champion serving", f"{summary.seconds_to_new_champion} s")
    for name, value in summary.accuracy.items():
        numbers.add_row(f"accuracy, {name}", f"{value:.3f}")
    numbers.add_row("rollback", summary.rollback_reason)
    numbers.add_row("drift report", summary.report)
    numbers.add_row("accuracy plot", summary.plot)
    numbers.add_row("history", f"visionloop --config {summary.workdir}/visionloop.yaml loop history")
    console.print(numbers)
