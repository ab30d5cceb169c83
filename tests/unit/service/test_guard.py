"""The shared guard (service/guard.py) and start-up checks (service/server.py) on a test-only FastAPI app.

The guard is driven through its ASGI interface: TestClient for ordinary requests, and hand-written
``receive`` callables for what a client does on the wire (stops sending a body, goes away half-way).
Real server processes are in tests/integration/service/.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry
from pydantic import BaseModel

from visionloop.config import HttpSettings
from visionloop.errors import ConfigError
from visionloop.service.app import guard_side_service
from visionloop.service.guard import TokenRule
from visionloop.service.metrics import HttpMetrics
from visionloop.service.server import HostAllowList, allowed_hosts, check_public_bind, is_loopback

TOKEN = "unit-token"
log = logging.getLogger("visionloop.test.guard")


class Payload(BaseModel):
    count: int


def build(**http: Any) -> tuple[FastAPI, CollectorRegistry]:
    registry = CollectorRegistry()
    app = FastAPI()

    @app.get("/boom")
    async def boom() -> dict:
        raise RuntimeError("a bug in a route")

    @app.post("/echo")
    async def echo(request: Request) -> dict:
        return {"bytes": len(await request.body())}

    @app.post("/typed")
    async def typed(body: Payload) -> dict:
        return {"count": body.count}

    settings = HttpSettings(**{"max_body_mb": 0.001, "body_timeout_seconds": 0.2, **http})
    guard_side_service(
        app,
        metrics=HttpMetrics(registry, "test"),
        http=settings,
        tokens=[TokenRule("POST", "/echo", TOKEN, "POST /echo needs a token")],
        log=log,
    )
    return app, registry


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float:
    return registry.get_sample_value(name, labels) or 0.0


@pytest.fixture
def guarded() -> Iterator[tuple[TestClient, CollectorRegistry]]:
    app, registry = build()
    with TestClient(app, raise_server_exceptions=False) as client:
        yield client, registry


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_an_exception_in_a_route_is_a_json_500_and_is_counted(guarded, caplog):
    client, registry = guarded
    with caplog.at_level(logging.ERROR, logger=log.name):
        response = client.get("/boom")
    assert response.status_code == 500
    assert response.json() == {"error": "internal error (RuntimeError); the server log says more"}
    assert sample(registry, "test_http_requests_total", route="/boom", method="GET", status="500") == 1
    assert sum("internal error on GET /boom" in r.getMessage() for r in caplog.records) == 1  # logged once


@pytest.mark.parametrize(
    "headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}], ids=["none", "wrong", "no-scheme"]
)
def test_a_guarded_route_without_its_token_is_401_and_counted(guarded, headers):
    client, registry = guarded
    response = client.post("/echo", content=b"x" * 100, headers=headers)
    assert response.status_code == 401 and response.json() == {"error": "POST /echo needs a token"}
    assert response.headers["www-authenticate"] == "Bearer"
    assert sample(registry, "test_http_requests_total", route="/echo", method="POST", status="401") == 1
    assert client.post("/echo", content=b"x" * 100, headers=AUTH).json() == {"bytes": 100}


def test_a_declared_body_over_the_cap_is_413_before_it_is_read(guarded):
    client, _registry = guarded
    response = client.post("/typed", content=b"{}" * 1000)
    assert response.status_code == 413
    assert response.json()["error"] == "request body of 2,000+ bytes is over the limit of 0.001 MiB (http.max_body_mb)"


def test_a_streamed_body_over_the_cap_is_413(guarded):
    client, _registry = guarded
    response = client.post("/echo", content=iter([b"x" * 600, b"x" * 600]), headers=AUTH)  # chunked: no length
    assert response.status_code == 413 and "over the limit" in response.json()["error"]


def test_a_validation_error_names_the_field_and_never_echoes_the_input(guarded):
    client, _registry = guarded
    response = client.post("/typed", json={"count": "SECRET-INPUT-abc"})
    assert response.status_code == 422
    assert response.json() == {"error": "invalid request: body.count: Input should be a valid integer, unable to "
                               "parse string as an integer"}  # fmt: skip
    assert "SECRET-INPUT" not in response.text


# ----------------------------------------------------------------------- what a client does on the wire
def run_asgi(app: Any, scope: dict[str, Any], messages: list[dict[str, Any] | None]) -> list[dict[str, Any]]:
    """Call ``app`` with ``messages`` as what the client sends; ``None`` means the client sends nothing more."""
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if not messages:
            return {"type": "http.disconnect"}
        message = messages.pop(0)
        if message is None:
            await asyncio.sleep(3600)  # a stalled client: only the guard's timeout ends this
        return message  # type: ignore[return-value]

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    async def main() -> None:
        await asyncio.wait_for(app(scope, receive, send), 30)

    asyncio.run(main())
    return sent


def http_scope(method: str, path: str, headers: list[tuple[bytes, bytes]]) -> dict[str, Any]:
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": method, "scheme": "http",
        "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers,
        "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000), "state": {},
    }  # fmt: skip


def test_a_body_that_stops_arriving_is_408_and_counted():
    app, registry = build()
    head = [(b"authorization", f"Bearer {TOKEN}".encode()), (b"content-length", b"100")]
    sent = run_asgi(
        app, http_scope("POST", "/echo", head), [{"type": "http.request", "body": b"x", "more_body": True}, None]
    )
    assert sent[0]["status"] == 408 and len([m for m in sent if m["type"] == "http.response.start"]) == 1
    assert json.loads(sent[1]["body"]) == {"error": "no request body data for 0.2 s (http.body_timeout_seconds)"}
    assert sample(registry, "test_http_requests_total", route="/echo", method="POST", status="408") == 1


def test_a_client_that_goes_away_is_counted_as_499_and_logged_at_info_without_traceback(caplog):
    app, registry = build()
    head = [(b"authorization", f"Bearer {TOKEN}".encode()), (b"content-length", b"100")]
    messages = [{"type": "http.request", "body": b"x" * 10, "more_body": True}, {"type": "http.disconnect"}]
    with caplog.at_level(logging.INFO, logger=log.name):
        sent = run_asgi(app, http_scope("POST", "/echo", head), messages)
    assert sent == []  # nobody to answer
    assert sample(registry, "test_http_client_disconnects_total", route="/echo") == 1
    assert sample(registry, "test_http_requests_total", route="/echo", method="POST", status="499") == 1
    records = [r for r in caplog.records if r.name == log.name]
    assert [(r.levelno, r.getMessage()) for r in records] == [
        (logging.INFO, "client disconnected before the answer: POST /echo (10 body bytes read)")
    ]
    assert all(r.exc_info is None for r in records)


# ---------------------------------------------------------------------------------------- hosts and binds
@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.0.2", True), ("0.0.0.0", False),
     ("::", False), ("10.0.0.5", False), ("example.com", False)],
)  # fmt: skip
def test_loopback_binds(host, loopback):
    assert is_loopback(host) is loopback


def test_the_default_host_list_follows_the_bind():
    assert allowed_hosts(HttpSettings(), "127.0.0.1") == ["127.0.0.1", "localhost", "[::1]"]
    assert allowed_hosts(HttpSettings(), "0.0.0.0") == ["*"]  # kubelet probes send Host: <pod IP>:port
    assert allowed_hosts(HttpSettings(allowed_hosts=["api.example.com"]), "0.0.0.0") == ["api.example.com"]


@pytest.mark.parametrize(
    ("host", "status"),
    [(b"127.0.0.1:8000", 200), (b"localhost", 200), (b"[::1]:8000", 200), (b"evil.example", 400),
     (b"evil.example:8000", 400), (b"127.0.0.1.evil.example", 400)],
)  # fmt: skip
def test_the_host_allow_list_answers_json_400(host, status):
    app, _registry = build()
    guarded = HostAllowList(app, allowed_hosts(HttpSettings(), "127.0.0.1"))
    sent = run_asgi(guarded, http_scope("GET", "/openapi.json", [(b"host", host)]), [{"type": "http.request"}])
    assert sent[0]["status"] == status
    if status == 400:
        assert json.loads(sent[1]["body"]) == {
            "error": f"Host {host.decode()!r} is not allowed here (http.allowed_hosts)"
        }


def test_a_public_bind_without_tokens_is_refused_in_one_line():
    with pytest.raises(ConfigError) as refused:
        check_public_bind("0.0.0.0", HttpSettings(), {"monitor.token": ""}, log)
    message = str(refused.value)
    assert "\n" not in message and "monitor.token is unset" in message
    assert "http.allow_public_without_tokens" in message
    check_public_bind("127.0.0.1", HttpSettings(), {"monitor.token": ""}, log)  # loopback: fine
    check_public_bind("0.0.0.0", HttpSettings(), {"monitor.token": "set"}, log)  # tokens: fine


def test_allow_public_without_tokens_starts_and_says_why(caplog):
    with caplog.at_level(logging.WARNING, logger=log.name):
        check_public_bind("0.0.0.0", HttpSettings(allow_public_without_tokens=True), {"loop.webhook_token": ""}, log)
    assert "without loop.webhook_token because http.allow_public_without_tokens is true" in caplog.text


def test_the_service_layer_imports_none_of_the_services_above_it():
    import ast
    from pathlib import Path

    import visionloop.service

    above = ("visionloop.serving", "visionloop.monitoring", "visionloop.loop")
    for path in Path(visionloop.service.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""]
            assert not [n for n in names if n.startswith(above)], (path.name, names)
