"""The service state every request shares: model holder, batcher, prediction store, metrics.

One ``Service`` per app, created by ``create_app`` and handed to the routes as a dependency
(``api/deps.py``), so a route module needs no closure over it and imports on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import io
import itertools
import time
import uuid

import numpy as np
from PIL import Image

from visionloop.config import Settings
from visionloop.monitoring.stats import pixel_stats, sharpness
from visionloop.monitoring.store import Prediction, PredictionStore, instance_name
from visionloop.serving.admission import Pool, process_pool, thread_pool
from visionloop.serving.batcher import DynamicBatcher
from visionloop.serving.errors import ApiError
from visionloop.serving.metrics import ServingMetrics
from visionloop.serving.model import LoadedModel, ModelHolder


class Service:
    """Everything a request needs: the model holder, the batcher, the prediction store, the metrics."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = ServingMetrics()
        # opening the store does not touch the database: a store that is down does not stop the server (its rows
        # queue, and the writer retries), and /metrics says so (visionloop_prediction_store_lag_seconds)
        self.predictions = (
            PredictionStore.from_settings(settings, metrics=self.metrics.store)
            if settings.serve.log_predictions
            else None
        )
        self.keep_images = self.predictions is not None and self.predictions.images is not None
        self.instance = instance_name()
        self.holder = ModelHolder(settings, self.metrics, self.predictions)
        serve = settings.serve
        self.batcher = DynamicBatcher(serve.max_batch_size, serve.max_wait_ms, self.metrics, serve.max_queued_images)
        # expensive request work runs in pools of its own, each bounded (admission.py): large uploads decode and
        # large JSON bodies parse in lower-priority worker processes, and /feedback waits on the store in threads
        # that no decode needs
        self.decode_pool: Pool = process_pool("decode", serve.decode_workers, serve.decode_queue_pixels, "pixels")
        self.parse_pool: Pool = process_pool("parse", serve.parse_workers, int(serve.parse_queue_mb * 2**20), "bytes")
        self.feedback_pool: Pool = thread_pool("feedback", serve.feedback_workers, serve.feedback_queue, "calls")
        self._poller: asyncio.Task | None = None
        # request ids: 64 random bits per process start, then a counter — unique, and no syscall per id
        self._id_prefix = uuid.uuid4().hex[:16]
        self._id_counter = itertools.count()

    async def start(self) -> None:
        self.batcher.start()
        self.decode_pool.warm()  # the workers import while the model loads, not on the first large upload
        self.parse_pool.warm()
        await self.holder.reload()
        # Everything imported and loaded so far (MLflow, pydantic, the model) lives as long as the process.
        # Freezing it keeps the collector from rescanning that heap: without this, a full collection paused
        # every request for ~200 ms under load (p99 at concurrency 32: 200 ms, with it 16 ms).
        gc.collect()
        gc.freeze()
        if self.settings.serve.poll_seconds > 0:
            self._poller = asyncio.get_running_loop().create_task(self.holder.poll_forever())

    async def stop(self) -> None:
        if self._poller is not None:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
        await self.batcher.close()
        for pool in (self.decode_pool, self.parse_pool, self.feedback_pool):
            pool.shutdown()
        if self.predictions is not None:
            self.predictions.close()

    def model(self) -> LoadedModel:
        model = self.holder.current
        if model is None:
            raise ApiError(503, f"no model loaded: {self.holder.status}", "not_ready")
        return model

    async def classify(self, model: LoadedModel, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return await self.batcher.submit(model, pixels)

    def record(
        self,
        model: LoadedModel,
        endpoint: str,
        pixels: np.ndarray,
        probs: np.ndarray,
        embeddings: np.ndarray,
        sizes: list[tuple[int, int]],
        converted: list[str | None],
        uploads: list[bytes] | None = None,
    ) -> list[str]:
        """Count and store each prediction; returns the request ids, one per image.

        ``uploads`` are the images as they arrived, kept when images are kept (monitor.image_url); without
        them (V2 tensors) the model's input pixels are kept as a PNG.
        """
        now = time.time()
        ids = [f"{self._id_prefix}{next(self._id_counter):016x}" for _ in range(len(probs))]
        top = probs.argmax(axis=1)
        confidence = probs[np.arange(len(probs)), top]
        for index, conf in zip(top, confidence, strict=True):
            self.metrics.predictions.labels(model.version, model.classes[index]).inc()
            self.metrics.confidence.labels(model.version).observe(float(conf))
        if self.predictions is None:
            return ids
        means, stds, channel_means = pixel_stats(pixels)
        sharp = sharpness(pixels)
        if not self.keep_images:
            images: list[bytes | None] = [None] * len(probs)
        elif uploads is not None:
            images = list(uploads)
        else:
            images = [png(pixels[i]) for i in range(len(probs))]
        self.predictions.append(
            [
                Prediction(
                    request_id=ids[i],
                    time=now,
                    endpoint=endpoint,
                    model_name=model.name,
                    model_version=model.version,
                    predicted_index=int(top[i]),
                    predicted_label=model.classes[top[i]],
                    confidence=float(confidence[i]),
                    probabilities=probs[i],
                    embedding=embeddings[i],
                    image_width=sizes[i][0],
                    image_height=sizes[i][1],
                    image_mean=float(means[i]),
                    image_std=float(stds[i]),
                    image_sharpness=float(sharp[i]),
                    channel_means=channel_means[i],
                    converted=converted[i],
                    image=images[i],
                    instance=self.instance,
                )
                for i in range(len(probs))
            ]
        )
        return ids


def png(pixels: np.ndarray) -> bytes:
    """A model input (C, H, W) uint8 as PNG bytes (fast compression: this runs on the request path)."""
    channels = pixels.shape[0]
    # Pillow reads the mode from the shape: (H, W) is L, (H, W, 3) RGB, (H, W, 4) RGBA; any other channel
    # count keeps the first channel, a picture a person can still look at
    array = pixels.transpose(1, 2, 0) if channels in (3, 4) else pixels[0]
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()
