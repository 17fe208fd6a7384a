"""The alert rules shipped in the chart, checked and unit-tested by Prometheus's promtool."""

import re

import yaml

from tests.deploy.prometheus_tools import RULE_TESTS, RULES, alerts, promtool, rule_groups

SEVERITIES = {"critical", "warning", "info"}
# PrometheusRule's Duration (monitoring.coreos.com/v1), which `for:` must also match there.
DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
)
RULE_KEYS = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts())} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    files = sorted(RULE_TESTS.glob("*.yaml"))
    assert files
    result = promtool("test", "rules", *files)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS.glob("*.yaml"):
        for test in yaml.safe_load(path.read_text())["tests"]:
            for case in test.get("alert_rule_test", []):
                (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = {rule["alert"] for rule in alerts()}
    assert names - firing == set(), "alerts never tested firing"
    assert names - quiet == set(), "alerts never tested staying quiet"


def test_every_alert_says_how_bad_what_and_since_when() -> None:
    for rule in alerts():
        assert rule["labels"]["severity"] in SEVERITIES, rule["alert"]
        assert rule["annotations"]["summary"] and rule["annotations"]["description"], rule["alert"]
        assert DURATION.match(rule["for"]), rule["alert"]


def test_the_file_is_also_a_prometheusrule_spec() -> None:
    """The chart puts the file's content under a PrometheusRule's ``spec``: nothing but
    ``groups``, rules with the CRD's fields only, labels and annotations as strings."""
    assert set(yaml.safe_load(RULES.read_text())) == {"groups"}
    names = [group["name"] for group in rule_groups()]
    assert len(names) == len(set(names))
    for group in rule_groups():
        assert set(group) <= {"name", "interval", "rules", "limit"}
        for rule in group["rules"]:
            assert set(rule) <= RULE_KEYS and isinstance(rule["expr"], str), rule
            for key in ("labels", "annotations"):
                assert all(isinstance(v, str) for v in rule.get(key, {}).values()), rule
    alert_names = [rule["alert"] for rule in alerts()]
    assert len(alert_names) == len(set(alert_names))
