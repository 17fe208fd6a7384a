"""What the scorer has done, counted once a batch's records are acknowledged.

The scorer hands every delivered batch to :meth:`Accounting.delivered`, in
stream order, on the event loop. Counting after delivery (not after the
decision) means the counts, the metrics and the stopping rules describe only
what really reached the topics.
"""

import time
from collections.abc import Callable
from typing import Any

from service.metrics import ScorerMetrics
from service.pipeline.batching import Batch
from service.selection.policy import QueryPolicy
from service.selection.stopping import LabelFeedback

PredictionHook = Callable[[list[dict[str, Any]]], None]
"""Sees the predictions of each delivered batch as their wire dicts (``schemas.Prediction``);
must return at once."""


class Accounting:
    """Frame counts, outcome metrics, the stopping rules' requests and a predictions hook.

    Args:
        metrics: the scorer's metrics.
        policy: read for the threshold and budget gauges.
        feedback: told of each delivered label request (the stopping rules); None for none.
        on_predictions: called with each delivered batch's predictions; None for none.
    """

    def __init__(
        self,
        metrics: ScorerMetrics,
        policy: QueryPolicy,
        *,
        feedback: LabelFeedback | None = None,
        on_predictions: PredictionHook | None = None,
    ) -> None:
        self.counts = {"selected": 0, "not_selected": 0, "invalid": 0}
        self.feedback = feedback
        self._metrics = metrics
        self._policy = policy
        self._on_predictions = on_predictions
        self._selected = metrics.frames.labels(outcome="selected")
        self._not_selected = metrics.frames.labels(outcome="not_selected")
        self._invalid = metrics.frames.labels(outcome="invalid")
        self._held_back = 0

    def delivered(self, batch: Batch, predictions: list[dict[str, Any]]) -> None:
        """Counts one batch whose records are all acknowledged.

        Args:
            batch: the batch, scored and decided.
            predictions: its predictions as built for the wire, one per good frame.
        """
        metrics = self._metrics
        for _, error in batch.poison:
            metrics.dead_letters.labels(reason=error.reason).inc()
        self._invalid.inc(len(batch.poison))
        self.counts["invalid"] += len(batch.poison)
        selected = [p for p in predictions if p["decision"]["selected"]]
        self.counts["selected"] += len(selected)
        self.counts["not_selected"] += len(predictions) - len(selected)
        self._selected.inc(len(selected))
        self._not_selected.inc(len(predictions) - len(selected))
        for prediction in selected:
            if self.feedback is not None:
                self.feedback.requested(prediction["frame_id"], prediction["label"])
            reason = prediction["decision"]["reason"] or "unknown"
            metrics.label_requests.labels(reason=reason).inc()
        self._latency(batch)
        threshold = self._policy.strategy.threshold
        metrics.query_threshold.set(threshold if threshold is not None else float("nan"))
        metrics.budget_used.set(self._policy.budget_used)
        self._selection_gauges()
        if predictions and self._on_predictions is not None:
            self._on_predictions(predictions)

    def _selection_gauges(self) -> None:
        """The uncertainty blend and the labeling queue's backpressure."""
        metrics, policy = self._metrics, self._policy
        metrics.uncertainty_blend.set(policy.blend)
        pressure = policy.backpressure
        if pressure is not None:
            metrics.requests_waiting.set(pressure.waiting)
            metrics.backpressure_factor.set(pressure.factor)
            if pressure.held_back > self._held_back:
                metrics.backpressure_held.inc(pressure.held_back - self._held_back)
                self._held_back = pressure.held_back

    def _latency(self, batch: Batch) -> None:
        """Capture (or broker) time to acknowledged decision, per scored frame."""
        observe, now = self._metrics.decision_latency.observe, time.time()
        for index in batch.good:
            captured = batch.frames[index].captured_epoch()
            if captured is not None:
                observe(max(0.0, now - captured))
