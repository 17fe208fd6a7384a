"""Answers from the labeling team, on ``winnow.labels`` (key: frame id).

The minimum a plain client must send is ``{"frame_id": "...", "label": "..."}``.
"""

from datetime import datetime
from typing import Literal, Self

from pydantic import BaseModel, model_validator


class Label(BaseModel):
    """A label for one frame, or the answer that it cannot be labeled."""

    frame_id: str
    label: str | None = None
    status: Literal["labeled", "unlabelable"] = "labeled"
    annotator: str | None = None
    labeled_at: datetime | None = None

    @model_validator(mode="after")
    def _label_when_labeled(self) -> Self:
        if self.status == "labeled" and not self.label:
            raise ValueError("a label with status 'labeled' needs a non-empty 'label'")
        return self
