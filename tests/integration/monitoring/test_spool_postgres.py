"""Nothing answered is lost: ``visionloop serve`` on a real PostgreSQL that goes down, then SIGTERM.

The rolling-deploy-during-a-database-blip case, repeated: each cycle stops PostgreSQL (``pg_ctl stop -m
fast``, our own cluster), sends predictions that are all answered 200, SIGTERMs the server and checks it
exits 0, then starts PostgreSQL again. The next server (or a second replica sharing the home's spool)
replays the spool. At the end the store holds every answered prediction exactly once, and the spool is
empty. Without the spool the writer dropped whatever was queued at SIGTERM.

Without the PostgreSQL server binaries the module skips, and fails when CI=true.
"""

from __future__ import annotations

import importlib.util
import io
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image
from registry_stores import closed_port  # tests/integration is on sys.path (no __init__.py)

from visionloop.data.preprocess import Dataset

_SERVING = Path(__file__).resolve().parents[1] / "serving"
sys.path.insert(0, str(_SERVING))
from serving_helpers import publish, settings_for  # noqa: E402

_spec = importlib.util.spec_from_file_location("serving_conftest", _SERVING / "conftest.py")
serving = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules.setdefault("serving_conftest", serving)  # dataclasses look their module up there
_spec.loader.exec_module(serving)  # type: ignore[union-attr]

CYCLES = 3
PER_CYCLE = 40  # requests of 5 images each while PostgreSQL is down: 200 predictions a cycle
IMAGES_PER_REQUEST = 5


class Cluster:
    """Our own PostgreSQL cluster on 127.0.0.1, started and stopped with pg_ctl (as root: as user postgres)."""

    def __init__(self) -> None:
        self.initdb, self.pg_ctl = shutil.which("initdb"), shutil.which("pg_ctl")
        if self.initdb is None or self.pg_ctl is None:
            missing = "PostgreSQL server binaries (initdb, pg_ctl) are not installed (Debian: postgresql)"
            if os.environ.get("CI") == "true":
                pytest.fail(missing)
            pytest.skip(missing)
        self.root = Path(tempfile.mkdtemp(prefix="visionloop-spool-pg-", dir="/tmp"))
        self.run_as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self.run_as:
            shutil.chown(self.root, "postgres", "postgres")
        self.port = closed_port()
        subprocess.run(
            [*self.run_as, self.initdb, "-D", str(self.root / "db"), "-U", "mlflow", "--auth=trust", "-E", "UTF8"],
            check=True,
            capture_output=True,
        )
        self.url = f"postgresql://mlflow@127.0.0.1:{self.port}/postgres"

    def _ctl(self, *args: str) -> None:
        subprocess.run(
            [*self.run_as, self.pg_ctl, "-D", str(self.root / "db"), *args], check=True, capture_output=True, timeout=60
        )

    def start(self) -> None:
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        self._ctl("-o", options, "-l", str(self.root / "log"), "-w", "-t", "60", "start")

    def stop(self) -> None:
        self._ctl("-m", "fast", "-w", "-t", "60", "stop")

    def remove(self) -> None:
        subprocess.run(
            [*self.run_as, self.pg_ctl, "-D", str(self.root / "db"), "-m", "immediate", "stop"],
            capture_output=True,
            timeout=60,
        )
        shutil.rmtree(self.root, ignore_errors=True)


@pytest.fixture
def cluster() -> Iterator[Cluster]:
    c = Cluster()
    c.start()
    try:
        yield c
    finally:
        c.remove()


def _pngs(dataset: Dataset, count: int) -> list[bytes]:
    x_test, _ = dataset.part("test")
    out = []
    for i in range(count):
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(x_test[i][0])).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{name} (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def _stored(url: str) -> list[str]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        with engine.connect() as conn:
            if not sa.inspect(conn).has_table("predictions"):
                return []
            return list(conn.execute(sa.text("SELECT request_id FROM predictions")).scalars())
    finally:
        engine.dispose()


def test_sigterm_with_postgres_down_loses_nothing_every_time(
    cluster: Cluster, tmp_path: Path, strong_export: Path, digits_dataset: Dataset
) -> None:
    settings = settings_for(tmp_path / "home", "spool-model")
    _, promoted = publish(settings, strong_export, digits_dataset)
    assert promoted
    env = serving.server_env(settings.home)
    env["VISIONLOOP_MONITOR__STORE_URL"] = cluster.url
    args = ("--model-name", settings.registry.model_name, "--poll-seconds", "0")
    pngs = _pngs(digits_dataset, 20)
    answered: list[str] = []
    started: list = []

    def launch() -> serving.ServerProcess:
        server = serving.launch(settings.home, *args, env=env)
        started.append(server)
        return server

    try:
        for cycle in range(CYCLES):
            if cycle == 1:  # this one starts with the database already down: its models row is spooled too
                cluster.stop()
            server = launch()
            if cycle != 1:
                cluster.stop()
            with server.client() as http:
                for i in range(PER_CYCLE):
                    files = [("file", (f"{i}-{k}.png", pngs[(i + k) % len(pngs)])) for k in range(IMAGES_PER_REQUEST)]
                    answer = http.post("/predict", files=files)
                    assert answer.status_code == 200, answer.text
                    answered.extend(p["request_id"] for p in answer.json()["predictions"])
                # the writer could not reach the store: the rows are on disk before any SIGTERM, and /metrics says so
                wanted = PER_CYCLE * IMAGES_PER_REQUEST
                for _ in range(300):
                    text = http.get("/metrics").text
                    if _metric(text, "visionloop_prediction_store_rows_spooled_total") >= wanted:
                        break
                    time.sleep(0.1)
                assert _metric(text, "visionloop_prediction_store_rows_spooled_total") == wanted
                assert _metric(text, "visionloop_prediction_store_spool_rows") >= wanted
            assert server.stop() == 0, server.log[-3000:]  # SIGTERM: exits, having spooled what it held
            assert "not written at close" not in server.log, server.log[-3000:]
            cluster.start()

        # the last cycle's rows: replayed by two replicas sharing the home's spool, each row exactly once
        with ThreadPoolExecutor(2) as pool:  # started together, they race for the same files
            replicas = list(pool.map(lambda _: launch(), range(2)))
        deadline = time.monotonic() + 90
        while len(stored := _stored(cluster.url)) < len(answered) and time.monotonic() < deadline:
            time.sleep(0.5)
        replayed = 0.0
        for replica in replicas:
            with replica.client() as http:
                text = http.get("/metrics").text
            replayed += _metric(text, "visionloop_prediction_store_rows_replayed_total")
            assert _metric(text, 'visionloop_prediction_store_errors_total{reason="spool_full"}') == 0
        for replica in replicas:
            assert replica.stop() == 0, replica.log[-3000:]
    finally:
        for server in started:
            if server.process.poll() is None:
                server.stop(signal.SIGKILL)

    assert len(answered) == CYCLES * PER_CYCLE * IMAGES_PER_REQUEST
    assert len(stored) == len(set(stored)), "a prediction was stored twice"
    assert sorted(stored) == sorted(answered), f"{len(set(answered) - set(stored))} answered predictions not stored"
    assert replayed > 0  # the replicas replayed rows (the earlier cycles' were replayed by the next server)
    spool = settings.home / "monitoring" / "spool"
    assert not [p for p in spool.rglob("*") if p.is_file()], "the spool still holds files after every row was stored"
