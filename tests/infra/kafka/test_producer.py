"""The producer's partitioner: every key where every Kafka client puts it, hashed once."""

import random

import pytest
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from aiokafka.partitioner import DefaultPartitioner
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.kafka.producer import KeyPartitioner, create_producer
from infra.kafka.settings import KafkaSettings
from schemas.topics import TopicNames


@settings(max_examples=300, deadline=None)
@given(
    keys=st.lists(st.binary(min_size=0, max_size=64), min_size=1, max_size=20),
    count=st.integers(1, 64),
)
def test_a_key_goes_where_the_default_partitioner_sends_it(keys: list[bytes], count: int) -> None:
    """The failure it catches: a key whose records land on another partition than the Java
    client's murmur2 (and aiokafka's default) puts them: per-key order across producers,
    and every consumer's idea of where a source's frames are, would break."""
    partitions = list(range(count))
    partitioner = KeyPartitioner(kept=8)  # small, so that it also starts over
    for key in keys * 2:  # each key hashed, then remembered
        assert partitioner(key, partitions, partitions) == DefaultPartitioner()(
            key, partitions, partitions
        )


def test_a_key_is_hashed_once_until_the_memory_starts_over(monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.kafka import producer

    hashed: list[bytes] = []
    original = producer.murmur2

    def counted(key: bytes) -> int:
        hashed.append(key)
        return original(key)

    monkeypatch.setattr(producer, "murmur2", counted)
    partitioner = KeyPartitioner(kept=3)
    for key in [b"cam0", b"cam1", b"cam0", b"cam1", b"cam0"]:
        partitioner(key, [0, 1, 2], [0, 1, 2])
    assert hashed == [b"cam0", b"cam1"]
    for key in [b"f1", b"f2", b"cam0"]:  # the fourth key starts the memory over
        partitioner(key, [0, 1, 2], [0, 1, 2])
    assert hashed == [b"cam0", b"cam1", b"f1", b"f2", b"cam0"]


def test_records_without_a_key_go_to_an_available_partition() -> None:
    random.seed(3)
    partitioner = KeyPartitioner()
    assert {partitioner(None, [0, 1, 2, 3], [1, 3]) for _ in range(50)} == {1, 3}
    assert {partitioner(None, [0, 1, 2], []) for _ in range(50)} == {0, 1, 2}


async def test_the_broker_gets_each_source_on_its_partition(
    kafka_settings: KafkaSettings, winnow_topics: TopicNames
) -> None:
    topic = winnow_topics.frames
    keys = [f"or-{i}-endoscope".encode() for i in range(12)]
    producer = create_producer(kafka_settings)
    await producer.start()
    try:
        for i in range(48):
            await producer.send(topic, str(i).encode(), key=keys[i % len(keys)])
        await producer.flush()
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=kafka_settings.bootstrap, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        records: list[ConsumerRecord] = []
        while len(records) < 48:
            batches = await consumer.getmany(timeout_ms=500)
            records += [r for batch in batches.values() for r in batch]
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
    finally:
        await consumer.stop()
    expected = DefaultPartitioner()
    assert all(r.partition == expected(r.key, partitions, partitions) for r in records)
    assert len({r.partition for r in records}) > 1
