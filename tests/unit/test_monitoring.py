"""The monitoring kit in config/: Prometheus alert rules and scrape configuration, and the
Grafana dashboard with its provisioning.

The rules are checked by Prometheus' own ``promtool`` (Debian's ``prometheus`` package
ships it; ``.ci/run`` installs it): their syntax, and their behaviour on made-up series
in ``alerts.test.yml``. That every query names a metric the worker really exports is
checked against a live worker in tests/integration/test_metrics.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "config" / "prometheus"
GRAFANA = ROOT / "config" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "check365-worker.json"
METRIC = re.compile(r"\bcheck365_[a-z0-9_]+\b")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    binary = shutil.which("promtool")
    if binary is None:
        pytest.skip("promtool is not installed (Debian: apt-get install prometheus)")
    return subprocess.run([binary, *args], capture_output=True, text=True, timeout=60, check=False, cwd=ROOT)


def rules() -> list[dict[str, Any]]:
    loaded = yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())
    return [rule for group in loaded["groups"] for rule in group["rules"]]


def dashboard_panels() -> list[dict[str, Any]]:
    loaded: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return [p for p in loaded["panels"] if p["type"] != "row"]


def test_promtool_accepts_the_alert_rules() -> None:
    result = promtool("check", "rules", "config/prometheus/alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules())} rules found" in result.stdout


def test_the_alert_rules_fire_when_they_should_and_not_before() -> None:
    result = promtool("test", "rules", "config/prometheus/alerts.test.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_accepts_the_scrape_configuration() -> None:
    result = promtool("check", "config", "config/prometheus/prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_the_operations_issue_asks_for_exists() -> None:
    names = {rule["alert"] for rule in rules()}
    assert {
        "Check365BeatDown",
        "Check365PollBacklogAgeGrowing",
        "Check365DeliveryBacklogAgeGrowing",
        "Check365DeadLettersGrowing",
        "Check365Errors",
        "Check365KeyRefused",
        "Check365BreakerOpenLong",
        "Check365Misconfigured",
    } <= names
    for rule in rules():
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert METRIC.search(rule["expr"]), f"{rule['alert']} names no metric of the worker"


def test_every_alert_has_a_unit_test() -> None:
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts.test.yml").read_text()))
    assert {rule["alert"] for rule in rules()} <= tested


def test_every_dashboard_panel_queries_a_worker_metric_and_answers_a_question() -> None:
    panels = dashboard_panels()
    assert len(panels) >= 10
    ids = [p["id"] for p in json.loads(DASHBOARD.read_text())["panels"]]
    assert len(ids) == len(set(ids))
    for panel in panels:
        assert panel["targets"], panel["title"]
        assert panel["description"], f"{panel['title']}: say which question the panel answers"
        for target in panel["targets"]:
            assert METRIC.search(target["expr"]), f"{panel['title']}: {target['expr']}"
            assert target["datasource"]["uid"] == panel["datasource"]["uid"]


def test_grafana_is_provisioned_with_the_dashboard_and_its_datasource() -> None:
    sources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = sources["datasources"]
    uids = {p["datasource"]["uid"] for p in dashboard_panels()}
    assert uids == {source["uid"]}
    assert source["type"] == "prometheus"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "check365.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"


def test_ci_installs_promtool_as_it_installs_redis() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"apt-get install [^\n]*\bprometheus\b", ci)
    assert "command -v promtool" in ci
