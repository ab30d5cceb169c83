"""The prediction store's write path: an in-memory queue and the one background thread that empties it.

A request must never wait on the database, so ``PredictionStore.append`` only puts rows in a queue (at
most ``max_queued_rows``; past it rows are dropped and counted as ``queue_full``) and returns. One thread
per store commits whatever queued up in the last ``COMMIT_INTERVAL`` in one transaction, so the number of
transactions a second stays bounded whatever the request rate, and keeps the images that came with the
rows (content-addressed, once each, under the shared cap; see images.py).

A store that is down or locked keeps the rows queued and is retried every ``RETRY_SECONDS``; the queue's
size and the age of its oldest row are what ``StoreMetrics.watch`` exposes as gauges. Inserts are
idempotent on ``request_id``, so a batch retried after a lost commit acknowledgement is not doubled, and
a batch the database refuses (a bad row, not an outage) is retried one row at a time so only the bad
rows are lost, each counted.

The writer works on its store's engine, settings and metrics, read when used (a store whose ``metrics``
is replaced reports to the new one), and shares the store's schema and image-count helpers.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from visionloop.monitoring.images import image_key
from visionloop.monitoring.tables import (
    IN_CHUNK,
    Prediction,
    StoreError,
    chunks,
    images_table,
    insert_ignoring_duplicates,
    models_table,
    predictions_table,
)

if TYPE_CHECKING:
    from visionloop.monitoring.store import PredictionStore

log = logging.getLogger("visionloop.store")

COMMIT_INTERVAL = 0.05  # seconds; at most ~20 transactions a second whatever the request rate
RETRY_SECONDS = 1.0  # while the store is down or locked
IMAGE_RECOUNT_SECONDS = 60.0  # how often a writer re-reads the kept images' total (other servers add to it)


class StoreMetrics:
    """What a writing store reports. This base reports nothing; ``ServingMetrics.store`` reports to Prometheus."""

    def rows_written(self, rows: int) -> None:
        """``rows`` predictions committed."""

    def rows_lost(self, reason: str, rows: int) -> None:
        """``rows`` predictions that will never be written: ``write`` (refused by the database), ``queue_full``."""

    def image(self, result: str) -> None:
        """One image offered for keeping: ``kept``, ``duplicate``, ``over_cap`` or ``error``."""

    def watch(self, store: PredictionStore) -> None:
        """Called once with the store, for gauges read at scrape time (queue_rows, lag_seconds)."""


def _is_outage(exc: BaseException) -> bool:
    """A failure worth retrying the same rows for (down, locked, timed out), not rows the database refuses."""
    if isinstance(exc, sa_exc.DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, sa_exc.OperationalError | sa_exc.TimeoutError | sa_exc.InterfaceError) or not isinstance(
        exc, sa_exc.SQLAlchemyError
    )


@dataclass
class _Batch:
    predictions: list[Prediction]
    queued_at: float
    seq: int


@dataclass
class _Queue:
    """What the writer thread has not committed yet, under one condition variable."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    batches: deque[_Batch] = field(default_factory=deque)
    models: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    seq: int = 0  # last sequence number handed out
    done: int = 0  # every batch up to this one is written or dropped
    closing: bool = False


