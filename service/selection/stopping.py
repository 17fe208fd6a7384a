"""What the labels say back to the scorer: the stopping rules of active learning.

The scorer remembers what it predicted for each frame it asked about; as labels
arrive on ``winnow.labels`` it scores those predictions (prequential accuracy on
its own requests) and counts ``unlabelable`` answers. Together with the budget
this answers the classic questions: is the budget spent, does the model already
get right what it asks about, can people label what is asked? On an imbalanced
stream plain accuracy flatters a model that always predicts the common class, so
the recall of each true class and their mean (balanced accuracy) are reported too.

Each answer is also handed on (``on_answer``): the query policy measures the
model's competence and the answer rate from them (``QueryPolicy.on_answer``).
"""

import logging
from collections import OrderedDict, deque
from collections.abc import Callable

from aiokafka import AIOKafkaConsumer
from pydantic import ValidationError

from infra.component import Component
from infra.kafka.closing import stop_client
from infra.kafka.consumer import create_consumer
from infra.kafka.settings import KafkaSettings
from schemas.api import LabelingStatus, PolicyState
from schemas.labels import Label
from service.metrics import ScorerMetrics

log = logging.getLogger(__name__)

ACCURATE_ENOUGH = 0.95
UNLABELABLE_TOO_OFTEN = 0.5
MIN_ANSWERS = 20
VERDICTS = (
    "stop_unlabelable",
    "stop_accurate",
    "wait_hourly_cap",
    "wait_budget",
    "keep_few_answers",
    "keep_learning",
)
"""The verdicts' codes (``winnow_labeling_verdict{verdict}``), in the order the rules apply."""

AnswerListener = Callable[[str, str | None], None]
"""Told of each answer to this scorer's requests: the predicted class when it asked, and
the label (None for ``unlabelable``); must return at once."""


