"""helm/winnow renders objects Kubernetes accepts, locked down and wired together.

Every value set under ``helm/winnow/ci`` is rendered offline with the Helm SDK;
built-in objects are checked against Kubernetes' own schemas (strict, one fixed
version), custom resources against small schemas of the fields the chart uses.
"""

import re
from typing import Any

import pytest

from tests.deploy.chart_render import (
    CHART,
    CI_VALUES,
    KUBE_VERSION,
    VALUE_SETS,
    Obj,
    ci_values,
    config_of,
    helm_sdk,
    named,
    notes,
    of_kind,
    pod_specs,
    render,
)

helm = helm_sdk()
kubernetes_validate = pytest.importorskip(
    "kubernetes_validate", reason="kubernetes-validate is not installed: the chart is untested"
)
jsonschema = pytest.importorskip("jsonschema")

BUILT_IN = {
    "ConfigMap",
    "Deployment",
    "Ingress",
    "NetworkPolicy",
    "Pod",
    "PodDisruptionBudget",
    "Service",
    "ServiceAccount",
    "StatefulSet",
}
SECRET_ISH = re.compile(r"PASSWORD|TOKEN|SECRET|API_KEY|SIGNING_KEY|JAAS")


def _strict(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    return {
        "type": "object",
        "additionalProperties": False,
        "properties": properties,
        "required": required or list(properties),
    }


_STR = {"type": "string", "minLength": 1}
_META = _strict(
    {"name": _STR, "namespace": _STR, "labels": {"type": "object"}, "annotations": {}},
    ["name", "namespace", "labels"],
)
_MATCH_LABELS = _strict({"matchLabels": {"type": "object", "minProperties": 1}})


def _resource(api_version: str, kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return _strict(
        {
            "apiVersion": {"const": api_version},
            "kind": {"const": kind},
            "metadata": _META,
            "spec": spec,
        }
    )


# The fields of the custom resources the chart renders, as their operators read them.
CRD_SCHEMAS = {
    "ServiceMonitor": _resource(
        "monitoring.coreos.com/v1",
        "ServiceMonitor",
        _strict(
            {
                "selector": _MATCH_LABELS,
                "namespaceSelector": _strict({"matchNames": {"type": "array", "items": _STR}}),
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(
                        {
                            "port": _STR,
                            "path": {"type": "string", "pattern": "^/"},
                            "interval": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                            "scrapeTimeout": {"type": "string", "pattern": "^[0-9]+(ms|s|m|h)$"},
                        }
                    ),
                },
            }
        ),
    ),
    "PrometheusRule": _resource(
        "monitoring.coreos.com/v1",
        "PrometheusRule",
        _strict(
            {
                "groups": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(
                        {
                            "name": _STR,
                            "interval": {"type": "string"},
                            "rules": {
                                "type": "array",
                                "items": {
                                    "type": "object",
                                    "additionalProperties": False,
                                    "required": ["expr"],
                                    "oneOf": [{"required": ["alert"]}, {"required": ["record"]}],
                                    "properties": {
                                        "alert": _STR,
                                        "record": _STR,
                                        "expr": {"type": ["string", "integer"]},
                                        "for": {"type": "string"},
                                        "keep_firing_for": {"type": "string"},
                                        "labels": {"type": "object"},
                                        "annotations": {"type": "object"},
                                    },
                                },
                            },
                        },
                        ["name", "rules"],
                    ),
                }
            }
        ),
    ),
    "ScaledObject": _resource(
        "keda.sh/v1alpha1",
        "ScaledObject",
        _strict(
            {
                "scaleTargetRef": _strict(
                    {
                        "apiVersion": {"const": "apps/v1"},
                        "kind": {"const": "Deployment"},
                        "name": _STR,
                    }
                ),
                "minReplicaCount": {"type": "integer", "minimum": 0},
                "maxReplicaCount": {"type": "integer", "minimum": 1},
                "pollingInterval": {"type": "integer", "minimum": 1},
                "cooldownPeriod": {"type": "integer", "minimum": 0},
                "triggers": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(
                        {
                            "type": {"const": "kafka"},
                            # KEDA reads trigger metadata as strings only.
                            "metadata": {
                                "type": "object",
                                "required": [
                                    "bootstrapServers",
                                    "consumerGroup",
                                    "topic",
                                    "lagThreshold",
                                ],
                                "additionalProperties": {"type": "string"},
                            },
                            "authenticationRef": _strict({"name": _STR}),
                        },
                        ["type", "metadata"],
                    ),
                },
            }
        ),
    ),
    "TriggerAuthentication": _resource(
        "keda.sh/v1alpha1",
        "TriggerAuthentication",
        _strict(
            {
                "env": {
                    "type": "array",
                    "items": _strict({"parameter": _STR, "name": _STR, "containerName": _STR}),
                },
                "secretTargetRef": {
                    "type": "array",
                    "minItems": 1,
                    "items": _strict(
                        {
                            "parameter": {"enum": ["password", "ca", "cert", "key"]},
                            "name": _STR,
                            "key": _STR,
                        }
                    ),
                },
            },
            ["secretTargetRef"],
        ),
    ),
}


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def rendered(chart: Any) -> dict[str, list[Obj]]:
    """Every ci value set, rendered once for the module."""
    return {name: render(chart, ci_values(name)) for name in VALUE_SETS}