class StoreWriter:
    """What ``append`` queued and the thread that writes it; one per writing ``PredictionStore``."""

    def __init__(self, store: PredictionStore) -> None:
        self.store = store
        self._q = _Queue()
        self._outage_logged = False
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._write_forever, name="visionloop-store", daemon=True)
        self._thread.start()

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def queue_model(self, row: dict[str, Any]) -> None:
        """Queue a ``models`` row; it goes in the next transaction, before the predictions that name it."""
        with self._q.cond:
            self._q.models.append(row)
            self._q.seq += 1
            self._q.batches.append(_Batch([], time.time(), self._q.seq))
            self._q.cond.notify()

    def append(self, predictions: list[Prediction]) -> None:
        """Queue predictions for the writer thread; never waits. A full queue drops them (counted)."""
        if not predictions:
            return
        with self._q.cond:
            if self._q.rows + len(predictions) > self.store.max_queued_rows or self._q.closing:
                dropped = True
            else:
                dropped = False
                self._q.seq += 1
                self._q.batches.append(_Batch(list(predictions), time.time(), self._q.seq))
                self._q.rows += len(predictions)
                self._q.cond.notify()
        if dropped:
            self.store.metrics.rows_lost("queue_full", len(predictions))

    @property
    def queue_rows(self) -> int:
        """Predictions appended and not yet written."""
        return self._q.rows

    @property
    def lag_seconds(self) -> float:
        """Age of the oldest prediction not yet written; 0 when none is queued."""
        with self._q.cond:
            oldest = next((b.queued_at for b in self._q.batches if b.predictions), None)
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything appended so far is written (or dropped); ``timeout`` None waits for as long."""
        if self._thread is None:
            return
        with self._q.cond:
            target = self._q.seq
            self._q.cond.notify_all()
            deadline = None if timeout is None else time.monotonic() + timeout
            while self._q.done < target and self._thread.is_alive():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    break
                self._q.cond.wait(0.5 if left is None else min(left, 0.5))

    def stop(self) -> None:
        """Write what is still queued (one last try), stop the thread, and count what was not written."""
        with self._q.cond:
            self._q.closing = True
            self._q.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.store.timeout + 5)
        left = self._q.rows
        if left:
            log.error("prediction store %s: %d predictions not written at close", self.store.display_url, left)
            self.store.metrics.rows_lost("write", left)

    def _write_forever(self) -> None:
        with contextlib.suppress(Exception):  # the tables at once, for readers; if down, the first write says so
            self.store._ensure_schema()
        while True:
            with self._q.cond:
                while not self._q.batches and not self._q.closing:
                    self._q.cond.wait()
                closing = self._q.closing
            if not closing:
                time.sleep(COMMIT_INTERVAL)  # let a few requests' rows gather: one commit per interval
            with self._q.cond:
                batches = list(self._q.batches)
                models = list(self._q.models)
            if batches or models:
                ok = self._write(batches, models)
                if not ok:
                    if closing:
                        return
                    time.sleep(RETRY_SECONDS)
                    continue
            if closing:
                with self._q.cond:
                    if not self._q.batches:
                        return

    def _write(self, batches: list[_Batch], models: list[dict[str, Any]]) -> bool:
        """Write the batches in one transaction; False when the store is down (the rows stay queued)."""
        try:
            self.store._ensure_schema()
            keys = self._keep_images([p for b in batches for p in b.predictions])
            rows = self._rows(batches, keys)
            try:
                with self.store.engine.begin() as conn:
                    self._insert(conn, models, rows)
                written = len(rows)
            except sa_exc.SQLAlchemyError as exc:
                if _is_outage(exc):
                    raise
                written = self._write_one_by_one(models, rows)
        except Exception as exc:
            if not self._outage_logged:
                queued = self._q.rows
                log.error(
                    "prediction store %s: cannot write (%d predictions queued; retrying every %g s): %s",
                    self.store.display_url, queued, RETRY_SECONDS,
                    exc if isinstance(exc, StoreError) else self.store._error("failed a write", exc),
                )  # fmt: skip
                self._outage_logged = True
            return False
        if self._outage_logged:
            log.warning("prediction store %s: writing again", self.store.display_url)
            self._outage_logged = False
        self._finish(batches, len(models))
        if written:
            self.store.metrics.rows_written(written)
        return True

    def _rows(self, batches: list[_Batch], keys: dict[int, str]) -> list[dict[str, Any]]:
        rows = []
        for prediction in (p for b in batches for p in b.predictions):
            try:
                rows.append(prediction.row(keys.get(id(prediction))))
            except Exception as exc:  # a value that is not what the field says: this row only is lost
                log.error("prediction store: prediction %r cannot be stored: %s", prediction.request_id, exc)
                self.store.metrics.rows_lost("write", 1)
        return rows

    def _insert(self, conn: sa.Connection, models: list[dict[str, Any]], rows: list[dict[str, Any]]) -> None:
        if models:
            conn.execute(
                insert_ignoring_duplicates(self.store.engine, models_table, ["model_name", "model_version"]), models
            )
        if rows:
            conn.execute(insert_ignoring_duplicates(self.store.engine, predictions_table, ["request_id"]), rows)

    def _write_one_by_one(self, models: list[dict[str, Any]], rows: list[dict[str, Any]]) -> int:
        """The database refused the batch: write each prediction alone, drop (and count) the ones it refuses."""
        written = 0
        with self.store.engine.begin() as conn:
            self._insert(conn, models, [])
        for row in rows:
            try:
                with self.store.engine.begin() as conn:
                    self._insert(conn, [], [row])
                written += 1
            except sa_exc.SQLAlchemyError as exc:
                if _is_outage(exc):
                    raise
                log.error("prediction store: prediction %s refused: %s", row["request_id"], exc.__cause__ or exc)
                self.store.metrics.rows_lost("write", 1)
        return written

    def _finish(self, batches: list[_Batch], models: int) -> None:
        with self._q.cond:
            for _ in batches:
                batch = self._q.batches.popleft()
                self._q.rows -= len(batch.predictions)
                self._q.done = batch.seq
            del self._q.models[:models]
            self._q.cond.notify_all()

    def _keep_images(self, predictions: list[Prediction]) -> dict[int, str]:
        """Keep the images of these predictions (once each); returns id(prediction) -> image key."""
        if self.store.images is None:
            return {}
        offered = [(p, image_key(p.image)) for p in predictions if p.image]
        if not offered:
            return {}
        if time.monotonic() - self.store._images_counted_at > IMAGE_RECOUNT_SECONDS:  # other servers' images count too
            self.store._refresh_image_bytes()
        wanted = sorted({key for _, key in offered})
        known: set[str] = set()
        with self.store.engine.connect() as conn:
            for chunk in chunks(wanted, IN_CHUNK):
                known.update(conn.execute(sa.select(images_table.c.key).where(images_table.c.key.in_(chunk))).scalars())
        keys: dict[int, str] = {}
        new_rows: list[dict[str, Any]] = []
        done: dict[str, str | None] = {}
        now = time.time()
        for prediction, key in offered:
            if key in known or key in done:
                if done.get(key, key) is not None:
                    keys[id(prediction)] = key
                    self.store.metrics.image("duplicate")
                else:
                    self.store.metrics.image("over_cap")
                continue
            try:
                stored, result = self.store.images.put(prediction.image, key)  # type: ignore[arg-type]
            except Exception as exc:
                log.error("kept images %s: cannot write %s: %s", self.store.images.url, key, exc)
                self.store.metrics.image("error")
                done[key] = None
                continue
            self.store.metrics.image(result)
            done[key] = stored
            if stored is not None:
                keys[id(prediction)] = stored
                new_rows.append({"key": key, "size": len(prediction.image), "created": now})  # type: ignore[arg-type]
        if new_rows:
            with self.store.engine.begin() as conn:
                conn.execute(insert_ignoring_duplicates(self.store.engine, images_table, ["key"]), new_rows)
        return keys
