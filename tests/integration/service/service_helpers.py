"""Real server processes for the HTTP-hygiene tests, and the raw sockets that play hostile clients.

- ``launch(command, env=None) -> Server``: runs ``command`` (it must print ``listening on http://…``),
  collects its stdout and stderr in ``Server.lines``; every process started is stopped by PID at the end;
- ``guarded_app(**http) -> Server``: ``guarded_app.py`` (this folder) with those ``http.*`` settings;
- ``raw(url)``: a connected socket to the server; ``read_all(sock)``: what the server sends until it closes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx

HERE = Path(__file__).parent


@dataclass
class Server:
    process: subprocess.Popen[str]
    url: str = ""
    lines: list[str] = field(default_factory=list)

    @property
    def log(self) -> str:
        return "".join(self.lines)

    @property
    def port(self) -> int:
        return urlsplit(self.url).port or 80

    def metric(self, name: str, **labels: str) -> float:
        """A sample of the server's /metrics (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        text = httpx.get(f"{self.url}/metrics", timeout=30).text
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    return sample.value
        return 0.0

    def wait_for_metric(self, name: str, value: float, timeout: float = 30, **labels: str) -> float:
        deadline = time.monotonic() + timeout
        seen = self.metric(name, **labels)
        while seen < value and time.monotonic() < deadline:
            time.sleep(0.2)
            seen = self.metric(name, **labels)
        return seen


def clean_env(home: Path | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VISIONLOOP_", "MLFLOW_"))}
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    env["PYTHONUNBUFFERED"] = "1"
    if home is not None:
        env["VISIONLOOP_HOME"] = str(home)
    env.update(extra)
    return env


def raw(server: Server, timeout: float = 30) -> socket.socket:
    return socket.create_connection(("127.0.0.1", server.port), timeout=timeout)


def read_all(sock: socket.socket, timeout: float = 30) -> bytes:
    """Everything the server sends until it closes the connection (a reset counts as closed)."""
    sock.settimeout(timeout)
    data = b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except ConnectionResetError:
        pass
    return data