def test_the_ci_value_sets_cover_the_deployments_users_run() -> None:
    names = {p.name for p in CI_VALUES}
    assert {
        "default-values.yaml",
        "full-values.yaml",
        "sasl-ssl-values.yaml",
        "gpu-values.yaml",
        "cpu-only-values.yaml",
    } <= names


@pytest.mark.parametrize("values", VALUE_SETS)
def test_every_object_is_valid_for_kubernetes_or_its_operator(
    rendered: dict[str, list[Obj]], values: str
) -> None:
    objects = rendered[values]
    assert objects
    for obj in objects:
        where = f"{values}: {obj['kind']}/{obj['metadata']['name']}"
        if obj["kind"] in BUILT_IN:
            try:
                kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
            except kubernetes_validate.ValidationError as error:
                path = ".".join(str(p) for p in error.path)
                pytest.fail(f"{where}: {path}: {error.message}")
        else:
            assert obj["kind"] in CRD_SCHEMAS, f"{where}: a kind nobody checks"
            jsonschema.validate(obj, CRD_SCHEMAS[obj["kind"]])
        assert obj["metadata"]["namespace"] in ("winnow", "monitoring"), where


@pytest.mark.parametrize("values", CI_VALUES, ids=lambda p: p.name)
def test_helm_lint_finds_nothing(values: Any) -> None:
    import yaml

    report = helm.lint(
        CHART, yaml.safe_load(values.read_text()), strict=True, kube_version=f"v{KUBE_VERSION}"
    )
    assert report["errors"] == []
    serious = [m for m in report["messages"] if m["severity"] >= 2]
    assert serious == []


def test_the_chart_is_helm_3_and_later_for_kubernetes_1_25_and_later(chart: Any) -> None:
    assert chart.metadata["apiVersion"] == "v2"
    assert chart.metadata["kubeVersion"] == ">=1.25.0-0"


def test_the_full_set_renders_every_kind(rendered: dict[str, list[Obj]]) -> None:
    kinds = {o["kind"] for o in rendered["full"]}
    assert kinds >= BUILT_IN - {"Pod"} | {"ServiceMonitor", "ScaledObject", "TriggerAuthentication"}
    assert {"Deployment", "StatefulSet", "Service"} <= {o["kind"] for o in rendered["default"]}


