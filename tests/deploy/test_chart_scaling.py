"""The scorer's replicas: KEDA on the consumer group's lag, bounded by the partitions.

A scorer replica without a frames partition has no work and never becomes ready,
so no setting may ask for more replicas than the frames topic has partitions.
"""

import re
from typing import Any

import pytest

from service.pipeline.checkpoint import DRAIN_TIMEOUT_S
from tests.deploy.chart_render import (
    CHART,
    Obj,
    ci_values,
    config_of,
    helm_sdk,
    merged,
    named,
    of_kind,
    render,
)

helm = helm_sdk()


@pytest.fixture(scope="module")
def chart() -> Any:
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def keda(chart: Any) -> list[Obj]:
    return render(chart, ci_values("sasl-ssl"))


def _scorer(objects: list[Obj]) -> Obj:
    return named(objects, "Deployment", "scorer")


def test_without_keda_the_chart_sets_the_replicas(chart: Any) -> None:
    objects = render(chart, ci_values("gpu"))
    assert _scorer(objects)["spec"]["replicas"] == 4
    assert not of_kind(objects, "ScaledObject")


def test_with_keda_the_deployment_leaves_replicas_to_it(keda: list[Obj]) -> None:
    deployment = _scorer(keda)
    assert "replicas" not in deployment["spec"]
    scaled = named(keda, "ScaledObject", "scorer")
    assert scaled["spec"]["scaleTargetRef"]["name"] == deployment["metadata"]["name"]


def test_keda_reads_the_lag_of_the_scorers_group_on_the_frames_topic(keda: list[Obj]) -> None:
    container = _scorer(keda)["spec"]["template"]["spec"]["containers"][0]
    config = config_of(keda, container)
    trigger = named(keda, "ScaledObject", "scorer")["spec"]["triggers"][0]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["bootstrapServers"] == config["WINNOW_KAFKA_BOOTSTRAP"]
    assert meta["consumerGroup"] == config["WINNOW_SCORER_GROUP_ID"]
    assert meta["topic"] == config["WINNOW_KAFKA_TOPIC_PREFIX"] + "frames"
    assert meta["sasl"] == "scram_sha512"
    assert meta["tls"] == "enable"
    spec = named(keda, "ScaledObject", "scorer")["spec"]
    assert spec["maxReplicaCount"] <= int(config["WINNOW_KAFKA_PARTITIONS"])


def test_keda_authenticates_with_the_scorers_own_secrets(keda: list[Obj]) -> None:
    scaled = named(keda, "ScaledObject", "scorer")
    auth = named(keda, "TriggerAuthentication", "scorer")
    assert scaled["spec"]["triggers"][0]["authenticationRef"]["name"] == auth["metadata"]["name"]
    refs = {r["parameter"]: (r["name"], r["key"]) for r in auth["spec"]["secretTargetRef"]}
    assert refs == {
        "password": ("winnow", "password"),
        "ca": ("my-cluster-cluster-ca-cert", "ca.crt"),
        "cert": ("winnow-tls", "user.crt"),
        "key": ("winnow-tls", "user.key"),
    }
    # The user name is not secret: KEDA reads it from the scorer container's environment.
    (username,) = auth["spec"]["env"]
    container = _scorer(keda)["spec"]["template"]["spec"]["containers"][0]
    assert username["containerName"] == container["name"]
    assert config_of(keda, container)[username["name"]] == "winnow"


