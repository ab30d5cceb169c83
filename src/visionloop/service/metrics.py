"""HTTP metrics of one service, on that service's own registry.

The prediction server keeps its historic names (``visionloop_http_requests_total``, …, defined in
``serving/metrics.py``); the monitor and the loop use the same shape under their own prefix
(``visionloop_monitor_http_requests_total``), so the serving 5xx ratio that alerts and the post-promotion
analysis read (which sum over every job) never mixes in the side services' answers.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram

LATENCY_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def client_disconnects_counter(registry: CollectorRegistry, prefix: str = "visionloop") -> Counter:
    """Requests whose client went away before the answer was sent (counted as status 499 as well)."""
    return Counter(
        f"{prefix}_http_client_disconnects",
        "Requests the client abandoned (closed the connection) before the answer, by route.",
        ["route"],
        registry=registry,
    )


class HttpMetrics:
    """``requests``, ``request_seconds`` and ``client_disconnects``: what ``GuardMiddleware`` counts."""

    def __init__(self, registry: CollectorRegistry, prefix: str) -> None:
        self.requests = Counter(
            f"{prefix}_http_requests", "HTTP requests answered.", ["route", "method", "status"], registry=registry
        )
        self.request_seconds = Histogram(
            f"{prefix}_http_request_duration_seconds",
            "Time from request to response.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.client_disconnects = client_disconnects_counter(registry, prefix)
