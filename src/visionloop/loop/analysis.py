"""The post-promotion analysis, in the shape of Argo Rollouts' AnalysisRun and Flagger's canary analysis.

After a promotion the loop takes ``loop.analysis_count`` measurements, ``loop.analysis_interval_seconds``
apart. Each measurement is

- *successful*: live accuracy of the new champion (from feedback on its own predictions since it was
  promoted) is at least ``loop.analysis_min_accuracy`` and, where ``loop.prometheus_url`` is set, the
  servers' 5xx share over the last two minutes is at most ``loop.analysis_max_error_ratio``;
- *failed*: either condition is false;
- *inconclusive*: fewer than ``loop.analysis_min_feedback`` labels so far (and no 5xx failure);
- *error*: the store or Prometheus could not be asked (counted apart, as Argo's consecutiveErrorLimit does).

The analysis fails as soon as failed measurements exceed ``loop.analysis_failure_limit`` (Argo's
``failureLimit``): the loop then rolls back. After the last measurement it is successful if any
measurement was, and inconclusive if all were (``loop.analysis_on_inconclusive`` says what then).
"""

from __future__ import annotations

import json
import time
import urllib.parse
import urllib.request
from typing import Literal

from pydantic import BaseModel, Field

from visionloop.config import Settings
from visionloop.monitoring.store import PredictionStore

ERROR_RATIO = (
    'sum(rate(visionloop_http_requests_total{status=~"5.."}[2m])) / sum(rate(visionloop_http_requests_total[2m]))'
)
Result = Literal["successful", "failed", "inconclusive", "error"]


class Measurement(BaseModel):
    at: float
    result: Result
    live_accuracy: float | None = None
    feedback: int = 0
    error_ratio: float | None = None
    reasons: list[str] = Field(default_factory=list)


class Analysis(BaseModel):
    version: str
    previous: str | None
    started_at: float
    phase: Literal["running", "successful", "failed", "inconclusive"] = "running"
    measurements: list[Measurement] = Field(default_factory=list)

    def counts(self) -> dict[str, int]:
        out = {"successful": 0, "failed": 0, "inconclusive": 0, "error": 0}
        for m in self.measurements:
            out[m.result] += 1
        return out

    def next_at(self, interval: float) -> float:
        """When the next measurement is due: one interval after the last (or after the promotion)."""
        last = self.measurements[-1].at if self.measurements else self.started_at
        return last + interval


def error_ratio(prometheus_url: str, timeout: float = 10.0) -> float | None:
    """The servers' 5xx share from Prometheus; None when there was no traffic to divide by."""
    query = urllib.parse.urlencode({"query": ERROR_RATIO})
    with urllib.request.urlopen(f"{prometheus_url.rstrip('/')}/api/v1/query?{query}", timeout=timeout) as response:
        body = json.loads(response.read())
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus answered {body.get('status')}: {body.get('error')}")
    result = body["data"]["result"]
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if value != value else value  # NaN: no requests in the range


def measure(settings: Settings, store: PredictionStore, analysis: Analysis, now: float | None = None) -> Measurement:
    loop = settings.loop
    now = time.time() if now is None else now
    reasons: list[str] = []
    try:
        count, correct = store.accuracy_since(
            settings.registry.model_name, analysis.version, analysis.started_at, settings.monitor.accuracy_window
        )
        ratio = error_ratio(loop.prometheus_url) if loop.prometheus_url else None
    except Exception as exc:  # the store or Prometheus: an error measurement, not a verdict
        return Measurement(at=now, result="error", reasons=[f"could not measure: {' '.join(str(exc).split())[:300]}"])
    accuracy = correct / count if count else None
    failed = False
    if ratio is not None:
        if ratio > loop.analysis_max_error_ratio:
            failed = True
            reasons.append(f"5xx ratio {ratio:.4f} > {loop.analysis_max_error_ratio:.4f}")
        else:
            reasons.append(f"5xx ratio {ratio:.4f} <= {loop.analysis_max_error_ratio:.4f}")
    if count < loop.analysis_min_feedback:
        reasons.append(f"{count} feedback labels on v{analysis.version}, fewer than {loop.analysis_min_feedback}")
        result: Result = "failed" if failed else "inconclusive"
    else:
        assert accuracy is not None
        ok = accuracy >= loop.analysis_min_accuracy
        sign = ">=" if ok else "<"
        reasons.append(f"live accuracy {accuracy:.4f} on {count} labels {sign} {loop.analysis_min_accuracy:.4f}")
        result = "successful" if ok and not failed else "failed"
    return Measurement(
        at=now, result=result, live_accuracy=accuracy, feedback=count, error_ratio=ratio, reasons=reasons
    )


def verdict(analysis: Analysis, settings: Settings) -> str:
    """running | successful | failed | inconclusive, from the measurements so far."""
    loop = settings.loop
    counts = analysis.counts()
    if counts["failed"] > loop.analysis_failure_limit:
        return "failed"
    if len(analysis.measurements) < loop.analysis_count:
        return "running"
    if counts["successful"]:
        return "successful"
    return "inconclusive"
