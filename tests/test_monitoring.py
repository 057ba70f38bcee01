"""The monitoring folder: Prometheus configuration, recording and alert rules with their
``promtool test rules`` suites, and the Grafana dashboard. Needs ``promtool`` (Debian package
``prometheus``); skips and says so without it."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from serving.metrics import ServiceMetrics

MONITORING = Path(__file__).resolve().parents[1] / "monitoring"
RULE_FILES = sorted((MONITORING / "rules").glob("*.yml"))
RULE_TESTS = sorted((MONITORING / "tests").glob("*.yml"))
DASHBOARD = MONITORING / "grafana" / "vitrine.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not found (Debian package `prometheus`; make system-deps)"
)

# The recall canary's and the drift monitor's series: each must be alerted on or shown.
WATCH = {
    "vitrine_canary_recall",
    "vitrine_canary_floor",
    "vitrine_canary_last_run_timestamp_seconds",
    "vitrine_query_drift",
    "vitrine_query_drift_threshold",
}
# What the nightly job pushes to the Pushgateway (job="vitrine_nightly").
NIGHTLY = {
    "vitrine_nightly_last_run_timestamp_seconds",
    "vitrine_nightly_last_success_timestamp_seconds",
    "vitrine_nightly_rows",
    "vitrine_nightly_recall",
    "vitrine_nightly_gate_promoted",
    "vitrine_nightly_gate_consecutive_rejections",
    "vitrine_nightly_index_build_seconds",
    "vitrine_nightly_collection_rows",
}
# Grafana's variables, replaced by values PromQL accepts before promtool parses an expression.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "${job}": "vitrine-search",
    "$job": "vitrine-search",
    "${route}": ".*",
    "$route": ".*",
}
IDENTIFIER = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")


def _promtool(*args: str | Path, cwd: Path = MONITORING) -> subprocess.CompletedProcess:
    assert PROMTOOL is not None
    return subprocess.run(
        [PROMTOOL, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def _ok(result: subprocess.CompletedProcess) -> str:
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{' '.join(result.args)} failed:\n{output}"
    return output


def _rules() -> Iterator[dict]:
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            yield from group["rules"]


def _alerts() -> list[dict]:
    return [rule for rule in _rules() if "alert" in rule]


def _recorded() -> set[str]:
    return {rule["record"] for rule in _rules() if "record" in rule}


def _dashboard() -> dict:
    return json.loads(DASHBOARD.read_text())


def _query_panels(dashboard: dict) -> list[dict]:
    panels = []
    for panel in dashboard["panels"]:
        panels.extend(panel.get("panels", []))  # a collapsed row keeps its panels inside
        if panel["type"] != "row":
            panels.append(panel)
    return panels


def _dashboard_exprs(dashboard: dict) -> list[tuple[str, str]]:
    """(where, PromQL) for every query the dashboard runs: panels, annotations, variables."""
    exprs = []
    for panel in _query_panels(dashboard):
        for target in panel.get("targets", []):
            exprs.append((f"panel {panel['title']!r} {target['refId']}", target["expr"]))
    for annotation in dashboard["annotations"]["list"]:
        if "expr" in annotation:
            exprs.append((f"annotation {annotation['name']!r}", annotation["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            # label_values(SELECTOR, label) is Grafana's, not PromQL: check the selector.
            query = variable["query"]["query"]
            match = re.fullmatch(r"label_values\((.*),\s*\w+\)", query)
            assert match, f"variable {variable['name']}: unexpected query {query!r}"
            exprs.append((f"variable {variable['name']!r}", match.group(1)))
    return exprs


def _substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know in {expr!r}"
    return expr


def _service_series() -> set[str]:
    """The series names the search service's own registry exposes."""
    names = set()
    for family in ServiceMetrics().registry.collect():
        if family.type == "counter":
            names |= {f"{family.name}_total", f"{family.name}_created"}
        elif family.type == "histogram":
            names |= {f"{family.name}_{suffix}" for suffix in ("bucket", "sum", "count")}
        else:
            names.add(family.name)
    return names


def _metric_names(expr: str) -> set[str]:
    """Identifiers of an expression that name series: vitrine_* metrics and recorded rules."""
    without_strings = re.sub(r'"[^"]*"', '""', expr)
    return {
        name
        for name in IDENTIFIER.findall(without_strings)
        if name.startswith("vitrine_") or name.count(":") == 2
    }


# ------------------------------------------------------------------------------ promtool


@needs_promtool
def test_prometheus_config_and_its_rule_files_check() -> None:
    output = _ok(_promtool("check", "config", "prometheus.yml"))
    assert "2 rule files found" in output, output


@needs_promtool
def test_rule_files_check() -> None:
    _ok(_promtool("check", "rules", *RULE_FILES))


@needs_promtool
def test_rule_unit_tests_pass() -> None:
    assert RULE_TESTS, "no promtool tests in monitoring/tests"
    output = _ok(_promtool("test", "rules", *RULE_TESTS))
    assert "FAILED" not in output, output


# ------------------------------------------------------------------------------ rule files


def test_every_alert_fires_in_a_test_and_stays_quiet_in_another() -> None:
    fired: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS:
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (fired if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in _alerts()}
    assert names - fired == set(), f"alerts never shown firing: {sorted(names - fired)}"
    assert names - quiet == set(), f"alerts never shown quiet: {sorted(names - quiet)}"
    assert fired | quiet <= names, f"tests of unknown alerts: {sorted((fired | quiet) - names)}"


