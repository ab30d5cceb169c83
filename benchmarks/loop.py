"""From the onset of a shift, how long until a recovered champion serves: the closed loop against scheduled retraining?

The scenario is ``visionloop demo``'s (``visionloop.loop.demo``: its settings, its traffic and its HTTP client,
imported, not copied), on the built-in digits, with the default (full-size) training settings unless ``--quick``.
Two arms run one after the other in this one run, each with its own fresh home and its own ``visionloop serve``,
``visionloop monitor`` and ``visionloop loop`` processes:

- **closed loop**: ``loop.triggers`` is ``["alert"]`` with Debian's Prometheus and Alertmanager driving the loop's
  webhook (the repository's rules, ``for:`` shortened to 5 s) where ``localstack.alerting_binaries()`` finds them,
  else ``["verdict"]`` (the monitor's stored verdict); the script says which;
- **baseline**: ``loop.triggers`` is ``["schedule"]``, ``loop.schedule_seconds`` is ``--interval``, no drift trigger.
  ``loop.cooldown_seconds`` is 0 there (the demo's hour-long cool-down would swallow every scheduled run).

Traffic, the same in both arms, over HTTP with a feedback label for every image (``demo.Client``), from a thread
that sends ``--batch`` images every ``--batch / --rate`` seconds (16 every 0.2 s by default; a tick that falls
behind by more than a period is not made up in a burst, and the achieved rate is printed), so samples and seconds
compare between the arms:

1. the base dataset's test split once (in-distribution accuracy of the first champion; these images are in the
   base dataset, so their labels are not usable for a retrain);
2. an *in-distribution production stream*: the test split again, cycled (these labels, too, are never
   retrained on: the base dataset holds the images). Closed loop: ``--warmup`` seconds of it and a monitor check
   that sees no drift. Baseline: ``engine`` fires ``from_schedule`` at once when the loop starts (no scheduled run
   yet; a scheduled run does not wait for labels, as a cron job would not), the next one ``--interval`` after that
   run *started*. The script waits for that first scheduled run to end, then sends this stream for a further
   U(0, ``--interval``) seconds (seeded by ``--seed``): the onset's phase within the schedule's period,
   (run time + U) mod interval, is then uniform;
3. the **onset**: the inverted train and val splits (dark on light, as the demo), repeated for as long as it takes,
   until a retrained champion serves (production keeps sending too) — the closed loop: its first new champion; the
   baseline: the first one whose accuracy on the inverted test split is within 2 points of the in-distribution
   accuracy, or ``2 x --interval + 300`` s;
4. accuracy after: every new champion (the version ``/readyz`` names) on the inverted *test* split, predictions only,
   no feedback, so no later retrain trains on them: images no model trained on in any form.

Measured in each arm from the onset: shifted samples and seconds until the monitor's first drifted check, seconds
until the loop creates its run, until a new champion serves, until a recovered one serves; accuracy of the first
champion on the shifted stream (before) and of the new champion on the inverted test split (after). It prints both
arms side by side, the ratio (baseline seconds / closed-loop seconds to a recovered champion), whether the issue's
targets hold (onset → recovered champion under 180 s; shifted accuracy after within 2 points of in-distribution),
the expected baseline wait for a uniform onset (interval / 2 + the measured retrain) and what a daily schedule would
mean (arithmetic). Writes ``--json-out`` (every figure, the settings, the machine).

Command: ``.venv/bin/python benchmarks/loop.py`` (about 10-15 minutes on the 2-core machine; ``--quick`` for a smoke
run with the demo's fast training settings and a 60 s interval).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
import yaml
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_load
from visionloop.errors import VisionloopError
from visionloop.loop import localstack
from visionloop.loop.demo import Client, Traffic, _free_port, demo_settings
from visionloop.loop.localstack import Process

DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "loop.json"
TARGET_SECONDS = 180.0
TARGET_POINTS = 0.02
DAY = 86_400.0
console = Console(width=160)


# ------------------------------------------------------------------------------------------------ traffic
class Sender(threading.Thread):
    """Sends ``batch`` images with feedback every ``period`` seconds from the current stream, cycling through it."""

    def __init__(self, client: Client, batch: int, period: float) -> None:
        super().__init__(name="traffic", daemon=True)
        self.client, self.batch, self.period = client, batch, period
        self.halt = threading.Event()
        self.error: BaseException | None = None
        self.switched: dict[str, float] = {}  # phase -> time its first batch went out
        self.sent: dict[str, int] = {}
        self._lock = threading.Lock()
        self._next: tuple[list[tuple[bytes, int]], str] | None = None
        self._stream: list[tuple[bytes, int]] = []
        self._phase = ""

    def switch(self, uploads: list[tuple[bytes, int]], phase: str, timeout: float = 60) -> float:
        """From the next tick on, send ``uploads`` as ``phase``; returns the time its first batch went out."""
        with self._lock:
            self._next = (uploads, phase)
        deadline = time.monotonic() + timeout
        while phase not in self.switched:
            self.check()
            if time.monotonic() > deadline:
                raise VisionloopError(f"the sender did not start {phase} within {timeout:g} s")
            time.sleep(0.01)
        return self.switched[phase]

    def check(self) -> None:
        """Raise the traffic thread's error, if it had one."""
        if self.error is not None:
            raise VisionloopError(f"the traffic thread failed: {type(self.error).__name__}: {self.error}")

    def run(self) -> None:
        planned, position = time.monotonic(), 0
        try:
            while not self.halt.is_set():
                with self._lock:
                    if self._next is not None:
                        (self._stream, self._phase), self._next, position = self._next, None, 0
                        self.switched[self._phase] = time.time()
                if not self._stream:
                    self.halt.wait(0.02)
                    planned = time.monotonic()
                    continue
                chunk = [self._stream[(position + i) % len(self._stream)] for i in range(self.batch)]
                position += self.batch
                self.client.send(chunk, self._phase)
                self.sent[self._phase] = self.sent.get(self._phase, 0) + len(chunk)
                planned += self.period
                now = time.monotonic()
                if planned > now:
                    self.halt.wait(planned - now)
                elif now - planned > self.period:
                    planned = now  # fell behind by more than a tick: carry on at the rate, no burst
        except BaseException as exc:  # reported to the main thread, which stops the arm
            self.error = exc

    def stop(self) -> None:
        self.halt.set()
        self.join(60)


