"""The prediction log in a real SQLite file: appends, feedback and its refusals, restarts, background writes."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

import numpy as np
import pytest

from visionloop.serving.errors import ApiError
from visionloop.serving.predlog import Feedback, Prediction, PredictionLog

CLASSES = ["cat", "dog", "fox"]


def prediction(request_id: str, predicted_index: int = 0, embedding: object = None, **overrides) -> Prediction:
    fields = {
        "request_id": request_id,
        "time": 1_700_000_000.0,
        "endpoint": "predict",
        "model_name": "pets",
        "model_version": "1",
        "predicted_index": predicted_index,
        "predicted_label": CLASSES[predicted_index],
        "confidence": 0.875,
        "embedding": np.arange(4, dtype=np.float32) if embedding is None else embedding,
        "image_width": 32,
        "image_height": 24,
        "image_mean": 0.5,
        "image_std": 0.25,
        **overrides,
    }
    return Prediction(**fields)


def query(path: Path, sql: str, *args: object) -> list[tuple]:
    """Read the file with a separate connection, as monitoring would."""
    conn = sqlite3.connect(path)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "home" / "serving" / "predictions.db"


@pytest.fixture
def predlog(db_path: Path):
    log = PredictionLog(db_path)
    log.record_model("pets", "1", "ds-abc", CLASSES)
    yield log
    log.close()


def test_appended_predictions_are_counted_after_flush(predlog, db_path):
    assert db_path.is_file()  # the folder is created
    predlog.append([prediction("r1", 1), prediction("r2", 2, endpoint="v2", converted="RGBA->RGB")])
    predlog.append([prediction("r3")])
    predlog.append([])
    predlog.flush()
    assert predlog.count() == 3
    rows = query(
        db_path,
        "SELECT request_id, endpoint, model_version, predicted_index, predicted_label, confidence, "
        "image_width, image_height, image_mean, image_std, converted FROM predictions ORDER BY request_id",
    )
    assert rows == [
        ("r1", "predict", "1", 1, "dog", 0.875, 32, 24, 0.5, 0.25, None),
        ("r2", "v2", "1", 2, "fox", 0.875, 32, 24, 0.5, 0.25, "RGBA->RGB"),
        ("r3", "predict", "1", 0, "cat", 0.875, 32, 24, 0.5, 0.25, None),
    ]
    assert query(db_path, "SELECT model_version, model_name, dataset_version, classes FROM models") == [
        ("1", "pets", "ds-abc", '["cat", "dog", "fox"]')
    ]


def test_embedding_blob_decodes_to_the_float32_array(predlog, db_path):
    embedding = np.array([0.1, -2.5, 3e10, 0.0, 1 / 3], dtype=np.float64)  # stored as float32
    predlog.append([prediction("r1", embedding=embedding)])
    predlog.flush()
    (blob,) = query(db_path, "SELECT embedding FROM predictions WHERE request_id = 'r1'")[0]
    assert len(blob) == 5 * 4
    np.testing.assert_array_equal(np.frombuffer(blob, dtype="<f4"), embedding.astype(np.float32))


def test_feedback_by_label_name_and_by_index(predlog, db_path):
    predlog.append([prediction("right", predicted_index=1), prediction("wrong", predicted_index=0)])
    # no flush: add_feedback waits for the prediction to reach the disk itself
    assert predlog.add_feedback("right", "dog") == Feedback("right", "1", "dog", "dog", True)
    assert predlog.add_feedback("wrong", 2) == Feedback("wrong", "1", "cat", "fox", False)
    rows = query(db_path, "SELECT request_id, true_index, true_label, correct FROM feedback ORDER BY request_id")
    assert rows == [("right", 1, "dog", 1), ("wrong", 2, "fox", 0)]


def test_feedback_for_an_unknown_request_is_a_404(predlog):
    predlog.append([prediction("r1")])
    with pytest.raises(ApiError) as caught:
        predlog.add_feedback("no-such-id", "cat")
    assert (caught.value.status, caught.value.reason) == (404, "unknown_request_id")
    assert "no prediction with request_id 'no-such-id'" in caught.value.message


def test_unknown_label_name_is_a_422_naming_the_known_labels(predlog):
    predlog.append([prediction("r1")])
    with pytest.raises(ApiError) as caught:
        predlog.add_feedback("r1", "wolf")
    assert (caught.value.status, caught.value.reason) == (422, "unknown_label")
    assert caught.value.message == "unknown label 'wolf'; model v1 knows: cat, dog, fox"


def test_long_label_list_is_cut_short_in_the_message(db_path):
    classes = [f"c{i}" for i in range(25)]
    log = PredictionLog(db_path)
    try:
        log.record_model("many", "7", "ds-x", classes)
        log.append([prediction("r1", model_version="7", predicted_label="c0")])
        with pytest.raises(ApiError) as caught:
            log.add_feedback("r1", "c25")
        assert caught.value.message.endswith("knows: " + ", ".join(classes[:20]) + ", …")
    finally:
        log.close()


@pytest.mark.parametrize("index", [3, -1, 100])
def test_out_of_range_label_index_is_a_422(predlog, index):
    predlog.append([prediction("r1")])
    with pytest.raises(ApiError) as caught:
        predlog.add_feedback("r1", index)
    assert (caught.value.status, caught.value.reason) == (422, "unknown_label")
    assert f"label index {index} is out of range for 3 classes" in caught.value.message
    assert predlog.add_feedback("r1", 0).correct  # a refused label records nothing


def test_out_of_range_label_index_names_the_known_labels(predlog):
    predlog.append([prediction("r1")])
    with pytest.raises(ApiError) as caught:
        predlog.add_feedback("r1", 3)
    assert "cat, dog, fox" in caught.value.message


def test_second_feedback_for_a_request_is_a_409_and_keeps_the_first(predlog, db_path):
    predlog.append([prediction("r1", predicted_index=1)])
    assert predlog.add_feedback("r1", "dog").correct
    for label in ("cat", "dog", 0):
        with pytest.raises(ApiError) as caught:
            predlog.add_feedback("r1", label)
        assert (caught.value.status, caught.value.reason) == (409, "duplicate_feedback")
        assert "feedback for 'r1' was already recorded" in caught.value.message
    assert query(db_path, "SELECT true_label, correct FROM feedback") == [("dog", 1)]


def test_log_survives_closing_and_reopening(db_path):
    first = PredictionLog(db_path)
    first.record_model("pets", "1", "ds-abc", CLASSES)
    first.append([prediction("r1", 1), prediction("r2", 2)])
    assert first.add_feedback("r1", "dog").correct
    first.close()  # close writes what is still queued

    second = PredictionLog(db_path)
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


def test_close_writes_everything_still_queued(db_path):
    log = PredictionLog(db_path)
    log.record_model("pets", "1", "ds-abc", CLASSES)
    for i in range(50):
        log.append([prediction(f"r{i}")])
    log.close()
    assert query(db_path, "SELECT COUNT(*) FROM predictions") == [(50,)]


def test_rows_are_written_by_the_background_thread(predlog, db_path):
    # another connection holds the write lock: a write from append itself would block here
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN IMMEDIATE")
        predlog.append([prediction("r1")])  # returns at once, with the database locked
        assert predlog.count() == 0  # not on disk yet
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    predlog.flush()
    assert predlog.count() == 1


def test_write_errors_are_reported_from_the_writer_thread(db_path):
    reports = []
    log = PredictionLog(db_path, on_error=lambda lost: reports.append((lost, threading.current_thread().name)))
    try:
        log.record_model("pets", "1", "ds-abc", CLASSES)
        log.append([prediction("r1")])
        log.flush()
        log.append([prediction("r1")])  # the same request_id again: the insert fails
        log.flush()
        assert reports == [(1, "visionloop-predlog")]
        assert log.count() == 1
        log.append([prediction("r2")])  # the writer carries on
        log.flush()
        assert log.count() == 2
    finally:
        log.close()
