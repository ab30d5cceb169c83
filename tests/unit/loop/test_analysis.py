"""The post-promotion analysis: the verdict over measurements (Argo Rollouts' failureLimit and count), one
measurement against a real SQLite prediction store, and the 5xx ratio from a real HTTP server on 127.0.0.1
that answers as Prometheus's query API does.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
import urllib.error
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from localhost import free_port  # tests/ is on sys.path (no __init__.py)
from monitoring_rows import CLASSES, prediction  # tests/ is on sys.path (no __init__.py)
from visionloop.config import Settings
from visionloop.loop.analysis import ERROR_RATIO, Analysis, Measurement, error_ratio, measure, verdict
from visionloop.monitoring.store import PredictionStore


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for name in list(os.environ):
        if name.startswith("VISIONLOOP_") or name == "MLFLOW_TRACKING_URI":
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)


def make_settings(tmp_path: Path, **loop: object) -> Settings:
    values = {
        "analysis_count": 4,
        "analysis_failure_limit": 1,
        "analysis_min_feedback": 5,
        "analysis_min_accuracy": 0.8,
        "analysis_max_error_ratio": 0.05,
        **loop,
    }
    return Settings(home=tmp_path / "home", registry={"model_name": "pets"}, loop=values)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return make_settings(tmp_path)


@pytest.fixture
def store(tmp_path: Path) -> Iterator[PredictionStore]:
    s = PredictionStore(f"sqlite:///{tmp_path / 'home' / 'monitoring' / 'predictions.db'}", timeout=5)
    s.record_model("pets", "1", "ds-abc", CLASSES)
    s.record_model("pets", "2", "ds-abc", CLASSES)
    s.flush()
    yield s
    s.close()


# ------------------------------------------------------------------------------------------- verdict
def analysis(*results: str) -> Analysis:
    return Analysis(
        version="2",
        previous="1",
        started_at=100.0,
        measurements=[Measurement(at=100.0 + 30 * (i + 1), result=r) for i, r in enumerate(results)],  # type: ignore[arg-type]
    )


@pytest.mark.parametrize(
    "results, expected",
    [
        pytest.param([], "running", id="nothing-yet"),
        pytest.param(["failed"], "running", id="one-failure-is-tolerated"),
        pytest.param(["failed", "failed"], "failed", id="over-the-limit-before-count"),
        pytest.param(["successful", "failed", "inconclusive", "failed"], "failed", id="over-the-limit-at-count"),
        pytest.param(["inconclusive", "failed", "inconclusive", "successful"], "successful", id="count-one-success"),
        pytest.param(["successful", "successful", "successful", "successful"], "successful", id="all-successful"),
        pytest.param(["inconclusive"] * 4, "inconclusive", id="all-inconclusive"),
        pytest.param(["error", "error", "error"], "running", id="errors-before-count"),
        pytest.param(["error"] * 4, "inconclusive", id="errors-are-no-failures"),
        pytest.param(["error", "failed", "error", "successful"], "successful", id="errors-and-one-failure"),
    ],
)
def test_the_verdict_over_the_measurements(settings, results, expected):
    assert verdict(analysis(*results), settings) == expected


def test_the_failure_limit_ends_the_analysis_at_once(tmp_path):
    strict = make_settings(tmp_path, analysis_failure_limit=0, analysis_count=10)
    assert verdict(analysis("failed"), strict) == "failed"  # the first failure, 9 measurements early
    lenient = make_settings(tmp_path, analysis_failure_limit=3, analysis_count=10)
    assert verdict(analysis("failed", "failed", "failed"), lenient) == "running"
    assert verdict(analysis("failed", "failed", "failed", "failed"), lenient) == "failed"
    assert verdict(analysis(*["error"] * 9), strict) == "running"  # errors never reach the limit


def test_counts_and_the_next_measurement(settings):
    a = analysis("successful", "error", "failed", "error")
    assert a.counts() == {"successful": 1, "failed": 1, "inconclusive": 0, "error": 2}
    assert a.next_at(30) == 100.0 + 4 * 30 + 30  # one interval after the last measurement
    assert analysis().next_at(30) == 130.0  # one interval after the promotion


# ------------------------------------------------------------------------------------------- measure
def label(store: PredictionStore, version: str, correct: int, wrong: int, prefix: str) -> None:
    """Predictions of class 0 by ``version``, with ``correct`` labels cat and ``wrong`` labels dog."""
    ids = [f"{prefix}{i}" for i in range(correct + wrong)]
    store.append([prediction(request_id, model_version=version) for request_id in ids])
    store.flush()
    for i, request_id in enumerate(ids):
        store.add_feedback(request_id, "cat" if i < correct else "dog")


def test_too_few_labels_is_inconclusive(settings, store):
    started = time.time()
    label(store, "2", correct=4, wrong=0, prefix="a")  # 4 labels, analysis_min_feedback 5
    m = measure(settings, store, Analysis(version="2", previous="1", started_at=started), now=started + 30)
    assert (m.result, m.feedback, m.live_accuracy, m.error_ratio, m.at) == ("inconclusive", 4, 1.0, None, started + 30)
    assert m.reasons == ["4 feedback labels on v2, fewer than 5"]


def test_no_labels_is_inconclusive(settings, store):
    m = measure(settings, store, Analysis(version="2", previous="1", started_at=time.time()))
    assert (m.result, m.feedback, m.live_accuracy) == ("inconclusive", 0, None)


def test_enough_accurate_labels_is_successful(settings, store):
    started = time.time()
    label(store, "2", correct=4, wrong=1, prefix="a")  # 0.8 on 5 labels: at the floor
    m = measure(settings, store, Analysis(version="2", previous="1", started_at=started))
    assert (m.result, m.feedback, m.live_accuracy) == ("successful", 5, 0.8)
    assert m.reasons == ["live accuracy 0.8000 on 5 labels >= 0.8000"]


def test_enough_inaccurate_labels_is_failed(settings, store):
    started = time.time()
    label(store, "2", correct=3, wrong=2, prefix="a")
    m = measure(settings, store, Analysis(version="2", previous="1", started_at=started))
    assert (m.result, m.feedback, m.live_accuracy) == ("failed", 5, 0.6)
    assert m.reasons == ["live accuracy 0.6000 on 5 labels < 0.8000"]


def test_only_labels_on_the_new_champion_since_its_promotion_count(settings, store):
    label(store, "2", correct=0, wrong=10, prefix="before")  # its traffic before the promotion: all wrong
    label(store, "1", correct=0, wrong=10, prefix="old")  # the previous champion's
    started = time.time()
    assert measure(settings, store, Analysis(version="2", previous="1", started_at=started)).feedback == 0
    label(store, "2", correct=5, wrong=0, prefix="after")
    m = measure(settings, store, Analysis(version="2", previous="1", started_at=started))
    assert (m.result, m.feedback, m.live_accuracy) == ("successful", 5, 1.0)
    earlier = measure(settings, store, Analysis(version="2", previous="1", started_at=0.0))
    assert (earlier.result, earlier.feedback) == ("failed", 15)  # the same store, counted from the start


def test_a_prometheus_that_cannot_be_reached_is_an_error_measurement(tmp_path, store):
    closed = make_settings(tmp_path, prometheus_url=f"http://127.0.0.1:{free_port()}")
    label(store, "2", correct=5, wrong=0, prefix="a")
    m = measure(closed, store, Analysis(version="2", previous="1", started_at=0.0))
    assert m.result == "error" and m.live_accuracy is None and m.feedback == 0
    assert len(m.reasons) == 1 and m.reasons[0].startswith("could not measure: ")
    assert "refused" in m.reasons[0].lower()


def test_a_store_that_cannot_be_read_is_an_error_measurement(tmp_path, settings, store):
    label(store, "2", correct=5, wrong=0, prefix="a")
    database = tmp_path / "home" / "monitoring" / "predictions.db"
    with sqlite3.connect(database) as conn:  # the table is gone under the store's feet
        conn.execute("ALTER TABLE feedback RENAME TO feedback_gone")
    m = measure(settings, store, Analysis(version="2", previous="1", started_at=0.0))
    assert m.result == "error" and m.feedback == 0
    assert m.reasons[0].startswith("could not measure: prediction store") and "feedback" in m.reasons[0]


# ------------------------------------------------------------------------------------------- error_ratio
class Prometheus:
    """A real HTTP server on 127.0.0.1 that answers /api/v1/query with whatever ``answer`` holds."""

    def __init__(self) -> None:
        self.answer: tuple[int, Any] = (200, {"status": "success", "data": {"resultType": "vector", "result": []}})
        self.queries: list[dict[str, list[str]]] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                url = urllib.parse.urlsplit(self.path)
                status, body = owner.answer if url.path == "/api/v1/query" else (404, {"status": "error"})
                owner.queries.append(urllib.parse.parse_qs(url.query))
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def vector(self, value: str) -> None:
        sample = {"metric": {}, "value": [1_700_000_000.123, value]}
        self.answer = (200, {"status": "success", "data": {"resultType": "vector", "result": [sample]}})


@pytest.fixture
def prometheus() -> Iterator[Prometheus]:
    p = Prometheus()
    p.thread.start()
    yield p
    p.server.shutdown()
    p.server.server_close()
    p.thread.join(10)


def test_error_ratio_reads_the_value(prometheus):
    prometheus.vector("0.0125")
    assert error_ratio(prometheus.url) == 0.0125
    assert error_ratio(prometheus.url + "/") == 0.0125  # a trailing slash is no second one
    assert prometheus.queries[-1] == {"query": [ERROR_RATIO]}


def test_error_ratio_of_no_result_is_none(prometheus):
    assert error_ratio(prometheus.url) is None


def test_error_ratio_of_nan_is_none(prometheus):
    prometheus.vector("NaN")  # 0/0: no requests in the range
    assert error_ratio(prometheus.url) is None


def test_error_ratio_of_an_error_answer_raises(prometheus):
    prometheus.answer = (200, {"status": "error", "errorType": "bad_data", "error": "parse error at char 5"})
    with pytest.raises(RuntimeError, match="Prometheus answered error: parse error at char 5"):
        error_ratio(prometheus.url)
    prometheus.answer = (400, {"status": "error", "errorType": "bad_data", "error": "parse error"})  # as it sends it
    with pytest.raises(urllib.error.HTTPError):
        error_ratio(prometheus.url)


def test_a_high_error_ratio_fails_a_measurement_even_on_few_labels(tmp_path, store, prometheus):
    served = make_settings(tmp_path, prometheus_url=prometheus.url)
    prometheus.vector("0.2")
    m = measure(served, store, Analysis(version="2", previous="1", started_at=0.0))
    assert (m.result, m.error_ratio, m.feedback) == ("failed", 0.2, 0)
    assert m.reasons[0] == "5xx ratio 0.2000 > 0.0500"
    label(store, "2", correct=5, wrong=0, prefix="a")
    m = measure(served, store, Analysis(version="2", previous="1", started_at=0.0))
    assert (m.result, m.live_accuracy) == ("failed", 1.0)  # accurate, but serving errors


def test_a_low_error_ratio_and_accurate_labels_is_successful(tmp_path, store, prometheus):
    served = make_settings(tmp_path, prometheus_url=prometheus.url)
    prometheus.vector("0.05")  # at the limit
    label(store, "2", correct=5, wrong=0, prefix="a")
    m = measure(served, store, Analysis(version="2", previous="1", started_at=0.0))
    assert (m.result, m.error_ratio) == ("successful", 0.05)
    assert m.reasons == ["5xx ratio 0.0500 <= 0.0500", "live accuracy 1.0000 on 5 labels >= 0.8000"]
    prometheus.answer = (200, {"status": "error", "error": "query timed out"})
    m = measure(served, store, Analysis(version="2", previous="1", started_at=0.0))
    assert m.result == "error" and "query timed out" in m.reasons[0]
