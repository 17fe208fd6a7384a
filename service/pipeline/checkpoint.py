"""The scorer's offsets: consumed, delivered, committed, and how far behind it is.

A batch is *consumed* when it is fetched and *delivered* once every record
produced for it is acknowledged; only the delivered prefix of each partition
is committed (``infra.kafka.offsets.OffsetTracker``). On a rebalance the
batches in flight are let finish and committed before the partitions go, so
the next owner starts where this scorer really stopped. Each rebalance also
moves this scorer's share of the labels-per-hour cap (``cap_shares``).
"""

import asyncio
import contextlib
import logging
import time

from aiokafka import AIOKafkaConsumer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import KafkaError

from infra.kafka.offsets import OffsetTracker
from service.metrics import ScorerMetrics
from service.pipeline.batching import Batch
from service.pipeline.cap_shares import CapShares

log = logging.getLogger(__name__)

COMMIT_INTERVAL_S = 0.05
DRAIN_TIMEOUT_S = 30.0
FINAL_COMMIT_TIMEOUT_S = 3.0
LAG_TIMEOUT_S = 2.0


class Checkpoint(ConsumerRebalanceListener):
    """Tracks the batches between fetch and acknowledgement and commits what is delivered.

    Also the consumer's rebalance listener (pass it to ``subscribe``).

    Args:
        consumer: the scorer's consumer (started later).
        metrics: commit results and the consumer lag gauge.
        interval_s: least time between commits while batches keep coming.
        drain_timeout_s: longest wait for the batches in flight on a rebalance.
        shares: told of each revocation (after the drain) and assignment; None for none.
    """

    def __init__(
        self,
        consumer: AIOKafkaConsumer,
        metrics: ScorerMetrics,
        *,
        interval_s: float = COMMIT_INTERVAL_S,
        drain_timeout_s: float = DRAIN_TIMEOUT_S,
        shares: CapShares | None = None,
    ) -> None:
        self._consumer = consumer
        self._shares = shares
        self._metrics = metrics
        self._offsets = OffsetTracker("scorer")
        self._interval_s = interval_s
        self._drain_timeout_s = drain_timeout_s
        self._last_commit = 0.0
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def consumed(self, batch: Batch) -> None:
        """A batch was fetched: its offsets stay uncommitted until it is delivered."""
        self._offsets.consumed_many(batch.positions())
        self._in_flight += 1
        self._idle.clear()

    def delivered(self, batch: Batch) -> None:
        """Every record of the batch is acknowledged: its offsets may be committed."""
        self._offsets.done_many(batch.positions())

    def settled(self) -> None:
        """A batch left the pipeline, delivered or not."""
        self._in_flight -= 1
        if self._in_flight == 0:
            self._idle.set()

    async def commit(self, *, more_coming: bool = False) -> None:
        """Commits the delivered prefix of each partition, at most every ``interval_s`` while
        ``more_coming``, and updates the lag gauge."""
        if more_coming and time.monotonic() - self._last_commit < self._interval_s:
            return
        self._last_commit = time.monotonic()
        committed = await self._offsets.commit(self._consumer)
        if committed is None:
            self._metrics.commits.labels(result="failed").inc()
        elif committed:
            self._metrics.commits.labels(result="ok").inc()
        for tp in self._consumer.assignment():
            highwater, position = self._consumer.highwater(tp), self._offsets.position(tp)
            if highwater is not None and position is not None:
                gauge = self._metrics.consumer_lag.labels(tp.topic, str(tp.partition))
                gauge.set(max(0, highwater - position))

    async def final_commit(self, timeout_s: float = FINAL_COMMIT_TIMEOUT_S) -> None:
        """The stop's commit: at most ``timeout_s``; names what stays uncommitted if it fails."""
        await self._offsets.commit_before_stop(
            self._consumer, timeout_s, "their frames will be decided again"
        )

    async def refresh_lag(self) -> None:
        """Sets the lag gauges from the broker's end offsets, whatever the pipeline is doing.

        Commits set them too, but a stalled pipeline commits nothing: asked on each scrape,
        the broker shows its lag growing, which tells a stalled scorer from an idle one.
        """
        try:
            lag = await asyncio.wait_for(self.lag(), LAG_TIMEOUT_S)
        except (KafkaError, TimeoutError) as error:
            log.debug("consumer lag not refreshed: %r", error)
            return
        for tp, behind in lag.items():
            self._metrics.consumer_lag.labels(tp.topic, str(tp.partition)).set(behind)

    async def lag(self) -> dict[TopicPartition, int]:
        """End offset minus the delivered position of each assigned partition."""
        consumer = self._consumer
        assigned = sorted(consumer.assignment())
        ends = await consumer.end_offsets(assigned) if assigned else {}
        lag = {}
        for tp, end in ends.items():
            position = self._offsets.position(tp)
            if position is None:  # nothing consumed since the assignment: where fetching starts
                position = await consumer.position(tp)
            lag[tp] = max(0, end - position)
        return lag

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        """Lets the batches in flight finish, then commits them before giving partitions up."""
        try:
            await asyncio.wait_for(self._idle.wait(), self._drain_timeout_s)
        except TimeoutError:
            log.warning(
                "rebalance: batches still in flight after %.0fs; they will be redelivered",
                self._drain_timeout_s,
            )
        await self.commit()
        if self._shares is not None:
            self._shares.revoked()
        self._offsets.forget(revoked)
        for tp in revoked:  # another scorer reports them now; a frozen lag here would mislead
            with contextlib.suppress(KeyError):  # never reported
                self._metrics.consumer_lag.remove(tp.topic, str(tp.partition))
        log.info("partitions revoked: %s", sorted(f"{tp.topic}:{tp.partition}" for tp in revoked))

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions assigned: %s", sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))
        if self._shares is not None:
            await self._shares.assigned(self._consumer, assigned)
