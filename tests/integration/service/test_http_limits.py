"""Connection hygiene of a real uvicorn process built on visionloop.service (tests/integration/service/guarded_app.py):
half-open connections, slow heads and bodies, the connection cap, 500s and disconnects counted, the Host check,
the token before the body. The same layer runs `visionloop serve`, `monitor` and `loop` (test_service_guards.py).

Loops are bounded in count and time; nothing asserts on time: a probe must *answer*, within generous timeouts.
"""

from __future__ import annotations

import json
import time

import httpx
import pytest
from service_helpers import Server, raw, read_all

HALF_HEAD = b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: "
TOKEN_HEADER = b"Authorization: Bearer test-token\r\n"


@pytest.fixture(scope="module")
def server(guarded_app) -> Server:
    return guarded_app(header_timeout_seconds=2, body_timeout_seconds=2, max_connections=64, max_body_mb=1)


def healthz(server: Server) -> int:
    return httpx.get(f"{server.url}/healthz", timeout=10).status_code


def test_half_open_connections_never_lock_out_healthz_and_are_closed(server):
    hostile = []
    for _ in range(300):  # far over http.max_connections (64): the oldest half-open ones are shed
        sock = raw(server)
        sock.sendall(HALF_HEAD)
        hostile.append(sock)
    try:
        assert [healthz(server) for _ in range(5)] == [200] * 5
        # every half-open connection is closed by the server: shed at the cap, or at the head timeout (408)
        answers = [read_all(sock) for sock in hostile]
    finally:
        for sock in hostile:
            sock.close()
    assert all(a == b"" or a.startswith(b"HTTP/1.1 408 ") for a in answers)
    assert healthz(server) == 200


def test_a_head_not_finished_in_time_gets_408_and_a_silent_connection_is_closed(server):
    slow, silent = raw(server), raw(server)
    slow.sendall(HALF_HEAD)
    answer, nothing = read_all(slow), read_all(silent)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 Request Timeout")
    assert json.loads(body) == {"error": "request head not complete within 2 s (http.header_timeout_seconds)"}
    assert nothing == b""


def test_a_keep_alive_connection_gets_a_fresh_head_clock_per_request(server):
    with raw(server) as sock:
        for _ in range(3):  # each request comes after a pause shorter than the head timeout
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = b""
            while not answer.endswith(b'{"status":"alive"}'):  # head and body may come in two reads
                answer += sock.recv(65536) or b"<closed>"
            assert answer.startswith(b"HTTP/1.1 200 ")
            time.sleep(1)


def test_an_oversized_head_is_431(server):
    with raw(server) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X-Big: " + b"a" * 100_000)
        assert read_all(sock).startswith(b"HTTP/1.1 431 ")


def test_a_body_that_never_finishes_is_408_and_counted(server):
    before = server.metric("test_http_requests_total", route="/echo", status="408")
    with raw(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n" + TOKEN_HEADER + b"Content-Length: 100\r\n\r\n0123")
        head, _, body = read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ")
    assert json.loads(body) == {"error": "no request body data for 2 s (http.body_timeout_seconds)"}
    assert server.metric("test_http_requests_total", route="/echo", status="408") == before + 1


def test_a_route_that_raises_is_a_counted_json_500_logged_once(server):
    response = httpx.get(f"{server.url}/boom", timeout=30)
    assert response.status_code == 500 and response.json()["error"].startswith("internal error (RuntimeError)")
    assert server.metric("test_http_requests_total", route="/boom", method="GET", status="500") == 1
    assert server.log.count("internal error on GET /boom") == 1
    assert "Exception in ASGI application" not in server.log  # uvicorn never saw it


def test_a_client_that_disconnects_is_counted_and_logged_at_info_without_traceback(server):
    earlier = len(server.lines)
    with raw(server) as sock:
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n" + TOKEN_HEADER + b"Content-Length: 1000\r\n\r\nabc")
        time.sleep(0.2)
    assert server.wait_for_metric("test_http_client_disconnects_total", 1, route="/echo") == 1
    assert server.metric("test_http_requests_total", route="/echo", status="499") == 1
    since = server.lines[earlier:]
    lines = [line for line in since if "client disconnected" in line]
    assert len(lines) == 1 and " INFO " in lines[0] and "POST /echo (3 body bytes read)" in lines[0]
    assert not any("Traceback" in line or "ERROR" in line for line in since)


def test_the_token_is_checked_before_a_body_byte_is_read(server):
    with raw(server) as sock:
        head = b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 300000000\r\n\r\n"
        sock.sendall(head + b"x" * 65536)  # 64 KiB of the 300 MB declared; the rest is never sent
        answer = read_all(sock)
    head_out, _, body = answer.partition(b"\r\n\r\n")
    assert head_out.startswith(b"HTTP/1.1 401 ") and b"www-authenticate: Bearer" in head_out
    assert json.loads(body) == {"error": "POST /echo needs 'Authorization: Bearer test-token'"}


def test_a_declared_body_over_the_cap_is_413_before_it_is_read(server):
    with raw(server) as sock:
        sock.sendall(
            b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n" + TOKEN_HEADER + b"Content-Length: 300000000\r\n\r\n"
        )
        head, _, body = read_all(sock).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413 ")
    assert "over the limit of 1 MiB (http.max_body_mb)" in json.loads(body)["error"]


@pytest.mark.parametrize(
    ("host", "status"), [("evil.example", 400), ("127.0.0.1:{port}", 200), ("localhost:{port}", 200), ("[::1]", 200)]
)
def test_a_loopback_server_answers_loopback_host_names_only(server, host, status):
    response = httpx.get(f"{server.url}/healthz", headers={"Host": host.format(port=server.port)}, timeout=30)
    assert response.status_code == status
    if status == 400:
        assert response.json() == {"error": "Host 'evil.example' is not allowed here (http.allowed_hosts)"}


def test_when_every_connection_is_busy_a_new_one_gets_503_until_they_finish(guarded_app):
    small = guarded_app(max_connections=4, body_timeout_seconds=3, header_timeout_seconds=5)
    busy = []
    for _ in range(4):  # heads complete, bodies pending: busy, not sheddable
        sock = raw(small)
        sock.sendall(b"POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n" + TOKEN_HEADER + b"Content-Length: 10\r\n\r\nx")
        busy.append(sock)
    try:
        time.sleep(0.5)  # let the server read the four heads
        refused = httpx.get(f"{small.url}/healthz", timeout=30)
        assert refused.status_code == 503 and refused.headers["retry-after"] == "1"
        assert "http.max_connections" in refused.json()["error"]
        assert all(read_all(sock).startswith(b"HTTP/1.1 408 ") for sock in busy)  # the body timeout frees them
    finally:
        for sock in busy:
            sock.close()
    assert healthz(small) == 200
