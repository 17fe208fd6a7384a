"""The stopping rules: labels scored against the scorer's own requests."""

import math

from infra.kafka.settings import KafkaSettings
from schemas.api import PolicyState
from schemas.labels import Label
from service.metrics import ScorerMetrics
from service.selection.stopping import LabelFeedback


def _policy(**kw: object) -> PolicyState:
    base = dict(
        name="variable",
        utility="entropy",
        budget=0.1,
        window=100,
        budget_used=0.05,
        labels_last_hour=0,
        seen=100,
        selected=5,
    )
    return PolicyState(**{**base, **kw})


def _feedback() -> tuple[LabelFeedback, ScorerMetrics]:
    metrics = ScorerMetrics()
    return LabelFeedback(KafkaSettings(bootstrap="127.0.0.1:1"), metrics, window=50), metrics


def test_keep_labeling_until_enough_answers() -> None:
    feedback, _ = _feedback()
    status = feedback.status(_policy(), window_limit=10)
    assert not status.stop and status.recent_accuracy is None
    assert status.budget_left_in_window == 5 and "Keep labeling" in status.verdict


def test_stop_when_the_model_already_gets_its_questions_right() -> None:
    feedback, metrics = _feedback()
    for i in range(40):
        feedback.requested(f"f{i}", "cat")
        feedback.observe(Label(frame_id=f"f{i}", label="cat" if i else "dog"))
    feedback.observe(Label(frame_id="never-asked", label="dog"))  # ignored
    status = feedback.status(_policy(), window_limit=10)
    assert status.answered == 40 and status.recent_accuracy == 39 / 40
    assert status.stop and "can stop" in status.verdict
    assert metrics.request_accuracy._value.get() == 39 / 40


def test_stop_and_look_when_people_cannot_label() -> None:
    feedback, metrics = _feedback()
    for i in range(30):
        feedback.requested(f"f{i}", "cat")
        status = "unlabelable" if i % 3 else "labeled"
        feedback.observe(
            Label(frame_id=f"f{i}", label="dog" if status == "labeled" else None, status=status)
        )
    state = feedback.status(_policy(), window_limit=10)
    assert state.stop and state.recent_unlabelable == 20 / 30
    assert "could not label" in state.verdict
    assert math.isclose(metrics.unlabelable_ratio._value.get(), 20 / 30)


def test_budget_spent_and_hourly_cap_are_reported() -> None:
    feedback, _ = _feedback()
    spent = feedback.status(_policy(budget_used=0.1), window_limit=10)
    assert spent.budget_left_in_window == 0 and "window is spent" in spent.verdict
    capped = feedback.status(
        _policy(
            labels_per_hour=30,
            labels_last_hour=30,
            labels_per_hour_share=30,
            cap_charged_last_hour=30,
        ),
        window_limit=10,
    )
    assert capped.labels_left_this_hour == 0 and "capacity" in capped.verdict


def test_requests_are_remembered_within_a_bound() -> None:
    feedback = LabelFeedback(KafkaSettings(bootstrap="127.0.0.1:1"), ScorerMetrics(), remember=3)
    for i in range(5):
        feedback.requested(f"f{i}", "cat")
    feedback.observe(Label(frame_id="f0", label="cat"))  # forgotten
    feedback.observe(Label(frame_id="f4", label="cat"))
    assert feedback.answered == 1


def test_per_class_recall_and_balanced_accuracy_show_what_plain_accuracy_hides() -> None:
    """A screening model that calls nearly everything normal: 84 % accurate on its requests,
    but it finds one pneumonia in five."""
    feedback, metrics = _feedback()
    for i in range(50):
        truth = "pneumonia" if i % 5 == 0 else "normal"
        predicted = "pneumonia" if i in (0, 1, 2) else "normal"  # one of them right, two wrong
        feedback.requested(f"f{i}", predicted)
        feedback.observe(Label(frame_id=f"f{i}", label=truth))
    status = feedback.status(_policy(), window_limit=10)
    assert status.recent_accuracy == (1 + 38) / 50
    assert status.recent_recall == {"normal": 38 / 40, "pneumonia": 1 / 10}
    assert status.recent_balanced_accuracy == (38 / 40 + 1 / 10) / 2
    assert metrics.request_recall.labels(label="pneumonia")._value.get() == 1 / 10
    assert metrics.request_balanced_accuracy._value.get() == (38 / 40 + 1 / 10) / 2


def test_each_request_answered_reaches_the_policy_once() -> None:
    heard: list[tuple[str, str | None]] = []
    feedback = LabelFeedback(
        KafkaSettings(bootstrap="127.0.0.1:1"),
        ScorerMetrics(),
        on_answer=lambda predicted, label: heard.append((predicted, label)),
    )
    feedback.requested("a", "cat")
    feedback.requested("b", "dog")
    feedback.observe(Label(frame_id="a", label="dog"))
    feedback.observe(Label(frame_id="a", label="cat"))  # a second opinion on the same frame
    feedback.observe(Label(frame_id="b", label=None, status="unlabelable"))
    feedback.observe(Label(frame_id="z", label="cat"))  # not this scorer's request
    assert heard == [("cat", "dog"), ("dog", None)]
    assert feedback.answered == 3


def test_the_verdict_is_a_gauge_with_a_short_code() -> None:
    feedback, metrics = _feedback()

    def verdicts() -> dict[str, float]:
        return {
            s.labels["verdict"]: s.value
            for m in metrics.labeling_verdict.collect()
            for s in m.samples
        }

    feedback.update_gauges(_policy(), window_limit=10)
    assert verdicts() == {"keep_few_answers": 1}
    feedback.update_gauges(
        _policy(
            labels_per_hour=20,
            labels_last_hour=20,
            labels_per_hour_share=20,
            cap_charged_last_hour=20,
        ),
        window_limit=10,
    )
    assert verdicts() == {"wait_hourly_cap": 1}
    assert metrics.registry.get_sample_value("winnow_labeling_stop") == 0
    assert metrics.registry.get_sample_value("winnow_budget_left_in_window") == 5


def test_a_replica_waits_when_its_share_of_the_group_cap_is_spent() -> None:
    feedback, _ = _feedback()
    state = _policy(
        labels_per_hour=30,
        labels_last_hour=4,  # its own requests; the other 6 on its partitions came before a move
        labels_per_hour_share=10,
        cap_charged_last_hour=10,
    )
    status = feedback.status(state, window_limit=10)
    assert status.labels_left_this_hour == 0 and "capacity is used up" in status.verdict