def predict_only(url: str, uploads: list[tuple[bytes, int]], batch: int = 8) -> tuple[float, list[str]]:
    """Accuracy of the served model on ``uploads`` with no feedback sent; also the versions that answered."""
    http, correct, versions = requests.Session(), 0, set()
    for start in range(0, len(uploads), batch):
        chunk = uploads[start : start + batch]
        files = [("file", (f"{i}.png", data, "image/png")) for i, (data, _) in enumerate(chunk)]
        answer = http.post(f"{url}/predict", files=files, timeout=60)
        if answer.status_code != 200:
            raise VisionloopError(f"POST /predict answered {answer.status_code}: {answer.text[:300]}")
        body = answer.json()
        versions.add(str(body["model"]["version"]))
        correct += sum(p["label"] == str(label) for p, (_, label) in zip(body["predictions"], chunk, strict=True))
    return correct / len(uploads), sorted(versions)


def _get(url: str, timeout: float = 10) -> Any:
    answer = requests.get(url, timeout=timeout)
    return answer.json() if answer.status_code == 200 else None


# ------------------------------------------------------------------------------------------------ one arm
def _merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in extra.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


class Arm:
    def __init__(self, name: str, workdir: Path, args: argparse.Namespace, trigger: str) -> None:
        self.name, self.workdir, self.args, self.trigger = name, workdir, args, trigger
        self.processes: list[Process] = []
        self.sender: Sender | None = None
        self.out: dict[str, Any] = {"arm": name, "trigger": trigger, "workdir": str(workdir)}

    def _wait(self, what: str, probe: Any, timeout: float, every: float = 0.5) -> Any:
        """``probe()`` until it gives something, at most ``timeout`` s; the traffic thread's failure ends it at once."""
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self.sender is not None:
                self.sender.check()
            try:
                value = probe()
                if value:
                    return value
            except (requests.RequestException, ValueError, KeyError) as exc:  # a service busy or not up yet
                last = exc
            time.sleep(every)
        raise VisionloopError(f"timed out after {timeout:g} s waiting for {what}" + (f" ({last})" if last else ""))

    def _say(self, text: str) -> None:
        console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] [bold]{self.name}[/]: {text}")

    def settings_dict(self) -> dict[str, Any]:
        loop: dict[str, Any] = {"triggers": [self.trigger]}
        if self.trigger == "schedule":
            loop |= {"schedule_seconds": self.args.interval, "cooldown_seconds": 0}
        return _merge(demo_settings(self.workdir, self.args.quick), {"loop": loop})

    def run(self) -> dict[str, Any]:
        try:
            self._run()
        finally:
            if self.sender is not None:
                self.sender.stop()
            for process in reversed(self.processes):
                process.stop()
        return self.out

    def _run(self) -> None:
        from visionloop.config import load_settings
        from visionloop.pipeline.runner import run_pipeline

        args, out = self.args, self.out
        self.workdir.mkdir(parents=True)
        config_path = self.workdir / "visionloop.yaml"
        chosen = self.settings_dict()
        config_path.write_text(yaml.safe_dump(chosen, sort_keys=False))
        out["settings"] = _merge(chosen, {"serve": {"feedback_token": "<random>", "admin_token": "<random>"}})
        settings = load_settings(config_path)
        env = {k: v for k, v in os.environ.items() if not k.startswith(("VISIONLOOP_", "MLFLOW_"))}
        env |= {"VISIONLOOP_CONFIG": str(config_path), "PYTHONUNBUFFERED": "1"}

        # the first champion
        t0 = time.time()
        self._say("training the first champion")
        first = run_pipeline(settings, show_progress=False)
        out["first_champion"] = {"version": first.model_version, "test_accuracy": first.test_accuracy,
                                 "seconds": round(time.time() - t0, 2)}  # fmt: skip
        traffic = Traffic(settings, self.workdir / "digits")
        in_stream = traffic.parts["test"]
        shifted = traffic.inverted(traffic.parts["train"] + traffic.parts["val"])
        held_out = traffic.inverted(traffic.parts["test"])

        # the processes
        logs = self.workdir / "logs"
        logs.mkdir()
        serve, serve_url = localstack.start_service("serve", ["serve"], env, logs)
        self.processes.append(serve)
        monitor, monitor_url = localstack.start_service("monitor", ["monitor"], env, logs)
        self.processes.append(monitor)
        loop_env = env | {"VISIONLOOP_LOOP__RELOAD_URLS": json.dumps([serve_url])}
        loop, loop_url = localstack.start_service("loop", ["loop"], loop_env, logs)
        self.processes.append(loop)
        if self.trigger == "alert":
            targets = {"visionloop-serve": localstack.host_port(serve_url),
                       "visionloop-monitor": localstack.host_port(monitor_url),
                       "visionloop-loop": localstack.host_port(loop_url)}  # fmt: skip
            prometheus, alertmanager, _, _ = localstack.start_alerting(
                self.workdir / "alerting", targets, loop_url, _free_port(), _free_port()
            )
            self.processes += [alertmanager, prometheus]
        out["processes"] = {p.name: p.popen.pid for p in self.processes}
        out["logs"] = str(logs)
        self._say(f"{len(self.processes)} processes started ({', '.join(out['processes'])}); logs in {logs}")

        # 1. in-distribution: the test split once
        client = Client(serve_url, settings.serve.feedback_token)
        right, sent = client.send(traffic.parts["test"], "in-distribution test split")
        out["in_distribution_accuracy"] = right / sent
        out["in_distribution_images"] = sent
        self._say(
            f"first champion v{first.model_version}: in-distribution accuracy {right / sent:.4f} on {sent} images"
        )

        # 2. the in-distribution production stream
        self.sender = Sender(client, args.batch, args.batch / args.rate)
        self.sender.start()
        stream_start = self.sender.switch(in_stream, "in-distribution stream")
        if self.trigger == "schedule":
            self._first_scheduled_run(loop_url, stream_start)
            offset = float(np.random.default_rng(args.seed).uniform(0, args.interval))
            out["onset_offset_seconds"] = round(offset, 2)
            self._say(
                f"the shift starts {offset:.1f} s after that run ended (U(0, {args.interval:g}), seed {args.seed})"
            )
            onset_planned = out["first_scheduled_run"]["finished_at"] + offset
            while time.time() < onset_planned:
                self.sender.check()
                time.sleep(min(0.5, max(0.0, onset_planned - time.time())))
        else:
            time.sleep(args.warmup)
            check = self._wait("a drift check of the in-distribution stream",
                               lambda: (d := _get(f"{monitor_url}/drift")) and d["checked_at"] > stream_start + 2 and d,
                               60)  # fmt: skip
            runs = _get(f"{loop_url}/runs") or []
            out["in_distribution_check"] = {"status": check["status"], "drifted": check["drifted"],
                                            "reasons": check["reasons"][:3], "loop_runs": len(runs)}  # fmt: skip
            if check["drifted"] or runs:
                raise VisionloopError(f"in-distribution traffic started something: {out['in_distribution_check']}")
            self._say(f"in-distribution stream for {args.warmup:g} s: monitor {check['status']}, no loop run")
        out["in_distribution_stream_images"] = self.sender.sent.get("in-distribution stream", 0)

        # 3. the onset
        probe = Client(serve_url, settings.serve.feedback_token)  # the main thread's own HTTP session
        before = probe.served()
        onset = self.sender.switch(shifted, "shifted")
        out["served_at_onset"] = before
        self._say(f"onset: inverted digits, {args.batch} every {args.batch / args.rate:.2f} s, serving v{before}")
        self._after_onset(client, probe, onset, before, monitor_url, loop_url, serve_url, held_out)
        self.sender.stop()
        log = list(client.log)
        shifted_log = [e for e in log if e[1] == "shifted"]
        sent_until = log[-1][0] if log else onset
        out["shifted_images_sent"] = len(shifted_log)
        out["shifted_seconds"] = round(sent_until - onset, 2)
        out["achieved_rate"] = round(len(shifted_log) / max(sent_until - onset, 1e-9), 1)
        by_first = [c for _, _, v, c in shifted_log if v == before]
        out["shifted_accuracy_before"] = float(np.mean(by_first)) if by_first else None
        out["shifted_answers_by_first_champion"] = len(by_first)
        runs = _get(f"{loop_url}/runs?limit=50") or []
        out["loop_runs"] = [_brief(r, onset) for r in reversed(runs)]
        for champion in out["champions_after_onset"]:  # which run made it, and when that run started
            made = next((r for r in out["loop_runs"] if r["version"] == champion["version"]), None)
            champion["run"] = (
                None if made is None else {k: made[k] for k in ("id", "trigger", "created_after_onset_s", "result")}
            )

    def _first_scheduled_run(self, loop_url: str, since: float) -> None:
        args = self.args

        def created() -> dict[str, Any] | None:
            return next((r for r in _get(f"{loop_url}/runs") or [] if r["trigger"] == "schedule"), None)

        run = self._wait("the first scheduled run to start", created, 180)
        self._say(f"first scheduled run {run['id']} started {run['created_at'] - since:.1f} s into the stream")

        def ended() -> dict[str, Any] | None:
            found = _get(f"{loop_url}/runs/{run['id']}")
            return found if found and found["phase"] == "done" else None

        done = self._wait(f"scheduled run {run['id']} to end", ended, 900 if not args.quick else 600, 0.5)
        self.out["first_scheduled_run"] = {
            "id": done["id"], "created_at": done["created_at"], "finished_at": done["finished_at"],
            "seconds": round(done["finished_at"] - done["created_at"], 2), "result": done["result"],
            "gate": (done["data"].get("gate") or {}).get("reasons"),
        }  # fmt: skip
        self._say(f"first scheduled run ended {done['result']} after {done['finished_at'] - done['created_at']:.1f} s")

    def _after_onset(
        self, client: Client, probe: Client, onset: float, before: str, monitor_url: str, loop_url: str, serve_url: str,
        held_out: list[tuple[bytes, int]],
    ) -> None:  # fmt: skip
        args, out = self.args, self.out
        baseline = self.trigger == "schedule"
        deadline = onset + (2 * args.interval + 300 if baseline else 600)
        detected: dict[str, Any] | None = None
        started: dict[str, Any] | None = None
        champions: list[dict[str, Any]] = []  # every version that served after the onset, in order
        current = before
        while time.time() < deadline:
            assert self.sender is not None
            self.sender.check()
            now = time.time()
            try:
                if detected is None:
                    drift = _get(f"{monitor_url}/drift")
                    if drift and drift.get("drifted") and drift["checked_at"] > onset:
                        at = drift["checked_at"]
                        samples = sum(1 for t, p, _, _ in list(client.log) if p == "shifted" and t <= at)
                        detected = {
                            "seconds": round(at - onset, 2),
                            "samples": samples,
                            "reasons": drift["reasons"][:3],
                        }
                        self._say(f"monitor: drift after {samples} shifted images, {at - onset:.1f} s")
                if started is None:
                    runs = _get(f"{loop_url}/runs") or []
                    run = next(
                        (r for r in reversed(runs) if r["trigger"] != "promotion" and r["created_at"] > onset), None
                    )
                    if run is not None:
                        started = {"id": run["id"], "trigger": run["trigger"], "reason": run["reason"],
                                   "seconds": round(run["created_at"] - onset, 2)}  # fmt: skip
                        self._say(
                            f"loop run {run['id']} ({run['trigger']}) started {run['created_at'] - onset:.1f} s after the onset"
                        )
                served = probe.served()
                if served and served != current:
                    seen = time.time()
                    accuracy, versions = predict_only(serve_url, held_out)
                    record = {"version": served, "seconds": round(seen - onset, 2), "inverted_test_accuracy": accuracy,
                              "answered_by": versions,
                              "shifted_images_until": sum(1 for t, p, _, _ in list(client.log) if p == "shifted" and t <= seen)}  # fmt: skip
                    current = served
                    if served != before:
                        champions.append(record)
                        self._say(
                            f"v{served} serves {seen - onset:.1f} s after the onset: inverted test accuracy {accuracy:.4f}"
                        )
                        if not baseline or self._recovered(accuracy):
                            break
                    else:
                        self._say(
                            f"v{served} (the champion at the onset) serves again {seen - onset:.1f} s after the onset"
                        )
            except requests.RequestException as exc:  # a service slow to answer while training: look again
                self._say(f"[yellow]a poll failed ({type(exc).__name__}); looking again[/]")
            time.sleep(max(0.0, 0.25 - (time.time() - now)))
        else:
            self._say(f"[red]no recovered champion within {deadline - onset:.0f} s of the onset[/]")
        out["detection"] = detected
        out["run_started"] = started
        out["champions_after_onset"] = champions
        out["deadline_seconds"] = round(deadline - onset, 1)
        first = champions[0] if champions else None
        recovered = next((c for c in champions if self._recovered(c["inverted_test_accuracy"])), None)
        out["new_champion"] = first
        out["recovered_champion"] = recovered

    def _recovered(self, accuracy: float) -> bool:
        return self.out["in_distribution_accuracy"] - accuracy <= TARGET_POINTS + 1e-9