class LabelFeedback(Component):
    """Joins labels with the scorer's own requests; reads ``winnow.labels`` from its end.

    The scorer's accounting calls :meth:`requested` for each label request it
    delivered; the root starts and stops the component (``async with``).

    Args:
        kafka: where ``winnow.labels`` is.
        metrics: the scorer's metrics (labels received, request accuracy).
        window: answers in the moving accuracy and unlabelable ratios.
        remember: requests remembered, the oldest forgotten first.
        on_answer: told of each answer (the policy's competence and backpressure).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        metrics: ScorerMetrics,
        *,
        window: int = 200,
        remember: int = 20_000,
        on_answer: AnswerListener | None = None,
    ) -> None:
        super().__init__()
        self._kafka = kafka
        self._metrics = metrics
        self._requests: OrderedDict[str, str] = OrderedDict()
        self._remember = remember
        self._correct: deque[bool] = deque(maxlen=window)
        self._by_class: deque[tuple[str, bool]] = deque(maxlen=window)  # (label, correct)
        self._answered: OrderedDict[str, None] = OrderedDict()
        self._on_answer = on_answer
        self._unlabelable: deque[bool] = deque(maxlen=window)
        self.answered = 0
        self._consumer: AIOKafkaConsumer | None = None

    async def _start(self) -> None:
        self._consumer = create_consumer(
            self._kafka, self._kafka.topics.labels, group_id=None, auto_offset_reset="latest"
        )
        await self._consumer.start()
        self.supervise(self._run(), name="label-feedback")

    async def _stop(self) -> None:
        await self._cancel_supervised()  # before the consumer it reads from goes
        if self._consumer is not None:
            await stop_client(self._consumer, "the label feedback's consumer")
            self._consumer = None

    def requested(self, frame_id: str, predicted: str) -> None:
        """Remembers the prediction behind a label request (bounded, oldest forgotten)."""
        self._requests[frame_id] = predicted
        self._requests.move_to_end(frame_id)
        while len(self._requests) > self._remember:
            self._requests.popitem(last=False)

    def observe(self, label: Label) -> None:
        """Scores one answer against the prediction the scorer made when it asked."""
        predicted = self._requests.get(label.frame_id)
        if predicted is None:
            return  # not asked by this scorer (or forgotten): says nothing about its questions
        first = label.frame_id not in self._answered  # a second opinion is not a new answer
        if first:
            self._answered[label.frame_id] = None
            while len(self._answered) > self._remember:
                self._answered.popitem(last=False)
        self.answered += 1
        unlabelable = label.status == "unlabelable"
        truth = None if unlabelable else label.label
        self._unlabelable.append(unlabelable)
        self._metrics.labels_received.labels(status=label.status).inc()
        if not unlabelable:
            self._correct.append(label.label == predicted)
        if truth is not None:
            self._by_class.append((truth, truth == predicted))
        self._metrics.request_accuracy.set(_ratio(self._correct))
        self._metrics.unlabelable_ratio.set(_ratio(self._unlabelable))
        recall = self.recall()
        for name, value in recall.items():
            self._metrics.request_recall.labels(label=name).set(value)
        if recall:
            self._metrics.request_balanced_accuracy.set(sum(recall.values()) / len(recall))
        if first and self._on_answer is not None:
            self._on_answer(predicted, truth)

    def recall(self) -> dict[str, float]:
        """Per true class among the recent answers: the share the model had predicted right."""
        seen: dict[str, list[int]] = {}
        for name, correct in self._by_class:
            counts = seen.setdefault(name, [0, 0])
            counts[0] += correct
            counts[1] += 1
        return {name: right / total for name, (right, total) in sorted(seen.items())}

    async def _run(self) -> None:
        assert self._consumer is not None
        async for record in self._consumer:
            try:
                self.observe(Label.model_validate_json(record.value or b""))
            except ValidationError:
                log.debug(
                    "ignoring an invalid label topic=%s partition=%d offset=%d",
                    record.topic,
                    record.partition,
                    record.offset,
                )

    def status(self, policy: PolicyState, window_limit: int) -> LabelingStatus:
        """The stopping rules, in figures and in words."""
        return self._assess(policy, window_limit)[0]

    def update_gauges(self, policy: PolicyState, window_limit: int) -> None:
        """Sets the stopping rules' gauges (budget left, stop, verdict code); called on scrape,
        since the budget and the hourly cap change with time as well as with answers."""
        status, code = self._assess(policy, window_limit)
        self._metrics.set_labeling(status, code)

    def _assess(self, policy: PolicyState, window_limit: int) -> tuple[LabelingStatus, str]:
        """The status and the short code of its verdict (``VERDICTS``)."""
        accuracy = _ratio(self._correct) if self._correct else None
        unlabelable = _ratio(self._unlabelable) if self._unlabelable else None
        recall = self.recall()
        left_in_window = max(0, window_limit - round(policy.budget_used * policy.window))
        share = policy.labels_per_hour_share  # this replica's part of the group's cap
        left_this_hour = None if share is None else max(0, share - policy.cap_charged_last_hour)
        code, verdict, stop = _verdict(
            len(self._correct),
            accuracy,
            len(self._unlabelable),
            unlabelable,
            left_in_window,
            left_this_hour,
        )
        status = LabelingStatus(
            answered=self.answered,
            recent_accuracy=accuracy,
            recent_unlabelable=unlabelable,
            recent_balanced_accuracy=sum(recall.values()) / len(recall) if recall else None,
            recent_recall=recall,
            budget_left_in_window=left_in_window,
            labels_left_this_hour=left_this_hour,
            verdict=verdict,
            stop=stop,
        )
        return status, code


def _ratio(values: deque[bool]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _verdict(
    n_correct: int,
    accuracy: float | None,
    n_answers: int,
    unlabelable: float | None,
    left_in_window: int,
    left_this_hour: int | None,
) -> tuple[str, str, bool]:
    """(code, words, stop): the first rule that applies, in the order of ``VERDICTS``."""
    if (
        n_answers >= MIN_ANSWERS
        and unlabelable is not None
        and (unlabelable >= UNLABELABLE_TOO_OFTEN)
    ):
        return (
            "stop_unlabelable",
            f"Stop and look: the labelers could not label {unlabelable:.0%} of the recent "
            "requests. Check the frames and the class list.",
            True,
        )
    if n_correct >= MIN_ANSWERS and accuracy is not None and accuracy >= ACCURATE_ENOUGH:
        return (
            "stop_accurate",
            f"You can stop labeling: the model already got {accuracy:.0%} of the last "
            f"{n_correct} frames it asked about right.",
            True,
        )
    if left_this_hour == 0:
        return (
            "wait_hourly_cap",
            "Waiting: this hour's labeling capacity is used up; requests resume as it frees.",
            False,
        )
    if left_in_window == 0:
        return "wait_budget", "Waiting: the budget for the current window is spent.", False
    if n_correct < MIN_ANSWERS:
        return (
            "keep_few_answers",
            f"Keep labeling: {n_correct} answers so far, at least {MIN_ANSWERS} are needed "
            "to judge the model.",
            False,
        )
    return (
        "keep_learning",
        f"Keep labeling: the model gets {accuracy:.0%} of what it asks about right; the "
        "labels still teach it.",
        False,
    )
