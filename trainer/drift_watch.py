"""The trainer's view of ``winnow.drift``: the scorer's drift alarms, read from the end.

The watcher has no consumer group: it assigns every partition of the drift
topic itself and starts at the end offsets it finds when it first looks, so
an alarm from before a restart never starts a round, while every alarm
published after :meth:`DriftWatch.start` returns is seen. Partitions it did not
find on that first look (a topic created later) are read from their
beginning, since everything in them is newer than the watcher. A broker that
goes away, or a drift topic that does not exist yet, is logged and retried; the
watcher resumes where it stopped and never stops the trainer.
"""

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import KafkaError
from pydantic import ValidationError

from infra.component import Component
from infra.errors import BrokerError
from infra.kafka.admin import topic_partitions
from infra.kafka.closing import stop_client
from infra.kafka.consumer import create_consumer, log_end_offsets
from infra.kafka.settings import KafkaSettings
from schemas.drift import DriftEvent
from trainer.metrics import TrainerMetrics

log = logging.getLogger(__name__)

_FETCH_TIMEOUT_MS = 500
_TOPIC_RETRY_S = 5.0
_RETRY_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)


class DriftWatch(Component):
    """Reads drift events; an alarm sets :attr:`alarm` and is kept in :attr:`last_alarm`.

    Use as ``async with DriftWatch(kafka, metrics) as watch:``. The training
    loop waits on ``alarm`` and clears it when it takes the alarm.

    Args:
        kafka: how to reach the cluster, and the topic prefix.
        metrics: the trainer's metrics (``winnow_trainer_drift_alarms_total``).
        ready_timeout_s: how long :meth:`start` waits for the first look at
            the topic before it returns anyway (the watcher keeps trying).
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        metrics: TrainerMetrics,
        *,
        ready_timeout_s: float = 10.0,
    ) -> None:
        super().__init__()
        self.topic = kafka.topics.drift
        self.alarm = asyncio.Event()
        self.last_alarm: DriftEvent | None = None
        self.alarms = 0
        self.statistics = 0
        self.invalid = 0
        self._kafka = kafka
        self._metrics = metrics
        self._ready_timeout_s = ready_timeout_s
        self._positions: dict[TopicPartition, int] = {}
        """Next offset to read, per partition; survives reconnects."""
        self._looked = False
        """Whether the topic has been looked up once (its end offsets are the start)."""
        self._assigned = False
        self._ready = asyncio.Event()

    # -- lifecycle (start, stop and ``async with`` come from Component) ---------------------

    async def _start(self) -> None:
        """Starts watching; returns once the end offsets are known (or after the ready timeout).

        A crash of the watch loop is logged by the base at once; from then on
        drift alarms no longer start rounds.
        """
        self.supervise(self._run(), name="trainer-drift-watch")
        try:
            async with asyncio.timeout(self._ready_timeout_s):
                await self._ready.wait()
        except TimeoutError:
            log.warning("drift watch not ready yet: topic=%s; still trying", self.topic)

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        attempt = 0
        while True:
            self._assigned = False
            try:
                await self._watch()
            except (KafkaError, BrokerError, OSError) as error:
                attempt = 0 if self._assigned else attempt
                delay = _RETRY_BACKOFF_S[min(attempt, len(_RETRY_BACKOFF_S) - 1)]
                attempt += 1
                log.warning(
                    "drift watch: topic=%s error=%r; retrying in %.0fs", self.topic, error, delay
                )
                await asyncio.sleep(delay)

    async def _watch(self) -> None:
        """One connection: assign, then read until an error or cancellation."""
        consumer = create_consumer(self._kafka, group_id=None, auto_offset_reset="latest")
        try:
            await consumer.start()
            while True:
                if await self._assign(consumer):
                    break
                await asyncio.sleep(_TOPIC_RETRY_S)
            while True:
                batches = await consumer.getmany(timeout_ms=_FETCH_TIMEOUT_MS)
                for tp, records in batches.items():
                    for record in records:
                        self._handle(record)
                        self._positions[tp] = record.offset + 1
        finally:
            await stop_client(consumer, "the drift watch's consumer")

    async def _assign(self, consumer: AIOKafkaConsumer) -> bool:
        """Assigns the topic's partitions at their saved, end or beginning offsets."""
        partitions = await topic_partitions(self._kafka, self.topic)
        if not partitions:
            log.log(
                logging.DEBUG if self._looked else logging.WARNING,
                "drift topic %s not found; looking again every %.0fs",
                self.topic,
                _TOPIC_RETRY_S,
            )
            self._looked = True
            self._ready.set()
            return False
        new = [tp for tp in partitions if tp not in self._positions]
        if new:
            # the end only on the first look: later partitions hold nothing older than us
            if self._looked:
                self._positions.update(await consumer.beginning_offsets(new))
            else:
                consumer.assign(new)
                self._positions.update(await log_end_offsets(consumer, new))
        self._looked = True
        consumer.assign(partitions)
        for tp in partitions:
            consumer.seek(tp, self._positions[tp])
        self._assigned = True
        self._ready.set()
        log.info(
            "watching drift alarms: topic=%s offsets=%s",
            self.topic,
            ",".join(f"{tp.partition}:{self._positions[tp]}" for tp in partitions),
        )
        return True

    def _handle(self, record: ConsumerRecord) -> None:
        """Takes an alarm; skips statistics and records that are not drift events."""
        try:
            event = DriftEvent.model_validate_json(record.value or b"")
        except ValidationError as error:
            self.invalid += 1
            log.warning(
                "skipping an invalid drift event: topic=%s partition=%d offset=%d error=%s",
                record.topic,
                record.partition,
                record.offset,
                "; ".join(e["msg"] for e in error.errors())[:300],
            )
            return
        if event.kind != "alarm":
            self.statistics += 1
            return
        self.alarms += 1
        self.last_alarm = event
        self._metrics.drift_alarms.labels(detector=event.detector).inc()
        log.info(
            "drift alarm: detector=%s source=%s model=%s statistic=%.4g threshold=%.4g "
            "topic=%s partition=%d offset=%d",
            event.detector,
            event.source_id,
            event.model_version,
            event.statistic,
            event.threshold,
            record.topic,
            record.partition,
            record.offset,
        )
        self.alarm.set()
