"""Schemathesis against a real ``visionloop serve``, driven by the server's own /openapi.json.

For every operation in the schema, Hypothesis generates a bounded number of requests — valid ones
(positive mode) and ones that break the schema (negative mode) — and sends them to the running
champion server. No response may be a 5xx (Schemathesis' ``not_a_server_error``), and every 4xx must
be the service's ``{"error": "..."}`` JSON.

Schemathesis is driven programmatically (``APIOperation.as_strategy`` under ``@given``), one subtest per
operation: its lazy pytest loader (``schemathesis.pytest.from_fixture``, needed because the URL is only
known once the server runs) fails on pytest 9 ("'Function' object has no attribute '_nodeid'").

Nothing is excluded: POST /admin/reload is open on this server (no serve.admin_token), and forcing a
reload of the version already served only answers "unchanged", so fuzzing it is harmless.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

EXAMPLES_PER_OPERATION = 40  # 15 operations: about 5 s of fuzzing on 2 cores


@pytest.fixture(scope="module")
def api_schema(champion_server) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{champion_server.url}/openapi.json")


@pytest.fixture(scope="module")
def session() -> Iterator[requests.Session]:
    with requests.Session() as http:
        yield http


def strategies(operation: schemathesis.APIOperation, served: dict[str, str]) -> st.SearchStrategy:
    """Valid and invalid requests; where the path names a model (and version), also with the served one,
    so that generated bodies reach the V2 parsing instead of all stopping at "unknown model" (404)."""
    pinned: list[dict[str, str]] = [{}]
    if "{name}" in operation.path:
        pinned.append({key: served[key] for key in ("name", "version") if f"{{{key}}}" in operation.path})
    return st.one_of(
        operation.as_strategy(mode, path_parameters=params or None)
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE)
        for params in pinned
    )


def fuzz(
    operation: schemathesis.APIOperation, served: dict[str, str], base_url: str, session: requests.Session
) -> None:
    """Send EXAMPLES_PER_OPERATION generated requests for one operation; fail on a 5xx or a non-JSON 4xx."""
    cases = strategies(operation, served)

    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much, HealthCheck.data_too_large],
    )
    @given(case=cases)
    def send(case: schemathesis.Case) -> None:
        response = case.call(base_url=base_url, session=session, timeout=30)
        case.validate_response(response, checks=[not_a_server_error])  # raises with a curl line to replay it
        if 400 <= response.status_code < 500:
            replay = case.as_curl_command(base_url=base_url)
            content_type = (response.headers.get("content-type") or [""])[0]  # Schemathesis keeps header lists
            assert content_type == "application/json", f"{response.status_code} {response.text[:300]}\n{replay}"
            try:
                body = json.loads(response.content)
            except ValueError:
                pytest.fail(f"{response.status_code} with a body that is not JSON: {response.text[:300]!r}\n{replay}")
            assert isinstance(body, dict) and isinstance(body.get("error"), str), f"{body}\n{replay}"

    send()


def test_api_never_answers_5xx_and_errors_are_json(api_schema, champion_server, champion_settings, session, subtests):
    served = {"name": champion_settings.registry.model_name, "version": "1"}
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 15, [op.label for op in operations]
    for operation in operations:
        with subtests.test(msg=operation.label):
            fuzz(operation, served, champion_server.url, session)
    # every operation really reached the app (the route label is the path template)
    with champion_server.client() as http:
        metrics = http.get("/metrics").text
    routes = set(re.findall(r'^visionloop_http_requests_total\{[^}]*route="([^"]+)"', metrics, re.M))
    assert {op.path for op in operations} <= routes, sorted({op.path for op in operations} - routes)


def test_the_schema_lists_every_route(api_schema):
    labels = {result.ok().label for result in api_schema.get_all_operations()}
    assert {"POST /predict", "POST /feedback", "POST /v2/models/{name}/infer", "GET /readyz"} <= labels
    assert "POST /admin/reload" in labels  # fuzzed too: see the module docstring
