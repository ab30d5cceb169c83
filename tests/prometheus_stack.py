"""A real monitoring stack on 127.0.0.1 for the tests: Debian's Prometheus and Alertmanager run on configs made
from deploy/monitoring (ports, intervals and the receiver URL changed, nothing else), a webhook receiver in a
thread, helpers to run `visionloop serve` / `visionloop monitor` and to ask Prometheus questions, and the
expressions of the rules and dashboards (``rule_expressions``, ``panel_queries``; ``loop_expressions``, those
that read the closed loop's metrics and so have data only where a `visionloop loop` is scraped).

Every process is started here and stopped by its PID; every wait is bounded.
"""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from localhost import VISIONLOOP  # tests/localhost.py (tests/ is on sys.path)

ROOT = Path(__file__).resolve().parents[1]
MONITORING = ROOT / "deploy" / "monitoring"
RULES = MONITORING / "prometheus" / "rules" / "visionloop.rules.yml"
DASHBOARDS = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))
# an expression on the loop's metrics: only a scraped `visionloop loop` gives it data
LOOP_METRICS = re.compile(r'\bvisionloop_loop_\w+|job\s*=~?\s*"visionloop-loop"')
# Grafana's variables, as a dashboard with "All" selected would send them (a range long enough for the test)
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "10m",
    "$instance": ".*",
    "$model_version": ".*",
}


def binary(*names: str) -> str:
    """The first of ``names`` on PATH; skip (fail under CI=true) when none is installed."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = f"{' / '.join(names)} is not installed (apt-get install -y --no-install-recommends prometheus prometheus-alertmanager)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def wait_until(what: str, probe: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    """Call ``probe`` until it returns something truthy (returned); fail naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = probe()
        except (httpx.HTTPError, OSError) as exc:
            last = exc
        else:
            if last:
                return last
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}; last answer: {last!r}")


@dataclass
class Process:
    """A process this test started, its output collected in a thread."""

    name: str
    process: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)

    @classmethod
    def start(cls, name: str, command: list[str], env: dict[str, str] | None = None) -> Process:
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        started = cls(name, process)
        threading.Thread(target=started._pump, daemon=True).start()
        return started

    def _pump(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def log(self) -> str:
        return "".join(self.lines[-200:])

    def wait_for_line(self, pattern: str, timeout: float) -> re.Match[str]:
        def found() -> re.Match[str] | None:
            if self.process.poll() is not None:
                raise AssertionError(f"{self.name} exited with {self.process.returncode}:\n{self.log}")
            return next((m for line in list(self.lines) if (m := re.search(pattern, line))), None)

        try:
            return wait_until(f"{self.name} to print {pattern!r}", found, timeout, every=0.1)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.log}") from None

    def stop(self, timeout: float = 30) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)


def start_visionloop(name: str, args: list[str], env: dict[str, str], timeout: float = 120) -> tuple[Process, str]:
    """``visionloop ARGS --port 0``; returns the process and the URL from its "listening on" banner."""
    process = Process.start(name, [*VISIONLOOP, *args, "--port", "0"], env)
    try:
        url = process.wait_for_line(r"listening on (http://[\d.]+:\d+)", timeout).group(1)
    except AssertionError:
        process.stop()
        raise
    return process, url


