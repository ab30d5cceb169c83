"""The prediction store on a real PostgreSQL server: the store's contract, several writers, and three real
``visionloop serve`` processes sharing one store under load (every answered prediction stored exactly once).

PostgreSQL comes from ``registry_stores.postgres_database`` (initdb + postgres on 127.0.0.1, torn down after
the module). Without the server binaries the module skips, and fails when CI=true.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import itertools
import re
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image
from registry_stores import closed_port, postgres_database  # tests/integration is on sys.path (no __init__.py)

from monitoring_rows import CLASSES, T0, prediction  # tests/ is on sys.path (no __init__.py)
from visionloop.data.preprocess import Dataset
from visionloop.monitoring.images import ImageStore, image_key
from visionloop.monitoring.schema import DriftResult, WindowInfo
from visionloop.monitoring.store import Feedback, PredictionStore, StoreError, predictions_table
from visionloop.serving.errors import ApiError
from visionloop.serving.metrics import ServingMetrics

# the serving tests' helpers: publish a model, and start `visionloop serve` the way their conftest does
_SERVING = Path(__file__).resolve().parents[1] / "serving"
sys.path.insert(0, str(_SERVING))
from serving_helpers import publish, settings_for  # noqa: E402

_spec = importlib.util.spec_from_file_location("serving_conftest", _SERVING / "conftest.py")
serving = importlib.util.module_from_spec(_spec)  # type: ignore[arg-type]
sys.modules["serving_conftest"] = serving  # dataclasses look their module up there
_spec.loader.exec_module(serving)  # type: ignore[union-attr]

_databases = itertools.count(1)


def png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    with postgres_database() as url:
        yield url


@pytest.fixture
def pg_url(postgres: str) -> str:
    """A fresh, empty database on the module's server."""
    import psycopg

    name = f"store_{next(_databases)}"
    with psycopg.connect(postgres, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return postgres.rsplit("/", 1)[0] + f"/{name}"


@pytest.fixture
def store(pg_url: str) -> Iterator[PredictionStore]:
    s = PredictionStore(pg_url)
    s.record_model("pets", "1", "ds-abc", CLASSES)
    s.flush()
    yield s
    s.close()


def rows(store: PredictionStore, sql: str, **params: object) -> list[tuple]:
    with store.engine.connect() as conn:
        return [tuple(r) for r in conn.execute(sa.text(sql), params)]


# ------------------------------------------------------------------------------------------- the contract on PG
def test_rows_vectors_and_refusals(store):
    metrics = ServingMetrics()
    store.metrics = metrics.store
    embedding = np.linspace(-1, 1, 128, dtype=np.float64)
    store.append(
        [
            prediction("r1", 1, embedding=embedding),
            prediction("r2", 2, endpoint="v2", converted="P->L", embedding=embedding),
        ]
    )
    store.append([prediction("bad", endpoint=None), prediction("r1")])  # NOT NULL refused; r1 again ignored
    store.flush()
    assert store.count() == 2 and store.count("pets", "1") == 2
    assert rows(store, "SELECT request_id, endpoint, predicted_label, converted FROM predictions ORDER BY 1") == [
        ("r1", "predict", "dog", None),
        ("r2", "v2", "fox", "P->L"),
    ]
    assert metrics.registry.get_sample_value("visionloop_prediction_store_errors_total", {"reason": "write"}) == 1
    window = store.window("pets", "1", 10, since=0)
    np.testing.assert_array_equal(window.sample.embeddings[0], embedding.astype(np.float32))
    assert window.sample.probabilities.shape == (2, 3)
    assert "channel_mean_2" in window.sample.stats
    indexes = {r[0] for r in rows(store, "SELECT indexname FROM pg_indexes WHERE schemaname = 'public'")}
    assert {"predictions_version_time", "predictions_time", "feedback_version_time", "checks_version_time"} <= indexes


def test_feedback_semantics(store):
    store.append([prediction("r1", 1), prediction("r2", 0)])
    assert store.add_feedback("r1", "dog") == Feedback("r1", "1", "dog", "dog", True)
    assert store.add_feedback("r2", 2) == Feedback("r2", "1", "cat", "fox", False)
    for request_id, label, status in [("nope", "cat", 404), ("r1", "wolf", 422), ("r1", 7, 422), ("r1", "cat", 409)]:
        with pytest.raises(ApiError) as caught:
            store.add_feedback(request_id, label)
        assert caught.value.status == status
    assert rows(store, "SELECT request_id, true_label, correct FROM feedback ORDER BY 1") == [
        ("r1", "dog", 1),
        ("r2", "fox", 0),
    ]


def test_window_and_live_accuracy(store):
    store.record_model("pets", "2", "ds-abc", CLASSES)
    store.append(
        [prediction(f"r{i:02d}", i % 3, time=T0 + i, model_version="1" if i % 2 == 0 else "2") for i in range(20)]
    )
    store.flush()
    assert store.window("pets", "1", size=4, since=T0).request_ids == ["r12", "r14", "r16", "r18"]
    assert store.window("pets", "1", size=100, since=T0 + 13).request_ids == ["r14", "r16", "r18"]
    for i, label in [(0, "cat"), (2, "cat"), (4, "dog"), (1, "dog")]:  # r0, r4 right; r2 wrong; r1 right
        store.add_feedback(f"r{i:02d}", label)
    assert store.live_accuracy("pets", 100) == [("1", 3, 2), ("2", 1, 1)]
    assert store.live_accuracy("pets", 1) == [("1", 1, 1), ("2", 1, 1)]  # v1's newest label: r04 right
    assert store.last_prediction_time("pets") == T0 + 19
    assert [m.version for m in store.models("pets")] == ["1", "2"]


def test_retention_and_kept_images(pg_url, tmp_path):
    images = ImageStore(str(tmp_path / "images"), 10 * 2**20)
    store = PredictionStore(pg_url, images=images, retention_days=1, retention_rows=2)
    a, b = png_bytes(1), png_bytes(2)
    try:
        store.record_model("pets", "1", "ds-abc", CLASSES)
        store.append([
            prediction("old", time=T0 - 2 * 86400, image=a),
            prediction("mid1", time=T0 - 3, image=b),
            prediction("mid2", time=T0 - 2, image=b),
            prediction("new1", time=T0 - 1),
            prediction("new2", time=T0, image=b),
        ])  # fmt: skip
        store.flush()
        assert rows(store, "SELECT count(*) FROM images") == [(2,)]
        store.add_feedback("old", "cat")
        store.add_feedback("new2", "cat")
        assert store.enforce_retention(now=T0) == 3  # old by age, then mid1 and mid2 by rows
        assert rows(store, "SELECT request_id FROM predictions ORDER BY time") == [("new1",), ("new2",)]
        assert rows(store, "SELECT request_id FROM feedback") == [("new2",)]
        assert not images.exists(image_key(a)) and images.exists(image_key(b))
        assert [x.request_id for x in store.labelled("pets")] == ["new2"]
    finally:
        store.close()


def test_checks_round_trip(store):
    result = DriftResult(
        model_name="pets", model_version="1", checked_at=T0, duration_seconds=0.5, status="ok", drifted=False,
        reasons=[], window=WindowInfo(size=10, requested=200, max_age_seconds=3600.0),
    )  # fmt: skip
    store.save_check(result)
    store.save_check(result.model_copy(update={"checked_at": T0 + 1, "status": "drifted", "drifted": True}))
    assert store.latest_check("pets", "1").status == "drifted"
    assert [c.checked_at for c in store.checks("pets", "1")] == [T0, T0 + 1]
    assert store.latest_check("pets", "2") is None


def test_unreachable_server_is_a_clear_error_with_the_password_masked():
    url = f"postgresql://mlflow:topsecret@127.0.0.1:{closed_port()}/none"
    with pytest.raises(StoreError) as caught:
        PredictionStore(url, writer=False, timeout=2)
    assert "mlflow:***@127.0.0.1" in str(caught.value) and "topsecret" not in str(caught.value)


def test_concurrent_writers_lose_nothing_and_report_the_write_rate(pg_url, capsys):
    """Three writer stores (as three servers would hold), each appending as fast as it can."""
    writers = [PredictionStore(pg_url) for _ in range(3)]
    per_writer, batch = 10_000, 16
    try:
        writers[0].record_model("pets", "1", "ds-abc", CLASSES)
        writers[0].flush()
        start = time.perf_counter()

        def fill(w: int) -> None:
            for i in range(0, per_writer, batch):
                writers[w].append([prediction(f"w{w}-{j}", j % 3, time=T0 + j) for j in range(i, i + batch)])
            writers[w].flush()

        threads = [threading.Thread(target=fill, args=(w,)) for w in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        seconds = time.perf_counter() - start
    finally:
        for w in writers:
            w.close()
    reader = PredictionStore(pg_url, writer=False)
    try:
        assert reader.count("pets") == 3 * per_writer
    finally:
        reader.close()
    with capsys.disabled():
        print(
            f"\n[store] PostgreSQL, 3 writers in one process, 128-d embeddings: {3 * per_writer:,} rows in "
            f"{seconds:.2f} s = {3 * per_writer / seconds:,.0f} rows/s written"
        )


# ------------------------------------------------------------------------------------------- three servers
def _lag(text: str) -> float:
    match = re.search(r"^visionloop_prediction_store_lag_seconds (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def test_three_servers_share_one_store_under_load(
    postgres, pg_url, tmp_path, strong_export: Path, digits_dataset: Dataset, capsys
):
    settings = settings_for(tmp_path / "home", "shared-store")
    version, promoted = publish(settings, strong_export, digits_dataset)
    assert promoted
    env = serving.server_env(settings.home)
    env["VISIONLOOP_MONITOR__STORE_URL"] = pg_url
    servers = [
        serving.launch(settings.home, "--model-name", settings.registry.model_name, "--poll-seconds", "0", env=env)
        for _ in range(3)
    ]
    x_test, _ = digits_dataset.part("test")
    pngs = []
    for i in range(50):
        buffer = io.BytesIO()
        Image.fromarray(np.asarray(x_test[i][0])).save(buffer, format="PNG")
        pngs.append(buffer.getvalue())

    requests_per_server, threads_per_server = 600, 4
    answered: list[str] = []
    statuses: list[int] = []
    lock = threading.Lock()
    max_lag = [0.0]
    done = threading.Event()

    def load(url: str, worker: int) -> None:
        with httpx.Client(base_url=url, timeout=60) as http:
            for i in range(worker, requests_per_server, threads_per_server):
                files = [("file", (f"{i}-{k}.png", pngs[(i + k) % len(pngs)])) for k in range(1 + i % 8)]
                answer = http.post("/predict", files=files)
                with lock:
                    statuses.append(answer.status_code)
                    if answer.status_code == 200:
                        answered.extend(p["request_id"] for p in answer.json()["predictions"])

    def watch() -> None:
        with httpx.Client(timeout=10) as http:
            while not done.wait(0.5):
                for server in servers:
                    with contextlib.suppress(httpx.HTTPError):
                        max_lag[0] = max(max_lag[0], _lag(http.get(f"{server.url}/metrics").text))

    try:
        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        start = time.perf_counter()
        workers = [
            threading.Thread(target=load, args=(server.url, w)) for server in servers for w in range(threads_per_server)
        ]
        for t in workers:
            t.start()
        for t in workers:
            t.join()
        load_seconds = time.perf_counter() - start
        done.set()
        watcher.join()
        exit_codes = [server.stop() for server in servers]  # SIGTERM: each writes what it still has queued
        written_seconds = time.perf_counter() - start
    finally:
        for server in servers:
            if server.process.poll() is None:
                server.stop(9)
    assert exit_codes == [0, 0, 0], "\n".join(s.log[-2000:] for s in servers)
    assert statuses.count(200) == len(statuses) == 3 * requests_per_server

    reader = PredictionStore(pg_url, writer=False)
    try:
        with reader.engine.connect() as conn:
            stored = list(
                conn.execute(
                    sa.select(predictions_table.c.request_id).where(
                        predictions_table.c.model_name == settings.registry.model_name
                    )
                ).scalars()
            )
            instances = conn.execute(sa.select(sa.func.count(sa.distinct(predictions_table.c.instance)))).scalar_one()
        assert len(stored) == len(answered)  # every answered prediction is stored ...
        assert sorted(stored) == sorted(answered) and len(set(stored)) == len(stored)  # ... exactly once
        assert instances == 3
        assert reader.count(settings.registry.model_name, version) == len(answered)
    finally:
        reader.close()
    with capsys.disabled():
        print(
            f"\n[store] 3 × visionloop serve → one PostgreSQL store: {len(answered):,} predictions from "
            f"{len(statuses):,} requests in {load_seconds:.2f} s = {len(answered) / load_seconds:,.0f} rows/s "
            f"sustained (all stored {written_seconds:.2f} s after the start); highest store lag seen "
            f"{max_lag[0]:.2f} s"
        )
