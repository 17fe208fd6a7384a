"""The labeling queue: label requests in from Kafka, labels out, offsets committed safely.

The app consumes ``winnow.label-requests`` in a consumer group and holds the
frames in a :class:`~service.labeling.leases.LeasePool`. An answer is produced
to ``winnow.labels`` and, once Kafka acknowledges it, the frame is done; the
offset committed per partition is the contiguous done prefix
(:class:`~infra.kafka.offsets.OffsetTracker`). Stopping the app with frames
leased but unanswered loses none of them: the next instance in the group reads
them again from the committed offset.
"""

import asyncio
import contextlib
import logging
import time
from collections import deque
from datetime import UTC, datetime
from typing import Literal

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from prometheus_client import CollectorRegistry, Counter, Gauge
from pydantic import ValidationError

from infra.component import Component
from infra.kafka import consumer_lag, create_consumer, create_producer
from infra.kafka.closing import stop_client
from infra.kafka.offsets import OffsetTracker
from infra.kafka.settings import KafkaSettings
from schemas.label_requests import LabelRequest
from schemas.labels import Label
from service.config import LabelAppSettings
from service.labeling.leases import Completion, Lease, LeaseError, LeasePool

log = logging.getLogger(__name__)

RATE_WINDOW_S = 600.0
"""A labeler's rate is measured over the last ten minutes."""

ANSWER_DRAIN_S = 10.0
"""On a rebalance, the longest wait for answers already sent to Kafka before committing."""

FINAL_COMMIT_TIMEOUT_S = 3.0
"""The stop's commit waits no longer: with the broker away it cannot succeed."""


