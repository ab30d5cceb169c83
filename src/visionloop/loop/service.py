"""``visionloop loop``: the Alertmanager webhook, the watcher, the run history and ``/metrics``, on one port.

- ``POST /alerts``: Alertmanager's webhook (payload version 4). A valid payload is always answered 200
  with what the loop did (``started``, ``busy``, ``cooldown``, ``waiting``, ``ignored``): Alertmanager
  retries anything else, and a refusal is a decision, not an error. A malformed one gets 422 naming the
  field (never echoing the body); a missing or wrong token (``loop.webhook_token``) 401 before a body byte is
  read; a body over ``http.max_body_mb`` 413 (service/guard.py);
- ``POST /runs``: start a retrain by hand (``{"reason": "..."}``), with the same token;
- ``GET /runs``, ``GET /runs/{id}``: the history, newest first; ``GET /triggers``: the latest triggers and
  what became of them;
- the watcher: every ``loop.interval_seconds`` one ``Engine.tick`` (unfinished runs first, then a
  promotion made outside the loop, the monitor's verdict, live accuracy, the schedule);
- ``/healthz``, ``/readyz`` (the store answers), ``/metrics``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import FastAPI, Query
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field

from visionloop.config import Settings
from visionloop.loop.engine import Ack, Engine
from visionloop.loop.triggers import AlertmanagerPayload, Trigger, from_alerts
from visionloop.service.app import guard_side_service
from visionloop.service.guard import TokenRule
from visionloop.service.server import run_side_service

log = logging.getLogger("visionloop.loop")
UNAUTHORISED = "POST needs Authorization: Bearer <loop.webhook_token>"


class ManualRun(BaseModel):
    reason: str = Field("manual retrain", min_length=1, max_length=2000, description="why; kept in the history")


def create_app(settings: Settings, engine: Engine | None = None) -> Any:
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from visionloop import __version__

    engine = engine or Engine(settings)

    async def watch_forever() -> None:
        while True:
            try:
                await asyncio.to_thread(engine.tick)
            except Exception as exc:  # the watcher outlives anything one look throws
                engine.metrics.errors.labels("watch").inc()
                log.exception("watch failed: %s", exc)
            await asyncio.sleep(settings.loop.interval_seconds)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.get_running_loop().create_task(watch_forever())
        yield
        engine.close()
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task

    app = FastAPI(
        title="visionloop loop",
        version=__version__,
        description="The closed loop: Alertmanager webhook, retrain, two-test-set gate, post-promotion analysis "
        "and rollback. Prometheus metrics under /metrics.",
        lifespan=lifespan,
    )
    app.state.engine = engine

    # the token is checked on the request head, before a body byte is read (service/guard.py)
    token = settings.loop.webhook_token
    guard_side_service(
        app,
        metrics=engine.metrics.http,
        http=settings.http,
        tokens=[TokenRule("POST", path, token, UNAUTHORISED) for path in ("/alerts", "/runs")],
        log=log,
    )

    @app.post("/alerts", response_model=Ack)
    async def alerts(payload: AlertmanagerPayload) -> Any:
        trigger = from_alerts(payload, settings)
        resolved = [a.labels.get("alertname", "") for a in payload.alerts if a.status == "resolved"]
        if resolved:
            engine.resolved(resolved)
        if trigger is None:
            names = sorted({a.labels.get("alertname", "?") for a in payload.alerts})
            ignored = Trigger("alert", f"{payload.status}: {', '.join(names)}")
            return engine._ack(ignored, "ignored", "no firing alert the loop acts on (loop.alerts)")
        return await asyncio.to_thread(engine.offer, trigger, False)

    @app.post("/runs", response_model=Ack)
    async def start_run(body: ManualRun) -> Any:
        return await asyncio.to_thread(engine.offer, Trigger("manual", body.reason), False)

    @app.get("/runs")
    def runs(limit: Annotated[int, Query(ge=1, le=1000)] = 50) -> list[dict]:
        return [run.to_dict() for run in engine.state.runs(settings.registry.model_name, limit=limit)]

    @app.get("/runs/{run_id}")
    def run(run_id: str) -> Any:
        found = engine.state.get_run(run_id)
        if found is None:
            return JSONResponse({"error": f"no loop run {run_id}"}, status_code=404)
        return found.to_dict()

    @app.get("/triggers", response_model=list[Ack])
    def triggers() -> Any:
        return list(reversed(engine.acks))

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "alive", "run": engine.current}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        try:
            engine.state.runs(settings.registry.model_name, limit=1)
        except Exception as exc:
            return JSONResponse({"ready": False, "error": " ".join(str(exc).split())[:500]}, status_code=503)
        return JSONResponse({"ready": True, "run": engine.current})

    @app.get("/metrics")
    def metrics() -> Response:
        return Response(generate_latest(engine.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


def run_service(settings: Settings, on_started: Any = None) -> None:
    """``visionloop loop``: serve until SIGINT/SIGTERM. A run in progress stops with the process and is
    taken up again by the next one (its phase is in the store)."""
    group = settings.loop
    run_side_service(
        lambda: create_app(settings), host=group.host, port=group.port, http=settings.http,
        tokens={"loop.webhook_token": group.webhook_token}, log=log, on_started=on_started,
    )  # fmt: skip
