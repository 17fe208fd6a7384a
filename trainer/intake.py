"""The trainer's intake: label requests and labels from Kafka into the sample store.

One consumer in the trainer's group reads both topics with manual commits.
Each batch is validated, written to the store (committed to disk), its dead
letters are produced and acknowledged (:class:`~infra.kafka.delivery.Delivery`),
and only then are its records marked done and their offsets committed
(:class:`~infra.kafka.offsets.OffsetTracker`): a crash at any point
redelivers records, and the store drops the duplicates, so nothing is lost and
nothing counts twice.

Labels and requests may arrive in any order. A label whose class its request
does not list goes to the dead-letter topic as ``unknown_class``, when it
arrives or, if it came first, when its request does. A label whose request
never comes is kept for ``orphan_grace_s`` and then dead-lettered as
``unknown_frame`` and dropped by a periodic sweep. The grace clock also waits
for the intake itself to have run that long, so a restart behind a backlog of
requests does not drop labels whose requests are still unread.
"""

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TypeVar

from aiokafka import (
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    ConsumerRecord,
    TopicPartition,
)
from pydantic import BaseModel, ValidationError

from infra.component import Component
from infra.kafka.closing import drain, stop_client
from infra.kafka.consumer import create_consumer
from infra.kafka.delivery import Delivery, OutRecord
from infra.kafka.offsets import OffsetTracker
from infra.kafka.producer import create_producer
from schemas.dead_letter import DeadLetter, DeadLetterReason, dead_letter, header_text
from schemas.frames import FrameOrigin
from schemas.label_requests import LabelRequest
from schemas.labels import Label
from trainer.config import TrainerSettings
from trainer.store import LabelOutcome, SampleStore, StoredLabel

log = logging.getLogger(__name__)

DEAD_LETTER_MAX_VALUE_BYTES = 900 * 1024
"""The original value is cut here so that a dead letter stays under 1 MiB."""

_FETCH_TIMEOUT_MS = 500
_MAX_RECORDS = 500
_STOP_TIMEOUT_S = 10.0
_FINAL_COMMIT_TIMEOUT_S = 3.0
_MAX_SWEEP_INTERVAL_S = 30.0

_M = TypeVar("_M", bound=BaseModel)


@dataclass
class IntakeCounters:
    """What this intake has read since it started (valid records, duplicates included)."""

    requests_received: int = 0
    labels_received: int = 0
    unlabelable: int = 0
    dead_letters: Counter[str] = field(default_factory=Counter)


@dataclass
class _Letter:
    key: bytes | None
    letter: DeadLetter


@dataclass
class _BatchResult:
    letters: list[_Letter] = field(default_factory=list)
    drop_after_send: list[int] = field(default_factory=list)
    """Stored label seqs to delete once their dead letters are acknowledged."""
    grew: bool = False


