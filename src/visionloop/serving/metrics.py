"""The service's Prometheus metrics. Each app owns a registry, so tests can run several in one process.

Names follow Prometheus conventions (``_total`` counters, ``_seconds`` durations, base units), so
alert rules and dashboards can be written against them as they stand.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from visionloop.monitoring.store import PredictionStore, StoreMetrics
from visionloop.service.metrics import client_disconnects_counter

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
CONFIDENCE_BUCKETS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class ServingMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "visionloop_http_requests", "HTTP requests answered.", ["route", "method", "status"], registry=r
        )
        self.request_seconds = Histogram(
            "visionloop_http_request_duration_seconds",
            "Time from request to response.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.bad_requests = Counter(
            "visionloop_bad_requests", "Requests refused with a 4xx, by reason.", ["reason"], registry=r
        )
        self.client_disconnects = client_disconnects_counter(r)  # counted by service/guard.py
        self.predictions = Counter(
            "visionloop_predictions", "Images classified, by model version and predicted class.",
            ["model_version", "predicted_class"], registry=r,
        )  # fmt: skip
        self.confidence = Histogram(
            "visionloop_prediction_confidence", "Top-1 probability of each prediction, by model version.",
            ["model_version"], buckets=CONFIDENCE_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Histogram(
            "visionloop_batch_size", "Images per model run (dynamic batching).", buckets=BATCH_BUCKETS, registry=r
        )
        self.queue_wait = Histogram(
            "visionloop_batch_queue_wait_seconds", "Time a request waited in the batching queue.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.inference_seconds = Histogram(
            "visionloop_inference_duration_seconds", "ONNX Runtime time per batch.",
            buckets=LATENCY_BUCKETS, registry=r,
        )  # fmt: skip
        self.model_info = Gauge(
            "visionloop_model_info", "1 for the model being served.", ["model_name", "model_version", "dataset_version"],
            registry=r,
        )  # fmt: skip
        self.ready = Gauge("visionloop_ready", "1 when a model is loaded and warmed up.", registry=r)
        self.model_loaded_at = Gauge(
            "visionloop_model_loaded_timestamp_seconds", "When the served model was loaded.", registry=r
        )
        self.reloads = Counter(
            "visionloop_model_reloads", "Reload attempts by result (loaded, unchanged, failed, no_model).",
            ["result"], registry=r,
        )  # fmt: skip
        self.feedback = Counter(
            "visionloop_feedback", "Ground-truth labels received, by whether the prediction was right.",
            ["model_version", "correct"], registry=r,
        )  # fmt: skip
        self.store = PrometheusStoreMetrics(r)
        self.overloaded = Counter(
            "visionloop_overloaded",
            "Requests answered 503 + Retry-After because a bounded queue was full, by queue (decode: large "
            "uploads; parse: large JSON bodies; batch: images waiting for the model; feedback: store writes).",
            ["queue"], registry=r,
        )  # fmt: skip
        for queue in ("decode", "parse", "batch", "feedback"):
            self.overloaded.labels(queue)

    # the batcher reports through these two
    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference_seconds.observe(seconds)

    def observe_queue_wait(self, seconds: float) -> None:
        self.queue_wait.observe(seconds)

    def count_overloaded(self, queue: str) -> None:
        self.overloaded.labels(queue).inc()

    def serving(self, name: str, version: str, dataset_version: str, loaded_at: float) -> None:
        self.model_info.clear()
        self.model_info.labels(name, version, dataset_version).set(1)
        self.model_loaded_at.set(loaded_at)
        self.ready.set(1)


class PrometheusStoreMetrics(StoreMetrics):
    """The prediction store's health: rows written and lost, the queue in front of the database, kept images."""

    def __init__(self, registry: CollectorRegistry) -> None:
        r = registry
        self.errors = Counter(
            "visionloop_prediction_store_errors",
            "Predictions lost before reaching the store, by reason (write: refused by the database, or not written "
            "at shutdown without a spool; queue_full: the in-memory queue was full; spool_full: the spool was at "
            "monitor.spool_max_mb; spool_error: the spool's disk failed).",
            ["reason"], registry=r,
        )  # fmt: skip
        for reason in ("write", "queue_full", "spool_full", "spool_error"):
            self.errors.labels(reason)
        self.spooled = Counter(
            "visionloop_prediction_store_rows_spooled",
            "Predictions the store could not take, written (fsync'd) to the local spool to be replayed.",
            registry=r,
        )
        self.replayed = Counter(
            "visionloop_prediction_store_rows_replayed", "Spooled predictions replayed into the store.", registry=r
        )
        self.spool_rows = Gauge(
            "visionloop_prediction_store_spool_rows",
            "Predictions this server holds in the spool (spooled or being replayed), not yet in the store.",
            registry=r,
        )
        self.written = Counter(
            "visionloop_prediction_store_rows_written", "Predictions committed to the store.", registry=r
        )
        self.queue_rows = Gauge(
            "visionloop_prediction_store_queue_rows", "Predictions queued in memory, not yet written.", registry=r
        )
        self.lag_seconds = Gauge(
            "visionloop_prediction_store_lag_seconds",
            "Age of the oldest prediction not yet written to the store; 0 when none is queued.",
            registry=r,
        )
        self.images = Counter(
            "visionloop_images_kept", "Input images offered for keeping, by result (kept, duplicate, over_cap, error).",
            ["result"], registry=r,
        )  # fmt: skip
        for result in ("kept", "duplicate", "over_cap", "error"):
            self.images.labels(result)

    def rows_written(self, rows: int) -> None:
        self.written.inc(rows)

    def rows_lost(self, reason: str, rows: int) -> None:
        self.errors.labels(reason).inc(rows)

    def rows_spooled(self, rows: int) -> None:
        self.spooled.inc(rows)

    def rows_replayed(self, rows: int) -> None:
        self.replayed.inc(rows)

    def image(self, result: str) -> None:
        self.images.labels(result).inc()

    def watch(self, store: PredictionStore) -> None:
        self.queue_rows.set_function(lambda: store.queue_rows)
        self.lag_seconds.set_function(lambda: store.lag_seconds)
        self.spool_rows.set_function(lambda: store.spool_rows)
