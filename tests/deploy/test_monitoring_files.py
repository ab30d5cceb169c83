"""deploy/monitoring as the tools read it: Prometheus' own promtool and Alertmanager's amtool check the configs
and run the rule unit tests; Grafana's generated dashboard types (grafana-foundation-sdk) load the dashboards;
and the files are cross-checked against each other, against the metrics the code registers, and against
the runbooks (docs/monitoring.md; docs/loop.md for the loop's own alerts).

promtool and amtool come from Debian's ``prometheus`` and ``prometheus-alertmanager`` packages: without
them these tests skip, and under CI=true they fail.
"""

from __future__ import annotations

import enum
import json
import os
import re
import shutil
import subprocess
import types
import typing
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
MONITORING = ROOT / "deploy" / "monitoring"
PROMETHEUS_YML = MONITORING / "prometheus" / "prometheus.yml"
RULES = MONITORING / "prometheus" / "rules" / "visionloop.rules.yml"
RULE_TESTS = sorted((MONITORING / "prometheus" / "tests").glob("*.test.yml"))
ALERTMANAGER_YML = MONITORING / "alertmanager" / "alertmanager.yml"
DASHBOARDS = sorted((MONITORING / "grafana" / "dashboards").glob("*.json"))
DOCS_URL = "https://github.com/visionloop/visionloop/blob/main/docs"
RUNBOOK_DOC = ROOT / "docs" / "monitoring.md"
RUNBOOK = f"{DOCS_URL}/monitoring.md"
LOOP_RUNBOOK_DOC = ROOT / "docs" / "loop.md"
LOOP_RUNBOOK = f"{DOCS_URL}/loop.md"
# the closed loop's own alerts: runbooks in docs/loop.md, and routed to people, not to the loop's webhook
LOOP_ALERT = re.compile(r"VisionloopLoop[A-Z]\w*")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SEVERITIES = {"critical", "warning", "info"}
# metrics that carry a model_version label: a panel on the model-quality dashboard filters them by $model_version
VERSIONED = re.compile(
    r"\b(visionloop_predictions_total|visionloop_prediction_confidence_\w+|visionloop_feedback_total|"
    r"visionloop_drift_\w+|visionloop_live_accuracy(_samples)?|visionloop_reference_age_seconds)\b(?!_)"
)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        package = "prometheus" if name == "promtool" else "prometheus-alertmanager"
        message = f"{name} is not installed (apt-get install -y --no-install-recommends {package})"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{' '.join(command)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def runbook_doc(alertname: str) -> tuple[Path, str]:
    """The file holding an alert's runbook and the URL its runbook_url starts with."""
    return (LOOP_RUNBOOK_DOC, LOOP_RUNBOOK) if LOOP_ALERT.fullmatch(alertname) else (RUNBOOK_DOC, RUNBOOK)


def alert_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def recording_rules() -> list[dict]:
    groups = yaml.safe_load(RULES.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "record" in rule]


def load_dashboard(path: Path) -> dict:
    return json.loads(path.read_text())


def all_panels(dashboard: dict) -> list[dict]:
    """Every panel, with the panels of collapsed rows."""
    out = []
    for panel in dashboard["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


# --- the tools' own checks ---------------------------------------------------------------------------------


def test_promtool_check_config_accepts_prometheus_yml():
    out = run(tool("promtool"), "check", "config", str(PROMETHEUS_YML))
    assert "SUCCESS" in out and "1 rule files found" in out


def test_promtool_check_rules_accepts_the_rules():
    out = run(tool("promtool"), "check", "rules", str(RULES))
    assert f"{len(alert_rules()) + len(recording_rules())} rules found" in out


def test_promtool_rule_unit_tests_pass():
    assert RULE_TESTS, "no deploy/monitoring/prometheus/tests/*.test.yml"
    out = run(tool("promtool"), "test", "rules", *map(str, RULE_TESTS))
    assert out.count("SUCCESS") == len(RULE_TESTS)


def test_amtool_check_config_accepts_alertmanager_yml():
    out = run(tool("amtool"), "check-config", str(ALERTMANAGER_YML))
    assert "SUCCESS" in out


def test_amtool_routes_every_visionloop_alert_to_the_loop():
    amtool = tool("amtool")
    routed = 0
    for rule in alert_rules():
        if LOOP_ALERT.fullmatch(rule["alert"]):
            continue  # the loop's own: see the next test
        labels = [f"alertname={rule['alert']}", *(f"{k}={v}" for k, v in rule["labels"].items()), "model_version=3"]
        out = run(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}", *labels)
        assert out.strip() == "visionloop-loop", (rule["alert"], out)
        routed += 1
    assert routed >= 13
    # an alert that is not visionloop's does not reach the loop
    out = run(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}", "alertname=NodeDown")
    assert out.strip() == "null"


def test_amtool_keeps_the_loops_own_alerts_away_from_the_loop():
    """A loop that is down cannot take VisionloopLoopDown, and the loop ignores its own alerts anyway: they go to
    the "null" receiver as shipped, where the team's on-call receiver belongs."""
    amtool = tool("amtool")
    loop_rules = [rule for rule in alert_rules() if LOOP_ALERT.fullmatch(rule["alert"])]
    assert {rule["alert"] for rule in loop_rules} >= {
        "VisionloopLoopDown", "VisionloopLoopRunFailed", "VisionloopLoopRolledBack", "VisionloopLoopStuck",
        "VisionloopLoopErrors",
    }  # fmt: skip
    for rule in loop_rules:
        labels = [f"alertname={rule['alert']}", *(f"{k}={v}" for k, v in rule["labels"].items()), "instance=l:8002"]
        out = run(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}", *labels)
        assert out.strip() == "null", (rule["alert"], out)
    # the route takes the loop's alerts only: the model alerts, same service label, still reach the loop
    labels = ["alertname=VisionloopLiveAccuracyLow", "service=visionloop", "severity=critical", "model_version=3"]
    out = run(amtool, "config", "routes", "test", f"--config.file={ALERTMANAGER_YML}", *labels)
    assert out.strip() == "visionloop-loop"


# --- the rules: conventions, and a promtool test for each alert --------------------------------------------


def test_every_alert_has_severity_service_and_the_annotations():
    rules = alert_rules()
    assert len({rule["alert"] for rule in rules}) >= 13
    for rule in rules:
        name = rule["alert"]
        assert re.fullmatch(r"Visionloop[A-Z][A-Za-z]+", name), name
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert rule["labels"]["service"] == "visionloop", name
        annotations = rule["annotations"]
        assert set(annotations) >= {"summary", "description", "runbook_url"}, name
        assert annotations["summary"].strip() and annotations["description"].strip(), name
        assert annotations["runbook_url"] == f"{runbook_doc(name)[1]}#{name.lower()}", name
        # one description per instance or job, not a bare sentence: it names what fired
        assert "$labels." in annotations["description"] or "$value" in annotations["description"], name


def test_same_name_alerts_differ_in_severity_only():
    by_name: dict[str, list[dict]] = {}
    for rule in alert_rules():
        by_name.setdefault(rule["alert"], []).append(rule)
    for name, rules in by_name.items():
        severities = [rule["labels"]["severity"] for rule in rules]
        assert len(set(severities)) == len(severities), f"{name}: two rules with one severity"


def _durations(text: str) -> int:
    """promtool's duration strings (1h30m, 90s, 15m) in seconds."""
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    parts = re.findall(r"(\d+)(ms|s|m|h|d|w)", str(text))
    assert parts and "".join(n + u for n, u in parts) == str(text), text
    return int(sum(int(n) * units[u] for n, u in parts))


def test_every_alert_has_a_promtool_case_that_fires_it_and_cases_that_keep_it_silent():
    fired: set[tuple[str, str]] = set()  # (alertname, severity) with exact labels and annotations
    silent_healthy: set[str] = set()  # silent in a test group where it never fires
    silent_before_for: set[str] = set()  # silent in a group where it fires later
    for path in RULE_TESTS:
        spec = yaml.safe_load(path.read_text())
        assert spec["rule_files"] == ["../rules/visionloop.rules.yml"], path
        for group in spec["tests"]:
            cases = group.get("alert_rule_test", [])
            firing_at: dict[str, int] = {}
            for case in cases:
                for alert in case["exp_alerts"]:
                    assert set(alert["exp_annotations"]) == {"summary", "description", "runbook_url"}, case
                    fired.add((case["alertname"], alert["exp_labels"]["severity"]))
                if case["exp_alerts"]:
                    at = _durations(case["eval_time"])
                    firing_at[case["alertname"]] = min(at, firing_at.get(case["alertname"], at))
            for case in cases:
                if case["exp_alerts"]:
                    continue
                name = case["alertname"]
                if name not in firing_at:
                    silent_healthy.add(name)
                elif _durations(case["eval_time"]) < firing_at[name]:
                    silent_before_for.add(name)
    for rule in alert_rules():
        name = rule["alert"]
        assert (name, rule["labels"]["severity"]) in fired, f"no promtool case fires {name} ({rule['labels']})"
        assert name in silent_healthy, f"no promtool case keeps {name} silent on healthy series"
        if "for" in rule:
            assert name in silent_before_for, f"no promtool case keeps {name} silent before its for: {rule['for']}"


def _github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"`|\*|_(?=\w*_)", "", heading.strip().lower())
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def test_every_runbook_url_points_at_a_section_of_its_doc():
    """docs/monitoring.md for the servers' and the monitor's alerts, docs/loop.md for the loop's."""
    wanted: dict[Path, set[str]] = {}
    for rule in alert_rules():
        doc, url = runbook_doc(rule["alert"])
        page, anchor = rule["annotations"]["runbook_url"].split("#", 1)
        assert page == url, rule["alert"]
        wanted.setdefault(doc, set()).add(anchor)
    assert set(wanted) == {RUNBOOK_DOC, LOOP_RUNBOOK_DOC}
    for doc, anchors_wanted in wanted.items():
        name = doc.relative_to(ROOT)
        assert doc.is_file(), f"{name} is missing; it needs a section per alert: {sorted(anchors_wanted)}"
        text = doc.read_text()
        headings = re.findall(r"^#{1,6}\s+(.+?)\s*#*\s*$", text, flags=re.MULTILINE)
        anchors = {_github_anchor(h) for h in headings} | set(re.findall(r'<a (?:id|name)="([^"]+)"', text))
        missing = sorted(anchor for anchor in anchors_wanted if anchor not in anchors)
        assert not missing, f"{name} has no heading for the runbook anchors {missing}"


# --- the metric names: each one a real metric the code registers, or a recording rule ---------------------


def registered_metric_names() -> set[str]:
    from prometheus_client import CollectorRegistry

    from visionloop.config import MonitorSettings
    from visionloop.loop.metrics import LoopMetrics
    from visionloop.monitoring.metrics import MonitorMetrics
    from visionloop.serving.metrics import ServingMetrics

    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    names: set[str] = set()
    registries: list[CollectorRegistry] = [
        ServingMetrics().registry, MonitorMetrics(MonitorSettings()).registry, LoopMetrics().registry,
    ]  # fmt: skip
    for registry in registries:
        for family in registry.collect():
            names.update(family.name + suffix for suffix in suffixes.get(family.type, ("",)))
    return names


def expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every rule and every dashboard target."""
    out = [(rule.get("alert") or rule["record"], rule["expr"]) for rule in alert_rules() + recording_rules()]
    for path in DASHBOARDS:
        for panel in all_panels(load_dashboard(path)):
            out.extend((f"{path.name}: {panel['title']}", t["expr"]) for t in panel.get("targets", []))
    return out


def test_every_metric_in_rules_and_dashboards_is_one_the_code_registers():
    known = registered_metric_names() | {rule["record"] for rule in recording_rules()} | {"up"}
    assert "visionloop_http_requests_total" in known and "visionloop_drift_detected" in known
    # the loop's: counters, a histogram, and the Enums (a stateset, its one label named as the metric)
    assert {"visionloop_loop_runs_total", "visionloop_loop_retrain_seconds_bucket", "visionloop_loop_phase"} <= known
    for where, expr in expressions():
        code = re.sub(r'"[^"]*"', '""', expr)  # label values are not metric names
        for name in re.findall(r"\b(?:visionloop_\w+|[a-z_]+:\w+:\w+)", code):
            assert name in known, f"{where}: {name} is not a metric visionloop registers"


# --- Prometheus and Alertmanager configs: what the rules and the loop rely on ------------------------------


def test_prometheus_yml_scrapes_the_three_jobs_and_alerts_to_alertmanager():
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["visionloop-serve"]["static_configs"][0]["targets"] == ["127.0.0.1:8000"]
    assert jobs["visionloop-monitor"]["static_configs"][0]["targets"] == ["127.0.0.1:8001"]
    assert jobs["visionloop-loop"]["static_configs"][0]["targets"] == ["127.0.0.1:8002"]
    assert jobs["visionloop-loop"]["metrics_path"] == "/metrics"
    assert config["alerting"]["alertmanagers"][0]["static_configs"][0]["targets"] == ["127.0.0.1:9093"]
    matched = [p for pattern in config["rule_files"] for p in PROMETHEUS_YML.parent.glob(pattern)]
    assert matched == [RULES]
    # every job the rules name is one Prometheus scrapes
    for _, expr in expressions():
        for job in re.findall(r'job="([^"]+)"', expr):
            assert job in jobs, job


def test_alertmanager_sends_visionloop_alerts_to_the_loop_webhook():
    config = yaml.safe_load(ALERTMANAGER_YML.read_text())
    routes = config["route"]["routes"]
    (route,) = [r for r in routes if r["receiver"] == "visionloop-loop"]
    assert route["matchers"] == ['service="visionloop"']
    # the loop's own alerts take a route of their own first (the first match wins: no `continue`)
    (own,) = [r for r in routes if 'alertname=~"VisionloopLoop.*"' in r.get("matchers", [])]
    assert own["receiver"] == "null" and not own.get("continue", False)
    assert routes.index(own) < routes.index(route)
    assert {"alertname", "model_version"} <= set(route["group_by"])
    (receiver,) = [r for r in config["receivers"] if r["name"] == "visionloop-loop"]
    (webhook,) = receiver["webhook_configs"]
    assert webhook["url"] == "http://127.0.0.1:8002/alerts" and webhook["send_resolved"] is True
    (inhibit,) = config["inhibit_rules"]
    assert 'severity="critical"' in inhibit["source_matchers"] and 'severity="warning"' in inhibit["target_matchers"]
    assert "alertname" in inhibit["equal"]


# --- Grafana: the dashboards through Grafana's own generated types, then our conventions -------------------


def _diff(ours: object, theirs: object, path: str = "$") -> list[str]:
    """What of ``ours`` did not come back from the typed model: dropped keys, changed values."""
    if isinstance(ours, dict):
        if not isinstance(theirs, dict):
            return [f"{path}: came back as {type(theirs).__name__}"]
        out = []
        for key, value in ours.items():
            out += (
                [f"{path}.{key}: not a field Grafana knows"]
                if key not in theirs
                else _diff(value, theirs[key], f"{path}.{key}")
            )
        return out
    if isinstance(ours, list):
        if not isinstance(theirs, list) or len(ours) != len(theirs):
            return [f"{path}: the list came back changed"]
        return [e for i, (a, b) in enumerate(zip(ours, theirs, strict=True)) for e in _diff(a, b, f"{path}[{i}]")]
    return [] if ours == theirs else [f"{path}: {ours!r} came back as {theirs!r}"]


def _type_errors(value: object, hint: object, path: str) -> list[str]:
    """``value`` against the SDK's type hint: enums, literals, scalars, lists, nested models."""
    origin = typing.get_origin(hint)
    if hint is typing.Any or hint is object:
        return _model_errors(value, path) if hasattr(value, "to_json") else []
    if origin in (typing.Union, types.UnionType):
        results = [_type_errors(value, arg, path) for arg in typing.get_args(hint)]
        return [] if any(not r for r in results) else min(results, key=len)
    if hint is type(None):
        return [] if value is None else [f"{path}: {value!r} is not null"]
    if origin is typing.Literal:
        return [] if value in typing.get_args(hint) else [f"{path}: {value!r} is not one of {typing.get_args(hint)}"]
    if origin is list:
        if not isinstance(value, list):
            return [f"{path}: {type(value).__name__} is not a list"]
        (item,) = typing.get_args(hint)
        return [e for i, v in enumerate(value) for e in _type_errors(v, item, f"{path}[{i}]")]
    if origin is dict:
        return [] if isinstance(value, dict) else [f"{path}: {value!r} is not an object"]
    if isinstance(hint, type) and issubclass(hint, enum.Enum):
        ok = isinstance(value, hint) or value in {member.value for member in hint}
        return [] if ok else [f"{path}: {value!r} is not one of {[member.value for member in hint]}"]
    if hint is bool:
        return [] if isinstance(value, bool) else [f"{path}: {value!r} is not a boolean"]
    if hint in (int, float):
        ok = isinstance(value, (int, float) if hint is float else int) and not isinstance(value, bool)
        return [] if ok else [f"{path}: {value!r} is not a number ({hint.__name__})"]
    if hint is str:
        return [] if isinstance(value, str) else [f"{path}: {value!r} is not a string"]
    if isinstance(hint, type):
        return _model_errors(value, path) if isinstance(value, hint) else [f"{path}: is not a {hint.__name__}"]
    raise AssertionError(f"{path}: no check for the type hint {hint!r}")


def _model_errors(model: object, path: str) -> list[str]:
    hints = typing.get_type_hints(type(model))
    return [e for name, hint in hints.items() for e in _type_errors(getattr(model, name, None), hint, f"{path}.{name}")]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_loads_in_grafanas_types_unchanged(path):
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard
    from grafana_foundation_sdk.models.prometheus import Dataquery

    register_default_plugins()  # typed options for timeseries/stat/table/..., typed Prometheus queries
    raw = load_dashboard(path)
    model = Dashboard.from_json(raw)
    back = json.loads(json.dumps(model, cls=JSONEncoder))
    assert _diff(raw, back) == []
    assert _model_errors(model, "$") == []
    for panel in model.panels or []:
        for target in getattr(panel, "targets", None) or []:
            assert isinstance(target, Dataquery), panel.title


def test_the_sdk_check_catches_a_wrong_enum_and_an_unknown_field():
    """The two checks above are not vacuous: a typo in a field name or an enum value fails them."""
    from grafana_foundation_sdk.cog.encoder import JSONEncoder
    from grafana_foundation_sdk.cog.plugins import register_default_plugins
    from grafana_foundation_sdk.models.dashboard import Dashboard

    register_default_plugins()
    raw = load_dashboard(DASHBOARDS[0])
    panel = next(p for p in raw["panels"] if p["type"] == "timeseries")
    panel["options"]["tooltip"]["mode"] = "everything"
    panel["fieldconfig"] = panel["fieldConfig"]
    model = Dashboard.from_json(raw)
    assert any("tooltip.mode: 'everything'" in e for e in _model_errors(model, "$"))
    assert any(
        e.endswith(".fieldconfig: not a field Grafana knows")
        for e in _diff(raw, json.loads(json.dumps(model, cls=JSONEncoder)))
    )


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_dashboard_conventions(path):
    dashboard = load_dashboard(path)
    assert dashboard["uid"] == path.stem and dashboard["title"].startswith("visionloop / ")
    assert 39 <= dashboard["schemaVersion"] <= 41 and "visionloop" in dashboard["tags"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == DATASOURCE, variable["name"]
            assert re.fullmatch(r"label_values\((\w+(\{[^}]*\})?, )?\w+\)", variable["query"]["query"]), variable
    panels = all_panels(dashboard)
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"duplicate panel ids in {path.name}"
    cells: set[tuple[int, int]] = set()
    for panel in panels:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cover = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cover & cells, f"{panel['title']} overlaps another panel"
        cells |= cover
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"timeseries", "stat", "table", "bargauge"}, panel["type"]
        assert panel["title"] and panel.get("description"), panel["id"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == DATASOURCE, panel["title"]
            assert target["expr"].strip() and target["refId"], panel["title"]
            for name in re.findall(r"\$(\w+)|\$\{(\w+)\}", target["expr"]):
                used = name[0] or name[1]
                assert used in variables or used.startswith("__"), f"{panel['title']}: ${used} is not a variable"


def test_model_quality_dashboard_filters_every_versioned_metric_by_model_version():
    dashboard = load_dashboard(MONITORING / "grafana" / "dashboards" / "visionloop-model-quality.json")
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "model_version"]
    assert variable["type"] == "query" and variable["includeAll"] and variable["multi"]
    assert variable["query"]["query"] == "label_values(visionloop_predictions_total, model_version)"
    versioned = 0
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            for selector in re.finditer(VERSIONED.pattern + r"\s*(?P<matchers>\{[^}]*\})?", target["expr"]):
                versioned += 1
                matchers = selector.group("matchers") or ""
                assert 'model_version=~"$model_version"' in matchers, (panel["title"], target["expr"])
    assert versioned >= 10


def test_service_dashboard_shows_what_the_brief_names():
    dashboard = load_dashboard(MONITORING / "grafana" / "dashboards" / "visionloop-service.json")
    text = " ".join(t["expr"] for p in all_panels(dashboard) for t in p.get("targets", []))
    for metric in (
        "visionloop_http_requests_total", "visionloop_http_request_duration_seconds_bucket",
        "visionloop_batch_size_bucket", "visionloop_batch_queue_wait_seconds_bucket", "visionloop_ready",
        "visionloop_model_reloads_total", "visionloop_prediction_store_errors_total",
        "visionloop_prediction_store_lag_seconds",
    ):  # fmt: skip
        assert metric in text, metric
    assert all(f"histogram_quantile({q}" in text for q in ("0.5", "0.9", "0.99"))


def test_grafana_provisioning_points_at_the_dashboards_and_prometheus():
    provisioning = MONITORING / "grafana" / "provisioning"
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://127.0.0.1:9090" and source["isDefault"]
    providers = yaml.safe_load((provisioning / "dashboards" / "visionloop.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file" and provider["options"]["path"].rstrip("/").endswith("dashboards/visionloop")
