"""The records the scorer produces: predictions, label requests and dead letters."""

import base64
from datetime import UTC, datetime

import numpy as np

from schemas.dead_letter import DeadLetter
from schemas.label_requests import LabelRequest
from schemas.predictions import Prediction
from schemas.scores import Decision, Scores
from service.batching import Batch, InboundFrame
from service.errors import PoisonRecord


class OutRecord:
    """One record to produce: topic, key, value."""

    __slots__ = ("key", "topic", "value")

    def __init__(self, topic: str, key: bytes | None, value: bytes) -> None:
        self.topic = topic
        self.key = key
        self.value = value


def _scores_of(batch: Batch, row: int) -> Scores:
    return Scores(**{name: float(values[row]) for name, values in batch.scores.items()})


def prediction_of(
    frame: InboundFrame,
    probabilities: np.ndarray,
    scores: Scores,
    decision: Decision,
    classes: list[str],
    model_version: str,
    now: datetime,
) -> Prediction:
    top = int(np.argmax(probabilities))
    return Prediction(
        frame_id=frame.frame_id,
        source_id=frame.source_id,
        origin=frame.origin,
        captured_at=frame.headers.captured_at,
        decided_at=now,
        model_version=model_version,
        label=classes[top],
        confidence=float(probabilities[top]),
        probabilities={c: float(p) for c, p in zip(classes, probabilities, strict=True)},
        scores=scores,
        decision=decision,
    )


def label_request_of(
    frame: InboundFrame, prediction: Prediction, classes: list[str]
) -> LabelRequest:
    return LabelRequest.model_validate(
        {
            **prediction.model_dump(exclude={"decided_at"}),
            "requested_at": prediction.decided_at,
            "classes": classes,
            "content_type": frame.headers.content_type or sniff_content_type(frame.value or b""),
            "image": base64.b64encode(frame.value or b""),
        }
    )


def sniff_content_type(value: bytes) -> str:
    if value.startswith(b"\x89PNG"):
        return "image/png"
    if value.startswith(b"\xff\xd8"):
        return "image/jpeg"
    return "application/octet-stream"


def dead_letter_of(
    frame: InboundFrame, error: PoisonRecord, max_value_bytes: int, now: datetime
) -> DeadLetter:
    value = frame.value or b""
    kept = value[:max_value_bytes]
    return DeadLetter.model_validate(
        {
            "origin": frame.origin,
            "reason": error.reason,
            "detail": error.detail,
            "role": "scorer",
            "failed_at": now,
            "headers": {k: v.decode("utf-8", errors="replace") for k, v in frame.raw_headers},
            "value": base64.b64encode(kept) if kept else None,
            "value_size": len(value),
            "value_truncated": len(kept) < len(value),
        }
    )


def batch_records(
    batch: Batch,
    *,
    predictions_topic: str | None,
    requests_topic: str,
    dead_letter_topic: str,
    max_dead_letter_bytes: int,
) -> tuple[list[OutRecord], list[Prediction]]:
    """Everything one batch produces, and its predictions (for counting and logs).

    Args:
        predictions_topic: None when predictions are turned off.
    """
    now = datetime.now(UTC)
    out: list[OutRecord] = []
    for index, error in batch.poison:
        frame = batch.frames[index]
        letter = dead_letter_of(frame, error, max_dead_letter_bytes, now)
        out.append(OutRecord(dead_letter_topic, frame.key, letter.model_dump_json().encode()))
    predictions: list[Prediction] = []
    if batch.model is None or batch.probabilities is None:
        return out, predictions
    classes, version = batch.model.spec.classes, batch.model.version
    for row, index in enumerate(batch.good):
        frame = batch.frames[index]
        prediction = prediction_of(
            frame,
            batch.probabilities[row],
            _scores_of(batch, row),
            batch.decisions[row],
            classes,
            version,
            now,
        )
        predictions.append(prediction)
        if prediction.decision.selected:
            request = label_request_of(frame, prediction, classes)
            out.append(
                OutRecord(
                    requests_topic, frame.frame_id.encode(), request.model_dump_json().encode()
                )
            )
        if predictions_topic is not None:
            out.append(
                OutRecord(predictions_topic, frame.key, prediction.model_dump_json().encode())
            )
    return out, predictions
