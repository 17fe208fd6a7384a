"""Bodies of the scorer's HTTP API."""

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, Field

# The names settings and the API accept. The modules that implement them derive their
# tuples from these (``typing.get_args``); tests check every name has an implementation.
ThresholdPolicyName = Literal[
    "fixed", "variable", "randomized-variable", "split", "quantile", "random"
]
"""Threshold strategies (``service.selection.strategies``)."""
CoveragePolicyName = Literal["herding", "probcover", "typiclust"]
"""Coverage strategies in embedding space: stream MaxHerding / uncertainty herding
(``service.selection.herding``), ProbCover and TypiClust."""
PolicyName = Literal[ThresholdPolicyName, CoveragePolicyName, "vessal"]
"""Every query strategy (``service.selection.registry``); ``vessal``: streaming volume
sampling on gradient embeddings (``service.selection.vessal``)."""
ColdStartName = Literal[CoveragePolicyName, "random", "none"]
"""What selects while the model has learned from no label: a coverage strategy, random
sampling, or ``none`` (the configured strategy from the start)."""
ProbabilityUtilityName = Literal["least_confidence", "margin", "entropy"]
"""Utilities of one probability vector (``service.scoring.uncertainty``); always scored."""
AiftUtilityName = Literal["aift", "aift_entropy", "aift_diversity"]
"""Utilities over augmented views of a frame (``service.scoring.aift``)."""
CommitteeUtilityName = Literal["bald", "vote_entropy", "average_kl"]
"""Utilities over a committee or MC-dropout passes (``service.scoring.committee``)."""
UtilityName = Literal[ProbabilityUtilityName, AiftUtilityName, CommitteeUtilityName]
"""Every utility a policy may compare; the fields of ``schemas.scores.Scores``."""
FilterName = Literal["dedup", "density", "balance", "audit", "rare", "pal"]
"""Stream filters (``service.selection.filters``)."""
SelectorName = Literal["none", "coreset", "badge"]
"""Windowed selectors (``service.selection.diversity``); ``none`` for frame by frame."""


class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    ready: bool
    model_loaded: bool
    partitions_assigned: int


class BackpressureState(BaseModel):
    """Labeling-queue backpressure: how far behind the team is and what the scorer asks for."""

    engaged: bool = Field(
        description="answers to this scorer's requests have been seen (until then it waits)"
    )
    throttled: bool = Field(description="true while the scorer asks for less than its budget")
    waiting: int = Field(ge=0, description="requests sent and not answered yet")
    oldest_wait_s: float | None = Field(
        default=None, description="how long the oldest unanswered request has waited"
    )
    request_rate_per_hour: float = Field(ge=0, description="requests sent, recent rate")
    answer_rate_per_hour: float = Field(ge=0, description="answers received, recent rate")
    allowed_rate_per_hour: float | None = Field(
        default=None, description="requests allowed while throttled; null when not throttled"
    )
    budget_factor: float = Field(
        ge=0, le=1, description="share of the budget in force: lower raises the bar"
    )
    held_back: int = Field(ge=0, description="selections the backpressure refused so far")
    max_waiting: int = Field(ge=0, description="unanswered requests that count as behind")
    max_wait_s: float = Field(ge=0, description="a wait that counts as behind")


class PolicyState(BaseModel):
    """The query policy as it stands: settings, live threshold and budget use."""

    name: PolicyName
    utility: UtilityName
    budget: float = Field(gt=0, le=1, description="fraction of frames that may be labeled")
    effective_budget: float | None = Field(
        default=None, description="the budget in force: raised for a while after a drift alarm"
    )
    boost_seconds_left: float = Field(default=0.0, ge=0, description="of a drift budget boost")
    window: int = Field(gt=0, description="frames in the sliding budget window")
    labels_per_hour: float | None = Field(default=None, description="cap; null for none")
    threshold: float | None = Field(default=None, description="current threshold on utility")
    budget_used: float = Field(ge=0, description="selected fraction over the current window")
    labels_last_hour: int = Field(ge=0, description="this replica's own selections, last hour")
    cap_share: float = Field(
        default=1.0,
        ge=0,
        le=1,
        description="this replica's fraction of the frames topic's partitions: its share of "
        "the group's labels-per-hour cap (1 outside a consumer group)",
    )
    cap_partitions: list[int] = Field(
        default_factory=list, description="the frames partitions this replica owns"
    )
    labels_per_hour_share: int | None = Field(
        default=None,
        ge=0,
        description="the labels per hour this replica may ask for: the slots of the partitions "
        "it owns (they add up to the cap over the group); null without a cap",
    )
    cap_charged_last_hour: int = Field(
        default=0,
        ge=0,
        description="requests in the last hour charged to the partitions it owns, by any "
        "replica (measured against labels_per_hour_share)",
    )
    seen: int = Field(ge=0)
    selected: int = Field(ge=0)
    params: dict[str, float] = Field(default_factory=dict, description="policy-specific knobs")
    cold_start: bool = Field(
        default=False,
        description="true while the model has learned from no label: frames are then chosen "
        "by the cold-start strategy within the budget",
    )
    cold_start_strategy: ColdStartName = Field(
        default="random",
        description="what chooses during cold start: a coverage strategy, random, or none",
    )
    blend: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="weight of the uncertainty utility against coverage (embedding "
        "strategies): 0 while the model has learned nothing, then following its accuracy",
    )
    competence: float | None = Field(
        default=None,
        description="the model's accuracy on recent answers, above the majority-class rate "
        "(null until enough answers)",
    )
    backpressure: BackpressureState | None = Field(
        default=None, description="labeling-queue backpressure; null when off"
    )
    filters: list[FilterName] = Field(
        default_factory=list, description="stream filters applied to the utility, in order"
    )
    filter_params: dict[str, float] = Field(default_factory=dict, description="filter knobs")
    selector: SelectorName = Field(
        default="none", description="windowed choice of which frames of a batch to label"
    )


