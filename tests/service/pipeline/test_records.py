"""The scorer's records are built as plain dicts for speed; they must match the schemas."""

import json
from datetime import UTC, datetime

import numpy as np

from schemas.frames import FrameHeaders, FrameOrigin
from schemas.label_requests import LabelRequest
from schemas.predictions import Prediction
from service.model.inference import OnnxModel
from service.pipeline.batching import Batch, InboundFrame
from service.pipeline.records import batch_records
from service.scoring.uncertainty import score_batch


def test_records_validate_against_the_wire_schemas(digits_model_path, digit_pngs) -> None:
    model = OnnxModel.load(digits_model_path, device="cpu")
    headers = FrameHeaders(
        frame_id="f1", captured_at=datetime(2026, 1, 1, tzinfo=UTC), content_type="image/png"
    )
    frames = [
        InboundFrame(
            FrameOrigin(topic="t", partition=0, offset=i),
            b"cam",
            digit_pngs[i],
            headers if i == 0 else FrameHeaders(),
            (),
            None,
        )
        for i in range(2)
    ]
    probabilities = np.array([[0.7, 0.2, 0.1] + [0.0] * 7, [0.1] * 10], dtype=np.float32)
    batch = Batch(
        frames=frames,
        model=model,
        good=[0, 1],
        probabilities=probabilities,
        scores=score_batch(probabilities),
    )
    batch.decisions = [
        {
            "selected": True,
            "reason": "uncertainty",
            "policy": "variable",
            "utility": 0.4,
            "threshold": 0.3,
        },
        {"selected": False, "reason": None, "policy": "variable", "utility": 1.0, "threshold": 0.3},
    ]
    out, predictions = batch_records(
        batch,
        predictions_topic="p",
        requests_topic="r",
        dead_letter_topic="d",
        max_dead_letter_bytes=100,
    )
    assert [(r.topic, r.key) for r in out] == [("r", b"f1"), ("p", b"cam"), ("p", b"cam")]
    request = LabelRequest.model_validate_json(out[0].value)
    assert request.image == digit_pngs[0] and request.content_type == "image/png"
    assert request.captured_at == datetime(2026, 1, 1, tzinfo=UTC)
    first, second = (Prediction.model_validate_json(r.value) for r in out[1:])
    assert first.frame_id == "f1" and first.label == "0" and abs(first.confidence - 0.7) < 1e-6
    assert first.decision.selected and first.decision.threshold == 0.3
    assert second.frame_id == "t:0:1" and second.captured_at is None
    assert abs(second.scores.entropy - 1.0) < 1e-6
    assert json.loads(out[1].value)["probabilities"]["1"] == first.probabilities["1"]
    assert [p["frame_id"] for p in predictions] == ["f1", "t:0:1"]
    # the predictions handed to the accounting and its hook are the wire dicts
    assert [Prediction.model_validate(p) for p in predictions] == [first, second]
    assert predictions[0]["decision"] is batch.decisions[0]  # embedded as the policy built it
    # the bytes hold exactly what the standard library would have written, float for float
    assert json.loads(out[1].value) == json.loads(json.dumps(predictions[0]))
    assert json.loads(out[2].value) == json.loads(json.dumps(predictions[1]))