class WebhookReceiver:
    """Alertmanager's webhook target: keeps every POSTed JSON body."""

    def __init__(self) -> None:
        self.bodies: queue.Queue[dict] = queue.Queue()
        self.received: list[dict] = []
        received = self.bodies

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                received.put({"path": self.path, **json.loads(body)})
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args: object) -> None:  # keep the test output quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def wait_for(self, match: Callable[[dict], bool], timeout: float) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                body = self.bodies.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                break
            self.received.append(body)
            if match(body):
                return body
        names = [[a["labels"].get("alertname") for a in b.get("alerts", [])] for b in self.received]
        raise AssertionError(f"no matching notification in {timeout:g} s; received alerts: {names}")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def prometheus_config(
    folder: Path, serve: str, monitor: str, prometheus: str, alertmanager: str, loop: str | None = None
) -> Path:
    """deploy/monitoring/prometheus/prometheus.yml with the real addresses and a 1 s scrape/evaluation, and the
    rules copied with every ``for:`` shortened to 2 s (the expressions unchanged). Without ``loop`` (no
    `visionloop loop` in the test) its job is left out: nothing to scrape, the loop's expressions stay empty."""
    config = yaml.safe_load((MONITORING / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    targets = {"visionloop-serve": serve, "visionloop-monitor": monitor, "visionloop-loop": loop}
    targets["prometheus"] = prometheus
    config["scrape_configs"] = [job for job in config["scrape_configs"] if targets[job["job_name"]] is not None]
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    config["alerting"]["alertmanagers"] = [{"static_configs": [{"targets": [alertmanager]}]}]
    rules = yaml.safe_load(RULES.read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = "2s"
    (folder / "visionloop.rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    config["rule_files"] = [str(folder / "visionloop.rules.yml")]
    path = folder / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def alertmanager_config(folder: Path, webhook_url: str) -> Path:
    """deploy/monitoring/alertmanager/alertmanager.yml with the loop's URL pointed at ``webhook_url`` and the
    group waits at a second (routing, grouping and inhibition unchanged)."""
    config = yaml.safe_load((MONITORING / "alertmanager" / "alertmanager.yml").read_text())
    for route in [config["route"], *config["route"].get("routes", [])]:
        route.update(group_wait="1s", group_interval="1s")
    for receiver in config["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            webhook["url"] = webhook_url
    path = folder / "alertmanager.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def start_prometheus(folder: Path, config: Path, address: str) -> Process:
    process = Process.start(
        "prometheus",
        [
            binary("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={folder / 'tsdb'}",
            f"--web.listen-address={address}", "--log.level=warn",
        ],
    )  # fmt: skip
    _wait_ready(process, f"http://{address}")
    return process


def start_alertmanager(folder: Path, config: Path, address: str) -> Process:
    process = Process.start(
        "alertmanager",
        [
            binary("prometheus-alertmanager", "alertmanager"), f"--config.file={config}",
            f"--storage.path={folder / 'alertmanager'}", f"--web.listen-address={address}",
            "--cluster.listen-address=",  # no HA gossip: nothing listens beyond 127.0.0.1
            "--log.level=warn",
        ],
    )  # fmt: skip
    _wait_ready(process, f"http://{address}")
    return process


def _wait_ready(process: Process, url: str) -> None:
    def ready() -> bool:
        if process.process.poll() is not None:
            raise AssertionError(f"{process.name} exited with {process.process.returncode}:\n{process.log}")
        return httpx.get(f"{url}/-/ready", timeout=2).status_code == 200

    try:
        wait_until(f"{process.name} to be ready", ready, timeout=30, every=0.2)
    except AssertionError:
        process.stop()
        raise


class PromAPI:
    def __init__(self, url: str) -> None:
        self.client = httpx.Client(base_url=url, timeout=30)

    def query(self, expr: str) -> list[dict]:
        """The instant vector (or scalar as one sample) of ``expr`` now; raises on a query error."""
        answer = self.client.get("/api/v1/query", params={"query": expr})
        body = answer.json()
        if answer.status_code != 200 or body.get("status") != "success":
            raise AssertionError(f"{expr}\n  -> {answer.status_code} {body.get('errorType')}: {body.get('error')}")
        data = body["data"]
        return data["result"] if data["resultType"] in ("vector", "matrix") else [{"value": data["result"]}]

    def alerts(self) -> list[dict]:
        return self.client.get("/api/v1/alerts").json()["data"]["alerts"]

    def label_values(self, label: str, match: str) -> list[str]:
        return self.client.get(f"/api/v1/label/{label}/values", params={"match[]": match}).json()["data"]


def substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def rule_expressions() -> list[tuple[str, str]]:
    """(rule name, PromQL) of every alerting and recording rule."""
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [(r.get("alert") or r["record"], r["expr"]) for g in groups for r in g["rules"]]


def panel_queries() -> list[tuple[str, str, str]]:
    """(dashboard, panel title, PromQL with the variables filled in) of every target."""
    out = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        panels = [p for top in dashboard["panels"] for p in (top, *top.get("panels", []))]
        for panel in panels:
            out.extend((path.stem, panel["title"], substitute(t["expr"])) for t in panel.get("targets", []))
    return out


def uses_loop(expr: str) -> bool:
    """Whether ``expr`` reads the closed loop's metrics (visionloop_loop_*, or anything of job visionloop-loop)."""
    return LOOP_METRICS.search(expr) is not None


def loop_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every rule and dashboard target on the loop's metrics: "rule <name>" or
    "<dashboard> / <panel title>" (variables filled in). A stack without a `visionloop loop` can only check that
    they evaluate; one with a real loop can assert that they return data."""
    rules = [(f"rule {name}", expr) for name, expr in rule_expressions() if uses_loop(expr)]
    panels = [(f"{dashboard} / {title}", expr) for dashboard, title, expr in panel_queries() if uses_loop(expr)]
    return rules + panels
