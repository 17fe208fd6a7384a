"""Frames chosen for labeling, on ``winnow.label-requests`` (key: frame id)."""

from datetime import datetime

from pydantic import Base64Bytes, BaseModel, Field

from schemas.frames import FrameOrigin
from schemas.scores import Decision, Scores


class LabelRequest(BaseModel):
    """A selected frame with everything a labeler or the trainer needs.

    ``image`` carries the encoded frame as base64 in JSON.
    """

    frame_id: str
    source_id: str | None = None
    origin: FrameOrigin
    captured_at: datetime | None = None
    requested_at: datetime
    model_version: str
    classes: list[str] = Field(description="the class names a label may take")
    content_type: str
    image: Base64Bytes
    label: str = Field(description="the predicted class name")
    confidence: float = Field(ge=0, le=1)
    probabilities: dict[str, float]
    scores: Scores
    decision: Decision
