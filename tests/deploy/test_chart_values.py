"""The chart's values: wrong ones fail with a clear message, changes restart pods, all documented.

Also the monitoring objects the chart builds from files other people keep
(``files/prometheus-rules.yaml``, ``files/dashboards/*.json``): rendered from a
copy of the chart with files of our own, so these tests do not depend on theirs.
"""

import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.deploy.chart_render import (
    CHART,
    Obj,
    ci_values,
    helm_sdk,
    leaves,
    merged,
    named,
    of_kind,
    render,
)

helm = helm_sdk()

README = CHART / "README.md"


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scorer": {"replicas": "2"}}, "at '/scorer/replicas': got string, want integer"),
        ({"scorer": {"gpu": {"enabled": "yes"}}}, "at '/scorer/gpu/enabled': got string"),
        ({"kafka": {"partitions": 0}}, "at '/kafka/partitions': minimum"),
        ({"scorer": {"replica": 2}}, "additional properties 'replica' not allowed"),
        ({"kafka": {"sasl": {"password": "hunter2"}}}, "additional properties 'password'"),
        ({"kafka": {"securityProtocol": "TLS"}}, "at '/kafka/securityProtocol'"),
        ({"scorer": {"image": {"digest": "latest"}}}, "at '/scorer/image/digest'"),
        ({"scorer": {"settings": {"WINNOW_ADMIN_TOKEN": "x"}}}, "WINNOW_ADMIN_TOKEN"),
        ({"trainer": {"settings": {"kafka_bootstrap": "x"}}}, "kafka_bootstrap"),
        ({"scorer": {"settings": {"WINNOW_DRIFT_ERT": 20000}}}, "got number, want string"),
        ({"labelApp": {"replicas": 2}}, "at '/labelApp/replicas': maximum"),
        ({"scorer": {"workers": 0}}, "at '/scorer/workers': minimum"),
        ({"scorer": {"workers": "2"}}, "at '/scorer/workers': got string, want integer"),
    ],
)
def test_wrong_values_fail_the_schema_and_name_the_value(
    chart: Any, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmValuesError, match=re.escape(message)):
        render(chart, merged(ci_values("default"), change))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"kafka": {"bootstrap": ""}}, "kafka.bootstrap is required"),
        ({"trainer": {"classes": ["cat"]}}, "trainer.classes needs at least two class names"),
        ({"secrets": {"existingSecret": ""}}, "labelApp needs secrets.existingSecret"),
        (
            {"kafka": {"securityProtocol": "SASL_SSL", "sasl": {"username": "winnow"}}},
            "set kafka.sasl.passwordSecret.name",
        ),
        (
            {"labelApp": {"ingress": {"enabled": True, "tls": {"enabled": True}}}},
            "labelApp.ingress.tls.enabled needs labelApp.ingress.tls.secretName",
        ),
    ],
)
def test_values_that_do_not_fit_together_fail_the_render(
    chart: Any, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(chart, merged(ci_values("default"), change))


def test_defaults_alone_say_what_is_missing(chart: Any) -> None:
    with pytest.raises(helm.HelmRenderError, match=r"kafka\.bootstrap is required"):
        render(chart, {})


def _checksums(objects: list[Obj]) -> dict[str, str]:
    return {
        w["metadata"]["labels"]["app.kubernetes.io/component"]: w["spec"]["template"]["metadata"][
            "annotations"
        ]["checksum/config"]
        for w in of_kind(objects, "Deployment") + of_kind(objects, "StatefulSet")
    }


def test_a_config_change_restarts_the_pods_that_read_it(chart: Any) -> None:
    base = ci_values("full")
    before = _checksums(render(chart, base))
    assert set(before) == {"scorer", "trainer", "label-app", "label-studio-bridge"}
    budget = _checksums(render(chart, merged(base, {"scorer": {"policy": {"budget": 0.03}}})))
    assert budget["scorer"] != before["scorer"]
    assert {k: v for k, v in budget.items() if k != "scorer"} == {
        k: v for k, v in before.items() if k != "scorer"
    }
    topics = _checksums(render(chart, merged(base, {"kafka": {"topicPrefix": "cams."}})))
    assert all(topics[k] != before[k] for k in before), "every role reads the Kafka settings"
    assert _checksums(render(chart, base)) == before, "a render is deterministic"


def _chart_copy(tmp_path: Path, rules: str | None, dashboards: dict[str, Any]) -> Path:
    copy = tmp_path / "winnow"
    shutil.copytree(CHART, copy, ignore=shutil.ignore_patterns("files"))
    (copy / "files" / "dashboards").mkdir(parents=True)
    if rules is not None:
        (copy / "files" / "prometheus-rules.yaml").write_text(rules)
    for name, board in dashboards.items():
        (copy / "files" / "dashboards" / name).write_text(json.dumps(board))
    return copy


MONITORING_ON = {
    "monitoring": {
        "prometheusRule": {"enabled": True, "labels": {"release": "kps"}},
        "dashboards": {"enabled": True, "namespace": "monitoring"},
    }
}
RULES = """\
groups:
  - name: winnow-test
    rules:
      - alert: WinnowScorerDown
        expr: up{job="scorer"} == 0
        for: 5m
        labels: {severity: critical}
        annotations: {summary: "the scorer is down: {{ $labels.pod }}"}
"""


def test_the_prometheus_rule_is_the_rules_file(tmp_path: Path) -> None:
    copy = _chart_copy(tmp_path, RULES, {"winnow.json": {"title": "Winnow"}})
    with helm.Chart.load(copy) as loaded:
        objects = render(loaded, merged(ci_values("default"), MONITORING_ON))
    rule = named(objects, "PrometheusRule", "monitoring")
    assert rule["spec"] == yaml.safe_load(RULES)
    assert rule["metadata"]["labels"]["release"] == "kps"


def test_no_rules_file_no_prometheus_rule(tmp_path: Path) -> None:
    copy = _chart_copy(tmp_path, None, {})
    with helm.Chart.load(copy) as loaded:
        objects = render(loaded, merged(ci_values("default"), MONITORING_ON))
    assert not of_kind(objects, "PrometheusRule")
    assert not [o for o in of_kind(objects, "ConfigMap") if "grafana_dashboard" in str(o)]


def test_a_rules_file_without_groups_fails_the_render(tmp_path: Path) -> None:
    copy = _chart_copy(tmp_path, "rules: []\n", {})
    with helm.Chart.load(copy) as loaded, pytest.raises(helm.HelmRenderError, match="groups"):
        render(loaded, merged(ci_values("default"), MONITORING_ON))


def test_dashboards_reach_grafanas_sidecar(tmp_path: Path) -> None:
    boards = {"scorer.json": {"title": "Scorer"}, "labeling.json": {"title": "Labeling"}}
    copy = _chart_copy(tmp_path, RULES, boards)
    with helm.Chart.load(copy) as loaded:
        objects = render(loaded, merged(ci_values("default"), MONITORING_ON))
    (config_map,) = [
        o for o in of_kind(objects, "ConfigMap") if "grafana_dashboard" in o["metadata"]["labels"]
    ]
    assert config_map["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert config_map["metadata"]["namespace"] == "monitoring"
    assert {k: json.loads(v) for k, v in config_map["data"].items()} == boards


def test_the_shipped_rules_file_renders_as_is(chart: Any) -> None:
    rules = CHART / "files" / "prometheus-rules.yaml"
    if not rules.exists():
        pytest.skip("files/prometheus-rules.yaml is not written yet")
    objects = render(chart, merged(ci_values("default"), MONITORING_ON))
    assert named(objects, "PrometheusRule", "monitoring")["spec"] == yaml.safe_load(
        rules.read_text()
    )


def _documented_keys() -> list[str]:
    return re.findall(r"^\| `([^`]+)` \|", README.read_text(), flags=re.MULTILINE)


def test_the_readme_lists_every_value_once() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    documented = _documented_keys()
    assert len(documented) == len(set(documented)), "a value listed twice"
    assert sorted(leaves(values)) == sorted(documented)


def test_the_readme_shows_the_real_defaults() -> None:
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    rows = re.findall(r"^\| `([^`]+)` \| `([^`]*)` \|", README.read_text(), flags=re.MULTILINE)
    for key, shown in rows:
        value = values
        for part in key.split("."):
            value = value[part]
        assert json.loads(shown) == value, key


def test_the_projects_readme_links_the_chart() -> None:
    readme = (CHART.parents[1] / "README.md").read_text()
    section = readme.split("## Deploying on Kubernetes", 1)[1].split("\n## ", 1)[0]
    assert "helm/winnow/README.md" in section
    assert "helm install" in section


def test_the_readmes_install_command_renders(chart: Any) -> None:
    readme = (CHART.parents[1] / "README.md").read_text()
    section = readme.split("## Deploying on Kubernetes", 1)[1].split("\n## ", 1)[0]
    command = section.split("helm install", 1)[1].split("\nhelm test", 1)[0]
    values: dict[str, Any] = {}
    for setting in re.findall(r"--set '?([^' ]+)'?", command):
        values = merged(values, helm.parse_set_string(setting))
    objects = render(chart, values)
    scorer = named(objects, "Deployment", "scorer")["spec"]["template"]["spec"]["containers"][0]
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in scorer["env"]}
    assert env["WINNOW_KAFKA_SASL_PASSWORD"] == {"name": "winnow", "key": "password"}
    assert env["WINNOW_ADMIN_TOKEN"]["name"] == "winnow-app"


def _resolve(schema: dict[str, Any], node: dict[str, Any]) -> dict[str, Any]:
    ref = node.get("$ref")
    return schema["definitions"][ref.rsplit("/", 1)[1]] if ref else node


def _same_keys(schema: dict[str, Any], node: dict[str, Any], values: Any, path: str) -> None:
    node = _resolve(schema, node)
    if "properties" not in node or not isinstance(values, dict):
        return
    assert set(values) == set(node["properties"]), f"{path or 'values'}: values and schema differ"
    for key, value in values.items():
        _same_keys(schema, node["properties"][key], value, f"{path}.{key}".lstrip("."))


def test_the_schema_is_valid_and_describes_exactly_values_yaml(chart: Any) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = chart.schema
    jsonschema.Draft7Validator.check_schema(schema)
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.validate(values, schema, cls=jsonschema.Draft7Validator)
    _same_keys(schema, schema, values, "")
