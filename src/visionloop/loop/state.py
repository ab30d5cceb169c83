"""The loop's durable state: its runs (what triggered them, how far they got, how they ended) and its lock.

Both live in the prediction store's database (``settings.store_url``), so the loop needs nothing the
serving side does not already have, and a loop restarted on another node finds where the last one stopped.
The tables have their own ``MetaData``: the prediction store never creates or reads them.

The lock is a lease, not a session lock: a row naming the holder and the time it expires. A holder that
crashes frees it after ``seconds`` without anyone cleaning up; a live holder renews it from a thread.
Leases compare ``time.time()`` of different processes, so the hosts' clocks must agree to well within
the lease (NTP does).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from visionloop.errors import VisionloopError
from visionloop.monitoring.tables import StoreError, create_store_engine, masked, normalise_url

if TYPE_CHECKING:
    from visionloop.config import Settings

TRIGGERS = ("alert", "verdict", "accuracy", "schedule", "manual", "promotion")
PHASES = ("triggered", "building", "training", "registered", "gated", "analysing", "rolling_back", "done")
RESULTS = ("promoted", "kept", "rejected", "rolled_back", "failed", "inconclusive")


class LoopBusy(VisionloopError):
    """Another loop process holds the lock (or this one lost it): wait for it rather than run twice."""


metadata = sa.MetaData()

runs_table = sa.Table(
    "loop_runs",
    metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("model_name", sa.String(255), nullable=False),
    sa.Column("trigger", sa.String(32), nullable=False),  # TRIGGERS
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("phase", sa.String(32), nullable=False),  # PHASES
    sa.Column("result", sa.String(32)),  # RESULTS, once the phase is done
    sa.Column("created_at", sa.Float(53), nullable=False),
    sa.Column("updated_at", sa.Float(53), nullable=False),
    sa.Column("finished_at", sa.Float(53)),
    sa.Column("owner", sa.String(255), nullable=False),  # the holder that last wrote the run
    sa.Column("data", sa.Text, nullable=False),  # JSON object: everything else a run carries
    sa.Index("loop_runs_model_created", "model_name", "created_at"),
)

locks_table = sa.Table(
    "loop_locks",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("holder", sa.String(255), nullable=False),
    sa.Column("expires_at", sa.Float(53), nullable=False),
    sa.Column("acquired_at", sa.Float(53), nullable=False),
)

marks_table = sa.Table(  # small values the loop must remember across processes (a CronJob's `loop once`)
    "loop_marks",
    metadata,
    sa.Column("name", sa.String(255), primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("updated_at", sa.Float(53), nullable=False),
)


@dataclass
class LoopRun:
    """One pass of the loop: triggered, then through its phases to ``done`` with a result."""

    id: str
    model_name: str
    trigger: str
    reason: str
    phase: str
    result: str | None
    created_at: float
    updated_at: float
    finished_at: float | None
    owner: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The run as JSON-ready values (for the CLI's --json and the loop's HTTP API)."""
        return asdict(self)

    @property
    def done(self) -> bool:
        return self.phase == "done"

    @classmethod
    def from_row(cls, row: Any) -> LoopRun:
        return cls(**{**row._mapping, "data": json.loads(row.data)})  # Float(53) reads back as float on both


def _iso(unix: float) -> str:
    return datetime.fromtimestamp(unix, UTC).isoformat(timespec="seconds")


