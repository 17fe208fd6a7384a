"""The frame contract on ``winnow.frames``.

A frame is a plain Kafka record so that any client (kcat, a GStreamer sink, a
Java app) can produce one without Winnow's code:

* key: the source id (camera, endoscope) as UTF-8; may be empty;
* value: the encoded image itself, JPEG or PNG bytes;
* headers, all optional: ``frame-id`` (UTF-8), ``captured-at`` (ISO 8601, or
  milliseconds since the Unix epoch as decimal digits), ``content-type``
  (``image/jpeg`` or ``image/png``).

When ``frame-id`` is absent the frame id is ``<topic>:<partition>:<offset>``,
which is stable across redeliveries, so duplicates can be dropped by id.
"""

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

FRAME_HEADERS = ("frame-id", "captured-at", "content-type")
ContentType = Literal["image/jpeg", "image/png"]
CONTENT_TYPES: tuple[str, ...] = ("image/jpeg", "image/png")


class FrameOrigin(BaseModel):
    """Where a record was read: enough to find it again."""

    model_config = ConfigDict(frozen=True)

    topic: str
    partition: int = Field(ge=0)
    offset: int = Field(ge=0)

    def frame_id(self) -> str:
        return f"{self.topic}:{self.partition}:{self.offset}"


class FrameHeaders(BaseModel):
    """The optional headers of a frame record, parsed."""

    frame_id: str | None = None
    captured_at: datetime | None = None
    content_type: str | None = None

    @classmethod
    def from_kafka(
        cls, headers: "list[tuple[str, bytes]] | tuple[tuple[str, bytes], ...]"
    ) -> "FrameHeaders":
        """Parses Kafka headers; unknown headers are ignored, bad times become None."""
        values: dict[str, str] = {}
        for name, raw in headers or ():
            if name in FRAME_HEADERS and raw is not None:
                values[name] = raw.decode("utf-8", errors="replace").strip()
        return cls(
            frame_id=values.get("frame-id") or None,
            captured_at=parse_timestamp(values.get("captured-at")),
            content_type=(values.get("content-type") or "").lower() or None,
        )

    def to_kafka(self) -> list[tuple[str, bytes]]:
        out: list[tuple[str, bytes]] = []
        if self.frame_id:
            out.append(("frame-id", self.frame_id.encode()))
        if self.captured_at:
            out.append(("captured-at", self.captured_at.isoformat().encode()))
        if self.content_type:
            out.append(("content-type", self.content_type.encode()))
        return out


def parse_timestamp(text: str | None) -> datetime | None:
    """Reads ISO 8601 or epoch milliseconds; returns None for anything else."""
    if not text:
        return None
    try:
        if text.isdigit():
            return datetime.fromtimestamp(int(text) / 1000, tz=UTC)
        parsed = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except (ValueError, OverflowError, OSError):
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)
