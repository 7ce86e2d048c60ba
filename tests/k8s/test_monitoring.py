"""The monitoring artifacts: alert rules that promtool accepts and whose unit tests pass,
and rules and a dashboard that name only metrics cargotrack exports.

promtool is a CI tool (the Makefile's `tools` target installs Debian's prometheus
package, which carries it); its absence fails these tests with the command that
installs it, never skips them. PodMonitor coverage of every workload is checked on the
rendered overlays in test_manifests.py.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY

import shared.metrics  # noqa: F401  (registers every cargotrack series)

REPO = Path(__file__).resolve().parents[2]
MONITORING = REPO / "k8s" / "components" / "monitoring"
RULES = MONITORING / "prometheusrule.yaml"
DASHBOARD = MONITORING / "dashboards" / "cargotrack.json"
ALERT_TESTS = Path(__file__).with_name("alert-tests.yaml")

pytestmark = pytest.mark.timeout(120)


def promtool_path() -> str:
    on_path = shutil.which("promtool")
    if on_path:
        return on_path
    pytest.fail("promtool is not installed: run `make tools`", pytrace=False)


@pytest.fixture
def rules_dir(tmp_path: Path) -> Path:
    """The PrometheusRule's spec as a plain rules file, beside the alert unit tests."""
    spec = yaml.safe_load(RULES.read_text())["spec"]
    (tmp_path / "cargotrack-rules.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    shutil.copy(ALERT_TESTS, tmp_path / ALERT_TESTS.name)
    return tmp_path


def _promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool_path(), *args], cwd=cwd, capture_output=True, text=True, timeout=60
    )


def test_promtool_checks_the_rules(rules_dir: Path) -> None:
    result = _promtool("check", "rules", "cargotrack-rules.yaml", cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r"SUCCESS: \d+ rules found", result.stdout), result.stdout


def test_the_alert_unit_tests_pass(rules_dir: Path) -> None:
    result = _promtool("test", "rules", ALERT_TESTS.name, cwd=rules_dir)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_an_alert_unit_test_can_fail(rules_dir: Path) -> None:
    """The unit tests are not vacuous: expecting silence where the lag grows fails."""
    tests = yaml.safe_load((rules_dir / ALERT_TESTS.name).read_text())
    growing = next(t for t in tests["tests"] if t["name"] == "lag growing for 5 minutes fires")
    growing["alert_rule_test"] = [
        {"eval_time": "10m", "alertname": "CargotrackProjectorLagGrowing", "exp_alerts": []}
    ]
    tests["tests"] = [growing]
    (rules_dir / "inverted.yaml").write_text(yaml.safe_dump(tests))
    result = _promtool("test", "rules", "inverted.yaml", cwd=rules_dir)
    assert result.returncode != 0, result.stdout
    assert "CargotrackProjectorLagGrowing" in result.stdout + result.stderr


# --- only exported metrics ----------------------------------------------------------------

#: PromQL words that are not metric names: aggregations, keywords, functions.
PROMQL_WORDS = {
    "and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
    "bool", "offset", "inf", "nan",
}  # fmt: skip


def exported_series() -> set[str]:
    """Every series name the registry exposes, with the suffixes of its type."""
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(sample.name for sample in family.samples)
        suffixes = {
            "counter": ("_total",),
            "histogram": ("_bucket", "_sum", "_count"),
            "gauge": ("",),
            "info": ("_info",),
            "summary": ("_sum", "_count", ""),
        }.get(family.type, ("",))
        names.update(family.name + suffix for suffix in suffixes)
    return names


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (strings, label matchers, ranges,
    grouping clauses and function names removed)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    text = re.sub(r"\{[^}]*\}", "", text)
    text = re.sub(r"\[[^\]]*\]", "", text)
    text = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    words = set(re.findall(r"(?<![\w.])[A-Za-z_:][\w:]*\b(?!\s*\()", text))
    return {w for w in words if w.lower() not in PROMQL_WORDS}


def rule_expressions() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(RULES.read_text())["spec"]["groups"]:
        for rule in group["rules"]:
            yield rule.get("alert") or rule["record"], str(rule["expr"])


def dashboard_expressions() -> Iterator[tuple[str, str]]:
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def test_metric_names_are_found_in_an_expression() -> None:
    assert metric_names(
        'sum by (le) (rate(cargotrack_x_bucket{a="b{c}"}[5m])) / on(pod) up - time()'
    ) == {"cargotrack_x_bucket", "up"}


@pytest.mark.parametrize(
    "source", [rule_expressions, dashboard_expressions], ids=["rules", "dashboard"]
)
def test_only_exported_metrics_are_referenced(source: object) -> None:
    exported = exported_series()
    assert "cargotrack_projector_consumer_lag" in exported
    assert callable(source)
    unknown = {
        f"{where}: {name}"
        for where, expr in source()
        for name in metric_names(expr)
        if name not in exported
    }
    assert unknown == set()


def test_the_dashboard_covers_the_alerted_metrics() -> None:
    """Every metric an alert watches has a panel, so a page leads to a graph."""
    on_dashboard = {name for _, expr in dashboard_expressions() for name in metric_names(expr)}
    alerted = {name for _, expr in rule_expressions() for name in metric_names(expr)}
    assert alerted - on_dashboard == set()