def _brief(run: dict[str, Any], onset: float) -> dict[str, Any]:
    data = run.get("data") or {}
    analysis = data.get("analysis") or {}
    return {
        "id": run["id"], "trigger": run["trigger"], "reason": run["reason"], "phase": run["phase"],
        "result": run["result"], "created_after_onset_s": round(run["created_at"] - onset, 2),
        "finished_after_onset_s": None if run["finished_at"] is None else round(run["finished_at"] - onset, 2),
        "version": data.get("version"), "gate": (data.get("gate") or {}).get("reasons"),
        "production_train": (data.get("lineage") or {}).get("train"),
        "analysis": analysis.get("phase"), "rollback": (data.get("rollback") or {}).get("reason"),
    }  # fmt: skip


# ------------------------------------------------------------------------------------------------ output
def _fmt(value: Any, unit: str = "", digits: int = 1) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}{unit}"
    return f"{value}{unit}"


def _started(champion: dict[str, Any]) -> str:
    run = champion.get("run")
    if not run:
        return "run not found"
    when = run["created_after_onset_s"]
    return f"{when:+.1f} s, {run['trigger']}" + (f", {run['result']}" if run["result"] else "")


def print_table(a: dict[str, Any], b: dict[str, Any], args: argparse.Namespace) -> None:
    table = Table(title="from the onset of the shift (inverted digits), one run, two arms", title_justify="left")
    table.add_column("")
    table.add_column(f"closed loop ({a['trigger']})", justify="right")
    table.add_column(f"baseline (schedule every {args.interval:g} s)", justify="right")

    def row(label: str, get: Any) -> None:
        values = []
        for arm in (a, b):
            try:
                values.append(get(arm))
            except (KeyError, TypeError, IndexError):
                values.append("—")
        table.add_row(label, *values)

    row("first champion: test accuracy of the pipeline", lambda r: _fmt(r["first_champion"]["test_accuracy"], digits=4))
    row("in-distribution accuracy (test split, served)", lambda r: _fmt(r["in_distribution_accuracy"], digits=4))
    row("in-distribution stream before the onset", lambda r: f"{r['in_distribution_stream_images']} images")
    row("first scheduled run (before the onset)",
        lambda r: f"{r['first_scheduled_run']['result']}, {r['first_scheduled_run']['seconds']:.1f} s")  # fmt: skip
    row("onset after that run ended (seeded U(0, interval))", lambda r: _fmt(r["onset_offset_seconds"], " s"))
    row("shifted samples until the first drifted check", lambda r: _fmt(r["detection"]["samples"]))
    row("seconds until the first drifted check", lambda r: _fmt(r["detection"]["seconds"], " s"))
    row(
        "seconds until the loop starts its run",
        lambda r: f"{r['run_started']['seconds']:.1f} s ({r['run_started']['trigger']})",
    )
    row("seconds until a new champion serves (its run started)", lambda r: f"{r['new_champion']['seconds']:.1f} s ("
        + _started(r["new_champion"]) + ")")  # fmt: skip
    row(
        "  its accuracy on the inverted test split",
        lambda r: _fmt(r["new_champion"]["inverted_test_accuracy"], digits=4),
    )
    row("seconds until a recovered champion serves (its run started)",
        lambda r: f"{r['recovered_champion']['seconds']:.1f} s (" + _started(r["recovered_champion"]) + ")"
        if r["recovered_champion"] else "none: the new champion is not within 2 points" if r["trigger"] != "schedule"
        else f"none in {r['deadline_seconds']:.0f} s")  # fmt: skip
    row("  its accuracy on the inverted test split",
        lambda r: _fmt(r["recovered_champion"]["inverted_test_accuracy"], digits=4))  # fmt: skip
    row("  shifted images sent until it served", lambda r: _fmt(r["recovered_champion"]["shifted_images_until"]))
    row("accuracy on the shifted stream before (first champion)",
        lambda r: f"{r['shifted_accuracy_before']:.4f} ({r['shifted_answers_by_first_champion']} answers)")  # fmt: skip
    row("shifted images sent in all / achieved rate",
        lambda r: f"{r['shifted_images_sent']} in {r['shifted_seconds']:.0f} s / {r['achieved_rate']:.0f} img/s")  # fmt: skip
    row("loop runs after the onset",
        lambda r: ", ".join(f"{x['trigger']} {x['result'] or x['phase']}" for x in r["loop_runs"]
                            if x["created_after_onset_s"] > 0) or "none")  # fmt: skip
    console.print(table)


