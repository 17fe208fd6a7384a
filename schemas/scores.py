"""Pieces shared by prediction and label-request records."""

from typing import NotRequired, TypedDict

from pydantic import BaseModel, Field


class Scores(BaseModel):
    """Utility scores of one frame, each normalized to [0, 1] (1 = most informative)."""

    least_confidence: float = Field(ge=0, le=1)
    margin: float = Field(ge=0, le=1)
    entropy: float = Field(ge=0, le=1)
    aift: float | None = Field(default=None, ge=0, le=1, description="AIFT entropy + diversity")
    aift_entropy: float | None = Field(default=None, ge=0, le=1, description="AIFT entropy term")
    aift_diversity: float | None = Field(
        default=None, ge=0, le=1, description="AIFT diversity term (symmetric KL between views)"
    )
    bald: float | None = Field(default=None, ge=0, le=1, description="MC-dropout mutual info")
    vote_entropy: float | None = Field(default=None, ge=0, le=1, description="committee votes")
    average_kl: float | None = Field(default=None, ge=0, le=1, description="committee mean KL")


class Decision(BaseModel):
    """What the query policy decided for one frame, and why."""

    selected: bool
    reason: str | None = Field(
        default=None, description="why it was selected: uncertainty, random, ...; null if not"
    )
    policy: str
    utility: float = Field(ge=0, le=1, description="the score the policy compared")
    threshold: float | None = Field(default=None, description="the threshold at decision time")
    cap_partition: int | None = Field(
        default=None,
        ge=0,
        description="the frames partition whose share of the group's labels-per-hour cap this "
        "selection used (the next owner of that partition counts it); absent if not selected",
    )


class DecisionRow(TypedDict):
    """A :class:`Decision` as the hot path carries it, from the policy to the wire.

    The policy builds one plain dict per frame and the records embed it as is:
    no model is built or validated per frame or per batch. Tests check that the
    rows validate as ``Decision`` (``tests/service/selection/test_policy.py``,
    ``tests/service/pipeline/test_records.py``).
    """

    selected: bool
    reason: str | None
    policy: str
    utility: float
    threshold: float | None
    cap_partition: NotRequired[int]
