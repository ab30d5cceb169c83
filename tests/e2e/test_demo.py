"""`visionloop demo --fast` end to end, with real processes: `visionloop serve`, `visionloop monitor`,
`visionloop loop`, and Debian's Prometheus and Alertmanager driving the loop's webhook.

The demo tells the story (in-distribution traffic → no action; inverted digits with feedback → drift alert →
retrain → promotion → the server answers from the new version → accuracy on the shifted traffic rises; a bad
model forced through → rolled back within its analysis). This test checks what it left behind on its own:
the loop's runs in the prediction store, the alias history and tags in MLflow, no MLflow run left RUNNING,
the report and the plot."""

from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest

from localhost import VISIONLOOP, free_port  # tests/localhost.py
from prometheus_stack import loop_expressions, start_prometheus  # tests/prometheus_stack.py
from visionloop import registry
from visionloop.config import load_settings
from visionloop.loop.state import LoopState

pytestmark = pytest.mark.slow


def test_demo_closes_the_loop_and_rolls_back_a_bad_model(tmp_path: Path) -> None:
    if not (shutil.which("prometheus") and (shutil.which("prometheus-alertmanager") or shutil.which("alertmanager"))):
        if os.environ.get("CI") == "true":
            pytest.fail("prometheus / prometheus-alertmanager are not installed (.ci/run installs them)")
        pytest.skip("prometheus / prometheus-alertmanager are not installed")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VISIONLOOP_", "MLFLOW_"))}
    env["VISIONLOOP_HOME"] = str(tmp_path / "elsewhere")  # the demo must not use the caller's settings
    workdir = tmp_path / "demo"
    done = subprocess.run(
        [*VISIONLOOP, "demo", "--fast", "--alerting", "--workdir", str(workdir), "--json"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    summary = json.loads(done.stdout)
    # drift and falling live accuracy both fire on the shift; whichever Alertmanager delivers first starts the run
    assert summary["alerting"] and summary["trigger"].startswith("alert: alert Visionloop")
    assert "DriftDetected firing" in summary["trigger"] or "LiveAccuracyLow firing" in summary["trigger"]
    accuracy = summary["accuracy"]
    assert accuracy["shifted (retrained champion)"] > accuracy["shifted (first champion)"] + 0.4
    assert summary["samples_to_detect"] > 0 and summary["seconds_to_new_champion"] > 0
    assert [p["name"] for p in summary["phases"]][:3] == ["train", "start", "in-distribution"]
    assert summary["ok"] and not summary["failures"] and {p["status"] for p in summary["phases"]} == {"passed"}
    assert json.loads((workdir / "summary.json").read_text()) == summary
    assert "✗" not in (workdir / "summary.txt").read_text()
    assert not (tmp_path / "elsewhere").exists()

    settings = load_settings(workdir / "visionloop.yaml")
    state = LoopState.from_settings(settings)
    promotion_run, retrain_run = state.runs(settings.registry.model_name)  # newest first; nothing else ran
    state.close()
    assert retrain_run.trigger == "alert" and retrain_run.result == "promoted"
    gate = retrain_run.data["gate"]
    assert gate["promoted"] and set(gate["challenger"]) == set(gate["champion"]) == {"original", "production"}
    assert gate["challenger"]["production"] > gate["champion"]["production"]
    assert retrain_run.data["analysis"]["phase"] == "successful"
    assert retrain_run.data["lineage"]["authenticated_only"] and retrain_run.data["lineage"]["test"] >= 20
    assert promotion_run.trigger == "promotion" and promotion_run.result == "rolled_back"
    analysis = promotion_run.data["analysis"]
    assert analysis["phase"] == "failed" and analysis["version"] == summary["versions"]["bad model"]
    assert len(analysis["measurements"]) <= settings.loop.analysis_count  # rolled back within the analysis

    new, bad = summary["versions"]["retrained champion"], summary["versions"]["bad model"]
    events = [e for e in registry.history(settings) if e.alias == registry.CHAMPION]
    assert [(e.kind, e.to_version) for e in events] == [
        ("promote", "1"),
        ("promote", new),
        ("promote", bad),
        ("rollback", new),
    ]
    assert "firing since" in events[1].reason and events[2].reason.startswith("forced:")
    assert "post-promotion analysis failed" in events[3].reason and "live accuracy" in events[3].reason
    assert registry.alias_version(settings, registry.CHAMPION) == new
    assert registry.version_tags(settings, bad)["rolled_back"] == "true"
    assert registry.version_tags(settings, new)["visionloop.loop_run"] == retrain_run.id
    assert registry.version_tags(settings, new)["loop.analysis"].startswith("successful (")
    assert registry.version_tags(settings, bad)["loop.analysis"].startswith("failed (")

    import mlflow

    client = mlflow.MlflowClient(settings.tracking_uri)
    experiment = client.get_experiment_by_name(settings.registry.experiment)
    statuses = {r.info.status for r in client.search_runs([experiment.experiment_id])}
    assert statuses == {"FINISHED"}, statuses  # no orphaned RUNNING run

    assert "<img" in Path(summary["report"]).read_text()
    assert Path(summary["plot"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "trigger alert" in (workdir / "logs" / "loop.log").read_text()

    # the demo's Prometheus kept what it scraped: every loop panel and rule evaluates, and each panel had data
    # while the loop worked (asked at the moment of the rollback, when the loop had decided and analysed)
    config = tmp_path / "replay.yml"
    config.write_text("global: {}\n")
    address = f"127.0.0.1:{free_port()}"
    replay = start_prometheus(workdir / "alerting", config, address)
    try:
        at = dt.datetime.fromisoformat(events[3].time).timestamp() + 1

        def query(expr: str) -> list:
            answer = httpx.get(f"http://{address}/api/v1/query", params={"query": expr, "time": at}, timeout=30).json()
            assert answer["status"] == "success", (expr, answer)
            return answer["data"]["result"]

        for alert in ("VisionloopDriftDetected", "VisionloopLiveAccuracyLow"):  # both fired during the shift
            assert query(f'max_over_time(ALERTS{{alertname="{alert}", alertstate="firing"}}[15m])'), alert
        for where, expr in loop_expressions():
            found = query(expr)
            if not where.startswith("rule "):
                assert found, f"{where}: no data while the loop ran: {expr}"
    finally:
        replay.stop()
