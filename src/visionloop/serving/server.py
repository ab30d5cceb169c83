"""Run the app with uvicorn: one process, graceful SIGTERM, and a banner with the URLs to try."""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Callable
from typing import Any

import uvicorn

from visionloop.config import Settings

# a serving replica does not hang on a registry that went away either: every registry call is bounded by
# registry.timeout_seconds, without MLflow's minutes of retries (registry.py)


class _Server(uvicorn.Server):
    on_started: Callable[[str, Any], None] | None = None

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.on_started(f"http://{host}:{port}", self.config.app)


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    logger = logging.getLogger("visionloop.serve")
    if not logger.handlers:
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)


def serve(settings: Settings, access_log: bool = False, on_started: Callable[[str, Any], None] | None = None) -> None:
    """Serve until SIGINT/SIGTERM; in-flight requests get ``serve.drain_seconds`` to finish."""
    from visionloop.serving.app import create_app

    configure_logging()
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.serve.host,
        port=settings.serve.port,
        access_log=access_log,
        log_level="info" if access_log else "warning",
        timeout_graceful_shutdown=settings.serve.drain_seconds,
        lifespan="on",
    )
    server = _Server(config)
    server.on_started = on_started
    # uvicorn turns SIGTERM and Ctrl-C into a graceful shutdown, then re-raises the signal to the handler it
    # found (the CLI's: "interrupted", exit 130, or a KeyboardInterrupt); a drained, finished server exits 0
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: None)
    server.run()
    if not server.started:  # the port was taken, the lifespan failed, …: uvicorn has said why
        raise SystemExit(1)


def run_side_service(
    app: Any, host: str, port: int, log: logging.Logger, on_started: Callable[[str, Any], None] | None = None
) -> None:
    """``visionloop monitor`` and ``visionloop loop``: serve ``app`` until SIGINT/SIGTERM, with ``log``'s lines on
    stderr; exit 1 when it could not start (the port was taken, the lifespan failed)."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    if not log.handlers:
        log.addHandler(handler)
    log.setLevel(logging.INFO)
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", lifespan="on", timeout_graceful_shutdown=5)
    server = _Server(config)
    server.on_started = on_started
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: None)
    server.run()
    if not server.started:
        raise SystemExit(1)
