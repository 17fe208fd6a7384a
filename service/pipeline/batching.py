"""Dynamic batching: frames from the consumer, grouped by size and wait time."""

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from aiokafka import TopicPartition

from schemas.frames import FrameHeaders, FrameOrigin
from schemas.scores import DecisionRow
from service.errors import PoisonRecord

if TYPE_CHECKING:
    from aiokafka import AIOKafkaConsumer, ConsumerRecord

    from service.model.inference import OnnxModel


@dataclass(slots=True)
class InboundFrame:
    """One consumed record with its parsed headers and identity."""

    origin: FrameOrigin
    key: bytes | None
    value: bytes | None
    headers: FrameHeaders
    raw_headers: tuple[tuple[str, bytes], ...]
    timestamp_ms: int | None

    @classmethod
    def from_record(cls, record: "ConsumerRecord[Any, Any]") -> "InboundFrame":
        raw_headers = tuple(record.headers or ())
        return cls(
            origin=FrameOrigin(
                topic=record.topic, partition=record.partition, offset=record.offset
            ),
            key=record.key,
            value=record.value,
            headers=FrameHeaders.from_kafka(raw_headers),
            raw_headers=raw_headers,
            timestamp_ms=record.timestamp if record.timestamp and record.timestamp > 0 else None,
        )

    @property
    def frame_id(self) -> str:
        return self.headers.frame_id or self.origin.frame_id()

    @property
    def source_id(self) -> str | None:
        return self.key.decode("utf-8", errors="replace") if self.key else None

    def captured_epoch(self) -> float | None:
        """Capture time in seconds since the epoch: the header, else the broker timestamp."""
        if self.headers.captured_at is not None:
            return self.headers.captured_at.timestamp()
        return self.timestamp_ms / 1000 if self.timestamp_ms else None


@dataclass(slots=True)
class Batch:
    """A batch as it moves through the stages; each stage fills its part."""

    frames: list[InboundFrame]
    model: "OnnxModel | None" = None
    inputs: np.ndarray | None = None
    good: list[int] = field(default_factory=list)
    poison: list[tuple[int, PoisonRecord]] = field(default_factory=list)
    probabilities: np.ndarray | None = None
    embeddings: np.ndarray | None = None
    scores: dict[str, np.ndarray] = field(default_factory=dict)
    decisions: list[DecisionRow] = field(default_factory=list)
    """One per good frame, as the policy built them and the records embed them."""

    def positions(self) -> list[tuple[TopicPartition, int]]:
        """Partition and offset of every frame, for the offset tracker."""
        return [
            (TopicPartition(f.origin.topic, f.origin.partition), f.origin.offset)
            for f in self.frames
        ]


async def collect_batch(
    consumer: "AIOKafkaConsumer", max_size: int, max_wait_ms: int
) -> list[InboundFrame]:
    """Waits for the first records, then fills the batch until it is full or max_wait passes.

    Returns an empty list when nothing arrived within a poll interval, so the
    caller can notice a stop request.
    """
    frames: list[InboundFrame] = []
    deadline: float | None = None
    while len(frames) < max_size:
        if deadline is None:
            timeout_ms = 500
        else:
            timeout_ms = int(max(0.0, deadline - time.monotonic()) * 1000)
        polled = await consumer.getmany(timeout_ms=timeout_ms, max_records=max_size - len(frames))
        for records in polled.values():
            frames.extend(InboundFrame.from_record(r) for r in records)
        if not frames:
            return frames
        if deadline is None:
            deadline = time.monotonic() + max_wait_ms / 1000
        if time.monotonic() >= deadline:
            break
    # getmany groups by partition; stream order within each partition is what matters.
    return frames
