"""The prediction store's data: its tables, the rows it hands back, and the engine that reaches them.

The schema is written once, on SQLAlchemy Core, so SQLite and PostgreSQL get the same tables, indexes
and statements; ``create_store_engine`` is the one place the two backends differ (SQLite's WAL and busy
timeout pragmas, PostgreSQL's connect/statement timeouts and pool). Vectors (probabilities, embeddings,
channel means) are stored as float32 little-endian blobs: the same bytes on both backends, and a window
of N rows turns back into one (N, D) array with a single ``frombuffer``.

The indexes are the read side's contract: every query ``store.py`` runs is a range scan on one of them,
so reading does not slow down as the store grows.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import sqlalchemy as sa
from sqlalchemy import exc as sa_exc

from visionloop.errors import VisionloopError
from visionloop.monitoring.stats import Sample

IN_CHUNK = 500  # bound on the number of parameters of one IN (...) clause


class StoreError(VisionloopError):
    """The prediction store cannot be reached or refused an operation."""


# ------------------------------------------------------------------------------------------- schema
metadata = sa.MetaData()

models_table = sa.Table(
    "models",
    metadata,
    sa.Column("model_name", sa.String(255), primary_key=True),
    sa.Column("model_version", sa.String(64), primary_key=True),
    sa.Column("dataset_version", sa.Text),
    sa.Column("classes", sa.Text, nullable=False),  # JSON list, index = class id
    sa.Column("first_served", sa.Float(53), nullable=False),
)

predictions_table = sa.Table(
    "predictions",
    metadata,
    sa.Column("request_id", sa.String(64), primary_key=True),
    sa.Column("time", sa.Float(53), nullable=False),  # unix seconds
    sa.Column("endpoint", sa.String(16), nullable=False),  # predict | v2
    sa.Column("model_name", sa.String(255), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("predicted_index", sa.Integer, nullable=False),
    sa.Column("predicted_label", sa.Text, nullable=False),
    sa.Column("confidence", sa.Float(53), nullable=False),
    sa.Column("probabilities", sa.LargeBinary, nullable=False),  # float32 little-endian (K,)
    sa.Column("embedding", sa.LargeBinary, nullable=False),  # float32 little-endian (D,)
    sa.Column("image_width", sa.Integer, nullable=False),  # as uploaded
    sa.Column("image_height", sa.Integer, nullable=False),
    sa.Column("image_mean", sa.Float(53), nullable=False),  # pixels on a 0-1 scale, after conversion
    sa.Column("image_std", sa.Float(53), nullable=False),
    sa.Column("image_sharpness", sa.Float(53), nullable=False),
    sa.Column("channel_means", sa.LargeBinary, nullable=False),  # float32 little-endian (C,)
    sa.Column("converted", sa.Text),  # e.g. RGBA->L when the colour mode was converted
    sa.Column("image_key", sa.String(160)),  # the kept image (images.py), or NULL
    sa.Column("instance", sa.String(255), nullable=False),  # hostname:pid of the server that wrote it
    sa.Index("predictions_version_time", "model_name", "model_version", "time"),
    sa.Index("predictions_time", "time"),
    sa.Index("predictions_image_key", "image_key"),
)

feedback_table = sa.Table(
    "feedback",
    metadata,
    sa.Column("request_id", sa.String(64), sa.ForeignKey("predictions.request_id"), primary_key=True),
    sa.Column("time", sa.Float(53), nullable=False),
    sa.Column("model_name", sa.String(255), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("true_index", sa.Integer, nullable=False),
    sa.Column("true_label", sa.Text, nullable=False),
    sa.Column("correct", sa.Integer, nullable=False),  # 0 | 1
    # 1 when the label came with serve.feedback_token: the labels a retrain may trust when a token is set
    sa.Column("authenticated", sa.Integer, nullable=False, server_default="0"),
    sa.Index("feedback_version_time", "model_name", "model_version", "time"),
)

checks_table = sa.Table(
    "checks",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("model_name", sa.String(255), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),  # "" when no version was served
    sa.Column("checked_at", sa.Float(53), nullable=False),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("drifted", sa.Integer, nullable=False),
    sa.Column("result", sa.Text, nullable=False),  # DriftResult JSON
    sa.Index("checks_version_time", "model_name", "model_version", "checked_at"),
)

images_table = sa.Table(  # the kept images: their total is the cap's count, without listing the object store
    "images",
    metadata,
    sa.Column("key", sa.String(160), primary_key=True),
    sa.Column("size", sa.BigInteger, nullable=False),
    sa.Column("created", sa.Float(53), nullable=False),
)


# ------------------------------------------------------------------------------------------- records
def f32(values: object) -> bytes:
    """Values as a float32 little-endian blob, the stored form of every vector column."""
    return np.ascontiguousarray(values, dtype="<f4").tobytes()


def from_f32(blobs: Sequence[bytes]) -> np.ndarray:
    """Equal-length float32 blobs as one (N, D) array."""
    if not blobs:
        return np.zeros((0, 0), np.float32)
    return np.frombuffer(b"".join(blobs), dtype="<f4").reshape(len(blobs), -1).astype(np.float32)


@dataclass
class Prediction:
    """One classified image, as the store keeps it."""

    request_id: str
    time: float
    endpoint: str
    model_name: str
    model_version: str
    predicted_index: int
    predicted_label: str
    confidence: float
    probabilities: np.ndarray  # float32 (K,) softmax
    embedding: np.ndarray  # float32 (D,)
    image_width: int  # as uploaded
    image_height: int
    image_mean: float  # 0-1 scale after conversion
    image_std: float
    image_sharpness: float  # stats.sharpness: mean neighbour difference, 0-1 scale
    channel_means: np.ndarray  # float32 (C,)
    converted: str | None = None
    image: bytes | None = None  # the upload's bytes to keep (V2: a PNG of the pixels); None: not kept
    instance: str = ""  # the server process that wrote it (hostname:pid)

    def row(self, image_key: str | None) -> dict[str, Any]:
        return {
            "request_id": self.request_id,
            "time": float(self.time),
            "endpoint": self.endpoint,
            "model_name": self.model_name,
            "model_version": self.model_version,
            "predicted_index": int(self.predicted_index),
            "predicted_label": self.predicted_label,
            "confidence": float(self.confidence),
            "probabilities": f32(self.probabilities),
            "embedding": f32(self.embedding),
            "image_width": int(self.image_width),
            "image_height": int(self.image_height),
            "image_mean": float(self.image_mean),
            "image_std": float(self.image_std),
            "image_sharpness": float(self.image_sharpness),
            "channel_means": f32(self.channel_means),
            "converted": self.converted,
            "image_key": image_key,
            "instance": self.instance,
        }


@dataclass
class Feedback:
    request_id: str
    model_version: str
    predicted_label: str
    true_label: str
    correct: bool


@dataclass
class ModelRecord:
    version: str
    dataset_version: str
    classes: list[str]
    first_served: float


@dataclass
class LabelledImage:
    request_id: str
    time: float  # when the label arrived (unix seconds)
    image_key: str  # ImageStore.open(image_key) gives the bytes
    true_label: str
    model_version: str  # the version that made the prediction
    authenticated: bool = False  # the label came with serve.feedback_token


WINDOW_COLUMNS = (  # what a Window is read from; the drift tests need no more
    "request_id", "time", "predicted_index", "probabilities", "embedding",
    "image_width", "image_height", "image_mean", "image_std", "image_sharpness", "channel_means",
)  # fmt: skip


@dataclass
class Window:
    """The newest predictions of one version, oldest first, as the drift tests read them."""

    sample: Sample
    request_ids: list[str]
    predicted: np.ndarray  # int (N,)
    first_time: float | None
    last_time: float | None

    def __len__(self) -> int:
        return len(self.request_ids)

    @classmethod
    def from_rows(cls, rows: Sequence[Any]) -> Window:
        """A window from ``WINDOW_COLUMNS`` rows, oldest first: the blobs become (N, D) arrays in one pass."""
        channel_means = from_f32([r.channel_means for r in rows])
        stats: dict[str, np.ndarray] = {
            "image_mean": np.array([r.image_mean for r in rows], np.float64),
            "image_std": np.array([r.image_std for r in rows], np.float64),
            "image_sharpness": np.array([r.image_sharpness for r in rows], np.float64),
            "image_width": np.array([r.image_width for r in rows], np.float64),
            "image_height": np.array([r.image_height for r in rows], np.float64),
        }
        if channel_means.shape[1] > 1:  # stats.stat_names: per-channel means only above one channel
            for c in range(channel_means.shape[1]):
                stats[f"channel_mean_{c}"] = channel_means[:, c].astype(np.float64)
        times = np.array([r.time for r in rows], np.float64)
        sample = Sample(stats, from_f32([r.probabilities for r in rows]), from_f32([r.embedding for r in rows]), times)
        return cls(
            sample,
            [r.request_id for r in rows],
            np.array([r.predicted_index for r in rows], np.int64),
            float(times[0]) if rows else None,
            float(times[-1]) if rows else None,
        )


# ------------------------------------------------------------------------------------------- engine
def normalise_url(url: str) -> str:
    """SQLAlchemy URL with the psycopg 3 driver for PostgreSQL (``postgresql://`` -> ``postgresql+psycopg://``)."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def masked(url: str) -> str:
    """The URL with its password replaced by ***, for messages and logs."""
    try:
        return sa.make_url(url).render_as_string(hide_password=True)
    except Exception:
        return "<unparseable store URL>"


def create_store_engine(url: str, timeout: float) -> sa.Engine:
    """An engine with the pragmas (SQLite) or timeouts and pool (PostgreSQL) the store relies on."""
    try:
        parsed = sa.make_url(normalise_url(url))
    except sa_exc.ArgumentError as exc:
        raise StoreError(f"prediction store URL {url!r} is not a SQLAlchemy URL: {exc}") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        engine = sa.create_engine(
            parsed, connect_args={"timeout": timeout, "check_same_thread": False}, pool_pre_ping=False
        )
        busy_ms = int(timeout * 1000)

        @sa.event.listens_for(engine, "connect")
        def _pragmas(dbapi_connection: Any, _record: Any) -> None:
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute(f"PRAGMA busy_timeout={busy_ms}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        return engine
    if backend == "postgresql":
        seconds = max(1, math.ceil(timeout))
        # a batch of rows goes as one executemany: psycopg 3 pipelines it (no round trip per row). SQLAlchemy's
        # "insertmanyvalues" pages (use_insertmanyvalues_wo_returning) measured 3× slower here: 3,600 against
        # 10,800 rows/s for 128-d rows (benchmarks/_store_growth.py's fill, 2 cores)
        return sa.create_engine(
            parsed,
            connect_args={"connect_timeout": seconds, "options": f"-c statement_timeout={int(timeout * 1000)}"},
            pool_size=4,
            max_overflow=4,
            pool_timeout=timeout,
            pool_pre_ping=True,
            pool_recycle=1800,
        )
    raise StoreError(f"prediction store {masked(url)}: only sqlite:// and postgresql:// URLs are supported")


def insert_ignoring_duplicates(engine: sa.Engine, table: sa.Table, keys: list[str]) -> sa.Insert:
    """INSERT … ON CONFLICT (keys) DO NOTHING on SQLite and PostgreSQL (other constraint errors still raise)."""
    if engine.dialect.name == "postgresql":
        from sqlalchemy.dialects.postgresql import insert
    else:
        from sqlalchemy.dialects.sqlite import insert
    return insert(table).on_conflict_do_nothing(index_elements=keys)


def chunks(items: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    """``items`` in slices of at most ``size`` (e.g. ``IN_CHUNK`` keys per IN clause)."""
    for start in range(0, len(items), size):
        yield items[start : start + size]
