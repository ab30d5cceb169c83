"""Run the prediction server with uvicorn: one process, graceful SIGTERM, and a banner with the URLs to try.

The uvicorn start itself (connection limits, Host allow-list, the refusal to listen publicly without
tokens) is shared by every service and lives in ``visionloop.service.server``; the names below stay for
the callers that import them from here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from visionloop.config import Settings
from visionloop.service.server import _Server, check_public_bind, run_server
from visionloop.service.server import configure_logging as _configure

__all__ = ["_Server", "configure_logging", "serve", "serving_tokens"]

# a serving replica does not hang on a registry that went away either: every registry call is bounded by
# registry.timeout_seconds, without MLflow's minutes of retries (registry.py)

log = logging.getLogger("visionloop.serve")


def configure_logging() -> None:
    _configure(log)


def serving_tokens(settings: Settings) -> dict[str, str]:
    """The prediction server's bearer tokens by setting name (what a public bind needs set)."""
    return {"serve.admin_token": settings.serve.admin_token, "serve.feedback_token": settings.serve.feedback_token}


def serve(settings: Settings, access_log: bool = False, on_started: Callable[[str, Any], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests get ``serve.drain_seconds`` to finish."""
    from visionloop.serving.app import create_app

    configure_logging()
    check_public_bind(settings.serve.host, settings.http, serving_tokens(settings), log)
    run_server(
        create_app(settings),
        host=settings.serve.host,
        port=settings.serve.port,
        http=settings.http,
        drain_seconds=settings.serve.drain_seconds,
        access_log=access_log,
        on_started=on_started,
    )
