"""The prediction spool: its record framing, its cap, its claims across processes, and the writer's replay
into a real SQLite store (locked by a real second connection to play the outage)."""

from __future__ import annotations

import multiprocessing
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from monitoring_rows import CLASSES, prediction  # tests/ is on sys.path (no __init__.py)
from visionloop.monitoring.spool import CLAIM, OPEN, SEALED, Spool, SpoolName, encode, read_records
from visionloop.monitoring.store import PredictionStore, spool_key
from visionloop.serving.errors import ApiError
from visionloop.serving.metrics import ServingMetrics


def _sealed_file(directory: Path, ids: list[str]) -> Path:
    """A sealed spool file holding predictions ``ids``, written the way a writer process writes one."""
    before = set(directory.glob("*")) if directory.exists() else set()
    spool = Spool(directory, 2**30)
    spool.append([("prediction", prediction(i)) for i in ids])
    spool.seal()
    (path,) = set(directory.glob("*")) - before
    return path


def _wait_until(condition: Callable[[], bool], tries: int = 200) -> None:
    """Poll a condition a bounded number of times (the writer thread works in the background)."""
    for _ in range(tries):
        if condition():
            return
        time.sleep(0.05)


def _sample(metrics: ServingMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels or None) or 0.0


# ------------------------------------------------------------------------------------------- records
def test_a_record_round_trips_with_its_vectors_and_image(tmp_path):
    spool = Spool(tmp_path, 2**20)
    original = prediction("r1", 2, image=b"\x89PNG-bytes", converted="RGBA->RGB")
    spool.append([("model", {"model_name": "pets", "model_version": "1", "classes": "[]"}), ("prediction", original)])
    spool.seal()
    claimed = Spool(tmp_path, 2**20).claim()
    assert claimed is not None and claimed.skipped_bytes == 0
    (kind_m, model), (kind_p, back) = claimed.records
    assert (kind_m, model["model_version"], kind_p) == ("model", "1", "prediction")
    assert back.image == b"\x89PNG-bytes" and back.converted == "RGBA->RGB" and back.predicted_index == 2
    np.testing.assert_array_equal(back.probabilities, original.probabilities)
    np.testing.assert_array_equal(back.channel_means, original.channel_means)


