"""The prediction store on a real SQLite file (and kept images in a real folder and a real S3 endpoint).

Appends and background writes, feedback and its refusals, the drift window and live accuracy, retention,
kept images (cap, duplicates), drift checks, and a store that cannot be reached. The same contract on
PostgreSQL is tests/integration/monitoring/test_store_postgres.py.
"""

from __future__ import annotations

import io
import sqlite3
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import sqlalchemy as sa
from PIL import Image

from localhost import free_port  # tests/ is on sys.path (no __init__.py)
from monitoring_rows import CLASSES, T0, prediction  # tests/ is on sys.path (no __init__.py)
from visionloop.config import Settings
from visionloop.monitoring.images import ImageStore, image_key
from visionloop.monitoring.schema import DriftResult, TestResult, WindowInfo
from visionloop.monitoring.stats import stat_names
from visionloop.monitoring.store import (
    Feedback,
    PredictionStore,
    StoreError,
    masked,
    normalise_url,
)
from visionloop.serving.errors import ApiError
from visionloop.serving.metrics import ServingMetrics


def png_bytes(seed: int, size: int = 8) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def query(path: Path, sql: str, *args: object) -> list[tuple]:
    """Read the file with a separate connection, as any SQLite client would."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def metric(metrics: ServingMetrics, name: str, **labels: str) -> float:
    return metrics.registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "home" / "monitoring" / "predictions.db"


@pytest.fixture
def url(db_path: Path) -> str:
    return f"sqlite:///{db_path}"


@pytest.fixture
def metrics() -> ServingMetrics:
    return ServingMetrics()


@pytest.fixture
def store(url: str, metrics: ServingMetrics) -> Iterator[PredictionStore]:
    s = PredictionStore(url, metrics=metrics.store)
    s.record_model("pets", "1", "ds-abc", CLASSES)
    s.flush()  # the tables exist
    yield s
    s.close()


@pytest.fixture
def image_store(tmp_path: Path) -> ImageStore:
    return ImageStore(str(tmp_path / "images"), 10 * 2**20)


# ------------------------------------------------------------------------------------------- writing
def test_appended_predictions_are_written_in_the_background(store, db_path, metrics):
    store.append([prediction("r1", 1), prediction("r2", 2, endpoint="v2", converted="RGBA->RGB")])
    store.append([prediction("r3")])
    store.append([])
    store.flush()
    assert db_path.is_file()  # the folder is created
    assert store.count() == 3 and store.count("pets", "1") == 3 and store.count("pets", "2") == 0
    assert store.queue_rows == 0 and store.lag_seconds == 0.0
    rows = query(
        db_path,
        "SELECT request_id, endpoint, model_version, predicted_index, predicted_label, confidence, "
        "image_width, image_height, image_mean, image_std, converted, image_key, instance "
        "FROM predictions ORDER BY request_id",
    )
    assert rows == [
        ("r1", "predict", "1", 1, "dog", 0.875, 32, 24, 0.5, 0.25, None, None, "host:1"),
        ("r2", "v2", "1", 2, "fox", 0.875, 32, 24, 0.5, 0.25, "RGBA->RGB", None, "host:1"),
        ("r3", "predict", "1", 0, "cat", 0.875, 32, 24, 0.5, 0.25, None, None, "host:1"),
    ]
    assert query(db_path, "SELECT model_name, model_version, dataset_version, classes FROM models") == [
        ("pets", "1", "ds-abc", '["cat", "dog", "fox"]')
    ]
    assert metric(metrics, "visionloop_prediction_store_rows_written_total") == 3
    assert query(db_path, "PRAGMA journal_mode") == [("wal",)]


def test_vectors_are_float32_little_endian_blobs(store, db_path):
    embedding = np.array([0.1, -2.5, 3e10, 0.0, 1 / 3], dtype=np.float64)  # stored as float32
    store.append([prediction("r1", embedding=embedding)])
    store.flush()
    blob, probs, channels = query(
        db_path, "SELECT embedding, probabilities, channel_means FROM predictions WHERE request_id = 'r1'"
    )[0]
    assert len(blob) == 5 * 4
    np.testing.assert_array_equal(np.frombuffer(blob, dtype="<f4"), embedding.astype(np.float32))
    np.testing.assert_array_equal(np.frombuffer(probs, dtype="<f4"), prediction("r").probabilities)
    np.testing.assert_array_equal(np.frombuffer(channels, dtype="<f4"), [0.25, 0.5, 0.75])


def test_rows_queued_together_are_committed_together(url, db_path, metrics):
    store = PredictionStore(url, metrics=metrics.store)
    commits = []
    sa.event.listen(store.engine, "commit", lambda _conn: commits.append(1))
    try:
        store.record_model("pets", "1", "ds-abc", CLASSES)
        store.flush()
        commits.clear()
        blocker = sqlite3.connect(db_path, isolation_level=None)
        blocker.execute("BEGIN IMMEDIATE")  # hold the writer back while 500 requests' rows queue up
        for i in range(500):
            store.append([prediction(f"r{i}")])
        blocker.execute("ROLLBACK")
        blocker.close()
        store.flush()
        assert store.count() == 500
        assert len(commits) <= 3  # what was queued when the writer woke, then the rest: not one per request
        assert metric(metrics, "visionloop_prediction_store_rows_written_total") == 500
    finally:
        store.close()


def test_append_never_blocks_while_the_database_is_locked(store, db_path):
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")  # another writer holds the lock
        store.append([prediction("r1")])  # returns at once
        store.append([prediction("r2")])
        assert store.count() == 0  # WAL: readers are not blocked; nothing written yet
        assert store.queue_rows == 2
        assert store.lag_seconds >= 0.0
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    store.flush()
    assert store.count() == 2 and store.queue_rows == 0


def test_a_full_queue_drops_new_rows_and_counts_them(url, db_path, metrics):
    store = PredictionStore(url, max_queued_rows=5, metrics=metrics.store)
    store.record_model("pets", "1", "ds-abc", CLASSES)
    store.flush()
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        store.append([prediction(f"a{i}") for i in range(3)])
        store.append([prediction(f"b{i}") for i in range(3)])  # 6 > 5: dropped, not waited for
        store.append([prediction("c0"), prediction("c1")])  # 5: fits
        assert store.queue_rows == 5
        assert metric(metrics, "visionloop_prediction_store_errors_total", reason="queue_full") == 3
        assert metric(metrics, "visionloop_prediction_store_queue_rows") == 5
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    store.flush()
    try:
        assert store.count() == 5
        assert metric(metrics, "visionloop_prediction_store_queue_rows") == 0
        assert metric(metrics, "visionloop_prediction_store_lag_seconds") == 0
    finally:
        store.close()


def test_rows_the_database_refuses_are_counted_and_the_rest_written(store, metrics):
    store.append([prediction("r1"), prediction("bad", endpoint=None), prediction("r2")])  # NOT NULL endpoint
    store.flush()
    assert store.count() == 2
    assert metric(metrics, "visionloop_prediction_store_errors_total", reason="write") == 1
    store.append([prediction("r3")])  # the writer carries on
    store.flush()
    assert store.count() == 3


def test_a_retried_row_is_not_stored_twice(store):
    store.append([prediction("r1")])
    store.flush()
    store.append([prediction("r1"), prediction("r2")])  # as after a commit whose acknowledgement was lost
    store.flush()
    assert store.count() == 2


def test_close_writes_everything_still_queued(url, db_path):
    store = PredictionStore(url)
    store.record_model("pets", "1", "ds-abc", CLASSES)
    for i in range(50):
        store.append([prediction(f"r{i}")])
    store.close()
    assert query(db_path, "SELECT COUNT(*) FROM predictions") == [(50,)]


def test_store_survives_closing_and_reopening(url, db_path):
    first = PredictionStore(url)
    first.record_model("pets", "1", "ds-abc", CLASSES)
    first.append([prediction("r1", 1), prediction("r2", 2)])
    assert first.add_feedback("r1", "dog").correct
    first.close()

    second = PredictionStore(url)
    try:
        assert second.count() == 2
        assert second.add_feedback("r2", "cat") == Feedback("r2", "1", "fox", "cat", False)
        with pytest.raises(ApiError) as caught:
            second.add_feedback("r1", "dog")
        assert caught.value.status == 409  # feedback from before the restart is still there
        second.record_model("pets", "1", "ds-abc", CLASSES)  # recorded again on every load: no error
        second.append([prediction("r3")])
        second.flush()
        assert second.count() == 3
    finally:
        second.close()
    assert query(db_path, "SELECT COUNT(*) FROM models") == [(1,)]


def test_a_reader_cannot_append(url, store):
    reader = PredictionStore(url, writer=False)
    try:
        with pytest.raises(RuntimeError, match="writer=False"):
            reader.append([prediction("r1")])
    finally:
        reader.close()


# ------------------------------------------------------------------------------------------- feedback
def test_feedback_by_label_name_and_by_index(store, db_path):
    store.append([prediction("right", predicted_index=1), prediction("wrong", predicted_index=0)])
    # no flush: add_feedback waits for the prediction to reach the database itself
    assert store.add_feedback("right", "dog") == Feedback("right", "1", "dog", "dog", True)
    assert store.add_feedback("wrong", 2) == Feedback("wrong", "1", "cat", "fox", False)
    rows = query(
        db_path, "SELECT request_id, model_version, true_index, true_label, correct FROM feedback ORDER BY request_id"
    )
    assert rows == [("right", "1", 1, "dog", 1), ("wrong", "1", 2, "fox", 0)]


def test_feedback_for_an_unknown_request_is_a_404(store):
    store.append([prediction("r1")])
    with pytest.raises(ApiError) as caught:
        store.add_feedback("no-such-id", "cat")
    assert (caught.value.status, caught.value.reason) == (404, "unknown_request_id")
    assert "no prediction with request_id 'no-such-id'" in caught.value.message


def test_unknown_label_name_is_a_422_naming_the_known_labels(store):
    store.append([prediction("r1")])
    with pytest.raises(ApiError) as caught:
        store.add_feedback("r1", "wolf")
    assert (caught.value.status, caught.value.reason) == (422, "unknown_label")
    assert caught.value.message == "unknown label 'wolf'; model v1 knows: cat, dog, fox"


def test_long_label_list_is_cut_short_in_the_message(url):
    classes = [f"c{i}" for i in range(25)]
    store = PredictionStore(url)
    try:
        store.record_model("many", "7", "ds-x", classes)
        store.append([prediction("r1", model_name="many", model_version="7", predicted_label="c0")])
        with pytest.raises(ApiError) as caught:
            store.add_feedback("r1", "c25")
        assert caught.value.message.endswith("knows: " + ", ".join(classes[:20]) + ", …")
    finally:
        store.close()


@pytest.mark.parametrize("index", [3, -1, 100])
def test_out_of_range_label_index_is_a_422(store, index):
    store.append([prediction("r1")])
    with pytest.raises(ApiError) as caught:
        store.add_feedback("r1", index)
    assert (caught.value.status, caught.value.reason) == (422, "unknown_label")
    assert f"label index {index} is out of range for 3 classes" in caught.value.message
    assert "cat, dog, fox" in caught.value.message
    assert store.add_feedback("r1", 0).correct  # a refused label records nothing


def test_second_feedback_for_a_request_is_a_409_and_keeps_the_first(store, db_path):
    store.append([prediction("r1", predicted_index=1)])
    assert store.add_feedback("r1", "dog").correct
    for label in ("cat", "dog", 0):
        with pytest.raises(ApiError) as caught:
            store.add_feedback("r1", label)
        assert (caught.value.status, caught.value.reason) == (409, "duplicate_feedback")
        assert "feedback for 'r1' was already recorded" in caught.value.message
    assert query(db_path, "SELECT true_label, correct FROM feedback") == [("dog", 1)]


# ------------------------------------------------------------------------------------------- reading
def test_window_is_the_newest_rows_of_that_version_within_the_time_bound(store):
    rows = []
    for i in range(20):
        version = "1" if i % 2 == 0 else "2"  # interleaved traffic of two versions
        rows.append(prediction(f"r{i:02d}", i % 3, time=T0 + i, model_version=version, image_mean=i / 100))
    store.record_model("pets", "2", "ds-abc", CLASSES)
    store.append(rows)
    store.flush()

    window = store.window("pets", "1", size=4, since=T0)
    assert window.request_ids == ["r12", "r14", "r16", "r18"]  # newest 4 of v1, oldest first
    assert (window.first_time, window.last_time) == (T0 + 12, T0 + 18)
    assert window.predicted.tolist() == [0, 2, 1, 0]
    assert sorted(window.sample.stats) == sorted(stat_names(3))
    np.testing.assert_allclose(window.sample.stats["image_mean"], [0.12, 0.14, 0.16, 0.18])
    np.testing.assert_allclose(window.sample.stats["channel_mean_2"], [0.75] * 4)
    assert window.sample.stats["image_width"].tolist() == [32] * 4
    assert window.sample.probabilities.shape == (4, 3) and window.sample.embeddings.shape == (4, 4)
    assert window.sample.predicted.tolist() == window.predicted.tolist()
    np.testing.assert_array_equal(window.sample.times, [T0 + 12, T0 + 14, T0 + 16, T0 + 18])

    bounded = store.window("pets", "1", size=100, since=T0 + 13)  # the time bound cuts first
    assert bounded.request_ids == ["r14", "r16", "r18"] and len(bounded) == 3
    assert store.window("pets", "2", size=2, since=0).request_ids == ["r17", "r19"]

    empty = store.window("pets", "3", size=10, since=0)
    assert len(empty) == 0 and empty.first_time is None and len(empty.sample) == 0


def test_window_of_a_grey_model_has_no_channel_means(store):
    store.append([prediction("r1", channel_means=np.array([0.5], np.float32))])
    store.flush()
    assert sorted(store.window("pets", "1", 10, 0).sample.stats) == sorted(stat_names(1))


def test_live_accuracy_per_version_over_the_newest_labels(store):
    store.record_model("pets", "2", "ds-abc", CLASSES)
    store.append([prediction(f"a{i}", 1, time=T0 + i) for i in range(6)])
    store.append([prediction(f"b{i}", 1, model_version="2", time=T0 + i) for i in range(3)])
    store.flush()
    for i, label in enumerate(["cat", "cat", "dog", "dog", "dog", "cat"]):  # v1: wrong, wrong, right ×3, wrong
        store.add_feedback(f"a{i}", label)
    store.add_feedback("b0", "dog")
    assert store.live_accuracy("pets", size=100) == [("1", 6, 3), ("2", 1, 1)]
    assert store.live_accuracy("pets", size=4) == [("1", 4, 3), ("2", 1, 1)]  # the 4 newest labels of v1
    assert store.live_accuracy("other", size=100) == []


def test_models_and_last_prediction_time(store):
    store.record_model("pets", "2", "ds-def", ["a", "b"])
    store.append([prediction("r1", time=T0 + 5), prediction("r2", time=T0 + 9, model_version="2")])
    store.flush()
    records = store.models("pets")
    assert [(m.version, m.dataset_version, m.classes) for m in records] == [
        ("1", "ds-abc", CLASSES),
        ("2", "ds-def", ["a", "b"]),
    ]
    assert records[0].first_served <= records[1].first_served
    assert store.last_prediction_time("pets", "1") == T0 + 5
    assert store.last_prediction_time("pets") == T0 + 9
    assert store.last_prediction_time("pets", "3") is None and store.last_prediction_time("none") is None


def drift_result(version: str, checked_at: float, drifted: bool) -> DriftResult:
    test = TestResult(
        name="ks:image_mean", detector="image_stats", statistic=0.5, p_value=0.001, adjusted_p_value=0.004,
        threshold=0.0025, drifted=drifted,
    )  # fmt: skip
    return DriftResult(
        model_name="pets", model_version=version, checked_at=checked_at, duration_seconds=0.25,
        status="drifted" if drifted else "ok", drifted=drifted, reasons=["ks:image_mean"] if drifted else [],
        window=WindowInfo(size=200, requested=200, max_age_seconds=3600.0), tests=[test],
        settings={"p_value": 0.01, "correction": "bonferroni"},
    )  # fmt: skip


def test_drift_checks_round_trip(url, store):
    monitor = PredictionStore(url, writer=False)  # the monitor writes checks without a writer thread
    try:
        assert monitor.latest_check("pets", "1") is None
        for i in range(5):
            monitor.save_check(drift_result("1", T0 + i, drifted=i == 3))
        monitor.save_check(drift_result("2", T0 + 10, drifted=False))
        latest = store.latest_check("pets", "1")
        assert latest == drift_result("1", T0 + 4, drifted=False)
        history = store.checks("pets", "1", since=T0 + 1, limit=3)
        assert [c.checked_at for c in history] == [T0 + 2, T0 + 3, T0 + 4]  # the newest 3, oldest first
        assert history[1].drifted and history[1].tests[0].drifted
        assert [c.checked_at for c in store.checks("pets", "1")] == [T0 + i for i in range(5)]
        assert store.latest_check("pets", "2").model_version == "2"
    finally:
        monitor.close()


# ------------------------------------------------------------------------------------------- kept images
def test_images_are_kept_once_by_content(url, tmp_path, image_store, metrics):
    store = PredictionStore(url, images=image_store, metrics=metrics.store)
    a, b = png_bytes(1), png_bytes(2)
    try:
        store.record_model("pets", "1", "ds-abc", CLASSES)
        store.append([prediction("r1", image=a), prediction("r2", image=a), prediction("r3", image=b)])
        store.append([prediction("r4")])  # no image: nothing kept
        store.flush()
        store.append([prediction("r5", image=a)])  # seen in an earlier batch
        store.flush()
    finally:
        store.close()
    files = sorted(p.relative_to(tmp_path / "images").as_posix() for p in (tmp_path / "images").rglob("*.*"))
    assert files == sorted([image_key(a), image_key(b)])
    assert image_key(a).startswith(image_key(a).split("/")[1][:2] + "/") and image_key(a).endswith(".png")
    assert image_store.open(image_key(a)) == a
    assert metric(metrics, "visionloop_images_kept_total", result="kept") == 2
    assert metric(metrics, "visionloop_images_kept_total", result="duplicate") == 2
    db = Path(url.removeprefix("sqlite:///"))
    assert query(db, "SELECT request_id, image_key FROM predictions ORDER BY request_id") == [
        ("r1", image_key(a)), ("r2", image_key(a)), ("r3", image_key(b)), ("r4", None), ("r5", image_key(a)),
    ]  # fmt: skip
    # a restarted server knows the kept images from the table: the cap's count survives too
    again = PredictionStore(url, writer=False, images=ImageStore(str(tmp_path / "images"), 10 * 2**20))
    try:
        assert again.images.used_bytes == len(a) + len(b)
    finally:
        again.close()


def test_images_over_the_cap_are_not_kept(url, tmp_path, metrics):
    a, b = png_bytes(1), png_bytes(2)
    images = ImageStore(str(tmp_path / "images"), max_bytes=len(a) + len(b) - 1)
    store = PredictionStore(url, images=images, metrics=metrics.store)
    try:
        store.record_model("pets", "1", "ds-abc", CLASSES)
        store.append([prediction("r1", image=a)])
        store.flush()
        store.append([prediction("r2", image=b), prediction("r3", image=a)])
        store.flush()
        assert images.used_bytes == len(a)
    finally:
        store.close()
    assert metric(metrics, "visionloop_images_kept_total", result="over_cap") == 1
    assert metric(metrics, "visionloop_images_kept_total", result="duplicate") == 1
    db = Path(url.removeprefix("sqlite:///"))
    assert query(db, "SELECT request_id, image_key FROM predictions ORDER BY request_id") == [
        ("r1", image_key(a)), ("r2", None), ("r3", image_key(a)),
    ]  # fmt: skip
    assert not images.exists(image_key(b))


def test_labels_that_came_with_the_feedback_token_are_marked_and_can_be_chosen(url, image_store):
    store = PredictionStore(url, images=image_store)
    try:
        store.record_model("pets", "1", "ds-abc", CLASSES)
        store.append([prediction("open", image=png_bytes(1)), prediction("signed", image=png_bytes(2))])
        store.add_feedback("open", "dog")
        store.add_feedback("signed", "fox", authenticated=True)
        assert [(x.request_id, x.authenticated) for x in store.labelled("pets")] == [("open", False), ("signed", True)]
        assert [x.request_id for x in store.labelled("pets", authenticated_only=True)] == ["signed"]
    finally:
        store.close()


def test_image_key_names_the_format():
    jpeg = io.BytesIO()
    Image.new("RGB", (4, 4)).save(jpeg, format="JPEG")
    assert image_key(jpeg.getvalue()).endswith(".jpg")
    assert image_key(b"not an image").endswith(".bin")


def test_labelled_images_are_the_kept_images_with_feedback(url, image_store):
    store = PredictionStore(url, images=image_store)
    try:
        store.record_model("pets", "1", "ds-abc", CLASSES)
        store.append([prediction("r1", image=png_bytes(1)), prediction("r2"), prediction("r3", image=png_bytes(3))])
        store.add_feedback("r1", "dog")
        store.add_feedback("r2", "cat")  # its image was not kept
        store.add_feedback("r3", "fox")
        labelled = store.labelled("pets")
        assert [(x.request_id, x.true_label, x.model_version) for x in labelled] == [
            ("r1", "dog", "1"),
            ("r3", "fox", "1"),
        ]
        assert image_store.open(labelled[1].image_key) == png_bytes(3)
        assert [x.request_id for x in store.labelled("pets", limit=1)] == ["r1"]
        assert store.labelled("pets", since=labelled[1].time + 1) == []
    finally:
        store.close()


# ------------------------------------------------------------------------------------------- retention
def test_retention_by_age_deletes_rows_feedback_checks_and_unreferenced_images(url, image_store, db_path):
    old_only, shared = png_bytes(1), png_bytes(2)
    store = PredictionStore(url, images=image_store, retention_days=1)
    day = 86400
    try:
        store.record_model("pets", "1", "ds-abc", CLASSES)
        store.append([
            prediction("old1", time=T0 - 3 * day, image=old_only),
            prediction("old2", time=T0 - 2 * day, image=shared),
            prediction("new1", time=T0 - 0.5 * day, image=shared),
            prediction("new2", time=T0),
        ])  # fmt: skip
        store.flush()
        store.add_feedback("old1", "cat")
        store.add_feedback("new1", "cat")
        store.save_check(drift_result("1", T0 - 2 * day, drifted=False))
        store.save_check(drift_result("1", T0, drifted=False))
        assert store.enforce_retention(now=T0) == 2
        assert store.enforce_retention(now=T0) == 0
        assert query(db_path, "SELECT request_id FROM predictions ORDER BY time") == [("new1",), ("new2",)]
        assert query(db_path, "SELECT request_id FROM feedback") == [("new1",)]
        assert [c.checked_at for c in store.checks("pets", "1")] == [T0]
        assert not image_store.exists(image_key(old_only))  # no row refers to it any more
        assert image_store.exists(image_key(shared))  # new1 still does
        assert query(db_path, "SELECT key FROM images") == [(image_key(shared),)]
        assert image_store.used_bytes == len(shared)
    finally:
        store.close()


def test_retention_by_rows_keeps_the_newest(url, db_path):
    store = PredictionStore(url, retention_rows=3)
    try:
        store.record_model("pets", "1", "ds-abc", CLASSES)
        store.append([prediction(f"r{i}", time=T0 + i) for i in range(10)])
        store.flush()
        store.add_feedback("r0", "cat")
        store.add_feedback("r9", "cat")
        assert store.enforce_retention() == 7
        assert query(db_path, "SELECT request_id FROM predictions ORDER BY time") == [("r7",), ("r8",), ("r9",)]
        assert query(db_path, "SELECT request_id FROM feedback") == [("r9",)]
    finally:
        store.close()


def test_retention_runs_in_the_background_of_a_writer(url):
    store = PredictionStore(url, retention_rows=2, retention_interval=0.2)
    try:
        store.record_model("pets", "1", "ds-abc", CLASSES)
        store.append([prediction(f"r{i}", time=T0 + i) for i in range(5)])
        store.flush()
        deadline = time.monotonic() + 60
        while store.count() > 2 and time.monotonic() < deadline:  # the first pass runs within one interval
            time.sleep(0.1)
        assert store.count() == 2
    finally:
        store.close()


# ------------------------------------------------------------------------------------------- URLs and outages
def test_urls_are_normalised_and_passwords_masked():
    assert normalise_url("postgresql://u:pw@h:5/db") == "postgresql+psycopg://u:pw@h:5/db"
    assert normalise_url("postgres://u@h/db") == "postgresql+psycopg://u@h/db"
    assert normalise_url("sqlite:///x.db") == "sqlite:///x.db"
    assert masked("postgresql+psycopg://u:secret@h:5/db") == "postgresql+psycopg://u:***@h:5/db"


def test_a_reader_of_an_unreachable_store_gets_a_clear_error():
    url = f"postgresql://monitor:s3cret@127.0.0.1:{free_port()}/predictions"
    with pytest.raises(StoreError) as caught:
        PredictionStore(url, writer=False, timeout=2)
    message = str(caught.value)
    assert "postgresql+psycopg://monitor:***@127.0.0.1" in message and "cannot be reached" in message
    assert "s3cret" not in message


def test_a_writer_of_an_unreachable_store_queues_and_never_blocks(metrics):
    url = f"postgresql://server:s3cret@127.0.0.1:{free_port()}/predictions"
    store = PredictionStore(url, timeout=2, metrics=metrics.store)  # the server starts anyway
    store.record_model("pets", "1", "ds-abc", CLASSES)
    store.append([prediction("r1"), prediction("r2")])
    assert store.queue_rows == 2
    store.flush(timeout=0.5)  # cannot finish: returns when the timeout is up
    assert store.queue_rows == 2 and store.lag_seconds > 0
    with pytest.raises(StoreError, match=r"\*\*\*"):
        store.add_feedback("r1", "cat")  # the feedback route answers 503 with this
    store.close(timeout=0.5)
    assert metric(metrics, "visionloop_prediction_store_errors_total", reason="write") == 2


def test_a_store_that_comes_up_later_gets_the_queued_rows(tmp_path):
    # SQLite "down": where its folder should be is a file, so the database cannot be opened
    blocked = tmp_path / "store"
    blocked.write_text("not a folder")
    store = PredictionStore(f"sqlite:///{blocked}/predictions.db", timeout=1)  # starts anyway
    try:
        store.record_model("pets", "1", "ds-abc", CLASSES)
        store.append([prediction("r1"), prediction("r2")])
        store.flush(timeout=0.5)
        assert store.queue_rows == 2
        blocked.unlink()  # the store comes up: the writer's next retry creates it and writes the rows
        store.flush()
        assert store.queue_rows == 0 and store.count() == 2
    finally:
        store.close()


def test_settings_name_the_embedded_store_and_its_images(tmp_path):
    settings = Settings(home=tmp_path / "home")
    store = PredictionStore.from_settings(settings, writer=False)
    try:
        assert store.url == f"sqlite:///{(tmp_path / 'home' / 'monitoring' / 'predictions.db').resolve()}"
        assert store.images is not None and store.images.root.endswith("monitoring/images")
        assert store.retention_days == settings.monitor.retention_days
    finally:
        store.close()
    off = Settings(home=tmp_path / "home", monitor={"keep_images": False})
    assert PredictionStore.from_settings(off, writer=False).images is None


# ------------------------------------------------------------------------------------------- images on S3
def test_images_kept_in_s3(s3, url):
    s3.create_bucket(Bucket="kept")
    images = ImageStore("s3://kept/traffic", 10 * 2**20)
    a = png_bytes(7)
    store = PredictionStore(url, images=images, retention_rows=1)
    try:
        store.record_model("pets", "1", "ds-abc", CLASSES)
        store.append([prediction("r1", image=a, time=T0), prediction("r2", image=png_bytes(8), time=T0 + 1)])
        store.flush()
        listed = s3.list_objects_v2(Bucket="kept", Prefix="traffic/")["Contents"]
        assert sorted(o["Key"] for o in listed) == sorted(f"traffic/{image_key(x)}" for x in (a, png_bytes(8)))
        assert images.open(image_key(a)) == a
        assert store.enforce_retention() == 1  # r1 goes, and its image with it
        assert not images.exists(image_key(a)) and images.exists(image_key(png_bytes(8)))
    finally:
        store.close()


@pytest.mark.parametrize("channels", [1, 3, 4])
def test_v2_tensors_are_kept_as_a_png_of_their_pixels(channels):
    from visionloop.serving.service import png

    pixels = np.random.default_rng(channels).integers(0, 256, (channels, 6, 5), dtype=np.uint8)
    with Image.open(io.BytesIO(png(pixels))) as img:
        assert img.format == "PNG" and img.size == (5, 6)
        back = np.asarray(img)
    np.testing.assert_array_equal(
        back if channels > 1 else back[None], pixels.transpose(1, 2, 0) if channels > 1 else pixels
    )
