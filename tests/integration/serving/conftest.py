"""Fixtures for the serving tests: a real registry with real exported models, and a real server.

- ``serving_helpers.publish`` / ``settings_for``: register an export the way the pipeline does, and
  settings with a fresh registered-model name (imported by the tests as plain functions).
- ``start_server(settings_or_home, *args, env=None) -> ServerProcess``: ``visionloop serve --port 0``
  as a subprocess; waits for the "listening on" banner and returns its URL. Stopped (SIGTERM, by PID)
  at the end of the test or module that started it.
- ``champion_server``: one server for a whole module, serving ``strong_export`` as champion.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import pytest
from serving_helpers import publish, settings_for  # this folder is on sys.path (no __init__.py)

from visionloop.config import Settings
from visionloop.data.preprocess import Dataset

_SCRIPT = Path(sys.executable).with_name("visionloop")
COMMAND = [str(_SCRIPT)] if _SCRIPT.is_file() else [sys.executable, "-m", "visionloop.cli"]


def server_env(home: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VISIONLOOP_", "MLFLOW_"))}
    env["VISIONLOOP_HOME"] = str(home)
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    return env


@dataclass
class ServerProcess:
    process: subprocess.Popen[str]
    url: str = ""
    lines: list[str] = field(default_factory=list)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.process.wait(timeout=timeout)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    def client(self, timeout: float = 30) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=timeout)

    def wait_for(self, pattern: str, timeout: float = 30) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for line in list(self.lines):
                if re.search(pattern, line):
                    return line
            time.sleep(0.1)
        raise AssertionError(f"server never logged {pattern!r}:\n{self.log}")


def launch(
    home: Path, *args: str, env: dict[str, str] | None = None, command: list[str] | None = None, timeout: float = 90
) -> ServerProcess:
    """``visionloop serve --port 0 ARGS`` (``command`` replaces ``visionloop``), once it says where it listens."""
    process = subprocess.Popen(
        [*(command or COMMAND), "serve", "--port", "0", *args],
        env=env or server_env(home),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = ServerProcess(process)
    found: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert process.stdout is not None
        for line in process.stdout:
            server.lines.append(line)
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                found.put(match.group(1))

    threading.Thread(target=pump, daemon=True).start()
    try:
        server.url = found.get(timeout=timeout)
    except queue.Empty:
        server.stop(signal.SIGKILL)
        raise AssertionError(f"visionloop serve did not start:\n{server.log}") from None
    return server


@pytest.fixture
def start_server() -> Iterator[Callable[..., ServerProcess]]:
    started: list[ServerProcess] = []

    def start(
        settings: Settings, *args: str, env: dict[str, str] | None = None, command: list[str] | None = None
    ) -> ServerProcess:
        server = launch(settings.home, "--model-name", settings.registry.model_name, *args, env=env, command=command)
        started.append(server)
        return server

    yield start
    for server in started:
        server.stop(signal.SIGKILL) if server.process.poll() is None else None


@pytest.fixture(scope="module")
def champion_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("serving-home")


@pytest.fixture(scope="module")
def champion_settings(champion_home: Path, strong_export: Path, digits_dataset: Dataset) -> Settings:
    settings = settings_for(champion_home, "champion-model")
    version, promoted = publish(settings, strong_export, digits_dataset)
    assert promoted and version == "1"
    return settings


@pytest.fixture(scope="module")
def champion_server(champion_settings: Settings) -> Iterator[ServerProcess]:
    server = launch(
        champion_settings.home, "--model-name", champion_settings.registry.model_name, "--poll-seconds", "0"
    )
    yield server
    server.stop()


@pytest.fixture(scope="module")
def digit_png(digits_dataset: Dataset) -> tuple[bytes, int]:
    """A test-split digit as PNG bytes (grey, 16x16) and its true class index."""
    import io

    from PIL import Image

    x_test, y_test = digits_dataset.part("test")
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(x_test[0][0])).save(buffer, format="PNG")
    return buffer.getvalue(), int(y_test[0])
