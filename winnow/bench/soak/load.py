"""The soak's load: frames at a steady rate, the decisions read back, a labeling team.

Frame ids are ``s<seq>-<index>``: ``seq`` counts the frames produced (so acknowledged
and decided frames are two bitmaps compared at the end), ``index`` is the image's place
in the dataset's training split (so the simulated labelers know its class).
"""

import asyncio
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np
from aiokafka import TopicPartition

from infra.kafka.consumer import create_consumer
from infra.kafka.producer import create_producer
from infra.kafka.settings import KafkaSettings
from schemas.frames import FrameHeaders
from winnow.datasets import ImageDataset, encode_png

SOURCES = 2
_TICK_S = 0.05  # the producer sends what is due every tick, not one sleep per frame


def frame_id(seq: int, index: int) -> str:
    return f"s{seq}-{index}"


def parse_frame_id(text: str) -> tuple[int, int] | None:
    """(seq, index) of a soak frame id, None for any other id."""
    head, _, tail = text.partition("-")
    if not (head[:1] == "s" and head[1:].isdigit() and tail.isdigit()):
        return None
    return int(head[1:]), int(tail)


@dataclass
class Frames:
    """The training split as PNG bytes, as is and under a shift."""

    plain: list[bytes]
    shifted: list[bytes]

    @classmethod
    def of(cls, data: ImageDataset, shift: str | None) -> "Frames":
        plain = [encode_png(image) for image in data.train_images]
        if shift is None:
            return cls(plain, plain)
        from winnow.bench.drift_data import shift_images

        images = shift_images(shift, data.train_images, np.random.default_rng(0))
        return cls(plain, [encode_png(image) for image in images])


class Bitmap:
    """One flag per frame sequence number, growing as frames are produced."""

    def __init__(self) -> None:
        self._bits = bytearray()

    def set(self, seq: int) -> bool:
        """Sets the flag; returns whether it was set before (a duplicate)."""
        if seq >= len(self._bits):
            self._bits.extend(bytes(max(seq + 1 - len(self._bits), 65536)))
        seen = self._bits[seq] == 1
        self._bits[seq] = 1
        return seen

    def count(self) -> int:
        return self._bits.count(1)

    def missing_from(self, other: "Bitmap") -> int:
        """Flags set in ``other`` and not here."""
        ours = np.frombuffer(bytes(self._bits), dtype=np.uint8)
        theirs = np.frombuffer(bytes(other._bits), dtype=np.uint8)
        size = max(len(ours), len(theirs))
        ours = np.pad(ours, (0, size - len(ours)))
        theirs = np.pad(theirs, (0, size - len(theirs)))
        return int(np.count_nonzero((theirs == 1) & (ours == 0)))


@dataclass
class Producer:
    """Sends frames to the frames topic; counts what the broker acknowledged."""

    kafka: KafkaSettings
    frames: Frames
    acked: Bitmap = field(default_factory=Bitmap)
    sent: int = 0
    failed: int = 0
    shifted: bool = False
    _pending: set[asyncio.Future[object]] = field(default_factory=set)

    @property
    def produced(self) -> int:
        """Frames the broker acknowledged."""
        return self.acked.count()

    async def run(
        self,
        rate: float | None,
        until: Callable[[], bool],
        hold: Callable[[], bool] = lambda: False,
    ) -> None:
        """Sends at ``rate`` frames per second (None: flat out, pausing while ``hold()``
        is true) until ``until()`` is true; waits for every acknowledgement before
        returning."""
        producer = create_producer(self.kafka)
        await producer.start()
        try:
            started, done = time.monotonic(), self.sent
            while not until():
                if rate is None and hold():
                    await asyncio.sleep(_TICK_S)
                    continue
                due = (
                    self.sent + 256
                    if rate is None
                    else done + int((time.monotonic() - started) * rate)
                )
                while self.sent < due:
                    await self._send(producer)
                await asyncio.sleep(_TICK_S if rate is not None else 0)
            await producer.flush()
            if self._pending:
                await asyncio.wait(set(self._pending))
        finally:
            await producer.stop()

    async def _send(self, producer: object) -> None:
        seq = self.sent
        index = seq % len(self.frames.plain)
        images = self.frames.shifted if self.shifted else self.frames.plain
        headers = FrameHeaders(
            frame_id=frame_id(seq, index), captured_at=datetime.now(UTC), content_type="image/png"
        )
        future = await producer.send(  # type: ignore[attr-defined]
            self.kafka.topics.frames,
            images[index],
            key=f"camera-{index % SOURCES}".encode(),
            headers=headers.to_kafka(),
        )
        self.sent += 1
        self._pending.add(future)
        future.add_done_callback(lambda f, seq=seq: self._acked(f, seq))

    def _acked(self, future: asyncio.Future[object], seq: int) -> None:
        self._pending.discard(future)
        if future.cancelled() or future.exception() is not None:
            self.failed += 1
        else:
            self.acked.set(seq)


@dataclass
class Decisions:
    """Reads the predictions topic from the start: which frames were decided, and how often."""

    kafka: KafkaSettings
    decided: Bitmap = field(default_factory=Bitmap)
    records: int = 0
    duplicates: int = 0
    foreign: int = 0
    _consumer: object | None = None
    _task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        consumer = create_consumer(self.kafka, group_id=None)
        await consumer.start()
        topic = self.kafka.topics.predictions
        partitions = consumer.partitions_for_topic(topic) or set()
        consumer.assign([TopicPartition(topic, p) for p in sorted(partitions)])
        await consumer.seek_to_beginning()
        self._consumer = consumer
        self._task = asyncio.create_task(self._read(), name="soak-decisions")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._consumer is not None:
            await self._consumer.stop()  # type: ignore[attr-defined]

    async def at_end(self) -> bool:
        """Whether every partition has been read up to its end offset as of now."""
        consumer = self._consumer
        assert consumer is not None
        assigned = list(consumer.assignment())  # type: ignore[attr-defined]
        ends = await consumer.end_offsets(assigned)  # type: ignore[attr-defined]
        for tp in assigned:
            if await consumer.position(tp) < ends[tp]:  # type: ignore[attr-defined]
                return False
        return True

    async def _read(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        while True:
            batches = await consumer.getmany(timeout_ms=500, max_records=2000)  # type: ignore[attr-defined]
            for records in batches.values():
                for record in records:
                    self._count(record.value)

    def _count(self, value: bytes) -> None:
        self.records += 1
        parsed = parse_frame_id(str(json.loads(value).get("frame_id", "")))
        if parsed is None:
            self.foreign += 1
        elif self.decided.set(parsed[0]):
            self.duplicates += 1
