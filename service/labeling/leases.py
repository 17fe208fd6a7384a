"""The pool of frames waiting for a label, and the leases labelers hold on them.

Pure bookkeeping, no I/O: :class:`~service.labeling.queue.LabelQueue` feeds it
from Kafka and produces the answers. Rules:

* a labeler holds at most one lease; asking again returns the same lease;
* a frame is leased to one labeler at a time, so two labelers never see it
  together; a lease that runs out returns the frame to the front of the pool;
* skipping returns the frame to the back of the pool and never drops it; the
  labeler who skipped gets it again only when nothing else is waiting;
* a frame picked for a second opinion needs answers from two different
  labelers, one after the other.
"""

import hashlib
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from aiokafka import TopicPartition

from schemas.label_requests import LabelRequest

Position = tuple[TopicPartition, int]


@dataclass(eq=False)
class Frame:
    """A requested frame and what is known about its answers."""

    request: LabelRequest
    positions: list[Position]
    required: int = 1
    answers: dict[str, str] = field(default_factory=dict)  # annotator -> label or status
    skipped_by: set[str] = field(default_factory=set)
    lease: "Lease | None" = None

    @property
    def frame_id(self) -> str:
        return self.request.frame_id


@dataclass(eq=False)
class Lease:
    """One labeler's hold on one frame; ``correction`` re-opens an answered frame (undo)."""

    id: str
    frame: Frame
    annotator: str
    expires_at: float
    correction: bool = False


@dataclass
class Completion:
    """What an acknowledged answer changed."""

    done: bool
    positions: list[Position]
    disagreement: dict[str, str] | None = None


class LeaseError(LookupError):
    """The lease is unknown (expired and re-leased, revoked, or from before a restart)."""


def needs_second_opinion(frame_id: str, fraction: float) -> bool:
    """A stable choice per frame id, so a restart picks the same frames."""
    if fraction <= 0:
        return False
    digest = hashlib.sha256(frame_id.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class LeasePool:
    """Frames in arrival order, leases by id.

    Args:
        lease_s: how long a lease lasts without an answer.
        second_opinion: the fraction of frames that need two labelers.
        clock: monotonic seconds; injectable for tests.
    """

    def __init__(
        self,
        lease_s: float,
        second_opinion: float = 0.0,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.lease_s = lease_s
        self.second_opinion = second_opinion
        self.clock = clock or time.monotonic
        self._frames: OrderedDict[str, Frame] = OrderedDict()
        self._leases: dict[str, Lease] = {}
        self._by_annotator: dict[str, Lease] = {}
        self._last_answered: dict[str, Frame] = {}
        self.expired_total = 0

    # -- feeding ---------------------------------------------------------------
    def add(self, request: LabelRequest, position: Position) -> Frame:
        """Adds a frame; a frame id already waiting only gains another position."""
        frame = self._frames.get(request.frame_id)
        if frame is not None:
            frame.positions.append(position)
            return frame
        required = 2 if needs_second_opinion(request.frame_id, self.second_opinion) else 1
        frame = Frame(request, [position], required)
        self._frames[request.frame_id] = frame
        return frame

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Drops the frames of revoked partitions, with their leases."""
        for frame_id, frame in list(self._frames.items()):
            frame.positions = [p for p in frame.positions if p[0] not in partitions]
            if not frame.positions:
                self._unlease(frame)
                del self._frames[frame_id]

    # -- leasing -----------------------------------------------------------------
    def next(self, annotator: str) -> Lease | None:
        """The labeler's current lease (extended), or a new one on the oldest free frame."""
        now = self.clock()
        self.expire(now)
        held = self._by_annotator.get(annotator)
        if held is not None:
            held.expires_at = now + self.lease_s
            return held
        frame = self._pick(annotator)
        if frame is None:
            return None
        return self._lease(frame, annotator, now)

    def undo(self, annotator: str) -> Lease | None:
        """A correction lease on the labeler's last answered frame, or None."""
        frame = self._last_answered.get(annotator)
        if frame is None:
            return None
        now = self.clock()
        held = self._by_annotator.get(annotator)
        if held is not None:
            if held.correction and held.frame is frame:
                return held
            self.release(held.id, annotator, skipped=False)
        return self._lease(frame, annotator, now, correction=True)

    def get(self, lease_id: str, annotator: str) -> Lease:
        """The labeler's lease by id.

        Raises:
            LeaseError: no such lease for this labeler.
        """
        lease = self._leases.get(lease_id)
        if lease is None or lease.annotator != annotator:
            raise LeaseError(lease_id)
        return lease

    def release(self, lease_id: str, annotator: str, skipped: bool = True) -> None:
        """Gives a frame back (skip): to the back of the pool, never dropped."""
        lease = self.get(lease_id, annotator)
        self._drop_lease(lease)
        frame = lease.frame
        if lease.correction or frame.frame_id not in self._frames:
            return
        frame.lease = None
        if skipped:
            frame.skipped_by.add(annotator)
            self._frames.move_to_end(frame.frame_id)

    def complete(self, lease: Lease, answer: str) -> Completion:
        """Records an acknowledged answer; a frame is done when enough labelers answered."""
        self._drop_lease(lease)
        frame = lease.frame
        frame.answers[lease.annotator] = answer
        self._last_answered[lease.annotator] = frame
        if frame.lease is lease:
            frame.lease = None
        if lease.correction or frame.frame_id not in self._frames:
            return Completion(done=False, positions=[])
        if len(frame.answers) < frame.required:
            return Completion(done=False, positions=[])
        del self._frames[frame.frame_id]
        self._unlease(frame)
        disagreement = dict(frame.answers) if len(set(frame.answers.values())) > 1 else None
        return Completion(done=True, positions=list(frame.positions), disagreement=disagreement)

    def expire(self, now: float | None = None) -> int:
        """Returns frames whose lease ran out to the front of the pool; how many."""
        now = self.clock() if now is None else now
        expired = [lease for lease in self._leases.values() if lease.expires_at <= now]
        for lease in expired:
            self._drop_lease(lease)
            if lease.frame.lease is lease:
                lease.frame.lease = None
        self.expired_total += len(expired)
        return len(expired)

    # -- counts --------------------------------------------------------------------
    @property
    def waiting(self) -> int:
        """Frames not leased right now."""
        return sum(1 for f in self._frames.values() if f.lease is None)

    @property
    def leased(self) -> int:
        return sum(1 for f in self._frames.values() if f.lease is not None)

    def __len__(self) -> int:
        return len(self._frames)

    def frames(self) -> Iterable[Frame]:
        return self._frames.values()

    # -- internals -------------------------------------------------------------------
    def _pick(self, annotator: str) -> Frame | None:
        fallback = None
        for frame in self._frames.values():
            if frame.lease is not None or annotator in frame.answers:
                continue
            if annotator not in frame.skipped_by:
                return frame
            fallback = fallback or frame
        return fallback

    def _lease(self, frame: Frame, annotator: str, now: float, correction: bool = False) -> Lease:
        lease = Lease(secrets.token_urlsafe(12), frame, annotator, now + self.lease_s, correction)
        self._leases[lease.id] = lease
        self._by_annotator[annotator] = lease
        if not correction:
            frame.lease = lease
        return lease

    def _drop_lease(self, lease: Lease) -> None:
        self._leases.pop(lease.id, None)
        if self._by_annotator.get(lease.annotator) is lease:
            del self._by_annotator[lease.annotator]

    def _unlease(self, frame: Frame) -> None:
        if frame.lease is not None:
            self._drop_lease(frame.lease)
            frame.lease = None