class Intake(Component):
    """Feeds the sample store from ``label-requests`` and ``labels``.

    Use as ``async with Intake(settings, store) as intake:``. ``new_labels`` is
    set whenever the store's untrained count grows (and at start if it is not
    zero); the training loop waits on it and clears it.

    Args:
        settings: the trainer's settings (group, grace, Kafka).
        store: the sample store; shared with the training loop.
        sweep_interval_s: how often to look for orphaned labels; by default
            half the grace, at most 30 s.
        broker_reachable: whether the broker answers now; a stop does not wait for
            the batch in hand to be committed while it does not.
    """

    def __init__(
        self,
        settings: TrainerSettings,
        store: SampleStore,
        *,
        sweep_interval_s: float | None = None,
        broker_reachable: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__()
        self._broker_reachable = broker_reachable
        self.settings = settings
        self.store = store
        self.new_labels = asyncio.Event()
        self.counters = IntakeCounters()
        self.offsets = OffsetTracker("intake")
        self._topics = settings.kafka.topics
        self._sweep_every = sweep_interval_s or min(
            settings.orphan_grace_s / 2, _MAX_SWEEP_INTERVAL_S
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._delivery: Delivery | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._started_at = 0.0
        self._next_sweep = 0.0

    # -- lifecycle -------------------------------------------------------------------------

    async def _start(self) -> None:
        """Connects, joins the consumer group and starts consuming."""
        kafka = self.settings.kafka
        self._producer = create_producer(kafka)
        await self._producer.start()
        self._delivery = Delivery(self._producer, what="dead letters")
        self._consumer = create_consumer(kafka, group_id=self.settings.group_id)
        self._consumer.subscribe(
            [self._topics.label_requests, self._topics.labels], listener=_Revoke(self.offsets)
        )
        await self._consumer.start()
        self._started_at = time.monotonic()
        if await asyncio.to_thread(self.store.untrained_count):
            self.new_labels.set()
        self._task = self.supervise(self._run(), name="trainer-intake")
        log.info(
            "intake started: topics=%s,%s group=%s",
            self._topics.label_requests,
            self._topics.labels,
            self.settings.group_id,
        )

    async def wait(self) -> None:
        """Returns when consuming ends; raises its failure, if any."""
        if self._task is not None:
            await self._task

    async def _stop(self) -> None:
        """Finishes the batch in hand (its offsets are committed), then disconnects.

        With the broker away the batch cannot be committed: the stop does not wait,
        and says which partitions will be read again (the store drops the duplicates).
        """
        self._stopping.set()
        try:
            if self._task is not None:
                pending = await drain([self._task], _STOP_TIMEOUT_S, self._broker_reachable)
                for task in pending:
                    task.cancel()
                await asyncio.gather(self._task, return_exceptions=True)
            if self._consumer is not None:
                await self.offsets.commit_before_stop(
                    self._consumer,
                    _FINAL_COMMIT_TIMEOUT_S,
                    "their labels and requests will be read again",
                )
        finally:
            if self._consumer is not None:
                await stop_client(self._consumer, "the intake's consumer")
            if self._producer is not None:
                await stop_client(self._producer, "the intake's producer")
        log.info("intake stopped: counters=%s", self.counters)

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._consumer is not None
        while not self._stopping.is_set():
            batches = await self._consumer.getmany(
                timeout_ms=_FETCH_TIMEOUT_MS, max_records=_MAX_RECORDS
            )
            records = [record for part in batches.values() for record in part]
            if records:
                await self._handle(records)
            await self._maybe_sweep()

    async def _handle(self, records: list[ConsumerRecord]) -> None:
        """Store, then dead letters (acknowledged), then offsets: in that order."""
        assert self._consumer is not None
        positions = [(TopicPartition(r.topic, r.partition), r.offset) for r in records]
        self.offsets.consumed_many(positions)
        result = await asyncio.to_thread(self._apply, records)
        await self._send(result.letters)
        if result.drop_after_send:
            await asyncio.to_thread(self.store.drop_labels, result.drop_after_send)
        self.offsets.done_many(positions)
        await self.offsets.commit(self._consumer)
        if result.grew:
            self.new_labels.set()

    def _apply(self, records: list[ConsumerRecord]) -> _BatchResult:
        """Writes a batch to the store (runs in a thread: every write is an fsync)."""
        before = self.store.untrained_added
        result = _BatchResult()
        for record in records:
            if record.topic == self._topics.label_requests:
                self._apply_request(record, result)
            else:
                self._apply_label(record, result)
        result.grew = self.store.untrained_added > before
        return result

    def _apply_request(self, record: ConsumerRecord, result: _BatchResult) -> None:
        request = _parse(LabelRequest, record.value)
        if isinstance(request, str):
            result.letters.append(_record_letter(record, "invalid_schema", request))
            return
        self.counters.requests_received += 1
        self.store.add_request(request)
        for stored in self.store.labels_outside_classes(request.frame_id):
            detail = f"label {stored.label.label!r} is not one of {request.classes}"
            result.letters.append(self._stored_letter(stored, "unknown_class", detail))
            result.drop_after_send.append(stored.seq)

    def _apply_label(self, record: ConsumerRecord, result: _BatchResult) -> None:
        label = _parse(Label, record.value)
        if isinstance(label, str):
            result.letters.append(_record_letter(record, "invalid_schema", label))
            return
        self.counters.labels_received += 1
        self.counters.unlabelable += label.status == "unlabelable"
        origin = FrameOrigin(topic=record.topic, partition=record.partition, offset=record.offset)
        outcome = self.store.add_label(label, origin=origin, key=record.key)
        if outcome is LabelOutcome.UNKNOWN_CLASS:
            detail = f"label {label.label!r} is not a class of frame {label.frame_id!r}"
            result.letters.append(_record_letter(record, "unknown_class", detail))

    # -- orphans ---------------------------------------------------------------------------

    async def _maybe_sweep(self) -> None:
        now = time.monotonic()
        if now < self._next_sweep or now - self._started_at < self.settings.orphan_grace_s:
            return
        self._next_sweep = now + self._sweep_every
        await self._sweep_orphans()

    async def _sweep_orphans(self) -> None:
        """Dead-letters, then drops, the labels whose request did not come within the grace."""
        grace = self.settings.orphan_grace_s
        orphans = await asyncio.to_thread(self.store.pending_orphans, grace)
        letters, seqs = [], []
        for frame_id, _ in orphans:
            for stored in await asyncio.to_thread(self.store.labels_of, frame_id):
                detail = f"no label request for frame {frame_id!r} within {grace:g}s"
                letters.append(self._stored_letter(stored, "unknown_frame", detail))
                seqs.append(stored.seq)
        if letters:
            await self._send(letters)
            await asyncio.to_thread(self.store.drop_labels, seqs)

    # -- producing and committing ----------------------------------------------------------

    async def _send(self, letters: list[_Letter]) -> None:
        """Produces dead letters and awaits every ack; transient errors resend the set."""
        if not letters:
            return
        assert self._delivery is not None
        topic = self._topics.dead_letter
        await self._delivery.send_all(
            [OutRecord(topic, d.key, d.letter.model_dump_json().encode()) for d in letters]
        )
        for d in letters:
            self.counters.dead_letters[d.letter.reason] += 1
            origin = d.letter.origin
            log.warning(
                "dead letter: reason=%s topic=%s partition=%d offset=%d detail=%s",
                d.letter.reason,
                origin.topic,
                origin.partition,
                origin.offset,
                d.letter.detail,
            )

    def _stored_letter(self, stored: StoredLabel, reason: DeadLetterReason, detail: str) -> _Letter:
        frame_id = stored.label.frame_id
        origin = stored.origin or FrameOrigin(topic=self._topics.labels, partition=0, offset=0)
        value = stored.label.model_dump_json(exclude_none=True).encode()
        return _Letter(stored.key or frame_id.encode(), _dead_letter(origin, reason, detail, value))


class _Revoke(ConsumerRebalanceListener):
    """Forgets the offsets of revoked partitions; their records go to the new owner.

    Every batch is done and committed before the next fetch, and a rebalance
    only happens during a fetch, so nothing done is left uncommitted here.
    """

    def __init__(self, offsets: OffsetTracker) -> None:
        self.offsets = offsets

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        self.offsets.forget(revoked)

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info("intake assigned: %s", sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))


def _parse(model: type[_M], value: bytes | None) -> _M | str:
    """The validated model, or why it is invalid."""
    if not value:
        return "empty value"
    try:
        return model.model_validate_json(value)
    except ValidationError as error:
        problems = (
            f"{'.'.join(map(str, e['loc'])) or 'value'}: {e['msg']}" for e in error.errors()
        )
        return f"not a valid {model.__name__}: " + "; ".join(problems)[:1000]


def _record_letter(record: ConsumerRecord, reason: DeadLetterReason, detail: str) -> _Letter:
    origin = FrameOrigin(topic=record.topic, partition=record.partition, offset=record.offset)
    headers = header_text(record.headers or ())
    return _Letter(record.key, _dead_letter(origin, reason, detail, record.value, headers))


def _dead_letter(
    origin: FrameOrigin,
    reason: DeadLetterReason,
    detail: str,
    value: bytes | None,
    headers: dict[str, str] | None = None,
) -> DeadLetter:
    return dead_letter(
        origin,
        reason,
        detail,
        value,
        role="trainer",
        max_value_bytes=DEAD_LETTER_MAX_VALUE_BYTES,
        headers=headers,
    )