def summarise(a: dict[str, Any], b: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    rec_a, rec_b = a.get("recovered_champion"), b.get("recovered_champion")
    if rec_a and rec_b:
        out["ratio"] = rec_b["seconds"] / rec_a["seconds"]
        console.print(f"ratio (baseline / closed loop, onset → recovered champion serving): "
                      f"{rec_b['seconds']:.1f} s / {rec_a['seconds']:.1f} s = [bold]{out['ratio']:.2f}x[/]")  # fmt: skip
    elif rec_a:
        out["ratio_at_least"] = b["deadline_seconds"] / rec_a["seconds"]
        console.print(f"ratio: the baseline recovered nothing in {b['deadline_seconds']:.0f} s: at least "
                      f"{out['ratio_at_least']:.2f}x")  # fmt: skip
    else:
        console.print("ratio: the closed loop's new champion did not recover (within 2 points): no ratio to a "
                      "recovered champion")  # fmt: skip
    # to the first new champion made by a run that started after the onset (recovered or not)
    after_a, after_b = (next((c for c in arm.get("champions_after_onset", [])
                              if c.get("run") and c["run"]["created_after_onset_s"] > 0), None) for arm in (a, b))  # fmt: skip
    if after_a and after_b:
        out["ratio_first_retrained_after_onset"] = after_b["seconds"] / after_a["seconds"]
        console.print(f"ratio to the first champion retrained after the onset (recovered or not): {after_b['seconds']:.1f} s "
                      f"/ {after_a['seconds']:.1f} s = {out['ratio_first_retrained_after_onset']:.2f}x "
                      f"(inverted test accuracy {after_b['inverted_test_accuracy']:.4f} / "
                      f"{after_a['inverted_test_accuracy']:.4f})")  # fmt: skip
    started = a.get("run_started") or {}
    if started:
        console.print(f"closed loop's run: {started['trigger']} — {started['reason']}")
    # the targets (closed loop)
    seconds = rec_a["seconds"] if rec_a else None
    after = (a.get("new_champion") or {}).get("inverted_test_accuracy")
    gap = None if after is None else a["in_distribution_accuracy"] - after
    out["targets"] = {
        "onset_to_recovered_under_180_s": {"value": seconds, "met": seconds is not None and seconds < TARGET_SECONDS},
        "after_within_2_points": {"in_distribution": a["in_distribution_accuracy"], "after": after, "gap": gap,
                                  "met": gap is not None and gap <= TARGET_POINTS + 1e-9},
    }  # fmt: skip
    for label, target in (("onset → recovered champion < 180 s", out["targets"]["onset_to_recovered_under_180_s"]),
                          ("shifted accuracy after within 2 points of in-distribution",
                           out["targets"]["after_within_2_points"])):  # fmt: skip
        colour, word = ("green", "met") if target["met"] else ("red", "NOT met")
        if "gap" in target:
            detail = "no new champion" if target["gap"] is None else (
                f"{target['after']:.4f} after against {target['in_distribution']:.4f} in-distribution, "
                f"{target['gap'] * 100:+.2f} points")  # fmt: skip
        else:
            detail = "no recovered champion" if target["value"] is None else f"{target['value']:.1f} s"
        console.print(f"  target {label}: [{colour}]{word}[/] ({detail})")
    # expected baseline wait (arithmetic on measured parts)
    retrain = None
    if rec_b and b.get("loop_runs"):
        promoted = next((r for r in b["loop_runs"] if r["version"] == rec_b["version"]), None)
        if promoted:
            retrain = rec_b["seconds"] - promoted["created_after_onset_s"]
    if retrain is None and b.get("first_scheduled_run"):
        retrain = b["first_scheduled_run"]["seconds"]
    ref = rec_a or a.get("new_champion")
    ref_label = "recovered champion" if rec_a else "new (not recovered) champion"
    if retrain is not None:
        period = max(args.interval, retrain)  # a retrain longer than the interval: runs start back to back
        expected = period / 2 + retrain
        out["baseline_retrain_seconds"] = retrain
        out["baseline_expected_seconds"] = expected
        console.print(f"expected baseline wait for a uniformly placed onset (arithmetic on the measured retrain): "
                      f"period/2 + the retrain = {period / 2:.0f} + {retrain:.1f} = {expected:.1f} s (period = the "
                      f"interval, or the retrain where it is longer)"
                      + (f"; {expected / ref['seconds']:.2f}x the closed loop's {ref['seconds']:.1f} s to its {ref_label}"
                         if ref else ""))  # fmt: skip
        daily = DAY / 2 + retrain
        out["daily_schedule_expected_seconds"] = daily
        console.print(f"a daily schedule (arithmetic, not measured): the average wait from an onset to the next "
                      f"scheduled retrain is interval/2 = 43,200 s = 12 h, plus the retrain ({retrain:.0f} s here)"
                      + (f": about {daily / ref['seconds']:,.0f}x the closed loop's {ref['seconds']:.0f} s to its {ref_label}"
                         if ref else ""))  # fmt: skip
    return out


def machine() -> dict[str, Any]:
    import onnxruntime
    import torch

    import visionloop

    return {"cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "onnxruntime": onnxruntime.__version__, "visionloop": visionloop.__version__,
            "platform": platform.platform()}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--interval", type=float, default=None, help="baseline schedule, seconds (default 180; 60 --quick)"
    )
    parser.add_argument("--rate", type=float, default=80.0, help="images a second, with feedback (default 80)")
    parser.add_argument("--batch", type=int, default=16, help="images per tick (default 16: every 0.2 s at 80/s)")
    parser.add_argument("--warmup", type=float, default=20.0, help="closed loop: in-distribution stream seconds")
    parser.add_argument("--seed", type=int, default=0, help="the onset's offset in the baseline's schedule")
    parser.add_argument("--trigger", choices=("auto", "alert", "verdict"), default="auto",
                        help="closed loop: alert (Prometheus + Alertmanager) where installed (auto), else verdict")  # fmt: skip
    parser.add_argument("--arms", default="loop,schedule", help="which arms, in this order")
    parser.add_argument("--quick", action="store_true", help="smoke run: the demo's fast training, a 60 s interval")
    parser.add_argument("--workdir", type=Path, default=None, help="where the arms' homes go (default: a temp folder)")
    parser.add_argument("--keep", action="store_true", help="keep the homes and logs (kept anyway on failure)")
    parser.add_argument("--json-out", type=Path, default=DEFAULT_JSON)
    args = parser.parse_args()
    if args.interval is None:
        args.interval = 60.0 if args.quick else 180.0
    trigger = args.trigger
    if trigger == "auto":
        trigger = "alert" if localstack.alerting_binaries() is not None else "verdict"
    elif trigger == "alert" and localstack.alerting_binaries() is None:
        parser.error("--trigger alert: prometheus / prometheus-alertmanager are not installed")

    def interrupted(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupted)
    load_start = os.getloadavg()
    root = args.workdir or Path(tempfile.mkdtemp(prefix="loop-bench-"))
    root.mkdir(parents=True, exist_ok=True)
    console.print(
        f"closed loop: loop.triggers \\[\"{trigger}\"]"
        + (" — Prometheus + Alertmanager drive the loop's webhook" if trigger == "alert"
           else " — the monitor's verdict (Prometheus / Alertmanager not installed)" if args.trigger == "auto" else "")
        + f"; baseline: loop.triggers \\[\"schedule\"] every {args.interval:g} s, cool-down 0; traffic {args.batch} images every "
        f"{args.batch / args.rate:.2f} s ({args.rate:g} images/s) with feedback; training: "
        + ("the demo's fast settings (--quick)" if args.quick else "the default (full-size) settings")
        + f"; homes under {root}"
    )  # fmt: skip
    saved = {k: os.environ.pop(k) for k in list(os.environ) if k.startswith(("VISIONLOOP_", "MLFLOW_"))}
    results: dict[str, Any] = {"args": {k: str(v) for k, v in vars(args).items()}, "closed_loop_trigger": trigger,
                               "machine": machine(), "load_start": load_start, "arms": {}}  # fmt: skip
    started, ok = time.time(), False
    try:
        for name in args.arms.split(","):
            arm = Arm("closed loop" if name == "loop" else "baseline", root / name, args,
                      trigger if name == "loop" else "schedule")  # fmt: skip
            t0 = time.time()
            try:
                results["arms"][name] = arm.run()
            except (VisionloopError, requests.RequestException) as exc:
                arm.out["error"] = str(exc)
                results["arms"][name] = arm.out
                console.print(f"[red]{arm.name} failed: {exc}[/] (logs: {arm.workdir / 'logs'})")
            results["arms"][name]["arm_seconds"] = round(time.time() - t0, 1)
        a, b = results["arms"].get("loop", {}), results["arms"].get("schedule", {})
        print_table(a, b, args)
        if a and b and "error" not in a and "error" not in b:
            results["summary"] = summarise(a, b, args)
            ok = True
    finally:
        os.environ.update(saved)
        results["total_seconds"] = round(time.time() - started, 1)
        results["load_end"] = print_load(console, load_start)
        from visionloop.fsutil import atomic_write_json

        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(TypeError, ValueError):
            atomic_write_json(args.json_out, json.loads(json.dumps(results, default=str)))
        console.print(f"wrote {args.json_out} in {results['total_seconds']:.0f} s")
        if ok and not args.keep and args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
        else:
            console.print(f"homes and logs kept in {root}")


if __name__ == "__main__":
    main()
