"""One decision record per scored frame, on ``winnow.predictions`` (key: source id)."""

from datetime import datetime

from pydantic import BaseModel, Field

from schemas.frames import FrameOrigin
from schemas.scores import Decision, Scores


class Prediction(BaseModel):
    """The scorer's prediction and query decision for one frame."""

    frame_id: str
    source_id: str | None = None
    origin: FrameOrigin
    captured_at: datetime | None = None
    decided_at: datetime
    model_version: str
    label: str = Field(description="the predicted class name")
    confidence: float = Field(ge=0, le=1)
    probabilities: dict[str, float]
    scores: Scores
    decision: Decision