class PolicyUpdate(BaseModel):
    """A live change to the policy; fields left out keep their values."""

    name: PolicyName | None = None
    utility: UtilityName | None = None
    budget: float | None = Field(default=None, gt=0, le=1)
    window: int | None = Field(default=None, gt=0)
    labels_per_hour: float | None = Field(default=None, ge=0, description="0 removes the cap")
    threshold: float | None = Field(default=None, ge=0, le=1)
    params: dict[str, float] | None = None
    filters: list[FilterName] | None = Field(default=None, description="[] removes every filter")
    filter_params: dict[str, float] | None = None
    selector: SelectorName | None = None


class ModelInfo(BaseModel):
    version: str
    arch: str
    classes: list[str]
    input_size: tuple[int, int]
    provider: str = Field(description="the ONNX Runtime execution provider in use")
    labels_trained: int = 0
    parent_version: str | None = None
    labels_unlearned: int | None = Field(
        default=None,
        ge=0,
        description="answered labels (the holdout excluded) this model had not learned from "
        "when the trainer released it; null when its release does not say",
    )


class ReleaseEntry(BaseModel):
    """One model release as the scorer saw it."""

    model_name: str
    version: str
    parent_version: str | None = None
    created_at: datetime
    sha256: str
    labels_trained: int = 0
    metrics: dict[str, float] = Field(default_factory=dict)
    status: Literal["active", "available", "rejected"]
    reason: str | None = None
    pinnable: bool = False


class ModelStatus(BaseModel):
    """What ``GET /v1/model`` answers: the model serving and the releases seen."""

    current: ModelInfo
    pinned: str | None = Field(default=None, description="the pinned version, if any")
    following_releases: bool
    history: list[ReleaseEntry]


class ModelPin(BaseModel):
    version: str = Field(min_length=1)


class FrameCounts(BaseModel):
    selected: int = 0
    not_selected: int = 0
    invalid: int = 0


class LabelingStatus(BaseModel):
    """The stopping rules of active learning, in figures and in words."""

    answered: int = Field(ge=0, description="labels received for this scorer's requests")
    recent_accuracy: float | None = Field(
        default=None, description="share of recent requests the model had predicted right"
    )
    recent_unlabelable: float | None = Field(
        default=None, description="share of recent answers that were 'unlabelable'"
    )
    recent_balanced_accuracy: float | None = Field(
        default=None,
        description="mean over classes of the recall on recent requests (imbalance-proof)",
    )
    recent_recall: dict[str, float] = Field(
        default_factory=dict, description="per true class: share of recent requests predicted right"
    )
    budget_left_in_window: int = Field(ge=0, description="selections left in the budget window")
    labels_left_this_hour: int | None = Field(default=None, description="null without a cap")
    verdict: str
    stop: bool = Field(description="true when a stopping rule says labeling can stop")


class DetectorState(BaseModel):
    """One drift detector on one source (null: all sources together)."""

    detector: str
    source_id: str | None = None
    statistic: float | None = Field(default=None, description="null while its window fills")
    threshold: float | None = Field(default=None, description="null until calibrated")
    window: int
    frames: int = Field(ge=0, description="frames since its last reset")
    alarms: int = Field(ge=0)
    last_alarm: datetime | None = None
    alarmed: bool = Field(
        default=False,
        description="true once it has alarmed against the current reference: it raises no "
        "other alarm until the reference is taken anew (from the frames after the alarm, or "
        "at a swap)",
    )


class DriftStatus(BaseModel):
    """The drift monitor: its reference, its detectors and their alarms."""

    enabled: bool
    paused: bool = Field(
        default=False, description="true while the model has learned from no label (cold start)"
    )
    model_version: str | None = None
    reference: Literal["training", "warmup"] | None = Field(
        default=None, description="where the reference came from; null while warming up"
    )
    reference_frames: int = 0
    warmup_frames_left: int = 0
    calibrating: bool = False
    ert: int = Field(description="expected frames between false alarms, per detector")
    alarms: int = Field(default=0, ge=0)
    dropped_batches: int = Field(default=0, ge=0, description="batches skipped: queue full")
    detectors: list[DetectorState] = Field(default_factory=list)


class ScorerStatus(BaseModel):
    """What ``GET /v1/status`` answers."""

    ready: bool
    started_at: datetime
    model: ModelInfo | None
    policy: PolicyState
    frames: FrameCounts
    partitions: list[str]
    labeling: LabelingStatus
    drift: DriftStatus | None = None
