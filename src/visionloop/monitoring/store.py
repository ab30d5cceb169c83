"""The prediction store: every prediction, every ground-truth label and every drift check, in SQL.

One URL picks the database (``monitor.store_url``): SQLite under the home by default (embedded, WAL),
or PostgreSQL that several ``visionloop serve`` processes write to and ``visionloop monitor`` reads.
``PredictionStore`` is the one object both sides hold; the parts it is made of each have a module:

- tables.py: the schema, the engine, the rows handed back (``Prediction``, ``Window``, …);
- writer.py: ``append`` never blocks a request; a background thread batches rows into one commit per
  50 ms, keeps their images, and retries while the store is down (queued rows and lag are gauges);
- spool.py: rows the store cannot take (down, too slow, or still queued at shutdown) go to a durable local
  file and are replayed when it answers, by this server or any replica sharing the folder;
- retention.py: the thread that deletes what ``retention_days`` / ``retention_rows`` say to.

This module is the read side, and the writes that are rare enough to go straight to the database
(feedback labels, drift checks). Reading uses indexed range scans only (the newest N predictions of a
version, the newest N feedback labels, the newest check): the cost of a read does not grow with the size
of the store. The names other code imports from here (the rows, the tables, ``StoreError``,
``StoreMetrics``, ``masked``, ``normalise_url``) are re-exported, so importers need not know the split.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from visionloop.monitoring.images import ImageStore
from visionloop.monitoring.retention import Retention
from visionloop.monitoring.schema import DriftResult
from visionloop.monitoring.spool import Spool
from visionloop.monitoring.tables import (
    WINDOW_COLUMNS,
    Feedback,
    LabelledImage,
    ModelRecord,
    Prediction,
    StoreError,
    Window,
    checks_table,
    create_store_engine,
    feedback_table,
    images_table,
    masked,
    metadata,
    models_table,
    normalise_url,
    predictions_table,
)
from visionloop.monitoring.writer import StoreMetrics, StoreWriter
from visionloop.serving.errors import ApiError

if TYPE_CHECKING:
    from visionloop.config import Settings


class PredictionStore:
    """Predictions, feedback and drift checks in one SQL database (SQLite or PostgreSQL)."""

    def __init__(
        self,
        url: str,
        *,
        writer: bool = True,
        timeout: float = 10.0,
        max_queued_rows: int = 100_000,
        images: ImageStore | None = None,
        retention_days: float = 0,
        retention_rows: int = 0,
        retention_interval: float = 600,
        metrics: StoreMetrics | None = None,
        spool_dir: Path | None = None,
        spool_max_bytes: int = 2**30,
    ) -> None:
        self.url = url
        self.display_url = masked(normalise_url(url))
        self.timeout = timeout
        self.max_queued_rows = max_queued_rows
        self.images = images
        self.retention_days = retention_days
        self.retention_rows = retention_rows
        self.retention_interval = retention_interval
        self.metrics = metrics or StoreMetrics()
        self.engine = create_store_engine(url, timeout)
        self.writer = writer
        self._schema_ready = False
        self._images_counted_at = 0.0
        self._schema_lock = threading.Lock()
        self.spool = Spool(spool_dir / spool_key(self.display_url), spool_max_bytes) if spool_dir and writer else None
        self._writes = StoreWriter(self, self.spool)
        self._retention = Retention(self)
        if not writer:
            self._ensure_schema()  # a reader says at once that the store cannot be reached
            return
        self.metrics.watch(self)
        self._writes.start()
        if retention_days > 0 or retention_rows > 0:
            # its own thread: a long first pass (a month of backlog) must not hold up the writes
            self._retention.start()

    @classmethod
    def from_settings(
        cls, settings: Settings, writer: bool = True, metrics: StoreMetrics | None = None
    ) -> PredictionStore:
        """The store ``settings`` name (monitor.*), with its image store when images are kept."""
        m = settings.monitor
        image_url = settings.image_url
        images = ImageStore(image_url, int(m.image_max_mb * 2**20)) if image_url else None
        spool_dir = Path(m.spool_dir) if m.spool_dir else settings.home / "monitoring" / "spool"
        return cls(
            settings.store_url,
            writer=writer,
            timeout=m.store_timeout_seconds,
            max_queued_rows=m.max_queued_rows,
            images=images,
            retention_days=m.retention_days,
            retention_rows=m.retention_rows,
            retention_interval=m.retention_interval_seconds,
            metrics=metrics,
            spool_dir=spool_dir.resolve(),
            spool_max_bytes=int(m.spool_max_mb * 2**20),
        )

    # ------------------------------------------------------------------ connections (writer.py and retention.py use them too)
    def _ensure_schema(self) -> None:
        """Create the tables on first contact (checkfirst), and seed the image cap's count."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            database = self.engine.url.database
            if self.engine.dialect.name == "sqlite" and database and database != ":memory:":
                with contextlib.suppress(OSError):  # a folder that cannot be made: SQLite says why, below
                    Path(database).parent.mkdir(parents=True, exist_ok=True)
            for attempt in range(3):
                try:
                    metadata.create_all(self.engine, checkfirst=True)
                    break
                except (sa_exc.IntegrityError, sa_exc.ProgrammingError) as exc:
                    # another server created the same table between our check and our CREATE: look again
                    if attempt == 2:
                        raise self._error("cannot create its tables", exc) from None
                except sa_exc.SQLAlchemyError as exc:
                    raise self._error("cannot be reached", exc) from None
            self._schema_ready = True
        self._refresh_image_bytes()

    def _error(self, what: str, exc: BaseException) -> StoreError:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return StoreError(f"prediction store {self.display_url} {what}: {detail[0] if detail else type(exc).__name__}")

    @contextmanager
    def _read(self) -> Iterator[sa.Connection]:
        self._ensure_schema()
        try:
            with self.engine.connect() as conn:
                yield conn
        except sa_exc.SQLAlchemyError as exc:
            raise self._error("failed a read", exc) from None

    def _refresh_image_bytes(self) -> None:
        if self.images is None:
            return
        with self.engine.connect() as conn:
            used = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(images_table.c.size), 0))).scalar_one()
        self.images.used_bytes = int(used)
        self._images_counted_at = time.monotonic()

    # ------------------------------------------------------------------------------ writing
    def record_model(self, name: str, version: str, dataset_version: str, classes: list[str]) -> None:
        """Note a version being served (its classes name the predicted indices); once per version."""
        row = {
            "model_name": name,
            "model_version": version,
            "dataset_version": dataset_version,
            "classes": json.dumps(list(classes)),
            "first_served": time.time(),
        }
        self._require_writer()
        self._writes.queue_model(row)

    def append(self, predictions: list[Prediction]) -> None:
        """Queue predictions for the writer thread; never waits. A full queue drops them (counted)."""
        self._require_writer()
        self._writes.append(predictions)

    def _require_writer(self) -> None:
        if not self.writer:
            raise RuntimeError("this PredictionStore was opened with writer=False")

    @property
    def queue_rows(self) -> int:
        """Predictions appended and not yet written."""
        return self._writes.queue_rows

    @property
    def lag_seconds(self) -> float:
        """Age of the oldest prediction not yet written; 0 when none is queued."""
        return self._writes.lag_seconds

    @property
    def spool_rows(self) -> int:
        """Predictions this writer holds in the spool (spooled, or in the file it replays), not yet stored."""
        return self._writes.spool_rows

    def flush(self, timeout: float | None = None) -> None:
        """Wait until everything appended so far is written, spooled or dropped; ``timeout`` None waits for as long."""
        self._writes.flush(timeout)

    def close(self, timeout: float | None = None) -> None:
        """Write what is queued (waiting up to ``timeout``, default the store timeout), then stop; with a spool,
        what the store did not take by then is spooled (fsync'd), not dropped, and replayed on the next start."""
        if self._writes.running:
            self._writes.flush(self.timeout if timeout is None else timeout)
            self._retention.stop()
            self._writes.stop()
        self.engine.dispose()

    # ------------------------------------------------------------------------------ feedback
    def add_feedback(self, request_id: str, true_label: str | int, authenticated: bool = False) -> Feedback:
        """Record the true label of a stored prediction (by class name or index); ApiError 404/422/409.

        ``authenticated``: the label came with serve.feedback_token (kept, so a retrain can use only those)."""
        self.flush(self.timeout)  # the prediction may still be on its way to the database
        p, m = predictions_table.c, models_table.c
        query = (
            sa.select(p.model_name, p.model_version, p.predicted_index, p.predicted_label, m.classes)
            .join(models_table, (m.model_name == p.model_name) & (m.model_version == p.model_version))
            .where(p.request_id == request_id)
        )
        with self._read() as conn:
            found = conn.execute(query).first()
        if found is None and self.writer and self.spool_rows:
            # it may be one of the rows waiting in this server's spool: not unknown, not stored yet either
            raise ApiError(
                503,
                f"no stored prediction with request_id {request_id!r} yet, and this server has "
                f"{self.spool_rows} predictions waiting in its spool for the store; try again later",
                "prediction_spooled",
            )
        if found is None:
            raise ApiError(404, f"no prediction with request_id {request_id!r}", "unknown_request_id")
        name, version, predicted_index, predicted_label, classes_json = found
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
        row = {
            "request_id": request_id,
            "time": time.time(),
            "model_name": name,
            "model_version": version,
            "true_index": index,
            "true_label": classes[index],
            "correct": int(index == predicted_index),
            "authenticated": int(authenticated),
        }
        try:  # feedback is rare: written at once, in its own transaction
            with self.engine.begin() as conn:
                conn.execute(feedback_table.insert(), row)
        except sa_exc.IntegrityError:
            raise ApiError(409, f"feedback for {request_id!r} was already recorded", "duplicate_feedback") from None
        except sa_exc.SQLAlchemyError as exc:
            raise self._error("failed a write", exc) from None
        return Feedback(request_id, version, predicted_label, classes[index], index == predicted_index)

    # ------------------------------------------------------------------------------ retention
    def enforce_retention(self, now: float | None = None) -> int:
        """Delete predictions past retention_days or beyond the newest retention_rows, their feedback, the
        drift checks past retention_days, and the kept images no prediction refers to any more; returns
        the number of predictions deleted."""
        return self._retention.enforce(now)

    # ------------------------------------------------------------------------------ reading
    def count(self, model_name: str | None = None, model_version: str | None = None) -> int:
        """Predictions stored (of one model, or one version)."""
        p = predictions_table.c
        query = sa.select(sa.func.count()).select_from(predictions_table)
        if model_name is not None:
            query = query.where(p.model_name == model_name)
        if model_version is not None:
            query = query.where(p.model_version == model_version)
        with self._read() as conn:
            return int(conn.execute(query).scalar_one())

    def window(self, model_name: str, model_version: str, size: int, since: float) -> Window:
        """The newest ``size`` predictions of that version with time >= ``since``, oldest first."""
        p = predictions_table.c
        query = (
            sa.select(*(getattr(p, name) for name in WINDOW_COLUMNS))
            .where(p.model_name == model_name, p.model_version == model_version, p.time >= since)
            .order_by(p.time.desc())
            .limit(size)
        )
        with self._read() as conn:
            rows = conn.execute(query).all()[::-1]
        return Window.from_rows(rows)

    def models(self, model_name: str) -> list[ModelRecord]:
        """Every version of ``model_name`` that has been served, in the order they were first served."""
        m = models_table.c
        query = sa.select(m.model_version, m.dataset_version, m.classes, m.first_served).where(
            m.model_name == model_name
        )
        with self._read() as conn:
            rows = conn.execute(query.order_by(m.first_served, m.model_version)).all()
        return [ModelRecord(r[0], r[1] or "", json.loads(r[2]), float(r[3])) for r in rows]

    def live_accuracy(self, model_name: str, size: int) -> list[tuple[str, int, int]]:
        """Per served version with feedback: (version, count, correct) over its newest ``size`` labels.

        One statement: a UNION ALL of one index range scan (newest ``size`` labels) per version.
        """
        f, m = feedback_table.c, models_table.c
        with self._read() as conn:
            versions = list(
                conn.execute(
                    sa.select(m.model_version)
                    .where(m.model_name == model_name)
                    .order_by(m.first_served, m.model_version)
                ).scalars()
            )
            if not versions:
                return []
            parts = []
            for version in versions:
                newest = (
                    sa.select(f.correct)
                    .where(f.model_name == model_name, f.model_version == version)
                    .order_by(f.time.desc())
                    .limit(size)
                    .subquery()
                )
                parts.append(
                    sa.select(
                        sa.literal(version, sa.String).label("version"),
                        sa.func.count().label("count"),
                        sa.func.coalesce(sa.func.sum(newest.c.correct), 0).label("correct"),
                    ).select_from(newest)
                )
            found = {row[0]: (int(row[1]), int(row[2])) for row in conn.execute(sa.union_all(*parts))}
        return [(v, *found[v]) for v in versions if found.get(v, (0, 0))[0]]

    def accuracy_since(self, model_name: str, model_version: str, since: float, size: int) -> tuple[int, int]:
        """(count, correct) over the newest ``size`` labels of one version given at or after ``since``:
        the post-promotion analysis judges a new champion on its own traffic only."""
        f = feedback_table.c
        newest = (
            sa.select(f.correct)
            .where(f.model_name == model_name, f.model_version == model_version, f.time >= since)
            .order_by(f.time.desc())
            .limit(size)
            .subquery()
        )
        query = sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(newest.c.correct), 0)).select_from(newest)
        with self._read() as conn:
            count, correct = conn.execute(query).one()
        return int(count), int(correct)

    def last_prediction_time(self, model_name: str, model_version: str | None = None) -> float | None:
        """Time of the newest prediction of a version (of any version when None); one index lookup per version."""
        p = predictions_table.c
        versions = [model_version] if model_version is not None else [m.version for m in self.models(model_name)]
        times = []
        with self._read() as conn:
            for version in versions:
                query = sa.select(sa.func.max(p.time)).where(p.model_name == model_name, p.model_version == version)
                value = conn.execute(query).scalar_one()
                if value is not None:
                    times.append(float(value))
        return max(times) if times else None

    # ------------------------------------------------------------------------------ drift checks
    def save_check(self, result: DriftResult) -> None:
        """Keep one drift check (its JSON, with the columns it is looked up by)."""
        row = {
            "model_name": result.model_name,
            "model_version": result.model_version or "",
            "checked_at": result.checked_at,
            "status": result.status,
            "drifted": int(result.drifted),
            "result": result.model_dump_json(),
        }
        self._ensure_schema()
        try:
            with self.engine.begin() as conn:
                conn.execute(checks_table.insert(), row)
        except sa_exc.SQLAlchemyError as exc:
            raise self._error("failed a write", exc) from None

    def latest_check(self, model_name: str, model_version: str) -> DriftResult | None:
        c = checks_table.c
        query = (
            sa.select(c.result)
            .where(c.model_name == model_name, c.model_version == (model_version or ""))
            .order_by(c.checked_at.desc())
            .limit(1)
        )
        with self._read() as conn:
            found = conn.execute(query).scalar_one_or_none()
        return None if found is None else DriftResult.model_validate_json(found)

    def checks(self, model_name: str, model_version: str, since: float = 0, limit: int = 500) -> list[DriftResult]:
        """The newest ``limit`` checks of a version since ``since``, oldest first."""
        c = checks_table.c
        query = (
            sa.select(c.result)
            .where(c.model_name == model_name, c.model_version == (model_version or ""), c.checked_at >= since)
            .order_by(c.checked_at.desc())
            .limit(limit)
        )
        with self._read() as conn:
            found = list(conn.execute(query).scalars())
        return [DriftResult.model_validate_json(text) for text in reversed(found)]

    # ------------------------------------------------------------------------------ labelled images
    def labelled(
        self, model_name: str, since: float = 0, limit: int | None = None, authenticated_only: bool = False
    ) -> list[LabelledImage]:
        """Predictions with a feedback label (given at or after ``since``) whose image was kept, oldest label first;
        ``authenticated_only``: only labels that came with serve.feedback_token."""
        p, f = predictions_table.c, feedback_table.c
        query = (
            sa.select(p.request_id, f.time, p.image_key, f.true_label, p.model_version, f.authenticated)
            .join(feedback_table, f.request_id == p.request_id)
            .where(f.model_name == model_name, f.time >= since, p.image_key.is_not(None))
            .order_by(f.time)
        )
        if authenticated_only:
            query = query.where(f.authenticated == 1)
        if limit is not None:
            query = query.limit(limit)
        with self._read() as conn:
            rows = conn.execute(query).all()
        return [LabelledImage(r[0], float(r[1]), r[2], r[3], r[4], bool(r[5])) for r in rows]


def spool_key(display_url: str) -> str:
    """The spool's subfolder for one store (a hash of its password-masked URL): rows spooled for one store are
    never replayed into another after monitor.store_url changes."""
    return hashlib.sha256(display_url.encode()).hexdigest()[:16]


def instance_name() -> str:
    """hostname:pid, the ``instance`` of the predictions this process writes."""
    return f"{socket.gethostname()}:{os.getpid()}"


__all__ = [
    "Feedback",
    "ImageStore",
    "LabelledImage",
    "ModelRecord",
    "Prediction",
    "PredictionStore",
    "StoreError",
    "StoreMetrics",
    "Window",
    "instance_name",
]