class LabelQueue(Component):
    """Serves leases to labelers and publishes their answers.

    Use as ``async with LabelQueue(kafka, settings) as queue``; ``stop()``
    commits the done prefix and is idempotent.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        settings: LabelAppSettings,
        registry: CollectorRegistry | None = None,
    ) -> None:
        super().__init__()
        self.kafka = kafka
        self.settings = settings
        self.topics = kafka.topics
        self.pool = LeasePool(settings.lease_s, settings.second_opinion)
        self.offsets = OffsetTracker("label-app")
        self.registry = registry or CollectorRegistry()
        self._labels_total = Counter(
            "winnow_label_app_labels",
            "labels acknowledged, by status and labeler",
            ["status", "annotator"],
            registry=self.registry,
        )
        self._disagreements = Counter(
            "winnow_label_app_disagreements",
            "second-opinion frames whose two labels differ",
            registry=self.registry,
        )
        self._depth = Gauge(
            "winnow_label_app_queue_depth", "frames waiting for a labeler", registry=self.registry
        )
        self._leased = Gauge(
            "winnow_label_app_leased", "frames leased to a labeler now", registry=self.registry
        )
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._lag = 0
        self._answers: dict[str, deque[float]] = {}
        self._counts: dict[str, int] = {}
        self._answering = 0  # answers sent and not yet acknowledged
        self._answered = asyncio.Event()  # set while none is
        self._answered.set()

    async def _start(self) -> None:
        """Starts the producer, then the consumer and its loop."""
        self._producer = create_producer(self.kafka)
        await self._producer.start()
        self._consumer = create_consumer(self.kafka, group_id=self.settings.group_id)
        self._consumer.subscribe([self.topics.label_requests], listener=_Rebalance(self))
        await self._consumer.start()
        self.supervise(self._run(), name="label-queue")

    async def _stop(self) -> None:
        """Stops the loop, commits the done prefix, closes the clients."""
        # The loop has nothing to drain (unanswered frames are read again by the group):
        # stop it first, so nothing is consumed after the final commit.
        await self._cancel_supervised()
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            try:
                await self.offsets.commit_before_stop(
                    consumer, FINAL_COMMIT_TIMEOUT_S, "their frames will be served again"
                )
            finally:
                await stop_client(consumer, "the label queue's consumer")
        producer, self._producer = self._producer, None
        if producer is not None:
            await stop_client(producer, "the label queue's producer")

    @property
    def failure(self) -> BaseException | None:
        """The error the consume loop stopped with, if it did."""
        for task in self._supervised:
            if task.done() and not task.cancelled() and task.exception() is not None:
                return task.exception()
        return None

    @property
    def assigned(self) -> list[TopicPartition]:
        """The label-request partitions this instance serves."""
        return sorted(self._consumer.assignment()) if self._consumer else []

    # -- what the app calls --------------------------------------------------------
    def next(self, annotator: str) -> Lease | None:
        return self.pool.next(annotator)

    def undo(self, annotator: str) -> Lease | None:
        return self.pool.undo(annotator)

    def skip(self, lease_id: str, annotator: str) -> None:
        self.pool.release(lease_id, annotator)

    async def answer(
        self,
        lease_id: str,
        annotator: str,
        label: str | None,
        status: Literal["labeled", "unlabelable"] = "labeled",
    ) -> Label:
        """Publishes an answer and waits for Kafka's acknowledgement.

        Raises:
            LeaseError: the lease is unknown.
            ValueError: the label is not one of the frame's classes.
            KafkaError: the label was not acknowledged; the lease stays.
        """
        lease = self.pool.get(lease_id, annotator)
        request = lease.frame.request
        if status == "labeled" and label not in request.classes:
            raise ValueError(f"{label!r} is not one of {request.classes}")
        record = Label(
            frame_id=request.frame_id,
            label=label if status == "labeled" else None,
            status=status,
            annotator=annotator,
            labeled_at=datetime.now(UTC),
        )
        assert self._producer is not None, "the queue is not started"
        self._answering += 1
        self._answered.clear()
        try:
            await self._producer.send_and_wait(
                self.topics.labels,
                record.model_dump_json(exclude_none=True).encode(),
                key=request.frame_id.encode(),
            )
            self._done_answer(lease, record)
        finally:
            self._answering -= 1
            if not self._answering:
                self._answered.set()
        return record

    async def answers_settled(self, timeout_s: float = ANSWER_DRAIN_S) -> bool:
        """Waits until no answer is in flight (at most ``timeout_s``); whether none is."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._answered.wait(), timeout_s)
        return self._answered.is_set()

    def stats(self, annotator: str) -> dict[str, float | int]:
        """Queue depth, and the labeler's count and rate (labels per hour)."""
        now = time.monotonic()
        times = self._answers.get(annotator, deque())
        while times and times[0] < now - RATE_WINDOW_S:
            times.popleft()
        span = max(60.0, now - times[0]) if times else RATE_WINDOW_S
        depth = self.update_gauges()
        return {
            "queue_depth": depth,
            "leased": self.pool.leased,
            "my_count": self._counts.get(annotator, 0),
            "my_rate_per_hour": round(len(times) * 3600 / span, 1),
        }

    def update_gauges(self) -> int:
        """Sets the queue depth and leased gauges (also on each scrape); returns the depth."""
        depth = self.pool.waiting + self._lag
        self._depth.set(depth)
        self._leased.set(self.pool.leased)
        return depth

    # -- internals -------------------------------------------------------------------
    def _done_answer(self, lease: Lease, record: Label) -> None:
        answer = record.label if record.status == "labeled" else "unlabelable"
        completion: Completion = self.pool.complete(lease, answer or "unlabelable")
        self._labels_total.labels(record.status, lease.annotator).inc()
        self._counts[lease.annotator] = self._counts.get(lease.annotator, 0) + 1
        self._answers.setdefault(lease.annotator, deque()).append(time.monotonic())
        for tp, offset in completion.positions:
            self.offsets.done(tp, offset)
        if completion.disagreement:
            self._disagreements.inc()
            log.warning(
                "second opinion disagrees on frame %s: %s",
                record.frame_id,
                ", ".join(f"{who}={what}" for who, what in completion.disagreement.items()),
            )

    async def _run(self) -> None:
        consumer = self._consumer
        assert consumer is not None
        last_commit = time.monotonic()
        while True:
            self._flow_control(consumer)
            batches = await consumer.getmany(timeout_ms=200, max_records=100)
            for tp, records in batches.items():
                for record in records:
                    self._add(tp, record.offset, record.value)
            self.pool.expire()
            if time.monotonic() - last_commit >= self.settings.commit_interval_s:
                await self._commit(consumer)
                self._lag = sum((await consumer_lag(consumer)).values())
                last_commit = time.monotonic()

    def _add(self, tp: TopicPartition, offset: int, value: bytes | None) -> None:
        self.offsets.consumed(tp, offset)
        try:
            request = LabelRequest.model_validate_json(value or b"")
        except ValidationError as error:
            # Never labelable: done at once, so it cannot hold back the partition.
            log.error(
                "unreadable label request topic=%s partition=%s offset=%s: %s",
                tp.topic, tp.partition, offset, error.errors()[:1],
            )  # fmt: skip
            self.offsets.done(tp, offset)
            return
        self.pool.add(request, (tp, offset))

    def _flow_control(self, consumer: AIOKafkaConsumer) -> None:
        assigned = consumer.assignment()
        if len(self.pool) >= self.settings.max_buffered:
            consumer.pause(*assigned)
        elif consumer.paused():
            consumer.resume(*consumer.paused())

    async def _commit(self, consumer: AIOKafkaConsumer) -> None:
        committed = await self.offsets.commit(consumer)  # a failure is logged and retried later
        if committed:
            where = {f"{tp.topic}:{tp.partition}": offset for tp, offset in committed.items()}
            log.debug("committed %s", where)


class _Rebalance(ConsumerRebalanceListener):
    """Commits what is done before partitions move; forgets frames it no longer owns.

    Answers already sent are awaited first: committed with their frames, those frames are
    not served again by the next owner while their label is still on its way (which would
    let a second labeler hold a frame the first one is answering).
    """

    def __init__(self, queue: LabelQueue) -> None:
        self.queue = queue

    async def on_partitions_revoked(self, revoked: set[TopicPartition]) -> None:
        consumer = self.queue._consumer
        if revoked and not await self.queue.answers_settled():
            log.warning(
                "rebalance: answers still unacknowledged after %.0fs; their frames may be "
                "served again",
                ANSWER_DRAIN_S,
            )
        if consumer is not None and revoked:
            await self.queue._commit(consumer)
        self.queue.pool.forget(set(revoked))
        self.queue.offsets.forget(set(revoked))

    async def on_partitions_assigned(self, assigned: set[TopicPartition]) -> None:
        log.info(
            "label requests assigned: %s", sorted(f"{tp.topic}:{tp.partition}" for tp in assigned)
        )


__all__ = ["LabelQueue", "LeaseError"]
