"""What the sample store hands out: plain records, no database in them."""

from dataclasses import dataclass
from enum import StrEnum

from schemas.frames import FrameOrigin
from schemas.labels import Label


class LabelOutcome(StrEnum):
    """What :meth:`trainer.store.SampleStore.add_label` did with a label."""

    NEW = "new"
    UPDATED = "updated"
    DUPLICATE = "duplicate"
    UNKNOWN_CLASS = "unknown_class"
    """Not stored: the frame's request does not list the label's class."""


@dataclass(frozen=True, slots=True)
class TrainItem:
    """One frame ready to train on (its image: :meth:`trainer.store.SampleStore.images`).

    Attributes:
        frame_id: the frame.
        label: its resolved label.
        seq: its latest answer's received order.
        untrained: no model was trained on it with this label yet.
    """

    frame_id: str
    label: str
    seq: int
    untrained: bool


@dataclass(frozen=True, slots=True)
class StoreCounts:
    """Sizes of the store, for metrics and logs."""

    requests: int
    labels: int
    labeled_frames: int
    unlabelable_answers: int
    pending_labels: int
    trained: int


@dataclass(frozen=True, slots=True)
class StoredLabel:
    """A label as stored, with the Kafka record it came from (for dead letters)."""

    seq: int
    label: Label
    origin: FrameOrigin | None
    key: bytes | None
    received_at: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """How the model did on one answered frame, for stop rules."""

    frame_id: str
    predicted: str
    resolved: str | None
    unlabelable: bool


def stored_label(row: tuple) -> StoredLabel:
    """A :class:`StoredLabel` from a ``labels`` row (seq, frame, annotator, label, status,
    labeled_at, origin, record key, received_at)."""
    seq, frame_id, annotator, label, status, labeled_at, origin, key, received_at = row
    return StoredLabel(
        seq=seq,
        label=Label(
            frame_id=frame_id,
            label=label,
            status=status,
            annotator=annotator or None,
            labeled_at=labeled_at,
        ),
        origin=FrameOrigin.model_validate_json(origin) if origin else None,
        key=key,
        received_at=received_at,
    )
