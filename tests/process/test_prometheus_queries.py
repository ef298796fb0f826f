"""The Prometheus and Grafana configuration against a real Prometheus scraping real Gunicorn.

`promtool` checks the configuration, the rules and the live /metrics output; then a
real Prometheus (the files in docker/prometheus, with only the scrape targets and
the intervals changed) scrapes a three-worker Gunicorn on 127.0.0.1 and the real
nginx in front of it (the shipped configuration) while traffic of every kind flows
through the proxy, and every PromQL expression of the Grafana dashboard and of the
rules must return data.

Alerts are written as `<expression> <comparison> <number>` or `absent(<expression>)`
(see docker/prometheus/alerts.yml). Healthy traffic leaves their conditions false,
so the test queries the expression the condition watches — the left-hand side, or
the argument of absent() — and requires data from it. The full alert expression
is queried too, for validity only.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from tests.support.bundles import REPO, SETOSA, VIRGINICA, copy_bundle
from tests.support.nginx import running_nginx
from tests.support.prometheus import (
    Prometheus,
    PromQLError,
    promtool,
    running_prometheus,
    write_drift_rules,
)
from tests.support.servers import free_port, running_gunicorn, wait_for

pytestmark = pytest.mark.process

PROMETHEUS_DIR = REPO / "docker" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERT_RULES = PROMETHEUS_DIR / "alerts.yml"
DRIFT_RULES = "rules/drift.yml"
DRIFT_ALERTS = {"MlApiFeatureDrift", "MlApiPredictionDrift"}
GRAFANA_DIR = REPO / "docker" / "grafana"
DASHBOARD = GRAFANA_DIR / "dashboards" / "ml-api.json"
DATASOURCES = GRAFANA_DIR / "provisioning" / "datasources" / "prometheus.yml"
JOB = "ml-api"
PROXY_JOB = "proxy"
# The proxy in front, open (AUTH=off) with a rate far above this test's traffic.
PROXY_SETTINGS = {"AUTH": "off", "PROXY_OPEN_RATE": "10000r/s", "PROXY_OPEN_BURST": "10000"}
SERVED, SHADOW = "1.0.0", "1.0.1"

VERSICOLOR = {"sepal_length": 5.9, "sepal_width": 3.0, "petal_length": 4.2, "petal_width": 1.5}
TRAFFIC_SECONDS = 4.0
MAX_TRAFFIC_ROUNDS = 300
# Grafana's built-in interval variables, as a 1 s scrape makes them sensible.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__range": "1m", "__interval": "1s"}
_VARIABLE = re.compile(r"\$(\w+)|\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]")
_LABEL_VALUES = re.compile(r"^\s*label_values\((?P<selector>.+),\s*(?P<label>\w+)\s*\)\s*$", re.S)
_COMPARISON = re.compile(r"(==|!=|>=|<=|>|<)(\s*bool\b)?")


# --- helpers ----------------------------------------------------------------------


def _load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def _dashboard() -> dict[str, Any]:
    dashboard: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return dashboard


def _all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in (collapsed) rows."""
    for panel in panels:
        yield panel
        yield from _all_panels(panel.get("panels", []))


@dataclass(frozen=True)
class Query:
    origin: str
    expr: str
    needs_data: bool = True


def _dashboard_queries(dashboard: dict[str, Any]) -> list[Query]:
    return [
        Query(f"panel {panel['title']!r} target {target['refId']}", target["expr"])
        for panel in _all_panels(dashboard["panels"])
        for target in panel.get("targets", [])
    ]


def _variable_names(text: str) -> set[str]:
    return {next(g for g in match.groups() if g) for match in _VARIABLE.finditer(text)}