def test_every_recording_rule_is_evaluated_in_a_test() -> None:
    evaluated = " ".join(
        case["expr"]
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("promql_expr_test", [])
    )
    missing = {name for name in _recorded() if not re.search(rf"{name}(?![\w:])", evaluated)}
    assert missing == set(), f"recording rules no test evaluates: {sorted(missing)}"


def test_recording_rule_names_follow_level_metric_operations() -> None:
    for name in _recorded():
        level, metric, operations = name.split(":")
        assert level and operations, name
        assert metric.startswith("vitrine_"), name


def test_alerts_carry_severity_summary_description_and_runbook() -> None:
    for rule in _alerts():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), rule["alert"]
        assert all(text.strip() for text in annotations.values()), rule["alert"]


def test_alert_expectations_are_the_agreed_ones() -> None:
    """The thresholds the brief and the README promise, read from the rules themselves."""
    rules: dict[str, list[dict]] = {}
    for rule in _alerts():
        rules.setdefault(rule["alert"], []).append(rule)
    assert set(rules) >= {
        "VitrineDown",
        "VitrineHighErrorRatio",
        "VitrineSearchLatencyHigh",
        "IndexStale",
        "GateRejectedRepeatedly",
        "RecallCanaryBelowFloor",
        "QueryDrift",
        "ServiceNotReady",
    }
    assert 'up{job="vitrine-search"} == 0' in rules["VitrineDown"][0]["expr"]
    assert {rule["for"] for rule in rules["QueryDrift"]} == {"30m"}
    assert {rule["for"] for rule in rules["ServiceNotReady"]} == {"5m"}
    stale = " ".join(rule["expr"] for rule in rules["IndexStale"])
    assert "36 * 3600" in stale and "absent(" in stale
    assert ">= 3" in rules["GateRejectedRepeatedly"][0]["expr"]


def _nightly_series() -> set[str]:
    """What components/night_metrics.py publishes for a promoted night."""
    from components.night_metrics import night_registry

    outcome = {
        "outcome": "promoted",
        "finished_ts": 1.0,
        "last_success_ts": 1.0,
        "candidate_metrics": {"inshop": {"recall@1": 0.5}},
        "index_seconds": 1.0,
    }
    return {family.name for family in night_registry(outcome).collect()}


def test_rules_and_dashboard_name_only_exported_or_recorded_series() -> None:
    assert WATCH.issubset(_service_series())
    assert _nightly_series() <= NIGHTLY | {"vitrine_nightly_outcome"}
    known = _service_series() | NIGHTLY | _recorded()
    used = {}
    for rule in _rules():
        for name in _metric_names(rule["expr"]):
            used.setdefault(name, f"rule {rule.get('record') or rule.get('alert')}")
    for where, expr in _dashboard_exprs(_dashboard()):
        for name in _metric_names(expr):
            used.setdefault(name, where)
    unknown = {name: where for name, where in used.items() if name not in known}
    assert unknown == {}, f"series nobody exports or records: {unknown}"
    for name in WATCH | NIGHTLY:
        assert name in used, f"{name} is exported but neither alerted on nor shown"


# ------------------------------------------------------------------------------ dashboard


def test_dashboard_is_grafana_json_with_a_prometheus_datasource_variable() -> None:
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] >= 36
    assert dashboard["uid"] and dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), "panel ids repeat"


def test_every_panel_queries_the_datasource_variable() -> None:
    panels = _query_panels(_dashboard())
    assert len(panels) >= 15
    for panel in panels:
        title = panel["title"]
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, title
        assert panel["targets"], f"{title}: no queries"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), f"{title}: refIds repeat"
        for target in panel["targets"]:
            assert target.get("datasource", panel["datasource"]) == panel["datasource"], title
            assert target["expr"].strip(), f"{title}: empty query"
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["w"] > 0 and grid["x"] + grid["w"] <= 24, title


def test_dashboard_covers_what_operators_look_at() -> None:
    exprs = " ".join(expr for _, expr in _dashboard_exprs(_dashboard()))
    for series in (
        "route:vitrine_http_requests:rate5m",
        "job:vitrine_http_requests_5xx:ratio_rate5m",
        "route:vitrine_http_request_seconds:histogram_quantile_rate5m",
        "stage:vitrine_stage_seconds:histogram_quantile_rate5m",
        "job:vitrine_embed_batch_size:mean5m",
        "vitrine_serving_info",
        "vitrine_collection_rows",
    ):
        assert series in exprs, f"no panel shows {series}"


def _check_as_rules(exprs: list[str], folder: Path) -> subprocess.CompletedProcess:
    """``promtool check rules`` over the expressions, written as recording rules."""
    rules = [{"record": f"dashboard:query_{i}:check", "expr": e} for i, e in enumerate(exprs)]
    rule_file = folder / "dashboard_queries.yml"
    rule_file.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return _promtool("check", "rules", rule_file, cwd=folder)


@needs_promtool
def test_dashboard_queries_parse_as_promql(tmp_path: Path) -> None:
    exprs = _dashboard_exprs(_dashboard())
    result = _check_as_rules([_substitute(expr) for _, expr in exprs], tmp_path)
    if result.returncode != 0:  # one at a time, to name the panel whose query is broken
        bad = [
            f"{where}: {expr}\n{_check_as_rules([_substitute(expr)], tmp_path).stdout}"
            for where, expr in exprs
            if _check_as_rules([_substitute(expr)], tmp_path).returncode != 0
        ]
        pytest.fail("dashboard queries promtool cannot parse:\n" + "\n".join(bad))
    assert f"{len(exprs)} rules found" in result.stdout
