"""Start any of our apps under uvicorn with ``settings.http``'s limits, the Host allow-list and the token rule.

``run_server`` is what ``visionloop serve``, ``visionloop monitor`` and ``visionloop loop`` end in: one
process, graceful SIGTERM/SIGINT, a banner callback with the URL, and exit 1 when it could not start.
Before anything is built, ``check_public_bind`` refuses a non-loopback address while the service's bearer
tokens are unset (unless ``http.allow_public_without_tokens``): a browser on the same network, or a DNS
rebinding page, could otherwise reload models, post labels or start retrains.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import signal
import sys
from collections.abc import Callable, Mapping
from typing import Any

import uvicorn
from starlette.middleware.trustedhost import TrustedHostMiddleware

from visionloop.config import HttpSettings
from visionloop.errors import ConfigError
from visionloop.service.guard import ASGIApp, Message, Receive, Scope, Send
from visionloop.service.protocol import guarded_protocol

# Host header names of a loopback bind (starlette keeps the brackets of an IPv6 literal)
LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "[::1]")


def is_loopback(host: str) -> bool:
    """Whether a bind address is reachable from this machine only."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve anywhere
        return False


def allowed_hosts(http: HttpSettings, bind_host: str) -> list[str]:
    """``http.allowed_hosts``, else the loopback names for a loopback bind, else any host."""
    if http.allowed_hosts:
        return list(http.allowed_hosts)
    return list(LOOPBACK_HOSTS) if is_loopback(bind_host) else ["*"]


def check_public_bind(bind_host: str, http: HttpSettings, tokens: Mapping[str, str], log: logging.Logger) -> None:
    """Refuse (one-line ``ConfigError``) a non-loopback bind with an unset token; log why when allowed."""
    if is_loopback(bind_host):
        return
    unset = [name for name, value in tokens.items() if not value]
    if not unset:
        return
    if not http.allow_public_without_tokens:
        raise ConfigError(
            f"refusing to listen on {bind_host} (not loopback) while {', '.join(unset)} "
            f"{'is' if len(unset) == 1 else 'are'} unset: set the token(s), bind 127.0.0.1, or set "
            "http.allow_public_without_tokens=true (VISIONLOOP_HTTP__ALLOW_PUBLIC_WITHOUT_TOKENS) to accept that "
            "anyone who reaches the port may use those routes"
        )
    log.warning(
        "listening on %s without %s because http.allow_public_without_tokens is true: anyone who reaches the "
        "port may use the routes they guard",
        bind_host,
        ", ".join(unset),
    )


class HostAllowList:
    """Starlette's ``TrustedHostMiddleware`` with our error shape: a Host not allowed gets 400 ``{"error"}``."""

    def __init__(self, app: ASGIApp, hosts: list[str]) -> None:
        self.app = app
        self.hosts = hosts
        self.checker = TrustedHostMiddleware(self._passed, allowed_hosts=hosts, www_redirect=False)

    async def _passed(self, scope: Scope, receive: Receive, send: Send) -> None:
        scope["visionloop.host_allowed"] = True
        await self.app(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.checker.allow_any:
            await self.app(scope, receive, send)
            return

        async def refusal_as_json(message: Message) -> None:
            if scope.get("visionloop.host_allowed"):
                await send(message)
            elif message["type"] == "http.response.start":
                host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")[:200]
                body = json.dumps({"error": f"Host {host!r} is not allowed here (http.allowed_hosts)"}).encode()
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
                await send({"type": "http.response.start", "status": 400, "headers": headers})
                await send({"type": "http.response.body", "body": body})

        await self.checker(scope, receive, refusal_as_json)  # type: ignore[arg-type]


class _Server(uvicorn.Server):
    on_started: Callable[[str, Any], None] | None = None
    inner_app: Any = None  # the app itself, under the Host check: what ``on_started`` is handed

    async def startup(self, sockets: list | None = None) -> None:
        await super().startup(sockets)
        if self.started and self.on_started is not None and self.servers:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.on_started(f"http://{host}:{port}", self.inner_app or self.config.app)


def configure_logging(log: logging.Logger) -> None:
    """``log``'s INFO lines (and the guard's) on stderr, once."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
    for logger in (log, logging.getLogger("visionloop.http")):
        if not logger.handlers:
            logger.addHandler(handler)
        logger.setLevel(logging.INFO)


def run_server(
    app: Any,
    *,
    host: str,
    port: int,
    http: HttpSettings,
    drain_seconds: float = 5,
    access_log: bool = False,
    on_started: Callable[[str, Any], None] | None = None,
) -> None:
    """Serve ``app`` until SIGINT/SIGTERM with the connection limits of ``http``; exit 1 if it could not start."""
    config = uvicorn.Config(
        HostAllowList(app, allowed_hosts(http, host)),
        host=host,
        port=port,
        http=guarded_protocol(http),
        access_log=access_log,
        log_level="info" if access_log else "warning",
        timeout_graceful_shutdown=int(drain_seconds),
        timeout_keep_alive=http.keep_alive_seconds,  # type: ignore[arg-type]
        h11_max_incomplete_event_size=http.max_header_kib * 1024,
        backlog=http.backlog,
        # limit_concurrency stays off: uvicorn counts open connections against it, so half-open connections
        # would turn probes into 503s; the protocol's connection cap sheds those instead
        lifespan="on",
    )
    server = _Server(config)
    server.on_started = on_started
    server.inner_app = app
    # uvicorn turns SIGTERM and Ctrl-C into a graceful shutdown, then re-raises the signal to the handler it
    # found (the CLI's: "interrupted", exit 130, or a KeyboardInterrupt); a drained, finished server exits 0
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda _signum, _frame: None)
    server.run()
    if not server.started:  # the port was taken, the lifespan failed, …: uvicorn has said why
        raise SystemExit(1)


def run_side_service(
    make_app: Callable[[], Any],
    *,
    host: str,
    port: int,
    http: HttpSettings,
    tokens: Mapping[str, str],
    log: logging.Logger,
    on_started: Callable[[str, Any], None] | None = None,
) -> None:
    """``visionloop monitor`` and ``visionloop loop``: ``log``'s lines on stderr, the public-bind check on
    ``tokens`` (by setting name) before ``make_app`` builds anything, then serve until SIGINT/SIGTERM."""
    configure_logging(log)
    check_public_bind(host, http, tokens, log)
    run_server(make_app(), host=host, port=port, http=http, drain_seconds=5, on_started=on_started)