def _substitute(expr: str, values: dict[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        assert name in values, f"no test value for Grafana variable ${name} in {expr}"
        return values[name]

    return _VARIABLE.sub(replace, expr)


def _top_level_call(expr: str, function: str) -> str | None:
    """The argument of `function(...)` when that call is the whole expression."""
    expr = expr.strip()
    if not (expr.startswith(f"{function}(") and expr.endswith(")")):
        return None
    depth = 0
    for position, char in enumerate(expr):
        depth += (char in "([{") - (char in ")]}")
        if depth == 0 and position > len(function) and position < len(expr) - 1:
            return None  # the opening parenthesis closes before the end
    return expr[len(function) + 1 : -1]


def _watched_expression(expr: str) -> str:
    """What an alert's condition looks at: the argument of absent(), or the
    left-hand side of its single top-level comparison with a number."""
    inner = _top_level_call(expr, "absent")
    if inner is not None:
        return inner
    depth, quote, position, cuts = 0, "", 0, []
    while position < len(expr):
        char = expr[position]
        if quote:
            if char == "\\":
                position += 1
            elif char == quote:
                quote = ""
        elif char in "\"'`":
            quote = char
        elif char in "([{":
            depth += 1
        elif char in ")]}":
            depth -= 1
        elif depth == 0 and (match := _COMPARISON.match(expr, position)):
            cuts.append((position, match.end()))
            position = match.end()
            continue
        position += 1
    assert len(cuts) == 1, f"alert is not `<expression> <comparison> <number>`: {expr}"
    start, end = cuts[0]
    threshold = expr[end:].strip()
    assert re.fullmatch(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?", threshold), (
        f"alert threshold is not a number: {expr}"
    )
    return expr[:start].strip()


def _rules(path: Path = ALERT_RULES) -> list[dict[str, Any]]:
    return [rule for group in _load_yaml(path)["groups"] for rule in group["rules"]]


# --- static checks ----------------------------------------------------------------


def test_promtool_checks_the_prometheus_config_and_its_rule_files() -> None:
    result = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alerts.yml" in result.stdout  # the rule file was found and checked with it


def test_promtool_checks_the_alert_rules() -> None:
    result = promtool("check", "rules", str(ALERT_RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_unit_tests_of_the_alert_rules_pass() -> None:
    result = promtool("test", "rules", str(ALERT_RULES.with_name("alerts.test.yml")))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_scrape_config_finds_every_api_replica_by_dns() -> None:
    config = _load_yaml(PROMETHEUS_CONFIG)
    assert config["global"]["scrape_interval"] == "15s"
    assert config["rule_files"] == ["alerts.yml", "rules/*.yml"]
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["dns_sd_configs"] == [
        {"names": ["api"], "type": "A", "port": 8000, "refresh_interval": "15s"}
    ]


def test_scrape_config_scrapes_the_proxy_on_its_internal_metrics_port() -> None:
    # 9113: nginx.conf's metrics listener, which compose never publishes; 8080,
    # the public one, refuses /metrics.
    config = _load_yaml(PROMETHEUS_CONFIG)
    (job,) = [job for job in config["scrape_configs"] if job["job_name"] == PROXY_JOB]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"] == [{"targets": ["proxy:9113"]}]


def test_no_rule_depends_on_the_job_label() -> None:
    # The user's scrape config (or a ServiceMonitor) names the job as it likes.
    for rule in _rules():
        assert not re.search(r"\bjob\s*(=|!=|=~|!~)", rule["expr"]), rule
        assert not re.search(r"\b(by|on|without|ignoring)\s*\([^)]*\bjob\b", rule["expr"]), rule


def test_every_alert_has_a_testable_condition_severity_and_text() -> None:
    alerts = [rule for rule in _rules() if "alert" in rule]
    assert {rule["alert"] for rule in alerts} >= {
        "MlApiHighP99Latency",
        "MlApiHigh5xxRatio",
        "MlApiNoReadyInstance",
        "MlApiRejectedShareRising",
        "MlApiKeysFileUnusable",
    }
    for rule in alerts:
        assert _watched_expression(rule["expr"]) != rule["expr"].strip(), rule["alert"]
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["annotations"]["description"], rule["alert"]
        assert "for" in rule, rule["alert"]


def test_dashboard_uses_the_provisioned_data_source_and_defines_its_variables() -> None:
    dashboard = _dashboard()
    assert dashboard["uid"] == "ml-api"
    assert dashboard["schemaVersion"] >= 39
    (datasource,) = _load_yaml(DATASOURCES)["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    expected = {"type": "prometheus", "uid": datasource["uid"]}

    panels = list(_all_panels(dashboard["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    variables = dashboard["templating"]["list"]
    defined = {variable["name"] for variable in variables} | set(GRAFANA_BUILTINS)
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == expected, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == expected, panel["title"]
            assert _variable_names(target["expr"]) <= defined, panel["title"]
    for variable in variables:
        assert variable["datasource"] == expected, variable["name"]
        assert _LABEL_VALUES.match(variable["definition"]), variable["name"]


# --- a real Prometheus scraping a real Gunicorn -----------------------------------


def _test_config(
    tmp_path: Path, model_dir: Path, api_port: int, proxy_metrics_port: int, prometheus_port: int
) -> Path:
    """docker/prometheus/prometheus.yml with static loopback targets and 1 s intervals,
    and the drift rules of the served bundle where `make rules` puts them."""
    config = _load_yaml(PROMETHEUS_CONFIG)
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    for job in config["scrape_configs"]:
        for key in ("scrape_interval", "scrape_timeout"):
            job.pop(key, None)
        if job["job_name"] == JOB:
            job.pop("dns_sd_configs")
            job["static_configs"] = [{"targets": [f"127.0.0.1:{api_port}"]}]
        elif job["job_name"] == PROXY_JOB:
            job["static_configs"] = [{"targets": [f"127.0.0.1:{proxy_metrics_port}"]}]
        elif job["job_name"] == "prometheus":
            job["static_configs"] = [{"targets": [f"127.0.0.1:{prometheus_port}"]}]
        else:
            raise AssertionError(f"unknown scrape job {job['job_name']!r}: teach this test")
    directory = tmp_path / "prometheus"
    directory.mkdir()
    shutil.copy(ALERT_RULES, directory / ALERT_RULES.name)
    # Few rows flow here: the drift alerts' row guard must not hide their expressions.
    write_drift_rules(
        model_dir, directory / DRIFT_RULES, "--min-rows", "1", "--model-version", SERVED
    )
    path = directory / "prometheus.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _send_traffic(url: str) -> int:
    """Requests of every kind, over several scrapes; returns how many were answered."""
    requests: list[tuple[str, str, Any, int]] = [
        ("POST", "/predict", SETOSA, 200),
        ("POST", "/predict", VERSICOLOR, 200),
        ("POST", "/predict", VIRGINICA, 200),
        ("POST", "/predict/batch", {"instances": [SETOSA, VERSICOLOR, VIRGINICA]}, 200),
        ("POST", "/predict", {}, 422),
        ("POST", "/predict/batch", {"instances": "not a list"}, 422),
        ("GET", "/no-such-route", None, 404),
        ("GET", "/health", None, 200),
        ("GET", "/health/live", None, 200),
        ("GET", "/health/ready", None, 200),
        ("GET", "/model-info", None, 200),
    ]
    sent = 0
    # No keep-alive: fresh connections spread the requests over all workers.
    limits = httpx.Limits(max_keepalive_connections=0)
    with httpx.Client(base_url=url, timeout=10, limits=limits) as client:
        deadline = time.monotonic() + TRAFFIC_SECONDS
        for _ in range(MAX_TRAFFIC_ROUNDS):
            if time.monotonic() >= deadline:
                break
            for method, path, body, status in requests:
                response = client.request(method, path, json=body)
                assert response.status_code == status, (method, path, response.text)
                sent += 1
            time.sleep(0.02)
    return sent


def _variable_values(prometheus: Prometheus, dashboard: dict[str, Any]) -> dict[str, str]:
    """A value for each dashboard variable, resolved like Grafana does, in order."""
    values = dict(GRAFANA_BUILTINS)
    for variable in dashboard["templating"]["list"]:
        match = _LABEL_VALUES.match(variable["definition"])
        assert match, variable["definition"]
        selector = _substitute(match["selector"], values)
        label = match["label"]
        found = prometheus.get(f"/api/v1/label/{label}/values", **{"match[]": selector})
        assert found, f"variable ${variable['name']}: no {label} values for {selector}"
        values[variable["name"]] = variable["allValue"] if variable["includeAll"] else found[0]
    return values


def _rule_queries(rules: list[dict[str, Any]]) -> list[Query]:
    queries = []
    for rule in rules:
        if "record" in rule:
            queries.append(Query(f"recording rule {rule['record']}", rule["expr"]))
        else:
            name, expr = rule["alert"], rule["expr"]
            queries.append(Query(f"alert {name} (watched)", _watched_expression(expr)))
            # The condition itself must be valid; healthy traffic leaves it empty.
            queries.append(Query(f"alert {name} (condition)", expr, needs_data=False))
    return queries


def _check(prometheus: Prometheus, query: Query) -> str | None:
    """None when the query returns at least one finite sample, else what went wrong."""
    try:
        result = prometheus.query(query.expr)
    except PromQLError as error:
        return f"{query.origin}: {error}\n    {query.expr}"
    if not query.needs_data:
        return None
    if not result:
        return f"{query.origin}: empty result\n    {query.expr}"
    if not any(math.isfinite(float(sample["value"][1])) for sample in result):
        return f"{query.origin}: only NaN/Inf values {result}\n    {query.expr}"
    return None


def test_every_dashboard_and_rule_expression_returns_data_from_a_real_prometheus(
    model_dir: Path, tmp_path: Path
) -> None:
    dashboard = _dashboard()
    # A shadow candidate (an identical copy) too: its panels and alert need its series.
    copy_bundle(model_dir / "iris" / SERVED, model_dir, version=SHADOW)
    env = {"MODEL_VERSION": SERVED, "SHADOW_MODEL_VERSION": SHADOW}
    with (
        running_gunicorn(model_dir, tmp_path / "gunicorn", workers=3, env=env) as api,
        running_nginx(tmp_path / "nginx", api.port, PROXY_SETTINGS) as proxy,
    ):
        prometheus_port = free_port()
        config = _test_config(tmp_path, model_dir, api.port, proxy.metrics_port, prometheus_port)
        rules = _rules() + _rules(config.parent / DRIFT_RULES)
        with running_prometheus(config, tmp_path / "tsdb", prometheus_port) as prometheus:
            # Targets are applied a few seconds after start: traffic must span scrapes.
            for job in (JOB, PROXY_JOB):
                wait_for(
                    lambda job=job: prometheus.query(f'up{{job="{job}"}} == 1'),
                    30,
                    interval=0.2,
                    what=f"the first successful scrape of {job}",
                )
            sent = _send_traffic(proxy.url)

            # promtool's lint of what the service exports, after traffic made every series.
            exposition = httpx.get(f"{api.url}/metrics", timeout=10).text
            lint = promtool("check", "metrics", stdin=exposition)
            assert lint.returncode == 0, f"promtool check metrics:\n{lint.stdout}{lint.stderr}"

            def scraped_everything() -> bool:
                total = prometheus.query(f'sum(http_requests_total{{job="{JOB}"}})')
                return bool(total) and float(total[0]["value"][1]) >= sent

            wait_for(scraped_everything, 15, interval=0.2, what="a scrape after the traffic")

            def proxy_scraped_everything() -> bool:
                # Every request went through the proxy (and its own health checks too).
                total = prometheus.query(f'sum(nginx_http_responses_total{{job="{PROXY_JOB}"}})')
                return bool(total) and float(total[0]["value"][1]) >= sent

            wait_for(proxy_scraped_everything, 15, interval=0.2, what="a scrape of the proxy")
            recorded = [rule["record"] for rule in rules if "record" in rule]
            wait_for(
                lambda: all(prometheus.query(name) for name in recorded),
                15,
                interval=0.2,
                what=f"rule evaluation to record {recorded}",
            )

            for job in (JOB, PROXY_JOB):
                (target,) = [
                    t
                    for t in prometheus.get("/api/v1/targets")["activeTargets"]
                    if t["scrapePool"] == job
                ]
                assert target["health"] == "up", target

            values = _variable_values(prometheus, dashboard)
            queries = [
                Query(q.origin, _substitute(q.expr, values)) for q in _dashboard_queries(dashboard)
            ] + _rule_queries(rules)
            failures = [problem for query in queries if (problem := _check(prometheus, query))]
            assert not failures, "\n".join(failures)

            groups = prometheus.get("/api/v1/rules")["groups"]
            evaluated = [rule for group in groups for rule in group["rules"]]
            assert len(evaluated) == len(rules)
            unhealthy = [(r["name"], r.get("lastError")) for r in evaluated if r["health"] != "ok"]
            assert not unhealthy, unhealthy
            # Three fixed rows are anything but the reference distribution: drift
            # alerts are pending here (tests/process/test_drift_rules.py pins them).
            active = [
                (alert["labels"]["alertname"], alert["state"])
                for alert in prometheus.get("/api/v1/alerts")["alerts"]
                if alert["labels"]["alertname"] not in DRIFT_ALERTS
            ]
            assert not active, f"alerts active under healthy traffic: {active}"
