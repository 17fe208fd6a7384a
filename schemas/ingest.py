"""HTTP ingest (``POST /v1/frames``): the receipt of written frames, and the error body.

A 201 answer is an :class:`IngestReceipt`, sent only once Kafka has
acknowledged every frame. Any refusal is ``{"detail": {...}}``
(:class:`IngestErrorResponse`), the shape FastAPI gives HTTP errors, with a
machine-readable ``error`` code and a human-readable ``message``.
"""

from typing import Literal

from pydantic import BaseModel, Field

from schemas.dead_letter import DeadLetterReason

IngestErrorCode = (
    Literal[
        "ingest_disabled",
        "unauthorized",
        "rate_limited",
        "bad_multipart",
        "no_image",
        "missing_source_id",
        "bad_captured_at",
        "not_ready",
        "kafka_unavailable",
        "invalid_parameter",
    ]
    | DeadLetterReason
)
"""Why a request was refused: a code of its own, or the reason the scorer would refuse
the image (``too_large``, ``unsupported_type``, ``undecodable``, ``truncated``, ...)."""


class IngestedFrame(BaseModel):
    """One frame written to Kafka."""

    frame_id: str
    partition: int
    offset: int
    content_type: str
    bytes: int
    filename: str | None = None


class IngestReceipt(BaseModel):
    """The answer to ``POST /v1/frames``: every frame is in Kafka."""

    topic: str
    source_id: str
    frame_ids: list[str]
    frames: list[IngestedFrame]


class IngestErrorDetail(BaseModel):
    """Why ingest refused a request (the ``detail`` of an error answer)."""

    error: IngestErrorCode
    message: str = Field(description="a human-readable explanation")
    filename: str | None = Field(
        default=None,
        description="the multipart file (or raw body, null) an image error is about; "
        "present only on errors about one image",
    )


class IngestErrorResponse(BaseModel):
    """An error answer of ``POST /v1/frames``: 400, 401, 403, 413, 415, 422, 429 or 503."""

    detail: IngestErrorDetail


__all__ = [
    "IngestErrorCode",
    "IngestErrorDetail",
    "IngestErrorResponse",
    "IngestReceipt",
    "IngestedFrame",
]
