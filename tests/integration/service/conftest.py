"""Fixtures of the HTTP-hygiene tests; the helpers they share with the tests are in ``service_helpers.py``
(a module of its own name: a test cannot import from ``conftest``, whose name every test folder shares)."""

from __future__ import annotations

import json
import queue
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator

import pytest
from service_helpers import HERE, Server, clean_env


@pytest.fixture(scope="module")
def launch() -> Iterator[Callable[..., Server]]:
    started: list[Server] = []

    def start(command: list[str], env: dict[str, str] | None = None, timeout: float = 90) -> Server:
        process = subprocess.Popen(
            command, env=env or clean_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        server = Server(process)
        started.append(server)
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
            raise AssertionError(f"{command} did not start:\n{server.log}") from None
        return server

    yield start
    for server in started:
        if server.process.poll() is None:
            server.process.send_signal(signal.SIGTERM)
            try:
                server.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                server.process.kill()
                server.process.wait(timeout=30)


@pytest.fixture(scope="module")
def guarded_app(launch: Callable[..., Server]) -> Callable[..., Server]:
    def start(**http: object) -> Server:
        return launch([sys.executable, str(HERE / "guarded_app.py"), json.dumps(http)])

    return start