def test_a_torn_last_record_and_a_corrupt_one_are_skipped_not_fatal(tmp_path):
    records = [encode("prediction", prediction(f"r{i}")) for i in range(4)]
    corrupt = bytearray(records[1])
    corrupt[-3] ^= 0xFF  # a flipped bit in the payload: the CRC says so
    data = records[0] + bytes(corrupt) + records[2] + records[3][: len(records[3]) // 2]  # crash mid-write
    payloads, skipped = read_records(data)
    assert len(payloads) == 2 and skipped == len(records[1]) + len(records[3]) // 2
    # and the same through a file a crashed writer left behind
    (tmp_path / f"999999@otherhost@dead-1{SEALED}").write_bytes(data)
    claimed = Spool(tmp_path, 2**20).claim()
    assert [p.request_id for _, p in claimed.records] == ["r0", "r2"]


# ------------------------------------------------------------------------------------------- the cap
def test_a_full_spool_refuses_rows_and_the_writer_counts_them(tmp_path):
    """A store that cannot be written (a path SQLite cannot open) and a spool room for about three rows."""
    metrics = ServingMetrics()
    record_size = len(encode("prediction", prediction("r0")))
    (tmp_path / "not-a-dir").write_text("a file where the database folder should be")
    store = PredictionStore(
        f"sqlite:///{tmp_path / 'not-a-dir'}/x.db",
        metrics=metrics.store,
        spool_dir=tmp_path / "spool",
        spool_max_bytes=3 * record_size + 10,
    )
    try:
        store.append([prediction(f"r{i}") for i in range(5)])
        store.flush(30)
        assert _sample(metrics, "visionloop_prediction_store_rows_spooled_total") == 3
        assert _sample(metrics, "visionloop_prediction_store_errors_total", reason="spool_full") == 2
        assert store.spool_rows == 3
        assert metrics.registry.get_sample_value("visionloop_prediction_store_spool_rows") == 3
    finally:
        store.close(timeout=1)
    assert _sample(metrics, "visionloop_prediction_store_errors_total", reason="write") == 0


# ------------------------------------------------------------------------------------------- claims
def _claim_all(directory: str, out: str) -> None:
    """One replica: claim files until none is left, and note the request ids it got."""
    spool = Spool(Path(directory), 2**30)
    got = []
    while (claimed := spool.claim()) is not None:
        got.extend(p.request_id for _, p in claimed.records)
        spool.done(claimed)
    Path(out).write_text("\n".join(got))


def test_two_replicas_claiming_at_once_never_replay_the_same_file(tmp_path):
    directory = tmp_path / "spool"
    ids = [f"f{f}-r{r}" for f in range(30) for r in range(3)]
    for f in range(30):
        _sealed_file(directory, ids[3 * f : 3 * f + 3])
    context = multiprocessing.get_context("spawn")
    outs = [tmp_path / f"replica{i}.txt" for i in range(2)]
    replicas = [context.Process(target=_claim_all, args=(str(directory), str(out))) for out in outs]
    for p in replicas:
        p.start()
    for p in replicas:
        p.join(timeout=60)
        assert p.exitcode == 0
    got = [[line for line in out.read_text().splitlines() if line] for out in outs]
    assert sorted(got[0] + got[1]) == sorted(ids)  # every row replayed, none twice
    assert not list(directory.iterdir())


def test_a_claim_or_open_file_of_a_dead_process_is_claimed_again_a_live_ones_is_not(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    me = Spool(tmp_path, 2**30)
    for request_id, claimer in [("claimed-by-dead", dead_pid), ("claimed-by-live", os.getppid())]:
        path = _sealed_file(tmp_path, [request_id])
        path.rename(tmp_path / f"{path.name}{CLAIM}{claimer}@{me.host}@other")
    path = _sealed_file(tmp_path, ["open-of-dead"])  # a writer killed before it could seal its file
    name = SpoolName.parse(path.name)
    path.rename(tmp_path / f"{dead_pid}@{me.host}@{name.tag}{OPEN}")
    got = []
    while (claimed := me.claim()) is not None:
        got.extend(p.request_id for _, p in claimed.records)
        me.done(claimed)
    assert sorted(got) == ["claimed-by-dead", "open-of-dead"]


# ------------------------------------------------------------------------------------------- replay
def test_spooled_rows_are_replayed_idempotently_on_request_id(tmp_path):
    """Rows already stored, rows spooled twice (a replay that crashed after its commit): each stored once."""
    url = f"sqlite:///{tmp_path / 'predictions.db'}"
    first = PredictionStore(url)
    first.record_model("pets", "1", "ds-abc", CLASSES)
    first.append([prediction("r0"), prediction("r1")])
    first.close()
    directory = tmp_path / "spool" / spool_key(first.display_url)
    _sealed_file(directory, ["r1", "r2", "r3"])
    _sealed_file(directory, ["r3", "r4"])
    metrics = ServingMetrics()
    store = PredictionStore(url, metrics=metrics.store, spool_dir=tmp_path / "spool")
    try:
        _wait_until(lambda: not list(directory.iterdir()))  # the writer replays at start
        assert store.count() == 5
        assert _sample(metrics, "visionloop_prediction_store_rows_replayed_total") == 5
        assert not list(directory.iterdir())
    finally:
        store.close()


def test_close_while_the_store_is_locked_spools_and_the_next_start_replays(tmp_path):
    """The unit-sized SIGTERM case: close() during an outage spools what is queued; nothing is dropped."""
    db = tmp_path / "predictions.db"
    url = f"sqlite:///{db}"
    setup = PredictionStore(url)
    setup.record_model("pets", "1", "ds-abc", CLASSES)
    setup.close()
    metrics = ServingMetrics()
    store = PredictionStore(url, timeout=0.2, metrics=metrics.store, spool_dir=tmp_path / "spool")
    blocker = sqlite3.connect(db, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock past the store's timeout
    try:
        store.append([prediction(f"r{i}") for i in range(50)])
        store.close(timeout=0.5)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    assert _sample(metrics, "visionloop_prediction_store_rows_spooled_total") == 50
    assert (
        sum(_sample(metrics, "visionloop_prediction_store_errors_total", reason=r) for r in ("write", "queue_full"))
        == 0
    )
    again = PredictionStore(url, spool_dir=tmp_path / "spool")
    try:
        _wait_until(lambda: again.count() == 50)
        assert again.count() == 50
    finally:
        again.close()
    with pytest.raises(StopIteration):
        next(f for f in (tmp_path / "spool").rglob("*") if f.is_file())


def test_feedback_for_a_spooled_prediction_says_try_later_then_works_once_replayed(tmp_path):
    """SQLite locked for writes (reads still work in WAL): the row waits in the spool, the label gets 503."""
    db = tmp_path / "predictions.db"
    store = PredictionStore(f"sqlite:///{db}", timeout=0.2, spool_dir=tmp_path / "spool")
    try:
        store.record_model("pets", "1", "ds-abc", CLASSES)
        store.flush()
        blocker = sqlite3.connect(db, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")
        try:
            store.append([prediction("r1", 1)])
            _wait_until(lambda: store.spool_rows == 1)
            with pytest.raises(ApiError) as caught:
                store.add_feedback("r1", "dog")
            assert (caught.value.status, caught.value.reason) == (503, "prediction_spooled")
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        _wait_until(lambda: store.count() == 1)
        assert store.add_feedback("r1", "dog").correct
    finally:
        store.close()
