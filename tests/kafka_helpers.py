"""Helpers that talk to the real broker the way any Kafka client would."""

import asyncio
import json
from collections.abc import Callable, Iterable

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from infra.kafka.admin import topic_partitions
from infra.kafka.connection import client_kwargs
from infra.kafka.consumer import log_end_offsets
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
    """Reads a topic from the start until ``until(records)`` holds; records carry _key.

    A reader that has fetched nothing new for ``STALL_S`` starts over with a fresh consumer
    (a stuck fetch is the reader's problem, not the system's under test); when ``within``
    runs out, the TimeoutError says how many records were read against the topic's end
    offsets, so a record never written is told apart from one not read.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    out = await _read_from_start(settings, topic, until, deadline)
    while not until(out) and loop.time() < deadline:
        out = await _read_from_start(settings, topic, until, deadline)
    if not until(out):
        ends = await end_offsets(settings, topic)
        raise TimeoutError(
            f"{topic}: read {len(out)} records in {within:.0f} s and the condition does not "
            f"hold; the broker's end offsets: {ends} ({sum(ends.values())} records)"
        )
    return out


STALL_S = 10.0  # nothing new fetched for this long: read again with a fresh consumer


async def _read_from_start(
    settings: KafkaSettings, topic: str, until: Callable[[list[dict]], bool], deadline: float
) -> list[dict]:
    loop = asyncio.get_running_loop()
    consumer = AIOKafkaConsumer(
        topic, group_id=None, auto_offset_reset="earliest", **client_kwargs(settings)
    )
    await consumer.start()
    out: list[dict] = []
    last_new = loop.time()
    try:
        while not until(out) and loop.time() < min(deadline, last_new + STALL_S):
            batches = await consumer.getmany(timeout_ms=200)
            for records in batches.values():
                for r in records:
                    out.append({**json.loads(r.value), "_key": r.key})
                    last_new = loop.time()
    finally:
        await consumer.stop()
    return out


async def committed_offsets(settings: KafkaSettings, topic: str, group: str) -> dict[int, int]:
    """The group's committed offset of each partition of ``topic`` (0 where none)."""
    partitions = await topic_partitions(settings, topic)
    consumer = AIOKafkaConsumer(group_id=group, enable_auto_commit=False, **client_kwargs(settings))
    await consumer.start()
    try:
        return {tp.partition: (await consumer.committed(tp)) or 0 for tp in partitions}
    finally:
        await consumer.stop()


async def end_offsets(settings: KafkaSettings, topic: str) -> dict[int, int]:
    """The end offset (next offset to be written) of each partition of ``topic``."""
    partitions = await topic_partitions(settings, topic)
    consumer = AIOKafkaConsumer(group_id=None, **client_kwargs(settings))
    await consumer.start()
    try:
        if not partitions:
            return {}
        consumer.assign(partitions)
        ends = await log_end_offsets(consumer, partitions, timeout_s=30)
        return {tp.partition: offset for tp, offset in ends.items()}
    finally:
        await consumer.stop()
