"""The FastAPI app: /predict for people, the V2 protocol for KServe/Triton clients, health, metrics, feedback.

``create_app(settings)`` builds the service state and the app; ``visionloop serve`` runs it with uvicorn.
The routes live one router per concern under ``api/routes/`` and get the state through ``api/deps.py``;
what stays here is what wraps every route: the shared ``GuardMiddleware`` (service/guard.py: bearer tokens
checked before a body byte is read, the body cap and read timeout, every answer counted, 5xx and client
disconnects included) and the error handlers. Every error a client can cause is a 4xx with
``{"error": "..."}`` naming the problem.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import AsyncIterator
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from visionloop import __version__
from visionloop.config import Settings
from visionloop.service.guard import BodyLimits, GuardMiddleware, TokenRule
from visionloop.serving.admission import Overloaded
from visionloop.serving.api.main import api_router
from visionloop.serving.errors import ApiError, first_error
from visionloop.serving.metrics import ServingMetrics
from visionloop.serving.service import Service

log = logging.getLogger("visionloop.serve")

_NO_TELEMETRY: Any = {"tracing": False, "metrics": False, "logs": False}
ADMIN_UNAUTHORISED = "POST /admin/reload needs 'Authorization: Bearer <serve.admin_token>'"
FEEDBACK_UNAUTHORISED = "POST /feedback needs 'Authorization: Bearer <serve.feedback_token>'"


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
    serve = settings.serve
    app.add_middleware(
        GuardMiddleware,
        metrics=service.metrics,
        limits=BodyLimits(serve.max_body_mb, "serve.max_body_mb", settings.http.body_timeout_seconds),
        log=log,
        tokens=[
            TokenRule("POST", "/admin/reload", serve.admin_token, ADMIN_UNAUTHORISED),
            TokenRule("POST", "/feedback", serve.feedback_token, FEEDBACK_UNAUTHORISED),
        ],
        on_refused=lambda reason: service.metrics.bad_requests.labels(reason).inc(),
    )
    _install_error_handlers(app, service)
    app.include_router(api_router)
    return app


def error_response(exc: ApiError, metrics: ServingMetrics) -> JSONResponse:
    """``{"error": ...}`` with the error's status and headers (Retry-After on an overload); a 4xx is counted by
    reason, a full queue's 503 by queue."""
    if 400 <= exc.status < 500:
        metrics.bad_requests.labels(exc.reason).inc()
    if isinstance(exc, Overloaded):
        metrics.count_overloaded(exc.queue)
    return JSONResponse({"error": exc.message}, status_code=exc.status, headers=exc.headers)


def _install_error_handlers(app: FastAPI, service: Service) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_request: Request, exc: ApiError) -> JSONResponse:
        return error_response(exc, service.metrics)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(ApiError(422, f"invalid request: {first_error(exc)}", "invalid_request"), service.metrics)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if isinstance(exc.__cause__, ApiError):  # e.g. FastAPI's body parsing wraps our 413 in its 400
            return error_response(exc.__cause__, service.metrics)
        return error_response(ApiError(exc.status_code, str(exc.detail), f"http_{exc.status_code}"), service.metrics)
