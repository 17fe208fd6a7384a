"""The Grafana dashboard shipped in the chart: importable as is, every query valid PromQL
(promtool parses it), every metric one that Winnow defines."""

from pathlib import Path

import pytest
import yaml

from infra.kafka.settings import KafkaSettings
from service.config import LabelAppSettings
from service.labeling.queue import LabelQueue
from service.metrics import ScorerMetrics
from service.workers.metrics import PoolMetrics
from tests.deploy.prometheus_tools import (
    concrete,
    dashboard_queries,
    dashboards,
    exposed_names,
    label_values_query,
    metric_names,
    panels,
    promtool,
    rule_groups,
)
from trainer.metrics import TrainerMetrics

DATASOURCE = "${datasource}"
# The dashboard's own variables pick jobs; any regex that matches them will do for parsing.
VARIABLES = {"scorer": ".*", "trainer": ".*", "label_app": ".*"}


def defined_metrics() -> set[str]:
    """Every metric name the scorer (and its workers' supervisor), the trainer and the label
    app define."""
    queue = LabelQueue(KafkaSettings(bootstrap="127.0.0.1:1"), LabelAppSettings())
    registries = (
        ScorerMetrics().registry,
        PoolMetrics().registry,
        TrainerMetrics().registry,
        queue.registry,
    )
    return {name for registry in registries for name in exposed_names(registry.collect())} | {"up"}


@pytest.fixture(params=sorted(dashboards()))
def dashboard(request: pytest.FixtureRequest) -> dict:
    return dashboards()[request.param]


def test_there_is_a_dashboard() -> None:
    assert "winnow.json" in dashboards()


def test_importable_with_a_datasource_variable(dashboard: dict) -> None:
    assert dashboard["uid"] and dashboard["title"] and dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"]["uid"] == DATASOURCE, variable["name"]
    for annotation in dashboard["annotations"]["list"]:
        assert annotation["datasource"]["uid"] == DATASOURCE, annotation["name"]
    shown = [p for p in panels(dashboard) if p["type"] != "row"]
    assert len(shown) >= 20
    for panel in shown:
        assert panel["datasource"]["uid"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DATASOURCE, panel["title"]


def test_panels_have_unique_ids_and_do_not_overlap(dashboard: dict) -> None:
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids))
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard):
        box = panel["gridPos"]
        assert box["x"] + box["w"] <= 24, panel["title"]
        for x in range(box["x"], box["x"] + box["w"]):
            for y in range(box["y"], box["y"] + box["h"]):
                assert (x, y) not in cells, f"{panel['title']!r} overlaps {cells[(x, y)]!r}"
                cells[(x, y)] = panel["title"]


def test_every_query_parses(dashboard: dict, tmp_path: Path) -> None:
    """promtool 2.42 has no parse-only command: each query becomes a recording rule of a
    generated rule file, which ``promtool check rules`` parses."""
    queries = dashboard_queries(dashboard)
    rules = [
        {"record": f"dashboard:query_{n}", "expr": concrete(label_values_query(expr), VARIABLES)}
        for n, (_, expr) in enumerate(queries)
    ]
    path = tmp_path / "dashboard-queries.yaml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_every_metric_is_defined() -> None:
    """A fast check against the metric classes; tests/deploy/test_metrics_scrape.py checks
    the same names against real scrapes."""
    defined = defined_metrics()
    for name, dashboard in dashboards().items():
        for where, expr in dashboard_queries(dashboard):
            assert metric_names(expr) <= defined, f"{name} {where}: {metric_names(expr) - defined}"
    for group in rule_groups():
        for rule in group["rules"]:
            assert metric_names(rule["expr"]) <= defined, rule.get("alert")


def test_the_dashboard_shows_what_operators_ask_for(dashboard: dict) -> None:
    used = set().union(*(metric_names(expr) for _, expr in dashboard_queries(dashboard)))
    for needed in (
        "winnow_frames_total",
        "winnow_dead_letters_total",
        "winnow_decision_latency_seconds_bucket",
        "winnow_consumer_lag",
        "winnow_budget_used_ratio",
        "winnow_query_threshold",
        "winnow_labels_last_hour",
        "winnow_labels_per_hour_cap",
        "winnow_model_info",
        "winnow_model_swaps_total",
        "winnow_drift_score",
        "winnow_drift_threshold",
        "winnow_drift_alarms_total",
        "winnow_trainer_rounds_total",
        "winnow_trainer_holdout_accuracy",
        "winnow_trainer_prequential_accuracy",
        "winnow_trainer_releases_total",
        "winnow_label_app_queue_depth",
        "winnow_label_app_labels_total",
        "winnow_labeling_verdict",
    ):
        assert needed in used, needed
    quantiles = [e for _, e in dashboard_queries(dashboard) if "histogram_quantile" in e]
    assert any("winnow_decision_latency_seconds_bucket" in e for e in quantiles)
    annotations = {a["name"] for a in dashboard["annotations"]["list"]}
    assert {"Model versions", "Refused model swaps", "Drift alarms"} <= annotations
