"""The monitor: every interval, the served version's newest predictions against its reference profile.

``Monitor.check()`` is one check: resolve the version ``serve.model_ref`` names, read its reference
profile (``profile.py``) and its window of logged predictions from the shared store (one indexed query,
``monitor.window_size`` rows no older than ``monitor.window_seconds``), run the drift tests
(``drift.py``), measure live accuracy per version from feedback, keep the result in the store (the
server's ``GET /monitoring/drift`` and the report read it there) and export it as metrics. Live accuracy
of the judged version under ``monitor.min_accuracy`` on enough labels is a status of its own,
``accuracy_below_floor`` (``under_floor``), that wins over what the drift tests said.
A check never raises: a registry, store or profile failure is a result with status ``error`` (or
``no_reference``), counted in ``visionloop_monitor_errors_total{stage}``.

``create_app`` is ``visionloop monitor``: the same check on a timer, ``GET /drift`` (the latest result),
``POST /check`` (one now), ``GET /metrics``, ``/healthz`` and ``/readyz``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from visionloop.config import Settings
from visionloop.errors import VisionloopError
from visionloop.monitoring import drift
from visionloop.monitoring.metrics import MonitorMetrics
from visionloop.monitoring.profile import ProfileError, ReferenceProfile, profile_for
from visionloop.monitoring.schema import ACCURACY_REASON, DriftResult, LiveAccuracy, WindowInfo
from visionloop.monitoring.stats import Sample
from visionloop.monitoring.store import PredictionStore, Window

log = logging.getLogger("visionloop.monitor")
CHECK_UNAUTHORISED = "POST /check needs 'Authorization: Bearer <monitor.token>'"


class Monitor:
    def __init__(self, settings: Settings, store: PredictionStore | None = None) -> None:
        self.settings = settings
        self.config = drift.DriftConfig.from_settings(settings.monitor)
        self.metrics = MonitorMetrics(settings.monitor)
        self._store = store
        self._references: dict[str, tuple[ReferenceProfile, drift.Reference]] = {}
        self._lock = threading.Lock()  # one check at a time (the timer and POST /check)
        self.latest: DriftResult | None = None
        self.latest_window: Window | None = None  # the window the latest check read (the report plots it)

    @property
    def store(self) -> PredictionStore:
        if self._store is None:
            self._store = PredictionStore.from_settings(self.settings, writer=False)
        return self._store

    def close(self) -> None:
        if self._store is not None:
            self._store.close()

    # ------------------------------------------------------------------------------------------ one check
    def check(self, version: str | None = None, save: bool = True) -> DriftResult:
        """One drift check of ``version`` (default: the one ``serve.model_ref`` names now)."""
        with self._lock:
            started, now = time.perf_counter(), time.time()
            self.latest_window = None
            result = under_floor(self._check(version, now), self.settings.monitor.min_accuracy)
            result.duration_seconds = round(time.perf_counter() - started, 6)
            if save and result.status != "error":
                try:
                    self.store.save_check(result)
                except VisionloopError as exc:
                    self._failed("store", exc)
            self.metrics.observe(result)
            self.latest = result
        return result

    def _check(self, version: str | None, now: float) -> DriftResult:
        monitor = self.settings.monitor
        name = self.settings.registry.model_name
        window_info = WindowInfo(size=0, requested=monitor.window_size, max_age_seconds=monitor.window_seconds)
        settings_used: dict[str, float | int | str] = {
            "p_value": monitor.p_value, "correction": monitor.correction, "detector_threshold": monitor.p_value / 4,
            "mmd_permutations": monitor.mmd_permutations, "window_size": monitor.window_size,
            "window_seconds": monitor.window_seconds, "min_window": monitor.min_window,
            "accuracy_window": monitor.accuracy_window, "min_accuracy": monitor.min_accuracy,
            "min_feedback": monitor.min_feedback,
        }  # fmt: skip

        def result(status: str, reasons: list[str], **fields: Any) -> DriftResult:
            return DriftResult(
                model_name=name, model_version=version, checked_at=now, duration_seconds=0.0, status=status,
                drifted=fields.pop("drifted", status == "drifted"), reasons=reasons,
                window=fields.pop("window", window_info),
                settings=settings_used, **fields,
            )  # fmt: skip

        if version is None:
            try:
                from visionloop import registry

                version = registry.resolve(self.settings, self.settings.serve.model_ref)
            except VisionloopError as exc:
                return result("error", [self._failed("registry", exc)])
            if version is None:
                return result("no_model", [f"no version is registered as {name}@{self.settings.serve.model_ref}"])
        try:
            accuracy = self.live_accuracy()
        except VisionloopError as exc:
            return result("error", [self._failed("store", exc)])
        try:
            profile, reference = self.reference(version)
        except VisionloopError as exc:
            return result("no_reference", [self._failed("reference", exc)], accuracy=accuracy)
        try:
            window = self.store.window(name, version, monitor.window_size, since=now - monitor.window_seconds)
        except VisionloopError as exc:
            return result("error", [self._failed("store", exc)], accuracy=accuracy)
        self.latest_window = window
        first, last = window.first_time, window.last_time
        info = WindowInfo(
            size=len(window.sample), requested=monitor.window_size, max_age_seconds=monitor.window_seconds,
            first_time=first, last_time=last, span_seconds=(last - first) if first is not None and last else 0.0,
        )  # fmt: skip
        common = {"window": info, "reference": profile.info(now), "accuracy": accuracy}
        if len(window.sample) < monitor.min_window:
            reason = (
                f"{len(window.sample)} predictions of v{version} in the last {monitor.window_seconds:g} s; "
                f"a verdict needs monitor.min_window={monitor.min_window}"
            )
            return result("insufficient_data", [reason], **common)
        try:
            verdict = drift.detect(reference, comparable(window.sample, profile.sample))
        except Exception as exc:  # a bug or a malformed row must not stop the monitor
            log.exception("drift tests failed")
            return result("error", [self._failed("drift", exc)], **common)
        status = "drifted" if verdict.drifted else "ok"
        return result(status, verdict.reasons, tests=verdict.tests, drifted=verdict.drifted, **common)

    def reference(self, version: str) -> tuple[ReferenceProfile, drift.Reference]:
        """The version's profile and its prepared drift reference (built once per version)."""
        if version not in self._references:
            profile = profile_for(self.settings, version)
            if len(profile) < 2:
                raise ProfileError(f"the reference profile of v{version} holds {len(profile)} images")
            prepared = drift.Reference(profile.sample, len(profile.classes), self.config)
            self._references = {version: (profile, prepared)}  # only the served version is kept in memory
        return self._references[version]

    def live_accuracy(self) -> list[LiveAccuracy]:
        monitor = self.settings.monitor
        out = []
        for version, count, correct in self.store.live_accuracy(
            self.settings.registry.model_name, monitor.accuracy_window
        ):
            accuracy = correct / count if count else None
            judged = count >= monitor.min_feedback
            below = judged and accuracy is not None and accuracy < monitor.min_accuracy
            out.append(
                LiveAccuracy(
                    model_version=version,
                    count=count,
                    correct=correct,
                    accuracy=accuracy,
                    judged=judged,
                    below_floor=below,
                )
            )
        return out

    def _failed(self, stage: str, exc: BaseException) -> str:
        self.metrics.errors.labels(stage).inc()
        message = f"{stage}: {exc}"
        log.warning("check failed at %s", message)
        return message


