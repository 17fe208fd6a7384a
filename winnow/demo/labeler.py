"""A simulated labeling team: answers label requests from the dataset's own labels."""

import asyncio
import time
from collections.abc import Callable
from datetime import UTC, datetime

from aiokafka import AIOKafkaProducer

from infra.kafka.consumer import create_consumer
from infra.kafka.producer import create_producer
from infra.kafka.settings import KafkaSettings
from schemas.label_requests import LabelRequest
from schemas.labels import Label


class SimulatedLabelers:
    """Reads ``winnow.label-requests`` and answers each after a delay, at a limited rate.

    Args:
        kafka: where the topics are.
        truth: the true class name of a frame id (None: the frame is not from the dataset).
        delay_s: how long a person takes to look at a frame.
        rate: answers per second the team can give, at most.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        truth: Callable[[str], str | None],
        *,
        delay_s: float,
        rate: float,
    ) -> None:
        self._kafka = kafka
        self._truth = truth
        self._delay_s = delay_s
        self._interval = 1 / rate if rate > 0 else 0.0
        self.answered: set[str] = set()
        self.requested: set[str] = set()
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="demo-labelers")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @property
    def pending(self) -> int:
        return len(self.requested - self.answered)

    async def _run(self) -> None:
        consumer = create_consumer(
            self._kafka, self._kafka.topics.label_requests, group_id="winnow-demo-labelers"
        )
        producer = create_producer(self._kafka)
        await consumer.start()
        await producer.start()
        try:
            next_free = time.monotonic()
            async for record in consumer:
                request = LabelRequest.model_validate_json(record.value)
                if request.frame_id in self.requested:
                    continue  # a redelivered request: answered already
                self.requested.add(request.frame_id)
                next_free = max(next_free, time.monotonic()) + self._interval
                await asyncio.sleep(max(self._delay_s, next_free - time.monotonic()))
                await self._answer(producer, request)
                await consumer.commit()
        finally:
            await consumer.stop()
            await producer.stop()

    async def _answer(self, producer: AIOKafkaProducer, request: LabelRequest) -> None:
        truth = self._truth(request.frame_id)
        label = Label(
            frame_id=request.frame_id,
            label=truth,
            annotator="simulated-team",
            status="labeled" if truth is not None else "unlabelable",
            labeled_at=datetime.now(UTC),
        )
        await producer.send_and_wait(
            self._kafka.topics.labels,
            label.model_dump_json().encode(),
            key=request.frame_id.encode(),
        )
        self.answered.add(request.frame_id)
