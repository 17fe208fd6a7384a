"""Produce, consume in a group, commit, and resume from the committed offsets."""

import asyncio

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from infra.kafka.consumer import consumer_lag, create_consumer, log_end_offsets
from infra.kafka.producer import create_producer
from infra.kafka.settings import KafkaSettings
from schemas.topics import TopicNames

# Tansu completes a JoinGroup after about half the session timeout, and a member
# that left is only dropped when its session expires (LeaveGroup does not end
# it), so the default 10 s session makes each join take 5 s and each rejoin
# ~19 s. A shorter session keeps these tests quick; it is still 6 heartbeats.
FAST_GROUP = {"session_timeout_ms": 3000, "heartbeat_interval_ms": 500}


async def _produce(settings: KafkaSettings, topic: str, values: list[bytes]) -> None:
    producer = create_producer(settings)
    await producer.start()
    try:
        for i, value in enumerate(values):
            await producer.send(
                topic, value, key=f"camera-{i % 5}".encode(), headers=[("frame-id", value[:16])]
            )
        await producer.flush()
    finally:
        await producer.stop()


async def _consume(consumer: AIOKafkaConsumer, count: int) -> list[ConsumerRecord]:
    records: list[ConsumerRecord] = []
    async with asyncio.timeout(30):
        while len(records) < count:
            batches = await consumer.getmany(timeout_ms=200)
            records.extend(r for batch in batches.values() for r in batch)
    return records


async def test_a_group_resumes_from_its_committed_offsets(
    kafka_settings: KafkaSettings, winnow_topics: TopicNames, group_id: str
) -> None:
    topic = winnow_topics.frames
    first = [f"frame-{i:04d}".encode() for i in range(30)]
    await _produce(kafka_settings, topic, first)

    consumer = create_consumer(kafka_settings, topic, group_id=group_id, **FAST_GROUP)
    await consumer.start()
    try:
        records = await _consume(consumer, len(first))
        await consumer.commit()
        assignment = consumer.assignment()
    finally:
        await consumer.stop()
    assert sorted(r.value for r in records) == first
    assert all(r.key == f"camera-{int(r.value[6:]) % 5}".encode() for r in records)
    assert all(r.headers == (("frame-id", r.value),) for r in records)
    assert {tp.partition for tp in assignment} == {0, 1, 2}

    second = [f"frame-{i:04d}".encode() for i in range(30, 40)]
    await _produce(kafka_settings, topic, second)
    consumer = create_consumer(kafka_settings, topic, group_id=group_id, **FAST_GROUP)
    await consumer.start()
    try:
        committed = {tp.partition: await consumer.committed(tp) for tp in assignment}
        records = await _consume(consumer, len(second))
        await asyncio.sleep(0.5)  # anything re-read from before the commit would show up now
        records += [r for b in (await consumer.getmany(timeout_ms=200)).values() for r in b]
    finally:
        await consumer.stop()
    assert sum(committed.values()) == len(first)
    assert sorted(r.value for r in records) == second


async def test_frames_of_several_mebibytes_go_through(
    kafka_settings: KafkaSettings, winnow_topics: TopicNames, group_id: str
) -> None:
    big = bytes(range(256)) * (6 * 1024 * 1024 // 256)  # over aiokafka's 1 MiB defaults
    topic = winnow_topics.frames
    await _produce(kafka_settings, topic, [big])
    consumer = create_consumer(kafka_settings, topic, group_id=group_id, **FAST_GROUP)
    await consumer.start()
    try:
        (record,) = await _consume(consumer, 1)
    finally:
        await consumer.stop()
    assert record.value == big


async def test_consumer_lag_counts_what_is_left_to_read(
    kafka_settings: KafkaSettings, winnow_topics: TopicNames, group_id: str
) -> None:
    topic = winnow_topics.frames
    await _produce(kafka_settings, topic, [f"frame-{i:04d}".encode() for i in range(20)])
    consumer = create_consumer(kafka_settings, topic, group_id=group_id, **FAST_GROUP)
    await consumer.start()
    try:
        assert await consumer_lag(consumer) == {}  # nothing fetched: high watermarks unknown
        records = await _consume(consumer, 20)
        assert sum((await consumer_lag(consumer)).values()) == 0
        per_partition = {p: sum(r.partition == p for r in records) for p in range(3)}
        await consumer.seek_to_beginning()
        lag = await consumer_lag(consumer)
    finally:
        await consumer.stop()
    # An empty partition shows up with lag 0 once fetched, or not at all.
    assert {tp: n for tp, n in lag.items() if n} == {
        TopicPartition(topic, p): n for p, n in per_partition.items() if n
    }
    assert sum(lag.values()) == 20


async def test_the_log_end_offset_counts_a_last_batch_of_several_records(
    kafka_settings: KafkaSettings, winnow_topics: TopicNames
) -> None:
    """The failure it catches: taking the broker's ``end_offsets`` as where the log ends.
    Tansu answers its last batch's first offset + 1, so whoever reads "up to the end" misses
    the rest of a batch (the cap's history lost requests that way)."""
    topic = winnow_topics.drift
    producer = create_producer(kafka_settings, linger_ms=200)
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"alone", partition=0)
        sent = [await producer.send(topic, f"{i}".encode(), partition=0) for i in range(5)]
        await asyncio.gather(*sent)
    finally:
        await producer.stop()
    consumer = create_consumer(kafka_settings, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        assert await log_end_offsets(consumer, [tp]) == {tp: 6}
    finally:
        await consumer.stop()
