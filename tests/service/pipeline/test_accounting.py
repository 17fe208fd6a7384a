"""The accounting counts delivered batches: counts, metrics, the stopping rules, the hook."""

from typing import Any

import numpy as np

from infra.kafka.settings import KafkaSettings
from schemas.frames import FrameHeaders, FrameOrigin
from schemas.labels import Label
from service.errors import PoisonRecord
from service.metrics import ScorerMetrics
from service.model.inference import OnnxModel
from service.pipeline.accounting import Accounting
from service.pipeline.batching import Batch, InboundFrame
from service.pipeline.records import batch_records
from service.selection.policy import QueryPolicy
from service.selection.stopping import LabelFeedback


def _batch(model: OnnxModel) -> Batch:
    frames = [
        InboundFrame(
            FrameOrigin(topic="t", partition=0, offset=i), b"cam", b"x", FrameHeaders(), (), None
        )
        for i in range(5)
    ]
    probabilities = np.full((4, 10), 0.1, dtype=np.float32)
    batch = Batch(frames=frames, model=model, good=[0, 1, 2, 3], probabilities=probabilities)
    batch.poison = [(4, PoisonRecord("empty", "no bytes"))]
    batch.scores = {"entropy": np.array([1.0, 1.0, 0.0, 0.0])}
    batch.decisions = [
        {
            "selected": chosen,
            "reason": "uncertainty" if chosen else None,
            "policy": "fixed",
            "utility": 0.5,
            "threshold": 0.5,
        }
        for chosen in (True, True, False, False)
    ]
    return batch


def test_delivered_batches_are_counted_and_reported(digits_model_path) -> None:
    model = OnnxModel.load(digits_model_path, device="cpu")
    metrics = ScorerMetrics()
    policy = QueryPolicy("fixed", budget=0.5, window=4)
    feedback = LabelFeedback(KafkaSettings(), metrics)
    hooked: list[list[dict[str, Any]]] = []
    accounting = Accounting(metrics, policy, feedback=feedback, on_predictions=hooked.append)
    batch = _batch(model)
    _, predictions = batch_records(
        batch,
        predictions_topic="p",
        requests_topic="r",
        dead_letter_topic="d",
        max_dead_letter_bytes=10,
    )
    accounting.delivered(batch, predictions)
    assert accounting.counts == {"selected": 2, "not_selected": 2, "invalid": 1}
    assert hooked == [predictions]
    value = metrics.registry.get_sample_value
    assert value("winnow_frames_total", {"outcome": "selected"}) == 2
    assert value("winnow_dead_letters_total", {"reason": "empty"}) == 1
    assert value("winnow_label_requests_total", {"reason": "uncertainty"}) == 2
    assert value("winnow_budget_used_ratio") == policy.budget_used
    # the stopping rules know what was predicted for each delivered request
    feedback.observe(Label(frame_id="t:0:0", label=predictions[0]["label"], labeler="a"))
    assert feedback.answered == 1
