"""The prediction store's write path: an in-memory queue and the one background thread that empties it.

A request must never wait on the database, so ``PredictionStore.append`` only puts rows in a queue (at
most ``max_queued_rows``; past it rows are dropped and counted as ``queue_full``) and returns. One thread
per store commits whatever queued up in the last ``COMMIT_INTERVAL`` in one transaction, so the number of
transactions a second stays bounded whatever the request rate, and keeps the images that came with the
rows (content-addressed, once each, under the shared cap; see images.py).

A store that is down or locked is retried every ``RETRY_SECONDS``; the queue's size and the age of its
oldest row are what ``StoreMetrics.watch`` exposes as gauges. With a spool (spool.py; every server has
one), rows the store cannot take are not kept in memory, where a SIGTERM or a crash would lose them: a
batch whose write fails, the queue past half of ``max_queued_rows`` (the store is slower than the
traffic), and whatever is still queued at ``close`` go to the spool file, fsync'd. Once the store
answers again the writer replays the spool (its own rows, and any other writer's that it may claim)
``REPLAY_CHUNK`` rows a transaction, between the live batches, so live rows never wait behind a backlog.
Only rows the spool itself refuses (full, or the disk failing) are lost, each counted. Inserts are
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
from visionloop.monitoring.spool import Claimed, Spool
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
SPOOL_SCAN_SECONDS = 10.0  # how often an idle, healthy writer looks for other writers' spool files to replay
REPLAY_CHUNK = 500  # spooled rows replayed per transaction


class StoreMetrics:
    """What a writing store reports. This base reports nothing; ``ServingMetrics.store`` reports to Prometheus."""

    def rows_written(self, rows: int) -> None:
        """``rows`` predictions committed."""

    def rows_lost(self, reason: str, rows: int) -> None:
        """``rows`` predictions that will never be written: ``write`` (refused by the database), ``queue_full``,
        ``spool_full`` (the spool is at monitor.spool_max_mb), ``spool_error`` (the spool's disk failed)."""

    def rows_spooled(self, rows: int) -> None:
        """``rows`` predictions the store could not take, now in the spool file (fsync'd)."""

    def rows_replayed(self, rows: int) -> None:
        """``rows`` spooled predictions committed to the store (replayed)."""

    def image(self, result: str) -> None:
        """One image offered for keeping: ``kept``, ``duplicate``, ``over_cap`` or ``error``."""

    def watch(self, store: PredictionStore) -> None:
        """Called once with the store, for gauges read at scrape time (queue_rows, lag_seconds, spool_rows)."""


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

    def __init__(self, store: PredictionStore, spool: Spool | None = None) -> None:
        self.store = store
        self.spool = spool
        self._q = _Queue()
        self._outage_logged = False
        self._spool_logged = False
        self._healthy = True  # the last attempt on the store succeeded
        self._thread: threading.Thread | None = None
        self._claimed: Claimed | None = None  # the spool file being replayed, and how far
        self._replayed = 0
        self._next_scan = 0.0  # monotonic time of the next look for spool files to replay

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
            closing = self._q.closing
            if self._q.rows + len(predictions) > self.store.max_queued_rows or closing:
                dropped = True
            else:
                dropped = False
                self._q.seq += 1
                self._q.batches.append(_Batch(list(predictions), time.time(), self._q.seq))
                self._q.rows += len(predictions)
                self._q.cond.notify()
        if dropped and closing and self.spool is not None:  # after close: no thread left, the spool takes them
            self._spool([_Batch(list(predictions), time.time(), 0)], [], finish=False)
        elif dropped:
            self.store.metrics.rows_lost("queue_full", len(predictions))

    @property
    def queue_rows(self) -> int:
        """Predictions appended and not yet written."""
        return self._q.rows

    @property
    def spool_rows(self) -> int:
        """Predictions this writer holds in the spool: spooled and not yet replayed, and those of the file it
        is replaying now (another writer's included)."""
        if self.spool is None:
            return 0
        claimed = self._claimed
        left = 0 if claimed is None else sum(kind == "prediction" for kind, _ in claimed.records[self._replayed :])
        return self.spool.rows + left

    @property
    def lag_seconds(self) -> float:
        """Age of the oldest prediction not yet written; 0 when none is queued."""
        with self._q.cond:
            oldest = next((b.queued_at for b in self._q.batches if b.predictions), None)
        return 0.0 if oldest is None else max(0.0, time.time() - oldest)

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything appended so far is written, spooled or dropped; ``timeout`` None waits for as long."""
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
        """Stop the thread: it writes what is queued if the store is up, else spools it; nothing is dropped
        that the spool can take. Then the spool file is sealed, for the next start or another replica."""
        with self._q.cond:
            self._q.closing = True
            self._q.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=self.store.timeout + 5)
        if self.spool is not None:
            with self._q.cond:  # the thread is gone or stuck in a database call: spool what it still holds
                batches, models = list(self._q.batches), list(self._q.models)
            if batches or models:
                self._spool(batches, models)
            self.spool.seal()
            return
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
                    if self.spool is None:
                        self._q.cond.wait()
                        continue
                    wait = self._next_scan - time.monotonic()
                    if wait <= 0:
                        break
                    self._q.cond.wait(wait)
                closing = self._q.closing
            if not closing and self._q.batches:
                time.sleep(COMMIT_INTERVAL)  # let a few requests' rows gather: one commit per interval
            with self._q.cond:
                batches = list(self._q.batches)
                models = list(self._q.models)
                behind = self._q.rows > self.store.max_queued_rows // 2
            if batches or models:
                if self.spool is not None and (behind or (closing and not self._healthy)):
                    # the store is slower than the traffic, or down at shutdown: to disk, not to more memory
                    self._spool(batches, models)
                elif self._write([p for b in batches for p in b.predictions], models):
                    self._healthy = True
                    self._finish(batches, len(models))
                else:
                    self._healthy = False
                    if self.spool is not None:
                        self._spool(batches, models)
                    elif closing:
                        return
                    if not closing:
                        self._pause(RETRY_SECONDS)
                    continue
            if closing:
                with self._q.cond:
                    if not self._q.batches:
                        break
                continue
            if self.spool is not None and time.monotonic() >= self._next_scan:
                self._replay_some()
        if self._claimed is not None:  # stopping mid-file: give it back, whole, to whoever starts next
            self.spool.release(self._claimed)  # type: ignore[union-attr]
            self._claimed = None

    def _pause(self, seconds: float) -> None:
        """Sleep, but wake at once for close()."""
        with self._q.cond:
            if not self._q.closing:
                self._q.cond.wait(seconds)

    # -------------------------------------------------------------------------------- the spool
    def _spool(self, batches: list[_Batch], models: list[dict[str, Any]], finish: bool = True) -> None:
        """Put rows the store cannot take in the spool (fsync'd); count what even the spool refuses."""
        assert self.spool is not None
        predictions = [p for b in batches for p in b.predictions]
        records = [("model", m) for m in models] + [("prediction", p) for p in predictions]
        try:
            spooled, refused = self.spool.append(records)
            reason = "spool_full"
        except Exception as exc:  # the disk is full or gone: these rows are lost, the thread goes on
            log.error("prediction spool %s cannot be written: %s", self.spool.directory, exc)
            spooled, refused, reason = 0, len(predictions), "spool_error"
        if finish:
            self._finish(batches, len(models))
        if spooled:
            if not self._spool_logged:
                log.warning(
                    "prediction store %s: cannot take rows now; spooling them to %s (replayed when it answers)",
                    self.store.display_url, self.spool.directory,
                )  # fmt: skip
                self._spool_logged = True
            self.store.metrics.rows_spooled(spooled)
        if refused:
            self.store.metrics.rows_lost(reason, refused)
        self._next_scan = time.monotonic() + RETRY_SECONDS

    def _replay_some(self) -> None:
        """Replay one chunk of the spool if the store answers: our own sealed rows first, then any file we may
        claim. Deletes a file only once all its rows are committed."""
        assert self.spool is not None
        if self._claimed is None:
            if not self.spool.rows and next(self.spool.pending(), None) is None:
                self._spool_logged = False
                self._next_scan = time.monotonic() + SPOOL_SCAN_SECONDS
                return
            if not self._reachable():
                self._next_scan = time.monotonic() + RETRY_SECONDS
                return
            if self.spool.rows:
                self.spool.seal()  # our own rows become a sealed file, claimed below like any other
            self._claimed = self.spool.claim()
            self._replayed = 0
            if self._claimed is None:
                self._spool_logged = False
                self._next_scan = time.monotonic() + SPOOL_SCAN_SECONDS
                return
            log.info(
                "prediction spool: replaying %s (%d records) into %s",
                self._claimed.path.name, len(self._claimed.records), self.store.display_url,
            )  # fmt: skip
        claimed = self._claimed
        chunk = claimed.records[self._replayed : self._replayed + REPLAY_CHUNK]
        models = [row for kind, row in chunk if kind == "model"]
        predictions = [p for kind, p in chunk if kind == "prediction"]
        if not self._write(predictions, models):  # type: ignore[arg-type]
            self._healthy = False
            self.spool.release(claimed)
            self._claimed = None
            self._next_scan = time.monotonic() + RETRY_SECONDS
            return
        self._healthy = True
        self._replayed += len(chunk)
        if predictions:
            self.store.metrics.rows_replayed(len(predictions))
        if self._replayed < len(claimed.records):
            self.spool.touch(claimed)
        else:
            self.spool.done(claimed)
            self._claimed = None
        self._next_scan = 0.0  # more may wait: go on at once, between the live batches

    def _reachable(self) -> bool:
        try:
            self.store._ensure_schema()
            with self.store.engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        except Exception:
            return False
        return True

    # -------------------------------------------------------------------------------- the database
    def _write(self, predictions: list[Prediction], models: list[dict[str, Any]]) -> bool:
        """Write predictions and models rows in one transaction; False when the store is down (nothing written)."""
        try:
            self.store._ensure_schema()
            keys = self._keep_images(predictions)
            rows = self._rows(predictions, keys)
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
        if written:
            self.store.metrics.rows_written(written)
        return True

    def _rows(self, predictions: list[Prediction], keys: dict[int, str]) -> list[dict[str, Any]]:
        rows = []
        for prediction in predictions:
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
        """Take written (or spooled) batches off the queue. By identity: at shutdown close() may spool what a
        stuck thread still holds, and whichever of the two finishes second must not take newer batches."""
        with self._q.cond:
            for batch in batches:
                if self._q.batches and self._q.batches[0] is batch:
                    self._q.batches.popleft()
                    self._q.rows -= len(batch.predictions)
                    self._q.done = max(self._q.done, batch.seq)
            del self._q.models[: min(models, len(self._q.models))]
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
