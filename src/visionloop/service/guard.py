"""The pure-ASGI guard in front of every app we ship: tokens, body cap, body timeout, and every answer counted.

Why pure ASGI and not a FastAPI dependency: FastAPI reads and parses a route's body *before* the route's
dependencies run, so a token checked in a dependency lets an unauthenticated client make the server read
300 MB first. Here the token is checked on the request head, the declared ``Content-Length`` is checked before
one body byte is read, and the streamed body is capped and timed as the app reads it.

Whatever happens inside the app, the answer is counted exactly once in ``requests``: an exception that escapes
the app becomes a JSON 500 (logged once, with its traceback); a client that went away before its answer is
counted as status ``499`` (nginx's "client closed request") and in ``client_disconnects``, and logged at INFO
in one line, since it is the client's doing, not a fault of the server.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.requests import ClientDisconnect

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

CLIENT_CLOSED = "499"  # nginx's status for "the client closed the connection before the answer"


class RequestMetrics(Protocol):
    """What the guard counts into: ``HttpMetrics`` (service/metrics.py) or the prediction server's metrics."""

    requests: Any  # Counter with labels route, method, status
    request_seconds: Any  # Histogram with label route
    client_disconnects: Any  # Counter with label route


@dataclass(frozen=True)
class TokenRule:
    """``method path`` needs ``Authorization: Bearer <token>``; an empty token leaves the route open."""

    method: str
    path: str
    token: str
    message: str


@dataclass(frozen=True)
class BodyLimits:
    max_mb: float  # MiB, as the setting states it
    setting: str  # the setting that holds the cap, named in the 413 message
    timeout_seconds: float

    @property
    def max_bytes(self) -> int:
        return int(self.max_mb * 1024 * 1024)


class _Refused(Exception):
    """Raised into the app after the guard has answered for it (413, 408): the app's own answer is dropped."""


@dataclass
class _Exchange:
    status: int = 500
    started: bool = False
    answered_by_guard: bool = False
    disconnected: bool = False
    body_done: bool = False
    received: int = 0


def bearer_matches(headers: Iterable[tuple[bytes, bytes]], token: str) -> bool:
    """Whether the request's ``Authorization`` header is exactly ``Bearer <token>`` (constant-time)."""
    given = b""
    for name, value in headers:
        if name.lower() == b"authorization":
            given = value
            break
    return hmac.compare_digest(given, f"Bearer {token}".encode())


def validation_message(exc: Exception) -> str:
    """The first problem of a FastAPI/pydantic validation error as ``where: what``, without the input.

    FastAPI's default 422 echoes the offending ``input`` back; a body that is refused must never be reflected
    (it may be huge, or be someone else's data), so only the field's location and the problem are named."""
    errors = getattr(exc, "errors", None)
    if not callable(errors) or not errors():
        return "invalid request"
    first = errors()[0]
    where = ".".join(str(part) for part in first.get("loc", ())) or "body"
    return f"invalid request: {where}: {first.get('msg', 'invalid value')}"


