"""The scorer's fetch wait lets the embedded broker answer from a large partition."""

import time

import pytest
from aiokafka import AIOKafkaProducer, TopicPartition

from infra.kafka.connection import client_kwargs
from infra.kafka.consumer import create_consumer
from tests.kafka_helpers import end_offsets
from winnow.bench.soak.roles import SOAK_FETCH_MAX_WAIT_MS

pytestmark = pytest.mark.slow

RECORDS = 60_000


async def _produce_one_per_batch(kafka, topic: str, count: int) -> None:
    """As a camera at a steady rate does: one record per batch (the broker's unit)."""
    producer = AIOKafkaProducer(**client_kwargs(kafka), acks=1, linger_ms=0, max_batch_size=256)
    await producer.start()
    try:
        value = b"x" * 120
        for _ in range(count):
            await producer.send(topic, value, key=b"cam")
        await producer.flush()
    finally:
        await producer.stop()


async def _fetched(kafka, topic: str, partition: int, start: int, wait_ms: int) -> int:
    consumer = create_consumer(kafka, group_id=None, fetch_max_wait_ms=wait_ms)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        consumer.assign([tp])
        consumer.seek(tp, start)
        got, deadline = 0, time.monotonic() + 20
        while got < 5000 and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            got += sum(len(records) for records in batches.values())
        return got
    finally:
        await consumer.stop()


@pytest.mark.parametrize("wait_ms", [SOAK_FETCH_MAX_WAIT_MS])
async def test_the_scorer_fetches_from_deep_in_a_large_partition(
    kafka_settings, winnow_topics, wait_ms: int
) -> None:
    """Catches: the soak's stalls. Tansu answers a fetch whose wait ends before it has read
    the records with no records at all, and its reads slow down as a partition grows. The
    scorer used to wait 20 ms (its batch wait); its soak partition held ~170,000 frames when it
    got nothing more, and neither did the scorers restarted after it. Measured with this
    test (10,000 records asked for from the end of a partition of 60,000 one-record batches,
    20 s allowed): 30 ms got 0, 50 ms 5,034, 100 ms and more all of them; at 250,000 records
    200 ms got 7,963 and 500 ms all."""
    topic = kafka_settings.topics.frames
    started = time.monotonic()
    await _produce_one_per_batch(kafka_settings, topic, RECORDS)
    print(f"produced in {time.monotonic() - started:.0f} s")
    ends = await end_offsets(kafka_settings, topic)
    partition = max(ends, key=ends.__getitem__)  # one key: one partition
    assert ends[partition] > RECORDS * 0.9, ends
    got = await _fetched(kafka_settings, topic, partition, ends[partition] - 10_000, wait_ms)
    print(f"fetch wait {wait_ms} ms: {got} records")
    assert got >= 5000
