"""One settings object for the whole loop.

Values come, highest priority first, from: command-line flags, ``VISIONLOOP_*`` environment
variables (nested with ``__``, e.g. ``VISIONLOOP_TRAIN__EPOCHS=5``), a YAML file
(``--config FILE``, ``VISIONLOOP_CONFIG``, or ``./visionloop.yaml`` when present), and the defaults
below. Every CLI option's default and help text is read from here, so there is one place to look.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

from visionloop.errors import ConfigError


class _Group(BaseModel):
    # a misspelt key (``train.epoch``) in a file, env var or --set is an error, not silently ignored
    model_config = ConfigDict(extra="forbid")


class DataSettings(_Group):
    source: str = Field(
        "digits",
        description="Where images come from: 'digits' (built in), 'synthetic', a folder of "
        "class_name/image files, a .zip/.tar.gz archive, or an fsspec URL (file://, s3://, https://).",
    )
    image_size: int = Field(
        0, ge=0, le=512, description="Side of the square model input in pixels; 0 picks it from the data."
    )
    channels: Literal[0, 1, 3] = Field(0, description="1 (grey) or 3 (RGB); 0 picks it from the data.")
    val_fraction: float = Field(0.1, gt=0, lt=0.5, description="Share of images held out for validation.")
    test_fraction: float = Field(0.2, gt=0, lt=0.5, description="Share of images held out for the test set.")
    split_seed: int = Field(0, description="Seed of the train/val/test split and of the synthetic generator.")
    hflip: bool | None = Field(
        None,
        description="Allow horizontal flips in augmentation; unset lets the source decide "
        "(never for digits, yes for synthetic shapes).",
    )
    # synthetic generator
    synthetic_classes: int = Field(
        4, ge=2, le=48, description="Classes the synthetic generator draws (over 8 they differ by hue too)."
    )
    synthetic_per_class: int = Field(60, ge=1, description="Images per class for the synthetic source.")
    synthetic_size: int = Field(32, ge=8, le=512, description="Side of synthetic images in pixels.")
    synthetic_channels: Literal[1, 3] = Field(3, description="Channels of synthetic images.")
    # ingest limits: what a hostile or broken source may cost before it is refused
    max_download_mb: float = Field(
        2048.0,
        gt=0,
        description="Refuse a remote source (https://, s3://, … file or folder) larger than this many MiB: "
        "checked against the declared size first, then counted while the bytes arrive, so a server that "
        "sends no Content-Length cannot fill the disk.",
    )
    download_timeout_seconds: float = Field(
        30.0,
        gt=0,
        description="Give up on a remote source when connecting, or any single read, takes longer than this "
        "(a read timeout, not a limit on the whole download).",
    )
    max_extract_mb: float = Field(
        4096.0,
        gt=0,
        description="Refuse an archive that unpacks to more than this many MiB; counted while extracting, "
        "and what was written is deleted.",
    )
    max_compression_ratio: float = Field(
        100.0,
        ge=1,
        description="Refuse an archive that unpacks to more than this many times its own size (a zip bomb): "
        "images are already compressed, so real datasets stay far below it. Checked while extracting, "
        "once more than 1 MiB is out.",
    )
    max_archive_members: int = Field(
        2_000_000,
        ge=1,
        description="Refuse an archive with more entries (files and folders) than this.",
    )


class ValidationPolicy(_Group):
    max_bad_fraction: float = Field(
        0.05, ge=0, le=1, description="Fail when more than this share of files cannot be decoded."
    )
    min_images_per_class: int = Field(5, ge=1, description="Fail when a class has fewer usable images.")
    max_imbalance_ratio: float = Field(
        10.0, ge=1, description="Warn when the largest class is this many times the smallest."
    )
    max_pixels: int = Field(
        40_000_000, ge=1, description="Refuse images with more pixels than this (decompression bombs)."
    )


class TrainSettings(_Group):
    epochs: int = Field(30, ge=1, le=10_000, description="Maximum training epochs.")
    batch_size: int = Field(64, ge=1, le=65_536, description="Images per optimisation step.")
    lr: float = Field(3e-3, gt=0, le=10, description="Peak learning rate (AdamW).")
    weight_decay: float = Field(5e-4, ge=0, description="AdamW weight decay.")
    label_smoothing: float = Field(0.1, ge=0, lt=1, description="Cross-entropy label smoothing.")
    schedule: Literal["onecycle", "cosine"] = Field("onecycle", description="Learning-rate schedule.")
    width: int = Field(0, ge=0, le=1024, description="Channels of the first stage; 0 sizes it from the data.")
    depth: int = Field(0, ge=0, le=6, description="Residual stages (each halves resolution); 0 = auto.")
    patience: int = Field(10, ge=1, description="Stop after this many epochs without a better val accuracy.")
    seed: int = Field(0, description="Seed for initialisation, augmentation and shuffling (CPU runs repeat exactly).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' takes CUDA when present.")
    compile: bool = Field(False, description="torch.compile the model (CUDA only).")
    threads: int = Field(
        0, ge=0, description="CPU threads for torch per process; 0 shares every core among a node's processes."
    )
    dist_timeout: float = Field(
        300.0,
        gt=0,
        le=86_400,
        description="Distributed training: seconds a process waits for the others in a collective (all-reduce, "
        "barrier) before failing, instead of hanging when a peer is gone.",
    )


class GateSettings(_Group):
    min_accuracy: float = Field(0.9, ge=0, le=1, description="Absolute floor on test accuracy for champion.")
    min_improvement: float = Field(
        0.0,
        ge=0,
        le=1,
        description="A challenger must beat the champion's accuracy on the same test set by more "
        "than 0 and by at least this much.",
    )
    promote: bool = Field(
        True,
        description="Whether the promote step may move champion. The closed loop sets it false for the pipeline runs "
        "it submits to Kubeflow: its own two-test-set gate decides after the run.",
    )
    parity_tolerance: float = Field(
        1e-4, gt=0, description="Largest allowed |ONNX - PyTorch| difference in softmax output."
    )


class RegistrySettings(_Group):
    model_name: str = Field("visionloop-classifier", description="Registered model name in MLflow.")
    tracking_uri: str = Field(
        "",
        description="MLflow tracking URI; empty uses MLFLOW_TRACKING_URI or an embedded SQLite "
        "store under the project home.",
    )
    experiment: str = Field("visionloop", description="MLflow experiment name.")
    timeout_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Longest wait for one answer from the MLflow store (an HTTP request, or a locked SQLite "
        "file) before the command fails instead of retrying for minutes.",
    )

    @field_validator("model_name")
    @classmethod
    def _name_ok(cls, value: str) -> str:
        if not value or any(c in value for c in "/:@ '\"\\") or len(value) > 200:
            raise ValueError(
                "must be non-empty, at most 200 chars, without '/', ':', '@', quotes, backslashes or spaces"
            )
        return value


class ServeSettings(_Group):
    host: str = Field("127.0.0.1", description="Address to listen on; 0.0.0.0 inside a container.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port (0 picks a free one).")
    model_ref: str = Field(
        "champion", description="Registered alias (or version number) to serve; hot reload follows it."
    )
    max_batch_size: int = Field(
        32, ge=1, le=4096, description="Dynamic batching: most images run through the model at once."
    )
    max_wait_ms: float = Field(
        2.0,
        ge=0,
        le=1000,
        description="Dynamic batching: longest an image waits for others to join its batch (0 = never wait).",
    )
    threads: int = Field(0, ge=0, description="ONNX Runtime intra-op threads; 0 uses every core.")
    top_k: int = Field(3, ge=1, le=1000, description="Labels returned per image by /predict unless asked otherwise.")
    max_images: int = Field(64, ge=1, le=4096, description="Most images accepted in one request.")
    max_body_mb: float = Field(16.0, gt=0, le=1024, description="Largest request body in MiB (413 above it).")
    max_pixels: int = Field(
        25_000_000,
        ge=1,
        le=89_478_485,  # Pillow's own bomb limit (Image.MAX_IMAGE_PIXELS) would refuse larger images anyway
        description="Largest decoded image in pixels (decompression bombs get 413).",
    )
    convert: bool = Field(
        True,
        description="Convert /predict uploads to the model's colour mode and size as training did; "
        "false refuses other modes with 422 (a request's convert=true|false overrides it).",
    )
    poll_seconds: float = Field(
        30.0, ge=0, description="How often to ask the registry whether the served alias moved (0 = never)."
    )
    admin_token: str = Field(
        "", description="Bearer token POST /admin/reload requires; empty leaves it open (bind to 127.0.0.1 then)."
    )
    feedback_token: str = Field(
        "",
        description="Bearer token POST /feedback requires; empty takes labels from anyone who can reach the server "
        "(labels become training data: set one wherever the closed loop retrains on them).",
    )
    log_predictions: bool = Field(
        True, description="Record every prediction in the prediction store (monitor.store_url) for monitoring."
    )
    drain_seconds: int = Field(
        20, ge=1, le=3600, description="On SIGTERM, how many seconds in-flight requests may take to finish."
    )
    decode_inline_pixels: int = Field(
        262_144,
        ge=0,
        description="Uploads whose headers declare at most this many pixels in all (and whose bytes are at most "
        "serve.decode_inline_kb) decode on the event loop, where a small image is cheapest; anything bigger "
        "decodes in the decode pool, so a 4900x4900 PNG of 230 KB never stalls /healthz.",
    )
    decode_inline_kb: int = Field(
        256, ge=0, description="Uploads of more KiB than this decode in the decode pool whatever their pixel count."
    )
    decode_workers: int = Field(
        1,
        ge=1,
        le=64,
        description="Worker processes decoding large uploads, at a lower CPU priority (nice +10) than the server: "
        "one leaves the other core to the event loop and the model on a 2-core machine; raise it with the cores.",
    )
    decode_queue_pixels: int = Field(
        100_000_000,
        ge=1,
        description="Pixels of large uploads admitted to the decode pool (decoding plus waiting); beyond it a "
        "request is answered 503 with Retry-After at once. Bounds memory too: a decoded pixel holds 1-4 bytes.",
    )
    parse_inline_kb: int = Field(
        256,
        ge=0,
        description="JSON bodies (V2 infer, /predict base64) of more KiB than this are parsed in a worker process: "
        "json.loads holds the GIL, so a 16 MB body parsed in the server process (even in a thread) stops every "
        "other request for seconds.",
    )
    parse_workers: int = Field(
        1, ge=1, le=64, description="Worker processes (nice +10, like the decode workers) parsing large JSON bodies."
    )
    parse_queue_mb: float = Field(
        64.0,
        gt=0,
        description="MiB of large JSON bodies admitted to the parse workers (parsing plus waiting); beyond it 503 "
        "with Retry-After.",
    )
    max_queued_images: int = Field(
        1024,
        ge=1,
        description="Images waiting for the model (the dynamic batcher's queue); beyond it a request is "
        "answered 503 with Retry-After instead of waiting longer and longer.",
    )
    feedback_workers: int = Field(
        2,
        ge=1,
        le=64,
        description="Threads writing /feedback to the prediction store: their own, so a store outage (each "
        "call may wait monitor.store_timeout_seconds) never holds a thread that decoding needs.",
    )
    feedback_queue: int = Field(
        8, ge=1, description="/feedback calls in flight (writing plus waiting); beyond it 503 with Retry-After."
    )


class MonitorSettings(_Group):
    """The prediction store the servers write and the monitor reads, and the drift tests run on it."""

    store_url: str = Field(
        "",
        description="Prediction store: empty is SQLite at <home>/monitoring/predictions.db; a SQLAlchemy URL "
        "(sqlite:///path.db, postgresql://user:password@host:5432/db) names a store several servers share.",
    )
    store_timeout_seconds: float = Field(
        10.0, gt=0, le=600, description="Longest wait for one answer from the prediction store."
    )
    max_queued_rows: int = Field(
        100_000,
        ge=100,
        description="Predictions a server holds in memory while the store is slow or down; beyond it they are "
        "dropped and counted, so the request path never waits for the database.",
    )
    retention_days: float = Field(
        30.0, ge=0, description="Delete predictions (and their feedback and kept images) older than this; 0 keeps all."
    )
    retention_rows: int = Field(
        0, ge=0, description="Keep at most this many newest predictions in the store; 0 is no limit."
    )
    retention_interval_seconds: float = Field(
        600.0, gt=0, description="How often a server enforces the retention settings in the background."
    )
    keep_images: bool | None = Field(
        None,
        description="Keep each prediction's input image (content-addressed) for retraining on labelled traffic; "
        "unset keeps them for the embedded store (under <home>) and for a store with monitor.image_url set.",
    )
    image_url: str = Field(
        "",
        description="Where kept images go: empty is <home>/monitoring/images; a folder, file:// or an fsspec URL "
        "(s3://bucket/prefix).",
    )
    image_max_mb: float = Field(
        1024.0, gt=0, description="Cap on the kept images' total size in MiB; past it new images are not kept."
    )
    spool_dir: str = Field(
        "",
        description="Where a server spools predictions the store cannot take (down, too slow, or still queued at "
        "shutdown), fsync'd, until it can replay them: empty is <home>/monitoring/spool. Servers that share this "
        "folder (one volume) replay each other's rows, so a replica that never comes back loses nothing.",
    )
    spool_max_mb: float = Field(
        1024.0,
        gt=0,
        description="Cap on the spool folder's total size in MiB (all servers sharing it). Past it predictions "
        'are dropped, counted as visionloop_prediction_store_errors_total{reason="spool_full"}; requests are '
        "still answered.",
    )
    host: str = Field("127.0.0.1", description="Address `visionloop monitor` listens on (0.0.0.0 in a container).")
    port: int = Field(8001, ge=0, le=65535, description="Port of `visionloop monitor` (/metrics, /drift).")
    interval_seconds: float = Field(30.0, gt=0, description="How often `visionloop monitor` runs a drift check.")
    window_size: int = Field(
        200, ge=2, description="Drift window: the newest this many predictions of the served version."
    )
    window_seconds: float = Field(
        3600.0, gt=0, description="Drift window time bound: predictions older than this are not in the window."
    )
    min_window: int = Field(
        20, ge=2, description="Fewer predictions in the window than this: the check says insufficient_data."
    )
    p_value: float = Field(
        0.01,
        gt=0,
        lt=1,
        description="Overall false-alarm budget of one check: split evenly (Bonferroni) over the four detectors "
        "(image statistics, class probabilities, class mix, embeddings).",
    )
    correction: Literal["bonferroni", "fdr_bh"] = Field(
        "bonferroni",
        description="Multiple-testing correction inside a detector's family of KS tests (Bonferroni or "
        "Benjamini-Hochberg).",
    )
    mmd_permutations: int = Field(
        500,
        ge=10,
        le=100_000,
        description="Permutations of the MMD test on embeddings; its p-value is at least 1/(permutations+1), so "
        "it must be at least 4/monitor.p_value for the test to be able to fire (400 at the default 0.01).",
    )
    reference_size: int = Field(
        2000, ge=50, description="Most validation/test images sampled into a version's reference profile."
    )
    accuracy_window: int = Field(200, ge=1, description="Live accuracy: over the newest this many feedback labels.")
    min_accuracy: float = Field(
        0.9, ge=0, le=1, description="Live accuracy floor; exported as visionloop_live_accuracy_floor for the alert."
    )
    min_feedback: int = Field(
        20, ge=1, description="Fewer feedback labels in the window than this: live accuracy is not judged."
    )
    token: str = Field(
        "",
        description="Bearer token POST /check on `visionloop monitor` requires (each call runs a check and writes a "
        "row); empty leaves it open (bind to 127.0.0.1 then).",
    )


class LoopSettings(_Group):
    """The closed loop: what starts a retrain, what it trains on, the two-test-set gate and the watch after it."""

    host: str = Field("127.0.0.1", description="Address `visionloop loop` listens on (0.0.0.0 in a container).")
    port: int = Field(8002, ge=0, le=65535, description="Port of `visionloop loop` (POST /alerts, /metrics, /runs).")
    triggers: list[Literal["alert", "verdict", "accuracy", "schedule"]] = Field(
        ["alert", "verdict", "accuracy"],
        description="What may start a retrain: an Alertmanager webhook (alert), the monitor's stored drift verdict "
        "(verdict), live accuracy under monitor.min_accuracy on enough labels (accuracy), loop.schedule_seconds.",
    )
    alerts: list[str] = Field(
        ["VisionloopDriftDetected", "VisionloopLiveAccuracyLow"],
        description="Alert names whose firing notifications start a retrain; other alerts are acknowledged and ignored.",
    )
    webhook_token: str = Field(
        "", description="Bearer token POST /alerts requires (Alertmanager's http_config.authorization); empty: open."
    )
    interval_seconds: float = Field(
        15.0,
        gt=0,
        description="How often the watcher looks at the verdict, live accuracy, the schedule and the champion.",
    )
    schedule_seconds: float = Field(
        0.0,
        ge=0,
        description="With the schedule trigger: retrain this long after the last retrain started (0 = never).",
    )
    cooldown_seconds: float = Field(
        600.0, ge=0, description="After a retrain ends, triggers are acknowledged but start nothing for this long."
    )
    lock_seconds: float = Field(
        60.0,
        gt=0,
        le=3600,
        description="Lease of the loop lock in the prediction store (renewed while a retrain runs): two loop processes "
        "never retrain at once, and one that died frees it after this long.",
    )
    min_labels: int = Field(
        50,
        ge=1,
        description="Fewest usable labelled production images (kept image, known class) a retrain needs; below it a "
        "trigger waits for more feedback.",
    )
    min_new_labels: int = Field(
        20,
        ge=0,
        description="A retrain needs at least this many labels newer than the last retrain's: the same data is never "
        "trained on twice.",
    )
    label_max_age_days: float = Field(30.0, gt=0, description="Labels older than this are not used for retraining.")
    max_production_share: float = Field(
        0.5,
        gt=0,
        lt=1,
        description="Cap on the production images' share of a retrain dataset (the newest are kept), so a flood of "
        "labels cannot outweigh the curated training data.",
    )
    production_test_fraction: float = Field(
        0.3,
        gt=0,
        lt=1,
        description="Share of the labelled production images held out (never trained on) as the gate's second test set.",
    )
    executor: Literal["local", "kubeflow"] = Field(
        "local",
        description="Where a retrain runs: local (the runner, in the loop's process) or kubeflow (the loop submits the "
        "pipeline to loop.kfp_host and waits, so training runs on the cluster's GPU nodes).",
    )
    kfp_host: str = Field("", description="Kubeflow Pipelines API URL for executor kubeflow.")
    kfp_namespace: str = Field("", description="Kubernetes namespace (Kubeflow profile) of the submitted runs.")
    kfp_image: str = Field("", description="Image the pipeline's steps run in (default: the pipeline's default image).")
    kfp_poll_seconds: float = Field(15.0, gt=0, description="How often the loop asks Kubeflow whether its run ended.")
    kfp_timeout_seconds: float = Field(
        7200.0, gt=0, description="Longest a submitted pipeline run may take before the loop marks the retrain failed."
    )
    dataset_url: str = Field(
        "",
        description="Where the retrain dataset is written: empty is <home>/loop/datasets; for executor kubeflow an "
        "object-store URL the pods can read (s3://bucket/visionloop/retrain).",
    )
    old_test_tolerance: float = Field(
        0.01,
        ge=0,
        le=1,
        description="Gate: the challenger may be at most this much less accurate than the champion on the original "
        "test set (poisoned labels alone cannot promote a model that got worse on it).",
    )
    min_production_gain: float = Field(
        0.0,
        ge=0,
        le=1,
        description="Gate: the challenger must beat the champion on the held-out production slice by more than 0 and "
        "by at least this much.",
    )
    min_production_test: int = Field(
        15, ge=1, description="Gate: fewest held-out production images for the production slice to count."
    )
    reload_urls: list[str] = Field(
        [],
        description="Servers to POST /admin/reload after a promotion or rollback (with serve.admin_token), so they "
        "switch at once instead of at their next poll.",
    )
    analysis_interval_seconds: float = Field(
        30.0, gt=0, description="Post-promotion analysis: seconds between two measurements."
    )
    analysis_count: int = Field(10, ge=1, le=1000, description="Post-promotion analysis: number of measurements.")
    analysis_min_accuracy: float = Field(
        0.9, ge=0, le=1, description="Success condition: live accuracy of the new champion at least this."
    )
    analysis_min_feedback: int = Field(
        20, ge=1, description="A measurement with fewer feedback labels on the new champion is inconclusive."
    )
    analysis_max_error_ratio: float = Field(
        0.05, ge=0, le=1, description="Success condition with loop.prometheus_url: 5xx share of requests at most this."
    )
    analysis_failure_limit: int = Field(
        1, ge=0, description="Failed measurements tolerated; one more ends the analysis failed and rolls back."
    )
    analysis_on_inconclusive: Literal["keep", "rollback"] = Field(
        "keep", description="When every measurement was inconclusive (too little feedback): keep or roll back."
    )
    prometheus_url: str = Field(
        "", description="Prometheus the analysis asks for the 5xx ratio (http://prometheus:9090); empty: not measured."
    )


class HttpSettings(_Group):
    """Limits every HTTP service we ship (serve, monitor, loop) puts on a connection before the app sees it."""

    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=3600,
        description="A request head (request line and headers) must arrive within this many seconds of its first "
        "byte (or of the connection opening); otherwise the connection is closed, so half-sent requests cannot "
        "hold file descriptors for ever.",
    )
    body_timeout_seconds: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Longest wait for the next chunk of a request body (nginx's client_body_timeout); past it the "
        "client gets 408 and the connection is closed.",
    )
    keep_alive_seconds: float = Field(
        5.0, gt=0, le=3600, description="An idle keep-alive connection is closed after this many seconds."
    )
    max_connections: int = Field(
        1000,
        ge=2,
        le=1_000_000,
        description="Most open connections per process (capped below the open-file soft limit). At the cap a new "
        "connection closes the oldest one that has not sent a complete request head, so idle or half-open "
        "connections never lock out /healthz; when every connection is busy the new one gets 503.",
    )
    max_header_kib: int = Field(
        64, ge=1, le=1024, description="Largest request head in KiB; a longer one gets 431 and the connection closes."
    )
    backlog: int = Field(
        2048, ge=1, le=65535, description="Connections the kernel queues before the server accepts them (listen())."
    )
    max_body_mb: float = Field(
        1.0,
        gt=0,
        le=1024,
        description="Largest request body of the monitor and loop services in MiB (413 before the body is read); "
        "the prediction server uses serve.max_body_mb.",
    )
    allowed_hosts: list[str] = Field(
        [],
        description="Host header values accepted (Starlette TrustedHostMiddleware patterns: 'example.com', "
        "'*.example.com', '*'); others get 400. Empty: the loopback names (127.0.0.1, localhost, ::1) when the "
        "service binds a loopback address (against DNS rebinding), any host otherwise (kubelet probes send the pod IP).",
    )
    allow_public_without_tokens: bool = Field(
        False,
        description="Let a service bind a non-loopback address while its bearer tokens (serve.admin_token, "
        "serve.feedback_token, monitor.token, loop.webhook_token) are unset. Off: it refuses to start, since anyone "
        "who can reach the port could reload models, post labels or start retrains.",
    )


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="VISIONLOOP_", env_nested_delimiter="__", extra="forbid", validate_default=True
    )

    home: Path = Field(Path(".visionloop"), description="Project data directory: datasets, runs, MLflow store.")
    data: DataSettings = DataSettings()
    validation: ValidationPolicy = ValidationPolicy()
    train: TrainSettings = TrainSettings()
    gate: GateSettings = GateSettings()
    registry: RegistrySettings = RegistrySettings()
    serve: ServeSettings = ServeSettings()
    monitor: MonitorSettings = MonitorSettings()
    loop: LoopSettings = LoopSettings()
    http: HttpSettings = HttpSettings()

    @model_validator(mode="after")
    def _splits_leave_training_data(self) -> Settings:
        if self.data.val_fraction + self.data.test_fraction >= 0.8:
            raise ValueError("data.val_fraction + data.test_fraction must leave at least 20% for training")
        return self

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        path = find_config_file(_EXPLICIT_FILE.get())
        if path is not None:
            sources.append(YamlConfigSettingsSource(settings_cls, yaml_file=path))
        return tuple(sources)

    @property
    def tracking_uri(self) -> str:
        """The MLflow store: explicit setting, then MLFLOW_TRACKING_URI, then SQLite under home."""
        if self.registry.tracking_uri:
            return self.registry.tracking_uri
        if os.environ.get("MLFLOW_TRACKING_URI"):
            return os.environ["MLFLOW_TRACKING_URI"]
        return f"sqlite:///{(self.home / 'mlflow.db').resolve()}"

    @property
    def artifact_root(self) -> Path:
        return (self.home / "mlartifacts").resolve()

    @property
    def store_url(self) -> str:
        """The prediction store: monitor.store_url, else SQLite under home."""
        if self.monitor.store_url:
            return self.monitor.store_url
        return f"sqlite:///{(self.home / 'monitoring' / 'predictions.db').resolve()}"

    @property
    def image_url(self) -> str | None:
        """Where kept input images go, or None when they are not kept."""
        keep = self.monitor.keep_images
        if keep is None:
            keep = not self.monitor.store_url or bool(self.monitor.image_url)
        if not keep:
            return None
        return self.monitor.image_url or str((self.home / "monitoring" / "images").resolve())


# The YAML file named by one ``load_settings`` call (--config); pydantic-settings reads its sources
# from a classmethod, so it is handed over for the duration of the call (per thread and task).
_EXPLICIT_FILE: ContextVar[Path | None] = ContextVar("visionloop_config_file", default=None)


def find_config_file(explicit: Path | None = None) -> Path | None:
    """The YAML file settings come from, whoever builds them (``Settings()`` or ``load_settings``):
    ``explicit`` (--config), else VISIONLOOP_CONFIG, else ./visionloop.yaml when it exists."""
    if explicit is None and os.environ.get("VISIONLOOP_CONFIG"):
        explicit = Path(os.environ["VISIONLOOP_CONFIG"])
    if explicit is None:
        return Path("visionloop.yaml") if Path("visionloop.yaml").is_file() else None
    if not explicit.is_file():
        raise ConfigError(f"config file not found: {explicit}")
    return explicit


def _nest(overrides: dict[str, Any]) -> dict[str, Any]:
    """Turn {"train.epochs": 5} into {"train": {"epochs": 5}}, dropping unset (None) values."""
    nested: dict[str, Any] = {}
    for dotted, value in overrides.items():
        if value is None:
            continue
        *parents, leaf = dotted.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def _merge(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in top.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def load_settings(config_file: Path | None = None, overrides: dict[str, Any] | None = None) -> Settings:
    """Build the settings; any problem becomes one ConfigError naming the bad key."""
    token = _EXPLICIT_FILE.set(find_config_file(config_file))
    try:
        # init kwargs replace whole nested groups, so flags are merged over env + file first.
        base = Settings().model_dump() if overrides else {}
        return Settings(**_merge(base, _nest(overrides or {})))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "settings"
        raise ConfigError(f"invalid setting {where}: {first['msg']}") from None
    except Exception as exc:  # YAML syntax errors, unreadable files, bad env JSON
        raise ConfigError(f"could not read settings: {exc}") from None
    finally:
        _EXPLICIT_FILE.reset(token)


def default_of(dotted: str) -> Any:
    """The built-in default of a setting, for help texts."""
    model: Any = Settings
    *parents, leaf = dotted.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    return model.model_fields[leaf].default


def describe(dotted: str) -> str:
    """Help text for a CLI option: the field's description plus its setting and env names."""
    model: Any = Settings
    *parents, leaf = dotted.split(".")
    for part in parents:
        model = model.model_fields[part].annotation
    field = model.model_fields[leaf]
    env = "VISIONLOOP_" + "__".join(p.upper() for p in dotted.split("."))
    shown = str(field.default) if isinstance(field.default, Path) else repr(field.default)
    return f"{field.description} [setting {dotted}, env {env}, default {shown}]"
