"""Helpers that talk to the real broker the way any Kafka client would."""

import asyncio
import json
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from infra.kafka.connection import client_kwargs
from infra.kafka.settings import KafkaSettings

Record = tuple[bytes | None, bytes | None, list[tuple[str, bytes]]]


async def produce(settings: KafkaSettings, topic: str, records: Iterable[Record]) -> None:
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all")
    await producer.start()
    try:
        for key, value, headers in records:
            await producer.send(topic, value, key=key, headers=headers)
        await producer.flush()
    finally:
        await producer.stop()


async def read_json(
    settings: KafkaSettings, topic: str, until: Callable[[list[dict]], bool], within: float = 60
) -> list[dict]:
    """Reads a topic from the start until ``until(records)`` holds; records carry _key."""
    consumer = AIOKafkaConsumer(
        topic, group_id=None, auto_offset_reset="earliest", **client_kwargs(settings)
    )
    await consumer.start()
    out: list[dict] = []
    try:
        async with asyncio.timeout(within):
            while not until(out):
                batches = await consumer.getmany(timeout_ms=200)
                for records in batches.values():
                    for r in records:
                        out.append({**json.loads(r.value), "_key": r.key})
    finally:
        await consumer.stop()
    return out


async def committed_offsets(settings: KafkaSettings, topic: str, group: str) -> dict[int, int]:
    from aiokafka import TopicPartition

    consumer = AIOKafkaConsumer(group_id=group, enable_auto_commit=False, **client_kwargs(settings))
    await consumer.start()
    try:
        partitions = consumer.partitions_for_topic(topic) or set()
        if not partitions:
            await consumer._client.force_metadata_update()
            partitions = consumer.partitions_for_topic(topic) or set()
        return {p: (await consumer.committed(TopicPartition(topic, p))) or 0 for p in partitions}
    finally:
        await consumer.stop()


async def end_offsets(settings: KafkaSettings, topic: str) -> dict[int, int]:
    from aiokafka import TopicPartition

    consumer = AIOKafkaConsumer(group_id=None, **client_kwargs(settings))
    await consumer.start()
    try:
        await consumer._client.force_metadata_update()
        partitions = consumer.partitions_for_topic(topic) or set()
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in partitions])
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()
