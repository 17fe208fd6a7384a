"""Delivery: send a set, await every ack, retry only what is retriable."""

import asyncio
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    MessageSizeTooLargeError,
    NotLeaderForPartitionError,
    RequestTimedOutError,
    UnknownTopicOrPartitionError,
)

from infra.errors import BrokerError, ConfigError
from infra.kafka.connection import client_kwargs
from infra.kafka.delivery import Delivery, OutRecord, is_retriable
from infra.kafka.producer import create_producer
from infra.kafka.settings import KafkaSettings
from schemas.topics import TopicNames


def test_is_retriable_reads_the_flag_and_counts_timeouts() -> None:
    for transient in (
        NotLeaderForPartitionError(),
        RequestTimedOutError(),
        KafkaConnectionError(),
        UnknownTopicOrPartitionError(),
        KafkaTimeoutError(),
        TimeoutError(),
        BrokerError("down"),
    ):
        assert is_retriable(transient), transient
    for permanent in (MessageSizeTooLargeError(), ValueError("bad"), ConfigError("bad")):
        assert not is_retriable(permanent), permanent


async def _read(settings: KafkaSettings, topic: str, at_least: int) -> list[tuple[int, bytes]]:
    """``(offset, value)`` of each record, once ``at_least`` arrived and no more came."""
    consumer = AIOKafkaConsumer(
        topic, group_id=None, auto_offset_reset="earliest", **client_kwargs(settings)
    )
    await consumer.start()
    out: list[tuple[int, bytes]] = []
    try:
        async with asyncio.timeout(30):
            while True:
                batches = await consumer.getmany(timeout_ms=200 if len(out) < at_least else 500)
                if not batches and len(out) >= at_least:
                    break
                out += [(r.offset, r.value) for batch in batches.values() for r in batch]
    finally:
        await consumer.stop()
    return out


def _records(topic: str, count: int) -> list[OutRecord]:
    return [
        OutRecord(topic, b"cam-1", f"frame-{i}".encode(), (("frame-id", str(i).encode()),))
        for i in range(count)
    ]


@pytest.fixture
async def producer(kafka_settings: KafkaSettings) -> Any:
    started = create_producer(kafka_settings, max_request_size=64 * 1024)
    await started.start()
    yield started
    await started.stop()


async def test_send_all_delivers_every_record_in_order(
    kafka_settings: KafkaSettings, winnow_topics: TopicNames, producer: AIOKafkaProducer
) -> None:
    topic = winnow_topics.dead_letter
    metadata = await Delivery(producer).send_all(_records(topic, 5))
    assert len(metadata) == 5 and len({m.partition for m in metadata}) == 1  # one key
    offsets = [m.offset for m in metadata]
    assert offsets == sorted(offsets) and offsets[-1] - offsets[0] == 4
    delivered = await _read(kafka_settings, topic, 5)
    assert delivered == [(o, f"frame-{i}".encode()) for i, o in enumerate(offsets)]
    assert await Delivery(producer).send_all([]) == []


async def test_a_permanent_error_is_raised_at_once(
    winnow_topics: TopicNames, producer: AIOKafkaProducer
) -> None:
    too_big = OutRecord(winnow_topics.dead_letter, None, bytes(128 * 1024))
    delivery = Delivery(producer, backoff_s=(30.0,))  # a retry would take 30 s
    async with asyncio.timeout(5):
        with pytest.raises(MessageSizeTooLargeError):
            await delivery.send_all([too_big])


class _FirstAckFails:
    """A real producer whose first acknowledgement fails as a leader change would."""

    def __init__(self, producer: AIOKafkaProducer, error: Exception) -> None:
        self._producer = producer
        self._error: Exception | None = error
        self.sends = 0

    async def send(self, *args: Any, **kwargs: Any) -> "asyncio.Future[Any]":
        self.sends += 1
        future = await self._producer.send(*args, **kwargs)
        if self._error is None:
            return future
        failed: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        failed.set_exception(self._error)
        self._error = None
        await future  # the record did reach the broker: a retry makes a duplicate
        return failed


async def test_a_retriable_failure_sends_the_whole_set_again(
    kafka_settings: KafkaSettings, winnow_topics: TopicNames, producer: AIOKafkaProducer
) -> None:
    topic = winnow_topics.dead_letter
    flaky = _FirstAckFails(producer, NotLeaderForPartitionError())
    delivery = Delivery(flaky, backoff_s=(0.01,))  # type: ignore[arg-type]
    metadata = await delivery.send_all(_records(topic, 3))
    assert flaky.sends == 6, "all three records were sent twice"
    assert len(metadata) == 3
    assert [m.offset for m in metadata] == [3, 4, 5], "the metadata of the attempt that succeeded"
    values = [value for _, value in await _read(kafka_settings, topic, 6)]
    assert values == [r.value for r in _records(topic, 3)] * 2  # duplicates are tolerated


async def test_a_retriable_failure_after_the_last_attempt_is_raised(
    winnow_topics: TopicNames, producer: AIOKafkaProducer
) -> None:
    flaky = _FirstAckFails(producer, RequestTimedOutError())
    with pytest.raises(RequestTimedOutError):
        await Delivery(flaky, backoff_s=()).send_all(_records(winnow_topics.dead_letter, 1))  # type: ignore[arg-type]
    assert flaky.sends == 1
