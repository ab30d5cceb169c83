"""The prediction log: every prediction and every ground-truth label, in SQLite, for monitoring to read.

Append-only: rows are inserted, never updated or deleted, so monitoring and retraining read a stable
history. Writes happen on one background thread that commits whatever has queued up in the last 50 ms in one
transaction, so a request never waits for the disk and the disk sees a few commits a second. The file lives at
``<home>/serving/predictions.db`` (WAL mode), survives restarts, and any SQLite client can read it.
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from visionloop.serving.errors import ApiError

log = logging.getLogger("visionloop.serve")
COMMIT_INTERVAL = 0.05  # seconds; at most ~20 transactions a second whatever the request rate

SCHEMA = """
CREATE TABLE IF NOT EXISTS models (
    model_version TEXT PRIMARY KEY,
    model_name TEXT NOT NULL,
    dataset_version TEXT,
    classes TEXT NOT NULL,               -- JSON list, index = class id
    first_served REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS predictions (
    request_id TEXT PRIMARY KEY,
    time REAL NOT NULL,                  -- unix seconds
    endpoint TEXT NOT NULL,              -- predict | v2
    model_name TEXT NOT NULL,
    model_version TEXT NOT NULL,
    predicted_index INTEGER NOT NULL,
    predicted_label TEXT NOT NULL,
    confidence REAL NOT NULL,
    embedding BLOB NOT NULL,             -- float32 little-endian
    image_width INTEGER NOT NULL,
    image_height INTEGER NOT NULL,
    image_mean REAL NOT NULL,            -- pixels on a 0-1 scale, after conversion
    image_std REAL NOT NULL,
    converted TEXT                       -- e.g. RGBA->L when the colour mode was converted
);
CREATE INDEX IF NOT EXISTS predictions_time ON predictions(time);
CREATE TABLE IF NOT EXISTS feedback (
    request_id TEXT PRIMARY KEY REFERENCES predictions(request_id),
    time REAL NOT NULL,
    true_index INTEGER NOT NULL,
    true_label TEXT NOT NULL,
    correct INTEGER NOT NULL
);
"""


@dataclass
class Prediction:
    request_id: str
    time: float
    endpoint: str
    model_name: str
    model_version: str
    predicted_index: int
    predicted_label: str
    confidence: float
    embedding: np.ndarray
    image_width: int
    image_height: int
    image_mean: float
    image_std: float
    converted: str | None = None

    def row(self) -> tuple:
        return (
            self.request_id, self.time, self.endpoint, self.model_name, self.model_version,
            self.predicted_index, self.predicted_label, self.confidence,
            np.asarray(self.embedding, dtype="<f4").tobytes(),
            self.image_width, self.image_height, self.image_mean, self.image_std, self.converted,
        )  # fmt: skip


@dataclass
class Feedback:
    request_id: str
    model_version: str
    predicted_label: str
    true_label: str
    correct: bool


def connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.executescript(SCHEMA)
    return conn


class PredictionLog:
    def __init__(self, path: Path, on_error: Callable[[int], None] | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._writer = connect(path)
        self._reader = connect(path)
        self._read_lock = threading.Lock()
        self._queue: queue.Queue[tuple[str, list[tuple]] | None] = queue.Queue()
        self._on_error = on_error
        self._thread = threading.Thread(target=self._write_forever, name="visionloop-predlog", daemon=True)
        self._thread.start()

    # --------------------------------------------------------------------------------- writing
    def record_model(self, name: str, version: str, dataset_version: str, classes: list[str]) -> None:
        row = (version, name, dataset_version, json.dumps(classes), time.time())
        self._queue.put(("INSERT OR IGNORE INTO models VALUES (?, ?, ?, ?, ?)", [row]))

    def append(self, predictions: list[Prediction]) -> None:
        rows = [p.row() for p in predictions]
        self._queue.put(("INSERT INTO predictions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows))

    def _write_forever(self) -> None:
        while True:
            first = self._queue.get()
            if first is not None:
                # let a few requests' rows gather: one commit per interval, not one per request
                time.sleep(COMMIT_INTERVAL)
            batch = [first]
            while not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                with self._writer:  # one transaction for everything queued
                    for entry in batch:
                        if entry is not None:
                            self._writer.executemany(*entry)
            except sqlite3.Error as exc:
                lost = sum(len(entry[1]) for entry in batch if entry is not None)
                log.error("prediction log: %d rows not written: %s", lost, exc)
                if self._on_error is not None:
                    self._on_error(lost)
            finally:
                for _ in batch:
                    self._queue.task_done()
            if None in batch:
                return

    def flush(self) -> None:
        """Wait until everything appended so far is committed."""
        self._queue.join()

    def close(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)
        self._writer.close()
        self._reader.close()

    # --------------------------------------------------------------------------------- feedback
    def add_feedback(self, request_id: str, true_label: str | int) -> Feedback:
        """Record the true label of a logged prediction (by class name or index)."""
        self.flush()  # the prediction may still be on its way to the disk
        with self._read_lock:
            found = self._reader.execute(
                "SELECT p.model_version, p.predicted_index, p.predicted_label, m.classes FROM predictions p "
                "JOIN models m ON m.model_version = p.model_version WHERE p.request_id = ?",
                (request_id,),
            ).fetchone()
        if found is None:
            raise ApiError(404, f"no prediction with request_id {request_id!r}", "unknown_request_id")
        version, predicted_index, predicted_label, classes_json = found
        classes = json.loads(classes_json)
        known = f"model v{version} knows: " + ", ".join(classes[:20]) + (", …" if len(classes) > 20 else "")
        if isinstance(true_label, int):
            if not 0 <= true_label < len(classes):
                message = f"label index {true_label} is out of range for {len(classes)} classes; {known}"
                raise ApiError(422, message, "unknown_label")
            index = true_label
        elif true_label in classes:
            index = classes.index(true_label)
        else:
            raise ApiError(422, f"unknown label {true_label!r}; {known}", "unknown_label")
        row = (request_id, time.time(), index, classes[index], int(index == predicted_index))
        try:  # feedback is rare: it is written at once, in its own transaction
            with self._read_lock, self._reader:
                self._reader.execute("INSERT INTO feedback VALUES (?, ?, ?, ?, ?)", row)
        except sqlite3.IntegrityError:
            raise ApiError(409, f"feedback for {request_id!r} was already recorded", "duplicate_feedback") from None
        return Feedback(request_id, version, predicted_label, classes[index], index == predicted_index)

    # --------------------------------------------------------------------------------- reading
    def count(self) -> int:
        with self._read_lock:
            return int(self._reader.execute("SELECT COUNT(*) FROM predictions").fetchone()[0])