@pytest.mark.parametrize("values", VALUE_SETS)
def test_every_pod_runs_locked_down(rendered: dict[str, list[Obj]], values: str) -> None:
    pods = list(pod_specs(rendered[values]))
    assert pods
    for name, _, spec in pods:
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True, name
        assert pod["runAsUser"] > 0, name
        assert pod["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert spec["automountServiceAccountToken"] is False, name
        tmp_volumes = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
        for container in spec["containers"]:
            ctx = container["securityContext"]
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["capabilities"] == {"drop": ["ALL"]}, name
            assert ctx["runAsNonRoot"] is True and ctx["runAsUser"] > 0, name
            assert ctx["seccompProfile"] == {"type": "RuntimeDefault"}, name
            tmp = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
            assert len(tmp) == 1 and tmp[0]["name"] in tmp_volumes, f"{name}: /tmp not an emptyDir"


def test_the_gpu_scorer_gets_its_gpu_toleration_and_nodes(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["gpu"]
    scorer = named(objects, "Deployment", "scorer")["spec"]["template"]["spec"]
    container = scorer["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in scorer[
        "tolerations"
    ]
    assert any(t["key"] == "dedicated" for t in scorer["tolerations"]), "the user's toleration"
    assert scorer["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert scorer["runtimeClassName"] == "nvidia"
    config = config_of(objects, container)
    assert config["WINNOW_GPU_REQUESTED"] == "true"
    assert config["WINNOW_DEVICE"] == "auto"
    trainer = named(objects, "StatefulSet", "trainer")["spec"]["template"]["spec"]
    assert trainer["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert config_of(objects, trainer["containers"][0])["WINNOW_TRAINER_DEVICE"] == "cuda"


def test_a_cpu_only_install_asks_for_no_gpu(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["cpu-only"]
    for name, _, spec in pod_specs(objects):
        assert "runtimeClassName" not in spec, name
        assert not any("nvidia" in str(t) for t in spec.get("tolerations", [])), name
        for container in spec["containers"]:
            assert "nvidia.com/gpu" not in str(container["resources"]), name
    scorer = named(objects, "Deployment", "scorer")["spec"]["template"]["spec"]["containers"][0]
    assert config_of(objects, scorer)["WINNOW_DEVICE"] == "cpu"
    assert not of_kind(objects, "Ingress")
    assert all("label-app" not in o["metadata"]["name"] for o in objects)


def _pods_selected(objects: list[Obj], selector: dict[str, str]) -> list[tuple[str, Obj]]:
    return [
        (name, spec)
        for name, meta, spec in pod_specs(objects)
        if selector.items() <= meta["labels"].items()
    ]


@pytest.mark.parametrize("values", VALUE_SETS)
def test_services_select_one_workload_and_target_its_named_ports(
    rendered: dict[str, list[Obj]], values: str
) -> None:
    objects = rendered[values]
    for service in of_kind(objects, "Service"):
        name = service["metadata"]["name"]
        pods = _pods_selected(objects, service["spec"]["selector"])
        assert len(pods) == 1, f"{name} selects {[p for p, _ in pods]}"
        container_ports = {p["name"] for c in pods[0][1]["containers"] for p in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["name"] and port["targetPort"] in container_ports, name


@pytest.mark.parametrize("values", VALUE_SETS)
def test_probes_ask_named_ports(rendered: dict[str, list[Obj]], values: str) -> None:
    for name, _, spec in pod_specs(rendered[values]):
        for container in spec["containers"]:
            ports = {p["name"] for p in container.get("ports", [])}
            for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                if probe in container:
                    assert container[probe]["httpGet"]["port"] in ports, f"{name} {probe}"
            if "ports" in container:
                assert "livenessProbe" in container and "readinessProbe" in container, name


def test_the_scorer_probes_health_readiness_and_startup(rendered: dict[str, list[Obj]]) -> None:
    container = named(rendered["default"], "Deployment", "scorer")["spec"]["template"]["spec"][
        "containers"
    ][0]
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/healthz"
    # The model loads (or the first release arrives) within the startup probe's allowance.
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 300


def test_service_monitors_scrape_named_service_ports(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["full"]
    monitors = of_kind(objects, "ServiceMonitor")
    assert {m["metadata"]["labels"]["app.kubernetes.io/component"] for m in monitors} == {
        "scorer",
        "trainer",
        "label-app",
    }
    services = of_kind(objects, "Service")
    for monitor in monitors:
        assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
        selector = monitor["spec"]["selector"]["matchLabels"]
        matched = [s for s in services if selector.items() <= s["metadata"]["labels"].items()]
        assert len(matched) == 1, monitor["metadata"]["name"]
        port_names = {p["name"] for p in matched[0]["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= port_names
        assert all(e["path"] == "/metrics" for e in monitor["spec"]["endpoints"])
        # The job label is the Service's name; the alert rules find each role by it
        # (files/prometheus-rules.yaml: job=~".*scorer.*" and so on).
        component = monitor["metadata"]["labels"]["app.kubernetes.io/component"]
        assert "jobLabel" not in monitor["spec"]
        assert component in matched[0]["metadata"]["name"]


@pytest.mark.parametrize("values", VALUE_SETS)
def test_secrets_arrive_only_by_reference(rendered: dict[str, list[Obj]], values: str) -> None:
    objects = rendered[values]
    assert not of_kind(objects, "Secret"), "the chart creates no Secret"
    for config_map in of_kind(objects, "ConfigMap"):
        secretish = [k for k in config_map.get("data", {}) if SECRET_ISH.search(k)]
        assert not secretish, f"{config_map['metadata']['name']} holds {secretish}"
    for name, _, spec in pod_specs(objects):
        for container in spec["containers"]:
            for env in container.get("env", []):
                if SECRET_ISH.search(env["name"]):
                    assert "value" not in env, f"{name}: {env['name']} is a literal"
                    assert "secretKeyRef" in env["valueFrom"], f"{name}: {env['name']}"


def test_strimzi_secrets_plug_in_unchanged(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["sasl-ssl"]
    for name, _, spec in pod_specs(objects):
        if name.endswith("test-readyz"):
            continue
        container = spec["containers"][0]
        env = {e["name"]: e for e in container.get("env", [])}
        assert env["WINNOW_KAFKA_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"] == {
            "name": "winnow",
            "key": "password",
        }, name
        config = config_of(objects, container)
        assert config["WINNOW_KAFKA_SECURITY_PROTOCOL"] == "SASL_SSL"
        assert config["WINNOW_KAFKA_SASL_MECHANISM"] == "SCRAM-SHA-512"
        volumes = {v["name"]: v for v in spec["volumes"]}
        mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
        files = {
            "WINNOW_KAFKA_SSL_CAFILE": ("my-cluster-cluster-ca-cert", "ca.crt"),
            "WINNOW_KAFKA_SSL_CERTFILE": ("winnow-tls", "user.crt"),
            "WINNOW_KAFKA_SSL_KEYFILE": ("winnow-tls", "user.key"),
        }
        for setting, (secret, key) in files.items():
            directory, _, filename = config[setting].rpartition("/")
            mount = mounts[directory]
            assert mount["readOnly"] is True
            source = volumes[mount["name"]]["secret"]
            assert source["secretName"] == secret, setting
            assert {"key": key, "path": filename} in source["items"], setting


def test_network_policies_always_allow_dns(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["full"]
    policies = of_kind(objects, "NetworkPolicy")
    assert len(policies) == 4
    for policy in policies:
        dns = [r for r in policy["spec"]["egress"] if any(p["port"] == 53 for p in r["ports"])]
        assert dns and "to" not in dns[0], policy["metadata"]["name"]
        assert {p["protocol"] for p in dns[0]["ports"]} == {"UDP", "TCP"}
        assert _pods_selected(objects, policy["spec"]["podSelector"]["matchLabels"])
    prometheus = ci_values("full")["networkPolicy"]["metricsFrom"][0]
    for policy in policies:
        sources = policy["spec"]["ingress"][0].get("from")
        assert sources is None or prometheus in sources, "Prometheus may scrape every role"
    scorer = named(objects, "NetworkPolicy", "scorer")
    sources = scorer["spec"]["ingress"][0]["from"]
    test_pod = named(objects, "Pod", "test")
    assert any(
        s.get("podSelector", {}).get("matchLabels", {}).items()
        <= test_pod["metadata"]["labels"].items()
        for s in sources
        if "podSelector" in s
    ), "the helm test pod may reach the scorer"


def test_helm_test_asks_the_scorers_readyz(rendered: dict[str, list[Obj]]) -> None:
    objects = rendered["default"]
    pod = named(objects, "Pod", "test")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    script = " ".join(pod["spec"]["containers"][0]["command"])
    service = named(objects, "Service", "scorer")
    assert f"http://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/readyz" in (
        script
    )


def test_notes_say_how_to_reach_each_part(chart: Any) -> None:
    text = notes(chart, ci_values("full"))
    assert "helm test vision" in text
    assert "https://label.example.com/" in text
    assert "/webhook" in text
