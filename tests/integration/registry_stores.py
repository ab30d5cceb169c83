"""Real MLflow stores for the registry tests (this folder is on sys.path: no __init__.py).

- ``isolate(monkeypatch)``: no MLFLOW_TRACKING_URI, MLFLOW_HTTP_* or VISIONLOOP_* from the outside.
- ``make_settings(home, name=None, tracking_uri="", timeout_seconds=None, **gate)``: Settings with a
  registered-model name of its own (gate floor 0 unless given).
- ``register(settings, export_dir)``: what the pipeline's register step does; returns the new version.
- ``closed_port()``: a TCP port on 127.0.0.1 that nothing listens on (yet).
- ``postgres_database()``: a real PostgreSQL server with an empty ``mlflow`` database; yields its URL.
- ``MlflowServer(backend_store_uri, root)``: a real ``mlflow server`` that can be started, killed and
  started again on the same backend store and port.
"""

from __future__ import annotations

import itertools
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from visionloop import registry
from visionloop.config import Settings
from visionloop.fsutil import read_json

_names = itertools.count(1)


def isolate(monkeypatch: pytest.MonkeyPatch) -> None:
    """The store under test is the one in Settings, never one a developer has configured."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for key in [k for k in os.environ if k.startswith(("VISIONLOOP_", "MLFLOW_HTTP_"))]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")


def make_settings(
    home: Path, name: str | None = None, tracking_uri: str = "", timeout_seconds: float | None = None, **gate: float
) -> Settings:
    store = {"model_name": name or f"model-{next(_names)}", "tracking_uri": tracking_uri}
    if timeout_seconds is not None:
        store["timeout_seconds"] = timeout_seconds
    return Settings(home=home, registry=store, gate={"min_accuracy": 0.0, **gate})


def register(settings: Settings, export_dir: Path) -> registry.RegisteredVersion:
    """What the pipeline's register step does: a run, the model logged into it, a registered version."""
    card = read_json(export_dir / "model_card.json")
    run_id = registry.start_run(settings, "test-run", {"dataset_version": card["dataset"]["version"]})
    tags = {"dataset_version": card["dataset"]["version"], "test_accuracy": "0.123456"}
    version = registry.register_onnx(settings, run_id, export_dir, card, tags)
    registry.set_run_status(run_id, "FINISHED")
    return version


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_health(url: str, process: subprocess.Popen, log: Path, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"mlflow server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def _stop_group(process: subprocess.Popen, first: signal.Signals) -> None:
    # a server and its workers share the process group we started it in
    if process.poll() is None:
        os.killpg(process.pid, first)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


@contextmanager
def postgres_database() -> Iterator[str]:
    """A real PostgreSQL server on 127.0.0.1 with an empty ``mlflow`` database: the production backend."""
    initdb, postgres = shutil.which("initdb"), shutil.which("postgres")
    if initdb is None or postgres is None:
        missing = "PostgreSQL server binaries (initdb, postgres) are not installed (Debian: postgresql)"
        if os.environ.get("CI") == "true":  # CI installs what make test needs (.ci/run): missing is a failure
            pytest.fail(missing)
        pytest.skip(missing)
    import psycopg

    root = Path(tempfile.mkdtemp(prefix="visionloop-pg-", dir="/tmp"))
    # postgres refuses to run as root: as root, the cluster belongs to the unprivileged 'postgres' user
    run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
    if run_as:
        shutil.chown(root, "postgres", "postgres")
    subprocess.run(
        [*run_as, initdb, "-D", str(root / "db"), "-U", "mlflow", "--auth=trust", "-E", "UTF8"],
        check=True,
        capture_output=True,
    )
    port = closed_port()
    server = subprocess.Popen(
        [
            *run_as,
            postgres,
            "-D",
            str(root / "db"),
            "-p",
            str(port),
            "-k",
            str(root),
            "-c",
            "listen_addresses=127.0.0.1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                connection = psycopg.connect(host="127.0.0.1", port=port, user="mlflow", dbname="postgres")
                break
            except psycopg.OperationalError:
                assert server.poll() is None, "postgres exited at start"
                assert time.monotonic() < deadline, "postgres did not accept connections within 60 s"
                time.sleep(0.2)
        connection.autocommit = True
        with connection.cursor() as cursor:
            cursor.execute("CREATE DATABASE mlflow")
        connection.close()
        yield f"postgresql://mlflow@127.0.0.1:{port}/mlflow"
    finally:
        _stop_group(server, signal.SIGINT)  # postgres' "fast shutdown"
        shutil.rmtree(root, ignore_errors=True)


class MlflowServer:
    """``mlflow server`` on 127.0.0.1 over ``backend_store_uri``, serving artifacts from ``root``."""

    def __init__(self, backend_store_uri: str, root: Path) -> None:
        self.backend_store_uri = backend_store_uri
        self.root = root
        self.artifacts = root / "server-artifacts"
        self.log = root / "server.log"
        self.port = closed_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        command = [
            str(Path(sys.executable).parent / "mlflow"),
            "server",
            "--backend-store-uri",
            self.backend_store_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.artifacts),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
        ]
        env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
        with self.log.open("ab") as log_file:
            self.process = subprocess.Popen(
                command, stdout=log_file, stderr=subprocess.STDOUT, cwd=self.root, env=env, start_new_session=True
            )
        wait_for_health(f"{self.url}/health", self.process, self.log)

    def kill(self) -> None:
        """SIGKILL, as a crash or an OOM kill would: no chance to finish anything."""
        if self.process is not None:
            _stop_group(self.process, signal.SIGKILL)

    def stop(self) -> None:
        if self.process is not None:
            _stop_group(self.process, signal.SIGTERM)


@contextmanager
def running_server(backend_store_uri: str, root: Path) -> Iterator[MlflowServer]:
    server = MlflowServer(backend_store_uri, root)
    try:
        server.start()
        yield server
    finally:
        server.stop()
