"""The scorer's metrics that the dashboard and the alert rules read."""

from prometheus_client import generate_latest

from schemas.api import LabelingStatus, PolicyState
from service.config import DriftSettings
from service.drift.monitor import DriftMonitor
from service.metrics import ScorerMetrics


def _value(metrics: ScorerMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_the_provider_follows_the_model() -> None:
    metrics = ScorerMetrics()
    metrics.set_model("v1", "CUDAExecutionProvider")
    metrics.set_model("v2", "CPUExecutionProvider")
    assert _value(metrics, "winnow_inference_provider", provider="CPUExecutionProvider") == 1
    assert _value(metrics, "winnow_inference_provider", provider="CUDAExecutionProvider") is None
    assert _value(metrics, "winnow_model_info", version="v2") == 1


def test_a_calibrated_detector_exposes_its_alarms_from_zero() -> None:
    metrics = ScorerMetrics()
    assert b"winnow_drift_alarms_total{" not in generate_latest(metrics.registry)
    metrics.set_drift_threshold("embedding", 0.25)
    assert _value(metrics, "winnow_drift_alarms_total", detector="embedding") == 0
    assert _value(metrics, "winnow_drift_threshold", detector="embedding") == 0.25


def test_budget_cap_and_verdict_gauges() -> None:
    metrics = ScorerMetrics()
    policy = PolicyState(
        name="variable",
        utility="entropy",
        budget=0.05,
        effective_budget=0.15,
        window=1000,
        labels_per_hour=None,
        budget_used=0.15,
        labels_last_hour=42,
        seen=1000,
        selected=150,
    )
    metrics.set_policy(policy)
    assert _value(metrics, "winnow_budget_ratio") == 0.15  # the boosted budget in force
    assert _value(metrics, "winnow_labels_last_hour") == 42
    assert _value(metrics, "winnow_labels_per_hour_cap") == 0  # no cap
    waiting = LabelingStatus(answered=3, budget_left_in_window=0, verdict="Waiting", stop=False)
    metrics.set_labeling(waiting, "keep_few_answers")
    metrics.set_labeling(waiting, "wait_budget")
    assert _value(metrics, "winnow_budget_left_in_window") == 0
    assert _value(metrics, "winnow_labeling_stop") == 0
    assert _value(metrics, "winnow_labeling_verdict", verdict="wait_budget") == 1
    assert _value(metrics, "winnow_labeling_verdict", verdict="keep_few_answers") is None


def test_the_drift_monitor_exposes_each_detector_s_alarms_from_startup() -> None:
    metrics = ScorerMetrics()
    DriftMonitor(DriftSettings(detectors=["embedding", "uncertainty"]), None, metrics)
    assert _value(metrics, "winnow_drift_alarms_total", detector="uncertainty") == 0
    assert _value(metrics, "winnow_drift_alarms_total", detector="prediction") is None