class GuardMiddleware:
    """Pure ASGI: tokens before bodies, the body cap and read timeout, and one count per answer.

    ``on_refused(reason)`` is told of each 4xx the guard gives itself (the server's bad-request counter)."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        metrics: RequestMetrics,
        limits: BodyLimits,
        log: logging.Logger,
        tokens: Iterable[TokenRule] = (),
        on_refused: Callable[[str], None] | None = None,
    ) -> None:
        self.app = app
        self.metrics = metrics
        self.limits = limits
        self.log = log
        self.tokens = {(rule.method, rule.path): rule for rule in tokens if rule.token}
        self.on_refused = on_refused

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        exchange = _Exchange()

        async def send_guarded(message: Message) -> None:
            if exchange.answered_by_guard or (exchange.disconnected and not exchange.started):
                return  # the guard answered already, or nobody is listening
            if message["type"] == "http.response.start":
                exchange.status = message["status"]
                exchange.started = True
            await send(message)

        async def receive_guarded() -> Message:
            if exchange.body_done or exchange.answered_by_guard:
                message = await receive()  # after the body: only a disconnect can come, however late
            else:
                try:
                    message = await asyncio.wait_for(receive(), self.limits.timeout_seconds)
                except TimeoutError:
                    await self._answer(
                        send,
                        exchange,
                        408,
                        f"no request body data for {self.limits.timeout_seconds:g} s (http.body_timeout_seconds)",
                        "body_timeout",
                    )
                    raise _Refused from None
            if message["type"] == "http.disconnect":
                if not exchange.started:
                    exchange.disconnected = True
            elif message["type"] == "http.request":
                exchange.received += len(message.get("body", b""))
                if exchange.received > self.limits.max_bytes:
                    await self._answer(send, exchange, 413, self._too_large(exchange.received), "body_too_large")
                    raise _Refused
                if not message.get("more_body", False):
                    exchange.body_done = True
            return message

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                status, message, reason, headers = refusal
                await self._answer(send, exchange, status, message, reason, headers)
                return
            await self.app(scope, receive_guarded, send_guarded)
        except _Refused:
            pass
        except ClientDisconnect:
            if not exchange.started:
                exchange.disconnected = True
        except Exception as exc:
            if exchange.disconnected or exchange.answered_by_guard:
                pass  # what the app made of a body it could not read; the client is gone or answered
            else:
                self.log.error("internal error on %s %s: %s", scope["method"], scope["path"], exc, exc_info=exc)
                if exchange.started:
                    exchange.status = 500  # the answer broke off half-way; uvicorn closes the connection
                else:
                    message = f"internal error ({type(exc).__name__}); the server log says more"
                    await self._answer(send, exchange, 500, message, None)
        finally:
            self._count(scope, exchange, time.perf_counter() - started)

    def _refusal(self, scope: Scope) -> tuple[int, str, str, list[tuple[bytes, bytes]]] | None:
        """What the request head alone earns: 401 without the right token, 413 for a declared oversize body."""
        rule = self.tokens.get((scope["method"], scope["path"]))
        if rule is not None and not bearer_matches(scope.get("headers") or [], rule.token):
            return 401, rule.message, "unauthorized", [(b"www-authenticate", b"Bearer")]
        for name, value in scope.get("headers") or []:
            if name == b"content-length" and value.isdigit() and int(value) > self.limits.max_bytes:
                return 413, self._too_large(int(value)), "body_too_large", []
        return None

    def _too_large(self, size: int) -> str:
        limits = self.limits
        return f"request body of {size:,}+ bytes is over the limit of {limits.max_mb:g} MiB ({limits.setting})"

    async def _answer(
        self,
        send: Send,
        exchange: _Exchange,
        status: int,
        message: str,
        reason: str | None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        """Answer for the app and close the connection: the rest of the body is never read."""
        if exchange.started or exchange.answered_by_guard:
            return
        exchange.status, exchange.started, exchange.answered_by_guard = status, True, True
        if reason is not None and self.on_refused is not None:
            self.on_refused(reason)
        body = json.dumps({"error": message}).encode()
        head = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
            *(headers or []),
        ]
        await send({"type": "http.response.start", "status": status, "headers": head})
        await send({"type": "http.response.body", "body": body})

    def _count(self, scope: Scope, exchange: _Exchange, seconds: float) -> None:
        route = getattr(scope.get("route"), "path", None) or self._known_path(scope)
        status = str(exchange.status)
        if exchange.disconnected:
            status = CLIENT_CLOSED
            self.metrics.client_disconnects.labels(route).inc()
            self.log.info(
                "client disconnected before the answer: %s %s (%d body bytes read)",
                scope["method"],
                scope["path"],
                exchange.received,
            )
        self.metrics.requests.labels(route, scope["method"], status).inc()
        self.metrics.request_seconds.labels(route).observe(seconds)

    def _known_path(self, scope: Scope) -> str:
        """A refused request never reached the router: name its path only when it is a guarded one."""
        return scope["path"] if (scope["method"], scope["path"]) in self.tokens else "unmatched"
