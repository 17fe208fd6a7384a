"""Rejected records, on ``winnow.dead-letter`` (key: the original key)."""

from datetime import datetime
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
