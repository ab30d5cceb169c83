"""The FastAPI app: /predict for people, the V2 protocol for KServe/Triton clients, health, metrics, feedback.

``create_app(settings)`` builds the service state and the app; ``visionloop serve`` runs it with uvicorn.
The routes live one router per concern under ``api/routes/`` and get the state through ``api/deps.py``;
what stays here is what wraps every route: the body cap and request metrics (``GuardMiddleware``) and
the error handlers. Every error a client can cause is a 4xx with ``{"error": "..."}`` naming the problem.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from visionloop import __version__
from visionloop.config import Settings
from visionloop.serving.api.main import api_router
from visionloop.serving.errors import ApiError, BodyTooLarge, first_error
from visionloop.serving.service import Service

log = logging.getLogger("visionloop.serve")

_NO_TELEMETRY: Any = {"tracing": False, "metrics": False, "logs": False}


class GuardMiddleware:
    """Pure ASGI: caps the request body (413 before the app reads it), times and counts every request."""

    def __init__(self, app: Any, service: Service) -> None:
        self.app = app
        self.service = service
        self.limit = int(service.settings.serve.max_body_mb * 1024 * 1024)

    async def __call__(self, scope: dict, receive: Callable[[], Awaitable[dict]], send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = {"code": 500, "sent": False}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
                status["sent"] = True
            await send(message)

        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.limit:
            await self._refuse(send_wrapper, BodyTooLarge(int(declared), self.service.settings.serve.max_body_mb))
        else:
            received = 0

            async def receive_capped() -> dict:
                nonlocal received
                message = await receive()
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(received, self.service.settings.serve.max_body_mb)
                return message

            try:
                await self.app(scope, receive_capped, send_wrapper)
            except BodyTooLarge as exc:  # raised outside a route's error handling
                if not status["sent"]:
                    await self._refuse(send_wrapper, exc)
        route = scope.get("route")
        path = getattr(route, "path", "unmatched")
        metrics = self.service.metrics
        metrics.requests.labels(path, scope["method"], str(status["code"])).inc()
        metrics.request_seconds.labels(path).observe(time.perf_counter() - started)

    async def _refuse(self, send: Callable, exc: ApiError) -> None:
        self.service.metrics.bad_requests.labels(exc.reason).inc()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": json.dumps({"error": exc.message}).encode()})


def create_app(settings: Settings) -> FastAPI:
    service = Service(settings)

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await service.start()
        yield
        await service.stop()

    app = FastAPI(
        title="visionloop",
        version=__version__,
        description="Image classification with the registered champion: `/predict` for people and scripts, "
        "the KServe V2 Open Inference Protocol under `/v2` for KServe/Triton clients, health and Prometheus "
        "metrics for operators, and `/feedback` to close the loop with true labels.",
        lifespan=lifespan,
        # FastAPI's OpenTelemetry hooks cost a provider lookup per request; they stay on only where an
        # OTLP exporter is configured. Prometheus metrics are ours (/metrics) either way.
        telemetry=None if os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") else _NO_TELEMETRY,
    )
    app.state.service = service  # what api/deps.py hands to the routes
    app.add_middleware(GuardMiddleware, service=service)
    _install_error_handlers(app, service)
    app.include_router(api_router)
    return app


def _install_error_handlers(app: FastAPI, service: Service) -> None:
    def error(status: int, message: str, reason: str) -> JSONResponse:
        if 400 <= status < 500:
            service.metrics.bad_requests.labels(reason).inc()
        return JSONResponse({"error": message}, status_code=status)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.message, exc.reason)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error(422, f"invalid request: {first_error(exc)}", "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, ApiError):  # e.g. FastAPI's body parsing wraps our 413 in its 400
            return error(exc.__cause__.status, exc.__cause__.message, exc.__cause__.reason)
        return error(exc.status_code, str(exc.detail), "http_" + str(exc.status_code))

    @app.exception_handler(Exception)
    async def internal_error(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("internal error: %s", exc)
        return JSONResponse({"error": f"internal error: {exc}"}, status_code=500)
