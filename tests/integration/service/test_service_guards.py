"""Tokens before bodies, the Host check, counted disconnects and the public-bind refusal on the real commands:
`visionloop loop`, `visionloop monitor` and `visionloop serve`, each a process on 127.0.0.1 with an empty home
(no model: none of this needs one).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
from service_helpers import Server, clean_env, raw, read_all

from localhost import VISIONLOOP  # tests/localhost.py

WEBHOOK_TOKEN = "loop-webhook-token"
MONITOR_TOKEN = "monitor-check-token"
FEEDBACK_TOKEN = "serve-feedback-token"


@pytest.fixture(scope="module")
def loop(launch, tmp_path_factory: pytest.TempPathFactory) -> Server:
    home = tmp_path_factory.mktemp("loop-home")
    env = clean_env(home, VISIONLOOP_LOOP__WEBHOOK_TOKEN=WEBHOOK_TOKEN, VISIONLOOP_LOOP__INTERVAL_SECONDS="3600")
    return launch([*VISIONLOOP, "loop", "--port", "0"], env=env)


@pytest.fixture(scope="module")
def monitor(launch, tmp_path_factory: pytest.TempPathFactory) -> Server:
    home = tmp_path_factory.mktemp("monitor-home")
    env = clean_env(home, VISIONLOOP_MONITOR__TOKEN=MONITOR_TOKEN, VISIONLOOP_MONITOR__INTERVAL_SECONDS="3600")
    return launch([*VISIONLOOP, "monitor", "--port", "0"], env=env)


@pytest.fixture(scope="module")
def serve(launch, tmp_path_factory: pytest.TempPathFactory) -> Server:
    home = tmp_path_factory.mktemp("serve-home")
    env = clean_env(home, VISIONLOOP_SERVE__FEEDBACK_TOKEN=FEEDBACK_TOKEN, VISIONLOOP_HTTP__BODY_TIMEOUT_SECONDS="5")
    return launch([*VISIONLOOP, "serve", "--port", "0", "--poll-seconds", "0"], env=env)


def post_head(path: str, length: int, token: str | None = None) -> bytes:
    auth = f"Authorization: Bearer {token}\r\n" if token else ""
    return (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n{auth}"
        f"Content-Length: {length}\r\n\r\n"
    ).encode()


def test_an_unauthenticated_300_mb_alert_is_401_before_the_body_is_read(loop):
    rss_before = loop.metric("process_resident_memory_bytes")
    with raw(loop) as sock:
        sock.sendall(post_head("/alerts", 300 * 1024 * 1024) + b"[" * 1024 * 1024)  # 1 MiB of the 300 declared
        head, _, body = read_all(sock).partition(b"\r\n\r\n")  # answered with 299 MiB still unsent
    assert head.startswith(b"HTTP/1.1 401 ")
    assert json.loads(body) == {"error": "POST needs Authorization: Bearer <loop.webhook_token>"}
    assert loop.metric("visionloop_loop_http_requests_total", route="/alerts", status="401") >= 1
    assert loop.metric("process_resident_memory_bytes") - rss_before < 64 * 1024 * 1024


def test_an_authenticated_malformed_alert_is_422_naming_the_field_without_echoing_it(loop):
    body = {"version": "4", "status": "firing", "alerts": "SECRET-PAYLOAD-TEXT"}
    response = httpx.post(
        f"{loop.url}/alerts", json=body, headers={"Authorization": f"Bearer {WEBHOOK_TOKEN}"}, timeout=30
    )
    assert response.status_code == 422
    assert list(response.json()) == ["error"] and response.json()["error"].startswith("invalid request: body.")
    assert "SECRET-PAYLOAD-TEXT" not in response.text


def test_a_loop_alert_over_the_body_cap_is_413_before_it_is_read(loop):
    with raw(loop) as sock:
        sock.sendall(post_head("/alerts", 2 * 1024 * 1024, WEBHOOK_TOKEN))  # http.max_body_mb is 1 by default
        head, _, body = read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ") and "(http.max_body_mb)" in json.loads(body)["error"]


def test_the_loop_refuses_a_foreign_host(loop):
    response = httpx.get(f"{loop.url}/healthz", headers={"Host": "evil.example"}, timeout=30)
    assert response.status_code == 400 and "http.allowed_hosts" in response.json()["error"]
    assert httpx.get(f"{loop.url}/healthz", timeout=30).status_code == 200


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}], ids=["no-token", "wrong-token"])
def test_post_check_needs_the_monitor_token(monitor, headers):
    response = httpx.post(f"{monitor.url}/check", headers=headers, timeout=30)
    assert response.status_code == 401
    assert response.json() == {"error": "POST /check needs 'Authorization: Bearer <monitor.token>'"}


def test_post_check_with_the_monitor_token_runs_a_check(monitor):
    response = httpx.post(f"{monitor.url}/check", headers={"Authorization": f"Bearer {MONITOR_TOKEN}"}, timeout=120)
    assert response.status_code == 200 and "status" in response.json()
    assert monitor.metric("visionloop_monitor_http_requests_total", route="/check", status="401") >= 1


def test_serve_refuses_a_foreign_host_and_counts_a_client_that_went_away(serve):
    response = httpx.get(f"{serve.url}/healthz", headers={"Host": "evil.example:80"}, timeout=30)
    assert response.status_code == 400
    earlier = len(serve.lines)
    with raw(serve) as sock:
        sock.sendall(post_head("/feedback", 1000, FEEDBACK_TOKEN) + b'{"request_id": ')
        time.sleep(0.2)
    route = "/feedback"
    assert serve.wait_for_metric("visionloop_http_client_disconnects_total", 1, route=route) == 1
    assert serve.metric("visionloop_http_requests_total", route=route, method="POST", status="499") == 1
    time.sleep(0.5)  # anything the server would log about it has been logged
    since = "".join(serve.lines[earlier:])
    assert "client disconnected before the answer: POST /feedback" in since
    assert "Traceback" not in since and "ERROR" not in since


def test_serve_checks_the_feedback_token_before_reading_the_body(serve):
    with raw(serve) as sock:
        sock.sendall(post_head("/feedback", 10 * 1024 * 1024) + b"{" * 65536)
        head, _, body = read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 ")
    assert json.loads(body) == {"error": "POST /feedback needs 'Authorization: Bearer <serve.feedback_token>'"}


def test_serve_on_a_public_address_without_tokens_exits_with_one_line(tmp_path: Path):
    # refused before any socket is opened: nothing ever listens on 0.0.0.0
    result = subprocess.run(
        [*VISIONLOOP, "serve", "--host", "0.0.0.0", "--port", "0"],
        env=clean_env(tmp_path / "home"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in result.stderr, result.stderr
    assert "serve.admin_token, serve.feedback_token are unset" in lines[0]
    assert "http.allow_public_without_tokens" in lines[0]
