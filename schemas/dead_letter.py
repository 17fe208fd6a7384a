"""Rejected records, on ``winnow.dead-letter`` (key: the original key)."""

import base64
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Literal

from pydantic import Base64Bytes, BaseModel, Field

from schemas.frames import FrameOrigin

DeadLetterReason = Literal[
    "empty",
    "too_large",
    "unsupported_type",
    "undecodable",
    "truncated",
    "too_many_pixels",
    "invalid_schema",
    "unknown_class",
    "unknown_frame",
]


class DeadLetter(BaseModel):
    """A record that a role rejected, with where it came from and why."""

    origin: FrameOrigin
    reason: DeadLetterReason
    detail: str = Field(description="a human-readable explanation")
    role: str = Field(description="the role that rejected it: scorer, trainer, ...")
    failed_at: datetime
    headers: dict[str, str] = Field(default_factory=dict)
    value: Base64Bytes | None = Field(
        default=None, description="the original value (base64), cut at the size limit"
    )
    value_size: int = Field(ge=0, description="the size of the original value in bytes")
    value_truncated: bool = False


def dead_letter(
    origin: FrameOrigin,
    reason: DeadLetterReason,
    detail: str,
    value: bytes | None,
    *,
    role: str,
    max_value_bytes: int,
    headers: dict[str, str] | None = None,
    failed_at: datetime | None = None,
) -> DeadLetter:
    """The dead letter of a rejected record; every role builds its letters here.

    Args:
        origin: where the rejected record was consumed.
        reason: why it was rejected.
        detail: a human-readable explanation.
        value: the record's value; kept up to ``max_value_bytes`` (base64 on the wire).
        role: the rejecting role (``scorer``, ``trainer``, ``ingest``, ...).
        max_value_bytes: the most of ``value`` to keep, so a letter fits in one message.
        headers: the record's headers, decoded.
        failed_at: when it was rejected; now if None.
    """
    value = value or b""
    kept = value[:max_value_bytes]
    return DeadLetter(
        origin=origin,
        reason=reason,
        detail=detail,
        role=role,
        failed_at=failed_at or datetime.now(UTC),
        headers=headers or {},
        value=base64.b64encode(kept) if kept else None,  # Base64Bytes validates encoded input
        value_size=len(value),
        value_truncated=len(kept) < len(value),
    )


def header_text(raw_headers: Iterable[tuple[str, bytes | None]]) -> dict[str, str]:
    """Kafka headers as text, for a dead letter (undecodable bytes replaced)."""
    return {name: (raw or b"").decode("utf-8", errors="replace") for name, raw in raw_headers}
