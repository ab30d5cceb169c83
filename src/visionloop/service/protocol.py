"""uvicorn's HTTP protocol plus what uvicorn 0.54 does not offer: a request-head timeout, a head-size cap
and a cap on open connections that sheds half-open ones first.

Without these, a client that sends half a request head holds a connection (and a file descriptor) for
ever: 20,000 of them exhausted the descriptors of a server and ``/healthz`` failed. uvicorn has a keep-alive
timeout (between requests) and ``limit_concurrency`` (a 503 once a head is complete), but nothing that bounds
the time to *send* a head, and nothing that bounds open connections before a head arrives.

- Head timeout: a timer armed when a connection opens and when the first byte of each next request arrives;
  when the head is not complete within ``http.header_timeout_seconds`` the connection is closed (with a 408
  when some bytes came).
- Head size: more than ``http.max_header_kib`` of head gets 431 (h11 has its own cap, which is set to the same
  value; llhttp, behind httptools, has none by default).
- Connection cap: past ``http.max_connections`` a new connection closes the oldest connection that is waiting
  for a request head (half-open, or idle between keep-alive requests), so a flood of such connections never
  locks out a probe; only when every connection is busy with a request is the new one refused with a 503.

The same mixin sits on the httptools protocol (uvicorn's default when httptools is installed) and on h11's.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from typing import Any, ClassVar

from uvicorn.protocols.http.h11_impl import H11Protocol

from visionloop.config import HttpSettings

log = logging.getLogger("visionloop.http")

# descriptors kept free for what a process opens besides client sockets: listeners, database, files, MLflow
_FD_HEADROOM = 64


def effective_max_connections(http: HttpSettings) -> int:
    """``http.max_connections``, lowered to fit under the open-file soft limit with some headroom."""
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft <= 0:
        return http.max_connections
    return max(2, min(http.max_connections, soft - _FD_HEADROOM))


def _raw_response(status: int, phrase: str, message: str, extra: str = "") -> bytes:
    body = json.dumps({"error": message}).encode()
    head = (
        f"HTTP/1.1 {status} {phrase}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
        f"{extra}connection: close\r\n\r\n"
    )
    return head.encode() + body


class _Tally:
    """What the protocol closed on its own, logged at most once a minute (an attack must not flood the log)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.last_logged = 0.0

    def add(self, what: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1
        now = time.monotonic()
        if now - self.last_logged >= 60.0:
            self.last_logged = now
            summary = ", ".join(f"{count} {name}" for name, count in sorted(self.counts.items()))
            log.warning("connections closed by the server's limits (http.*) so far: %s", summary)


class _HeadGuard:
    """Mixin over a uvicorn HTTP protocol class; the limits are class attributes set by ``guarded_protocol``."""

    header_timeout: ClassVar[float] = 10.0
    max_head_bytes: ClassVar[int] = 64 * 1024
    max_connections: ClassVar[int] = 1000
    tally: ClassVar[_Tally] = _Tally()

    # attributes of uvicorn's protocols this mixin relies on
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    connections: set[Any]
    cycle: Any

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)  # type: ignore[misc]
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0
        self._waiting_since = self.loop.time()
        self._arm_head_timer()
        if len(self.connections) > self.max_connections:
            self._make_room()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_head_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        waiting = self.waiting_for_head()
        before = self.cycle
        if waiting and self._head_timer is None:  # the first byte of the next request: its head's clock starts
            self._waiting_since = self.loop.time()
            self._arm_head_timer()
        super().data_received(data)  # type: ignore[misc]
        if self.cycle is not before:  # a request head was completed (a new request cycle began)
            self._cancel_head_timer()
            self._head_bytes = 0
        elif waiting:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
                limit_kib = self.max_head_bytes // 1024
                message = f"request head over {limit_kib} KiB (http.max_header_kib)"
                self.transport.write(_raw_response(431, "Request Header Fields Too Large", message))
                self.transport.close()
                self.tally.add("oversized heads")

    def waiting_for_head(self) -> bool:
        """No request in progress: a new connection, or an idle keep-alive one."""
        return self.cycle is None or bool(self.cycle.response_complete)

    # -------------------------------------------------------------------------------------------- internals
    def _arm_head_timer(self) -> None:
        self._cancel_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        timer = getattr(self, "_head_timer", None)
        if timer is not None:
            timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing() or not self.waiting_for_head():
            return
        if self._head_bytes:
            message = f"request head not complete within {self.header_timeout:g} s (http.header_timeout_seconds)"
            self.transport.write(_raw_response(408, "Request Timeout", message))
        self.transport.close()
        self.tally.add("slow or silent heads")

    def _make_room(self) -> None:
        """Over the cap: close the connection that has waited longest for a head, or refuse this one."""
        waiting = [
            conn
            for conn in self.connections
            if conn is not self
            and isinstance(conn, _HeadGuard)
            and not conn.transport.is_closing()
            and conn.waiting_for_head()
        ]
        if waiting:
            oldest = min(waiting, key=lambda conn: conn._waiting_since)
            oldest._cancel_head_timer()
            oldest.transport.close()
            self.tally.add("idle or half-open connections shed (http.max_connections)")
            return
        message = f"the server has {self.max_connections} busy connections (http.max_connections); retry shortly"
        self.transport.write(_raw_response(503, "Service Unavailable", message, "retry-after: 1\r\n"))
        self.transport.close()
        self.tally.add("connections refused, all busy (http.max_connections)")


def _base_protocols() -> dict[str, type[asyncio.Protocol]]:
    bases: dict[str, type[asyncio.Protocol]] = {"h11": H11Protocol}
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is optional: uvicorn then uses h11 too
        return bases
    bases["httptools"] = HttpToolsProtocol
    return bases


def guarded_protocol(http: HttpSettings, implementation: str = "auto") -> type[asyncio.Protocol]:
    """The protocol class to pass as ``uvicorn.Config(http=...)``, with ``http``'s limits built in."""
    bases = _base_protocols()
    if implementation == "auto":
        implementation = "httptools" if "httptools" in bases else "h11"
    base = bases[implementation]
    attributes = {
        "header_timeout": http.header_timeout_seconds,
        "max_head_bytes": http.max_header_kib * 1024,
        "max_connections": effective_max_connections(http),
        "tally": _Tally(),
    }
    return type(f"Guarded{base.__name__}", (_HeadGuard, base), attributes)
