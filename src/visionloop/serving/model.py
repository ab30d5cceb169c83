"""The model being served, and hot reload: follow the registry alias without dropping a request.

A reload resolves the alias (``champion`` by default) in the registry. If it names a version other
than the one serving, that version is downloaded and loaded *beside* the current one, warmed up, and
checked on its check input (shapes, finite outputs, probabilities summing to 1, and the same answer
the exported graph gave at export time), and its card must state an input transform this server can
apply (``data/transform.py``). Only then does one assignment make it the served model;
requests already decoded for the old model finish on the old model. A version that fails to
download, load or check is refused: the old one keeps serving, and the failure is logged, counted in
``visionloop_model_reloads_total{result="failed"}`` and shown by ``/readyz``. A refused version is
not retried by the poller until the alias moves again (``POST /admin/reload`` retries at once).
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from visionloop import registry
from visionloop.config import Settings
from visionloop.data.transform import InputTransform
from visionloop.errors import VisionloopError
from visionloop.inference import OnnxClassifier
from visionloop.monitoring.store import PredictionStore
from visionloop.serving.metrics import ServingMetrics

log = logging.getLogger("visionloop.serve")

WARMUP_RUNS = 3


@dataclass
class LoadedModel:
    name: str
    version: str
    classifier: OnnxClassifier
    loaded_at: float = field(default_factory=time.time)
    # built from the card at load time, so a card stating a transform this server cannot apply is a refused
    # reload (the old model keeps serving), not a failure on every request
    transform: InputTransform = field(init=False)

    def __post_init__(self) -> None:
        self.transform = InputTransform.from_card(self.card)

    @property
    def card(self) -> dict:
        return self.classifier.card

    @property
    def classes(self) -> list[str]:
        return self.card["classes"]

    @property
    def channels(self) -> int:
        return int(self.card["channels"])

    @property
    def image_size(self) -> int:
        return int(self.card["image_size"])

    @property
    def dataset_version(self) -> str:
        return str(self.card.get("dataset", {}).get("version", ""))

    def run(self, images: np.ndarray, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
        return self.classifier.run(images, batch_size)


@dataclass
class ReloadResult:
    result: str  # loaded | unchanged | failed | no_model
    version: str | None
    message: str

    def to_dict(self) -> dict:
        return {"result": self.result, "version": self.version, "message": self.message}


class ModelHolder:
    def __init__(self, settings: Settings, metrics: ServingMetrics, predictions: PredictionStore | None) -> None:
        self.settings = settings
        self.metrics = metrics
        self.predictions = predictions
        self.current: LoadedModel | None = None
        self.status = "starting: no model loaded yet"
        self._refused: str | None = None  # the version that last failed its load or check
        self._lock = asyncio.Lock()
        self._models_dir = settings.home / "serving" / "models"

    @property
    def ready(self) -> bool:
        return self.current is not None

    async def reload(self, force: bool = False) -> ReloadResult:
        """Resolve the alias and switch to the version it names, if that is new and passes its check."""
        async with self._lock:
            result = await self._reload(force)
        self.metrics.reloads.labels(result.result).inc()
        if result.result in ("loaded", "failed", "no_model"):
            (log.info if result.result == "loaded" else log.warning)("reload: %s", result.message)
        if result.result != "unchanged" and not (result.result == "failed" and self.current is not None):
            self.status = result.message
        elif result.result == "failed":
            self.status = f"serving v{self.current.version}; last reload failed: {result.message}"  # type: ignore[union-attr]
        return result

    async def _reload(self, force: bool) -> ReloadResult:
        ref = self.settings.serve.model_ref
        name = self.settings.registry.model_name
        try:
            version = await asyncio.to_thread(registry.resolve, self.settings, ref)
        except VisionloopError as exc:
            return ReloadResult("failed", None, str(exc))
        if version is None:
            if self.current is not None:
                return ReloadResult("unchanged", self.current.version, f"{name}@{ref} names no version; still serving")
            return ReloadResult(
                "no_model", None, f"no model registered as {name}@{ref} yet; not ready (`visionloop run` registers one)"
            )
        if self.current is not None and self.current.version == version:
            return ReloadResult("unchanged", version, f"{name}@{ref} is v{version}, already serving")
        if version == self._refused and not force:
            return ReloadResult("unchanged", version, f"v{version} was refused before; waiting for {ref} to move")
        try:
            loaded = await asyncio.to_thread(self._load, version)
        except Exception as exc:
            self._refused = version
            return ReloadResult("failed", version, f"refused {name} v{version}: {exc}")
        previous, self.current = self.current, loaded  # the swap: one assignment
        self._refused = None
        self.metrics.serving(name, version, loaded.dataset_version, loaded.loaded_at)
        if self.predictions is not None:
            self.predictions.record_model(name, version, loaded.dataset_version, loaded.classes)
        was = f" (was v{previous.version})" if previous is not None else ""
        return ReloadResult("loaded", version, f"serving {name} v{version}{was} from {name}@{ref}")

    def _load(self, version: str) -> LoadedModel:
        # the session and the card live in memory once loaded, so the download is removed at once
        self._models_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f"v{version}-", dir=self._models_dir) as folder:
            onnx_path, card_path = registry.download_version(self.settings, version, Path(folder))
            classifier = OnnxClassifier.load(onnx_path, card_path, threads=self.settings.serve.threads)
        for _ in range(WARMUP_RUNS):
            classifier.run(np.zeros((self.settings.serve.max_batch_size, *classifier.input_shape), np.uint8))
        problems = classifier.self_check(self.settings.gate.parity_tolerance)
        if problems:
            raise VisionloopError("check failed: " + "; ".join(problems))
        return LoadedModel(self.settings.registry.model_name, version, classifier)

    async def poll_forever(self) -> None:
        interval = self.settings.serve.poll_seconds
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload()
            except Exception as exc:  # the poller must outlive anything a reload throws
                log.exception("reload poll failed: %s", exc)
