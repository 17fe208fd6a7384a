"""The records the scorer produces: predictions, label requests and dead letters.

Predictions and label requests are encoded by ``orjson``: 2 µs a prediction of
the throughput bench's digits case against 13 µs for ``json.dumps``. Its output is
compact JSON (no spaces after separators) and a non-finite float, which no record
should hold, becomes ``null`` where ``json.dumps`` wrote ``NaN`` (not JSON).
"""

import base64
import logging
from datetime import UTC, datetime

import orjson

from infra.kafka.delivery import OutRecord
from schemas.dead_letter import DeadLetter, dead_letter, header_text
from schemas.media import sniff
from service.errors import PoisonRecord
from service.pipeline.batching import Batch, InboundFrame

log = logging.getLogger(__name__)

UNKNOWN_CONTENT_TYPE = "application/octet-stream"


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def prediction_dicts(batch: Batch, now: datetime) -> list[dict[str, object]]:
    """One ``schemas.Prediction`` per scored frame, as plain dicts (the hot path).

    Built from whole-batch numpy conversions instead of one pydantic model per
    frame; the policy's decision dicts are embedded as they are.
    ``tests/service/pipeline/test_records.py`` checks they validate as ``Prediction``.
    """
    assert batch.model is not None and batch.probabilities is not None
    classes, version = batch.model.spec.classes, batch.model.version
    probabilities = batch.probabilities.tolist()
    tops = batch.probabilities.argmax(axis=1).tolist()
    scores = {name: values.tolist() for name, values in batch.scores.items()}
    decided_at = now.isoformat()
    out = []
    for row, index in enumerate(batch.good):
        frame, p, top = batch.frames[index], probabilities[row], tops[row]
        origin = frame.origin
        out.append(
            {
                "frame_id": frame.frame_id,
                "source_id": frame.source_id,
                "origin": {
                    "topic": origin.topic,
                    "partition": origin.partition,
                    "offset": origin.offset,
                },
                "captured_at": _iso(frame.headers.captured_at),
                "decided_at": decided_at,
                "model_version": version,
                "label": classes[top],
                "confidence": p[top],
                "probabilities": dict(zip(classes, p, strict=True)),
                "scores": {name: values[row] for name, values in scores.items()},
                "decision": batch.decisions[row],
            }
        )
    return out


def label_request_dict(
    frame: InboundFrame, prediction: dict[str, object], classes: list[str]
) -> dict[str, object]:
    """The ``schemas.LabelRequest`` of a selected frame: its prediction plus the image."""
    request = {k: v for k, v in prediction.items() if k != "decided_at"}
    request["requested_at"] = prediction["decided_at"]
    request["classes"] = classes
    value = frame.value or b""
    request["content_type"] = frame.headers.content_type or sniff(value) or UNKNOWN_CONTENT_TYPE
    request["image"] = base64.b64encode(value).decode("ascii")
    return request


def dead_letter_of(
    frame: InboundFrame, error: PoisonRecord, max_value_bytes: int, now: datetime
) -> DeadLetter:
    """The dead letter of a frame that can never be scored (and a log line that says so)."""
    origin = frame.origin
    log.warning(
        "dead-lettering frame topic=%s partition=%d offset=%d reason=%s: %s",
        origin.topic,
        origin.partition,
        origin.offset,
        error.reason,
        error.detail,
    )
    return dead_letter(
        frame.origin,
        error.reason,
        error.detail,
        frame.value,
        role="scorer",
        max_value_bytes=max_value_bytes,
        headers=header_text(frame.raw_headers),
        failed_at=now,
    )


def batch_records(
    batch: Batch,
    *,
    predictions_topic: str | None,
    requests_topic: str,
    dead_letter_topic: str,
    max_dead_letter_bytes: int,
) -> tuple[list[OutRecord], list[dict[str, object]]]:
    """Everything one batch produces, and its predictions as dicts (for counting and hooks).

    Args:
        predictions_topic: None when predictions are turned off.
    """
    now = datetime.now(UTC)
    out: list[OutRecord] = []
    for index, error in batch.poison:
        frame = batch.frames[index]
        letter = dead_letter_of(frame, error, max_dead_letter_bytes, now)
        out.append(OutRecord(dead_letter_topic, frame.key, letter.model_dump_json().encode()))
    if batch.model is None or batch.probabilities is None:
        return out, []
    classes = batch.model.spec.classes
    predictions = prediction_dicts(batch, now)
    dumps = orjson.dumps
    for index, prediction in zip(batch.good, predictions, strict=True):
        frame = batch.frames[index]
        if prediction["decision"]["selected"]:  # type: ignore[index]
            request = label_request_dict(frame, prediction, classes)
            out.append(OutRecord(requests_topic, frame.frame_id.encode(), dumps(request)))
        if predictions_topic is not None:
            out.append(OutRecord(predictions_topic, frame.key, dumps(prediction)))
    return out, predictions
