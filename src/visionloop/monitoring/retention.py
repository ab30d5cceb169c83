"""The prediction store's retention: what is deleted, and the thread that deletes it.

A store that keeps every prediction grows without bound, so retention deletes predictions older than
``retention_days`` or beyond the newest ``retention_rows``, with their feedback, the drift checks older
than ``retention_days``, and the kept images no remaining prediction refers to (an image is shared by
every prediction of the same bytes, so it goes only with the last of them).

Deletes go oldest first along the ``time`` index, ``DELETE_CHUNK`` rows a transaction: a first pass over
a month of backlog never holds a long lock that would stall the writers. It runs on its own thread, not
the writer's, for the same reason: a long pass must not hold up the writes.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import TYPE_CHECKING

import sqlalchemy as sa

from visionloop.monitoring.tables import IN_CHUNK, checks_table, chunks, feedback_table, images_table, predictions_table

if TYPE_CHECKING:
    from visionloop.monitoring.store import PredictionStore

log = logging.getLogger("visionloop.store")

DELETE_CHUNK = 2000  # retention deletes this many rows per transaction


class Retention:
    """Retention of one ``PredictionStore``, on its settings (``retention_days``, ``_rows``, ``_interval``)."""

    def __init__(self, store: PredictionStore) -> None:
        self.store = store
        self._stop = threading.Event()

    def start(self) -> None:
        threading.Thread(target=self._retain_forever, name="visionloop-store-retention", daemon=True).start()

    def stop(self) -> None:
        self._stop.set()

    def _retain_forever(self) -> None:
        # the first pass soon after start (a server restarted after a long stop has a backlog), then every interval
        wait = min(60.0, self.store.retention_interval)
        while not self._stop.wait(wait):
            wait = self.store.retention_interval
            try:
                self.store.enforce_retention()
            except Exception as exc:  # the thread outlives anything one pass throws
                log.error("prediction store %s: retention failed: %s", self.store.display_url, exc)

    def enforce(self, now: float | None = None) -> int:
        """Delete predictions past retention_days or beyond the newest retention_rows, their feedback, the
        drift checks past retention_days, and the kept images no prediction refers to any more; returns
        the number of predictions deleted."""
        self.store._ensure_schema()
        now = time.time() if now is None else now
        p = predictions_table.c
        deleted = 0
        orphans: set[str] = set()
        if self.store.retention_days > 0:
            cutoff = now - self.store.retention_days * 86400
            deleted += self._delete_oldest(p.time < cutoff, None, orphans)
            with self.store.engine.begin() as conn:
                conn.execute(sa.delete(checks_table).where(checks_table.c.checked_at < cutoff))
        if self.store.retention_rows > 0:
            with self.store._read() as conn:
                total = conn.execute(sa.select(sa.func.count()).select_from(predictions_table)).scalar_one()
            if total > self.store.retention_rows:
                deleted += self._delete_oldest(sa.true(), total - self.store.retention_rows, orphans)
        if orphans:
            self._delete_unreferenced_images(sorted(orphans))
        self.store._refresh_image_bytes()
        if deleted:
            log.info("prediction store %s: retention deleted %d predictions", self.store.display_url, deleted)
        return deleted

    def _delete_oldest(self, condition: sa.ColumnElement[bool], limit: int | None, orphans: set[str]) -> int:
        """Delete the oldest predictions matching ``condition`` (at most ``limit``), in chunks, index order."""
        p = predictions_table.c
        deleted = 0
        while limit is None or deleted < limit:
            take = DELETE_CHUNK if limit is None else min(DELETE_CHUNK, limit - deleted)
            with self.store.engine.begin() as conn:
                found = conn.execute(
                    sa.select(p.request_id, p.image_key).where(condition).order_by(p.time).limit(take)
                ).all()
                if not found:
                    break
                ids = [row[0] for row in found]
                conn.execute(sa.delete(feedback_table).where(feedback_table.c.request_id.in_(ids)))
                conn.execute(sa.delete(predictions_table).where(p.request_id.in_(ids)))
            orphans.update(row[1] for row in found if row[1])
            deleted += len(found)
            if len(found) < take:
                break
        return deleted

    def _delete_unreferenced_images(self, candidates: list[str]) -> None:
        p, i = predictions_table.c, images_table.c
        for chunk in chunks(candidates, IN_CHUNK):
            with self.store.engine.begin() as conn:
                used = set(conn.execute(sa.select(p.image_key).where(p.image_key.in_(chunk)).distinct()).scalars())
                unused = [key for key in chunk if key not in used]
                if unused:
                    conn.execute(sa.delete(images_table).where(i.key.in_(unused)))
            if unused and self.store.images is not None:
                try:
                    self.store.images.delete(unused)
                except Exception as exc:
                    log.error("kept images %s: cannot delete %d images: %s", self.store.images.url, len(unused), exc)