# statuses the accuracy floor overrides: a measured failure outweighs a suspicion (drifted), a quiet input test
# (ok) and a drift check that could not run (insufficient_data, no_reference); without a version (no_model) or
# without the store (error) there is no accuracy to judge
OVERRIDDEN = ("ok", "drifted", "insufficient_data", "no_reference")


def under_floor(result: DriftResult, min_accuracy: float) -> DriftResult:
    """``result`` with status ``accuracy_below_floor`` when the judged version's live accuracy is under the floor.

    Live accuracy comes from labels, not from the drift window: 200 labels that all contradict the model are
    the worst failure a monitor can see, even while the inputs look unchanged, and a CronJob that trusts the
    exit code must hear it. Only the version being judged counts (another version's labels are history). The
    drift reasons stay listed after the accuracy one and ``drifted`` keeps what the drift tests said.
    """
    if result.status not in OVERRIDDEN:
        return result
    live = next((a for a in result.accuracy if a.model_version == result.model_version and a.below_floor), None)
    if live is None or live.accuracy is None:
        return result
    reason = (
        f"{ACCURACY_REASON} {live.accuracy:.3f} on {live.count} labels < {min_accuracy:.2f} "
        f"(monitor.min_accuracy; v{live.model_version})"
    )
    return result.model_copy(update={"status": "accuracy_below_floor", "reasons": [reason, *result.reasons]})


def comparable(window: Sample, reference: Sample) -> Sample:
    """The window with only the statistics the reference has (older profiles lack the source sizes)."""
    if set(window.stats) == set(reference.stats):
        return window
    stats = {name: values for name, values in window.stats.items() if name in reference.stats}
    return Sample(stats, window.probabilities, window.embeddings, window.times)


# ------------------------------------------------------------------------------------------ the service
def create_app(settings: Settings, monitor: Monitor | None = None) -> Any:
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, Response
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from visionloop import __version__

    monitor = monitor or Monitor(settings)

    async def check_forever() -> None:
        while True:
            try:
                await asyncio.to_thread(monitor.check)
            except Exception as exc:  # the timer outlives anything a check throws
                log.exception("drift check failed: %s", exc)
            await asyncio.sleep(settings.monitor.interval_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(check_forever())
        yield
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        monitor.close()

    app = FastAPI(
        title="visionloop monitor",
        version=__version__,
        description="Drift checks of the served model's traffic against its reference profile, every "
        f"{settings.monitor.interval_seconds:g} s; Prometheus metrics under /metrics.",
        lifespan=lifespan,
    )
    app.state.monitor = monitor
    # each POST /check runs a check and writes a row: behind monitor.token, checked before the body is read
    from visionloop.service.app import guard_side_service
    from visionloop.service.guard import TokenRule

    check_token = TokenRule("POST", "/check", settings.monitor.token, CHECK_UNAUTHORISED)
    guard_side_service(app, metrics=monitor.metrics.http, http=settings.http, tokens=[check_token], log=log)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "alive"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        latest = monitor.latest
        if latest is None:
            return JSONResponse({"ready": False, "error": "no check has finished yet"}, status_code=503)
        if latest.status == "error":
            return JSONResponse({"ready": False, "error": "; ".join(latest.reasons)}, status_code=503)
        return JSONResponse({"ready": True, "status": latest.status})

    @app.get("/drift", response_model=DriftResult)
    def latest_drift() -> Any:
        if monitor.latest is None:
            return JSONResponse({"error": "no check has finished yet; try again in a moment"}, status_code=503)
        return monitor.latest

    @app.post("/check", response_model=DriftResult)
    async def check_now() -> DriftResult:
        return await asyncio.to_thread(monitor.check)

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(monitor.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def run_service(settings: Settings, on_started: Any = None) -> None:
    """``visionloop monitor``: serve until SIGINT/SIGTERM."""
    from visionloop.service.server import run_side_service

    group = settings.monitor
    run_side_service(
        lambda: create_app(settings), host=group.host, port=group.port, http=settings.http,
        tokens={"monitor.token": group.token}, log=log, on_started=on_started,
    )  # fmt: skip
