"""What the side services (``visionloop monitor``, ``visionloop loop``) put around their FastAPI app.

The guard (tokens before bodies, ``http.max_body_mb``, the body timeout, every answer counted) and error
handlers that answer ``{"error": "..."}`` in one line: FastAPI's default 422 lists every problem *with the
input echoed back*, which reflects a refused body to whoever sent it; here only the field and the problem
are named.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from visionloop.config import HttpSettings
from visionloop.service.guard import BodyLimits, GuardMiddleware, RequestMetrics, TokenRule, validation_message


def guard_side_service(
    app: FastAPI, *, metrics: RequestMetrics, http: HttpSettings, tokens: Iterable[TokenRule], log: logging.Logger
) -> None:
    """Add the guard and the one-line error handlers to a side service's app."""
    limits = BodyLimits(http.max_body_mb, "http.max_body_mb", http.body_timeout_seconds)
    app.add_middleware(GuardMiddleware, metrics=metrics, limits=limits, log=log, tokens=list(tokens))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse({"error": validation_message(exc)}, status_code=422)
