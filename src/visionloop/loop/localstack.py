"""The whole stack as local processes, for ``visionloop demo`` and ``benchmarks/loop.py``.

``visionloop serve``, ``visionloop monitor`` and ``visionloop loop`` each start on a free port of 127.0.0.1
(``--port 0``; the URL is read from the banner), with one settings file. Where Debian's ``prometheus``
and ``prometheus-alertmanager`` are installed and the repository's ``deploy/monitoring`` is at hand,
they start too: Prometheus with the repository's rules (every ``for:`` shortened, the expressions
unchanged) and Alertmanager with the repository's routing, pointed at the loop's ``/alerts``, so the
drift alert reaches the loop the way it does in production. Every process is ended by its own PID.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import yaml

from visionloop.errors import VisionloopError

DEPLOY = Path(__file__).resolve().parents[3] / "deploy" / "monitoring"  # a source checkout (editable install)
URL = re.compile(r"listening on (http://[0-9.:\[\]a-z]+)")


def visionloop_command() -> list[str]:
    script = Path(sys.executable).with_name("visionloop")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "visionloop.cli"]


class Process:
    """A child process whose output goes to a log file (and is searched for its banner)."""

    def __init__(self, name: str, command: list[str], log_path: Path, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.log_path = log_path
        self._log: IO[str] = log_path.open("w", encoding="utf-8")
        self._text: list[str] = []
        self.popen = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True
        )
        self._pump = threading.Thread(target=self._read, name=f"log-{name}", daemon=True)
        self._pump.start()

    def _read(self) -> None:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            self._text.append(line)
            self._log.write(line)
            self._log.flush()

    @property
    def output(self) -> str:
        return "".join(self._text)

    def wait_for(self, pattern: re.Pattern[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = pattern.search(" ".join(self.output.split()))
            if found:
                return found
            if self.popen.poll() is not None:
                raise VisionloopError(f"{self.name} exited with {self.popen.returncode}; its log: {self.log_path}")
            time.sleep(0.1)
        raise VisionloopError(f"{self.name} did not start within {timeout:g} s; its log: {self.log_path}")

    def stop(self, timeout: float = 20) -> None:
        """SIGTERM to this process (by its PID), SIGKILL if it has not ended in ``timeout``."""
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.popen.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(self.popen.pid, signal.SIGKILL)
                self.popen.wait(10)
        self._pump.join(5)
        self._log.close()

    def kill(self) -> None:
        """SIGKILL, as a crash would: no cleanup runs."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.popen.pid, signal.SIGKILL)
        self.popen.wait(10)


def start_service(
    name: str, args: list[str], env: dict[str, str], logs: Path, timeout: float = 120
) -> tuple[Process, str]:
    """``visionloop ARGS --port 0``; returns the process and the URL its banner names."""
    process = Process(name, [*visionloop_command(), *args, "--port", "0"], logs / f"{name}.log", env)
    return process, process.wait_for(URL, timeout).group(1)


def wait_until(what: str, probe: Callable[[], Any], timeout: float, every: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = probe()
            if value:
                return value
        except Exception as exc:  # not up yet
            last = exc
        time.sleep(every)
    raise VisionloopError(f"timed out after {timeout:g} s waiting for {what}" + (f" ({last})" if last else ""))


def alerting_binaries() -> tuple[str, str] | None:
    """(prometheus, alertmanager) when both are installed and the repository's monitoring files are at hand."""
    prometheus = shutil.which("prometheus")
    alertmanager = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
    if prometheus and alertmanager and (DEPLOY / "prometheus" / "prometheus.yml").is_file():
        return prometheus, alertmanager
    return None


def host_port(url: str) -> str:
    return url.removeprefix("http://").rstrip("/")


def start_alerting(
    folder: Path,
    targets: dict[str, str],
    loop_url: str,
    prometheus_port: int,
    alertmanager_port: int,
    for_seconds: int = 5,
) -> tuple[Process, Process, str, str]:
    """Prometheus (the repository's scrape config and rules, ``for:`` at ``for_seconds``, a 1 s scrape) and
    Alertmanager (the repository's routing, 1 s group waits, the webhook at ``loop_url``/alerts)."""
    found = alerting_binaries()
    if found is None:
        raise VisionloopError(
            "prometheus / prometheus-alertmanager are not installed, or deploy/monitoring is not here"
        )
    prometheus_bin, alertmanager_bin = found
    folder.mkdir(parents=True, exist_ok=True)
    am_address, prom_address = f"127.0.0.1:{alertmanager_port}", f"127.0.0.1:{prometheus_port}"
    config = yaml.safe_load((DEPLOY / "alertmanager" / "alertmanager.yml").read_text())
    for route in [config["route"], *config["route"].get("routes", [])]:
        route.update(group_wait="1s", group_interval="5s")
    for receiver in config["receivers"]:
        for webhook in receiver.get("webhook_configs", []):
            webhook["url"] = f"{loop_url}/alerts"
    (folder / "alertmanager.yml").write_text(yaml.safe_dump(config, sort_keys=False))
    rules = yaml.safe_load((DEPLOY / "prometheus" / "rules" / "visionloop.rules.yml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            if "for" in rule:
                rule["for"] = f"{for_seconds}s"
    (folder / "visionloop.rules.yml").write_text(yaml.safe_dump(rules, sort_keys=False))
    scrape = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    scrape["global"].update(scrape_interval="1s", evaluation_interval="1s")
    targets = {**targets, "prometheus": prom_address}
    scrape["scrape_configs"] = [job for job in scrape["scrape_configs"] if job["job_name"] in targets]
    for job in scrape["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    scrape["alerting"]["alertmanagers"] = [{"static_configs": [{"targets": [am_address]}]}]
    scrape["rule_files"] = [str(folder / "visionloop.rules.yml")]
    (folder / "prometheus.yml").write_text(yaml.safe_dump(scrape, sort_keys=False))
    alertmanager = Process(
        "alertmanager",
        [alertmanager_bin, f"--config.file={folder / 'alertmanager.yml'}", f"--storage.path={folder / 'am'}",
         f"--web.listen-address={am_address}", "--cluster.listen-address=", "--log.level=warn"],
        folder / "alertmanager.log",
    )  # fmt: skip
    prometheus = Process(
        "prometheus",
        [prometheus_bin, f"--config.file={folder / 'prometheus.yml'}", f"--storage.tsdb.path={folder / 'tsdb'}",
         f"--web.listen-address={prom_address}", "--log.level=warn"],
        folder / "prometheus.log",
    )  # fmt: skip
    import urllib.request

    for process, url in (
        (alertmanager, f"http://{am_address}/-/ready"),
        (prometheus, f"http://{prom_address}/-/ready"),
    ):

        def ready(url: str = url, process: Process = process) -> bool:
            if process.popen.poll() is not None:
                raise VisionloopError(f"{process.name} exited; its log: {process.log_path}")
            with urllib.request.urlopen(url, timeout=2) as response:
                return response.status == 200

        wait_until(f"{process.name} to be ready", ready, 60)
    return prometheus, alertmanager, f"http://{prom_address}", f"http://{am_address}"