def test_plaintext_keda_needs_no_authentication(chart: Any) -> None:
    values = merged(ci_values("default"), {"scorer": {"autoscaling": {"keda": {"enabled": True}}}})
    objects = render(chart, values)
    trigger = named(objects, "ScaledObject", "scorer")["spec"]["triggers"][0]
    assert "authenticationRef" not in trigger
    assert "sasl" not in trigger["metadata"] and "tls" not in trigger["metadata"]
    assert not of_kind(objects, "TriggerAuthentication")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"scorer": {"autoscaling": {"keda": {"enabled": True, "maxReplicaCount": 4}}}},
            "scorer.autoscaling.keda.maxReplicaCount (4) is larger than kafka.partitions (3)",
        ),
        (
            {"scorer": {"replicas": 5}},
            "scorer.replicas (5) is larger than kafka.partitions (3)",
        ),
        (
            {
                "scorer": {
                    "autoscaling": {
                        "keda": {"enabled": True, "minReplicaCount": 3, "maxReplicaCount": 2}
                    }
                }
            },
            "minReplicaCount (3) is larger than maxReplicaCount (2)",
        ),
    ],
)
def test_more_replicas_than_partitions_fail_the_render(
    chart: Any, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(chart, merged(ci_values("default"), change))


def test_more_partitions_allow_more_replicas(chart: Any) -> None:
    values = merged(
        ci_values("default"),
        {
            "kafka": {"partitions": 12},
            "scorer": {"autoscaling": {"keda": {"enabled": True, "maxReplicaCount": 12}}},
        },
    )
    assert named(render(chart, values), "ScaledObject", "scorer")["spec"]["maxReplicaCount"] == 12


def test_a_rollout_frees_a_partition_before_it_starts_a_scorer(chart: Any) -> None:
    # With a surge pod, replicas = partitions leaves one pod without a partition, never
    # ready, and the rollout waits on it for ever.
    strategy = _scorer(render(chart, ci_values("default")))["spec"]["strategy"]
    assert strategy["rollingUpdate"] == {"maxSurge": 0, "maxUnavailable": 1}


def test_the_grace_period_outlasts_the_drain(chart: Any) -> None:
    objects = render(chart, ci_values("default"))
    grace = _scorer(objects)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    # SIGTERM: the batches in flight get DRAIN_TIMEOUT_S, then offsets are committed, the
    # producer flushed and the group left.
    assert grace >= DRAIN_TIMEOUT_S + 15
    floor = chart.schema["properties"]["scorer"]["properties"]["terminationGracePeriodSeconds"]
    assert floor["minimum"] >= DRAIN_TIMEOUT_S + 15
    with pytest.raises(helm.HelmValuesError, match="terminationGracePeriodSeconds"):
        render(
            chart, merged(ci_values("default"), {"scorer": {"terminationGracePeriodSeconds": 30}})
        )


def test_disruption_budgets_cover_every_workload(chart: Any) -> None:
    objects = render(chart, ci_values("full"))
    budgets = of_kind(objects, "PodDisruptionBudget")
    workloads = of_kind(objects, "Deployment") + of_kind(objects, "StatefulSet")
    assert len(budgets) == len(workloads) == 4
    for budget in budgets:
        selector = budget["spec"]["selector"]["matchLabels"]
        assert budget["spec"]["maxUnavailable"] == 1
        selected = [
            w
            for w in workloads
            if selector.items() <= w["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert len(selected) == 1, budget["metadata"]["name"]


# -- workers: scorer processes per pod (winnow serve --workers N) ----------------------------


def test_the_scorer_runs_as_many_workers_as_the_values_ask(chart: Any) -> None:
    def workers(values: dict[str, Any]) -> str:
        objects = render(chart, values)
        container = _scorer(objects)["spec"]["template"]["spec"]["containers"][0]
        return config_of(objects, container)["WINNOW_WORKERS"]

    assert workers(ci_values("default")) == "1"  # a single process, as before
    change = {"kafka": {"partitions": 8}, "scorer": {"workers": 4, "replicas": 2}}
    assert workers(merged(ci_values("default"), change)) == "4"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"scorer": {"replicas": 2, "workers": 2}},  # kafka.partitions: 3
            "scorer.replicas (2) × scorer.workers (2) is larger than kafka.partitions (3)",
        ),
        (
            {
                "kafka": {"partitions": 4},
                "scorer": {
                    "workers": 2,
                    "autoscaling": {"keda": {"enabled": True, "maxReplicaCount": 3}},
                },
            },
            "maxReplicaCount (3) × scorer.workers (2) is larger than kafka.partitions (4)",
        ),
    ],
)
def test_more_workers_in_all_than_partitions_fail_the_render(
    chart: Any, change: dict[str, Any], message: str
) -> None:
    # Every worker must hold a partition for its pod to be ready.
    with pytest.raises(helm.HelmRenderError, match=re.escape(message)):
        render(chart, merged(ci_values("default"), change))


def test_workers_up_to_the_partitions_render(chart: Any) -> None:
    values = merged(ci_values("default"), {"scorer": {"workers": 3}})  # 1 replica, 3 partitions
    assert _scorer(render(chart, values))["spec"]["replicas"] == 1
