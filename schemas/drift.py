"""Drift alarms and statistics, on ``winnow.drift`` (key: detector)."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel


class DriftEvent(BaseModel):
    """One drift alarm, or a periodic statistic from one detector."""

    kind: Literal["alarm", "statistic"]
    detector: str
    source_id: str | None = None
    statistic: float
    threshold: float
    window: int
    model_version: str
    time: datetime