class LoopState:
    """Loop runs and the loop lock, in the prediction store's database (SQLite or PostgreSQL)."""

    def __init__(self, url: str, timeout: float = 10.0, holder: str | None = None) -> None:
        self.url = url
        self.display_url = masked(normalise_url(url))
        self.timeout = timeout
        # the pid alone repeats across containers (pid 1 everywhere) and restarts: the random tail does not
        self.holder = holder or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.engine = create_store_engine(url, timeout)
        self._schema_ready = False
        self._schema_lock = threading.Lock()

    @classmethod
    def from_settings(cls, settings: Settings) -> LoopState:
        return cls(settings.store_url, timeout=settings.monitor.store_timeout_seconds)

    def close(self) -> None:
        self.engine.dispose()

    # ------------------------------------------------------------------------------ connections
    def _error(self, what: str, exc: BaseException) -> StoreError:
        detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
        return StoreError(
            f"loop state in store {self.display_url} {what}: {detail[0] if detail else type(exc).__name__}"
        )

    def _ensure_schema(self) -> None:
        """Create the tables on first use; a second process creating them at the same moment is not an error."""
        if self._schema_ready:
            return
        with self._schema_lock:
            if self._schema_ready:
                return
            database = self.engine.url.database
            if self.engine.dialect.name == "sqlite" and database and database != ":memory:":
                with contextlib.suppress(OSError):  # a folder that cannot be made: SQLite says why, below
                    Path(database).parent.mkdir(parents=True, exist_ok=True)
            for attempt in range(5):
                try:
                    metadata.create_all(self.engine, checkfirst=True)
                    break
                except sa_exc.SQLAlchemyError as exc:
                    # another process creating them too: PostgreSQL reports a unique/duplicate error, SQLite
                    # "already exists", or "database is locked" while a new file turns to WAL (it does not wait)
                    text = str(exc)
                    raced = isinstance(exc, sa_exc.IntegrityError | sa_exc.ProgrammingError) or any(
                        sign in text for sign in ("already exists", "database is locked")
                    )
                    if not raced:
                        raise self._error("cannot be reached", exc) from None
                    if attempt == 4:
                        raise self._error("cannot create its tables", exc) from None
                    time.sleep(0.05 * (attempt + 1))
            self._schema_ready = True

    @contextmanager
    def _db(self, what: str) -> Iterator[sa.Connection]:
        """One transaction; a database error becomes a StoreError naming the store."""
        self._ensure_schema()
        try:
            with self.engine.begin() as conn:
                yield conn
        except sa_exc.SQLAlchemyError as exc:
            raise self._error(what, exc) from None

    # ------------------------------------------------------------------------------ runs
    def create_run(self, model_name: str, trigger: str, reason: str, data: dict[str, Any] | None = None) -> LoopRun:
        """Record a new run in phase ``triggered``; its id sorts by time and says when it started."""
        if trigger not in TRIGGERS:
            raise ValueError(f"unknown loop trigger {trigger!r}; one of: {', '.join(TRIGGERS)}")
        now = time.time()
        run_id = "lr-" + datetime.fromtimestamp(now, UTC).strftime("%Y%m%d-%H%M%S") + "-" + secrets.token_hex(3)
        run = LoopRun(
            run_id, model_name, trigger, reason, "triggered", None, now, now, None, self.holder, dict(data or {})
        )
        row = {**run.to_dict(), "data": json.dumps(run.data)}
        with self._db("failed a write") as conn:
            conn.execute(runs_table.insert(), row)
        return run

    def update_run(
        self, run_id: str, *, phase: str | None = None, result: str | None = None, data: dict[str, Any] | None = None
    ) -> LoopRun:
        """Move a run on and merge ``data`` into what it carries (top-level keys), in one transaction.

        The first statement writes the row, which locks it on both backends (SQLite: the database's write
        lock; PostgreSQL: the row, as FOR UPDATE would) before it is read, so two writers cannot lose each
        other's keys. ``result`` is only for a run whose phase is (or becomes) ``done``."""
        if phase is not None and phase not in PHASES:
            raise ValueError(f"unknown loop phase {phase!r}; one of: {', '.join(PHASES)}")
        if result is not None and result not in RESULTS:
            raise ValueError(f"unknown loop result {result!r}; one of: {', '.join(RESULTS)}")
        r = runs_table.c
        now = time.time()
        with self._db("failed a write") as conn:
            touched = conn.execute(
                runs_table.update().where(r.id == run_id).values(updated_at=now, owner=self.holder)
            ).rowcount
            found = conn.execute(sa.select(runs_table).where(r.id == run_id).with_for_update()).first()
            if touched != 1 or found is None:
                raise StoreError(f"no loop run {run_id}")
            run = LoopRun.from_row(found)
            run.phase = phase or run.phase
            if result is not None and run.phase != "done":
                raise ValueError(f"loop run {run_id}: a result ({result}) needs phase done, not {run.phase}")
            run.result = result if result is not None else run.result
            if run.phase == "done" and run.finished_at is None:
                run.finished_at = now
            run.data.update(data or {})
            run.updated_at, run.owner = now, self.holder
            values = {"phase": run.phase, "result": run.result, "finished_at": run.finished_at}
            conn.execute(runs_table.update().where(r.id == run_id).values(**values, data=json.dumps(run.data)))
        return run

    def _select(self, query: sa.Select) -> list[LoopRun]:
        with self._db("failed a read") as conn:
            return [LoopRun.from_row(row) for row in conn.execute(query)]

    def get_run(self, run_id: str) -> LoopRun | None:
        found = self._select(sa.select(runs_table).where(runs_table.c.id == run_id))
        return found[0] if found else None

    def runs(self, model_name: str, limit: int = 50, since: float = 0) -> list[LoopRun]:
        """The newest ``limit`` runs of a model created at or after ``since``, newest first."""
        r = runs_table.c
        query = sa.select(runs_table).where(r.model_name == model_name, r.created_at >= since)
        return self._select(query.order_by(r.created_at.desc(), r.id.desc()).limit(limit))

    def unfinished(self, model_name: str) -> list[LoopRun]:
        """Runs not yet done, oldest first: what a restarted loop has to resume or close."""
        r = runs_table.c
        query = sa.select(runs_table).where(r.model_name == model_name, r.phase != "done")
        return self._select(query.order_by(r.created_at, r.id))

    def last_run(
        self, model_name: str, triggers: tuple[str, ...] | None = None, finished_only: bool = False
    ) -> LoopRun | None:
        """The newest run of a model (of those triggers; only done ones), e.g. for a cooldown or a schedule."""
        r = runs_table.c
        query = sa.select(runs_table).where(r.model_name == model_name)
        if triggers is not None:
            query = query.where(r.trigger.in_(triggers))
        if finished_only:
            query = query.where(r.phase == "done")
        found = self._select(query.order_by(r.created_at.desc(), r.id.desc()).limit(1))
        return found[0] if found else None

    # ------------------------------------------------------------------------------ the lock
    def acquire(self, name: str, seconds: float) -> bool:
        """Take the lease ``name`` for ``seconds`` if it is free, expired or already ours (which renews it).

        Atomic on both backends: the INSERT succeeds for one process only (primary key), and the UPDATE's
        WHERE is evaluated under the row's write lock, so of many racers exactly one sees rowcount 1."""
        self._ensure_schema()
        k = locks_table.c
        for _ in range(2):  # a second pass when the row vanished (released) between the INSERT and the UPDATE
            now = time.time()
            try:
                with self.engine.begin() as conn:  # its own transaction: a failed INSERT aborts PostgreSQL's
                    conn.execute(
                        locks_table.insert(),
                        {"name": name, "holder": self.holder, "expires_at": now + seconds, "acquired_at": now},
                    )
                return True
            except sa_exc.IntegrityError:
                pass
            except sa_exc.SQLAlchemyError as exc:
                raise self._error("failed a write", exc) from None
            with self._db("failed a write") as conn:
                taken = conn.execute(
                    locks_table.update()
                    .where(k.name == name, (k.expires_at < now) | (k.holder == self.holder))
                    .values(holder=self.holder, expires_at=now + seconds, acquired_at=now)
                ).rowcount
            if taken == 1:
                return True
            if self.lock_holder(name) is not None:
                return False
        return False

    def renew(self, name: str, seconds: float) -> bool:
        """Push our lease's expiry to now + ``seconds``; False when it is no longer ours."""
        k = locks_table.c
        with self._db("failed a write") as conn:
            query = locks_table.update().where(k.name == name, k.holder == self.holder)
            return conn.execute(query.values(expires_at=time.time() + seconds)).rowcount == 1

    def release(self, name: str) -> None:
        """Give our lease back; someone else's is left alone."""
        k = locks_table.c
        with self._db("failed a write") as conn:
            conn.execute(locks_table.delete().where(k.name == name, k.holder == self.holder))

    def mark(self, name: str) -> str | None:
        """A remembered value (e.g. the newest alias event the champion watch has looked at), or None."""
        m = marks_table.c
        with self._db("failed a read") as conn:
            return conn.execute(sa.select(m.value).where(m.name == name)).scalar()

    def set_mark(self, name: str, value: str) -> None:
        """Write a remembered value: one INSERT ... ON CONFLICT DO UPDATE, which SQLite and PostgreSQL both do."""
        if self.engine.dialect.name == "postgresql":
            from sqlalchemy.dialects.postgresql import insert
        else:
            from sqlalchemy.dialects.sqlite import insert
        row = {"name": name, "value": value, "updated_at": time.time()}
        statement = insert(marks_table).values(**row)
        statement = statement.on_conflict_do_update(
            index_elements=["name"], set_={"value": value, "updated_at": row["updated_at"]}
        )
        with self._db("failed a write") as conn:
            conn.execute(statement)

    def lock_holder(self, name: str) -> tuple[str, float] | None:
        """(holder, expires_at) of the lease, or None; an expires_at in the past is a lease anyone may take."""
        k = locks_table.c
        with self._db("failed a read") as conn:
            found = conn.execute(sa.select(k.holder, k.expires_at).where(k.name == name)).first()
        return None if found is None else (found[0], float(found[1]))

    @contextmanager
    def held(self, name: str, seconds: float) -> Iterator[Callable[[], None]]:
        """Hold the lease while inside, renewed every ``seconds``/3 from a daemon thread.

        Yields ``check()``: call it between steps; it raises LoopBusy once the lease is lost (taken by
        another holder, or not renewed for ``seconds`` because the store was down), so a step that must not
        run twice is not started. The lease is released on exit; a failed release simply expires."""
        if not self.acquire(name, seconds):
            holder, until = self.lock_holder(name) or ("another holder", time.time())
            raise LoopBusy(f"loop lock {name!r} is held by {holder} until {_iso(until)}")
        stop, lost = threading.Event(), threading.Event()
        renewed = [time.monotonic()]

        def keep_renewing() -> None:
            while not stop.wait(seconds / 3):
                try:
                    if not self.renew(name, seconds):
                        lost.set()
                        return
                    renewed[0] = time.monotonic()
                except StoreError:
                    continue  # the store is down: the lease may still be ours; check() watches its age

        def check() -> None:
            if lost.is_set() or time.monotonic() - renewed[0] > seconds:
                raise LoopBusy(f"loop lock {name!r} was lost by {self.holder}: another loop may be running")

        thread = threading.Thread(target=keep_renewing, name=f"loop-lock-{name}", daemon=True)
        thread.start()
        try:
            yield check
        finally:
            stop.set()
            thread.join(self.timeout)
            with contextlib.suppress(StoreError, sa_exc.SQLAlchemyError):
                self.release(name)


__all__ = ["PHASES", "RESULTS", "TRIGGERS", "LoopBusy", "LoopRun", "LoopState", "StoreError"]
