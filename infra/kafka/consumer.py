"""The consumer every online component uses, its lag, and where a log really ends."""

import asyncio
from collections.abc import Collection
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError

from infra.kafka.connection import client_kwargs
from infra.kafka.settings import KafkaSettings

MAX_PARTITION_FETCH_BYTES = 16 * 1024 * 1024
"""Per partition and fetch; above the largest frame so a big one never stalls a partition."""

FETCH_MAX_BYTES = 64 * 1024 * 1024
"""Per fetch response, across partitions."""


def create_consumer(
    settings: KafkaSettings, *topics: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    """A consumer (not yet started) with manual commits.

    Offsets are committed by the caller, and only after what it produced for
    the consumed records is acknowledged (at-least-once). A group starting
    afresh reads from the earliest offset, so frames produced before the
    scorer's first start are scored too.

    Args:
        settings: where the cluster is and how to authenticate.
        *topics: topics to subscribe to; none to ``assign()`` partitions later.
        group_id: the consumer group; None for a reader that commits nothing.
        **overrides: any ``AIOKafkaConsumer`` argument, replacing the defaults
            (``enable_auto_commit=False``, ``auto_offset_reset="earliest"``,
            16 MiB per partition and 64 MiB per fetch).

    Returns:
        The consumer; the caller calls ``await consumer.start()`` and ``stop()``.

    Raises:
        ConfigError: the connection settings are inconsistent.
    """
    options: dict[str, Any] = {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": MAX_PARTITION_FETCH_BYTES,
        "fetch_max_bytes": FETCH_MAX_BYTES,
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **client_kwargs(settings), **options)


async def consumer_lag(consumer: AIOKafkaConsumer) -> dict[TopicPartition, int]:
    """Records not yet consumed, per assigned partition: high watermark minus position.

    A partition is left out until its high watermark is known, i.e. until the
    consumer has fetched from it at least once.

    Args:
        consumer: a started consumer.

    Returns:
        The lag of each assigned partition with a known high watermark.
    """
    lag: dict[TopicPartition, int] = {}
    for tp in consumer.assignment():
        highwater = consumer.highwater(tp)
        if highwater is None:
            continue
        try:
            position = await consumer.position(tp)
        except IllegalStateError:  # revoked by a rebalance meanwhile
            continue
        lag[tp] = max(0, highwater - position)
    return lag


async def log_end_offsets(
    consumer: AIOKafkaConsumer, partitions: Collection[TopicPartition], timeout_s: float = 10.0
) -> dict[TopicPartition, int]:
    """The offset after the last record of each partition, read from the log.

    Kafka's ``end_offsets`` is that offset. Tansu, the embedded broker, answers its last
    batch's first offset + 1, short of the end when that batch holds several records (a
    producer's linger batches them). So each partition's last batch is read, from the
    answered end - 1 on, and the position after it taken: right on both.

    Args:
        consumer: a started consumer with ``partitions`` assigned; their positions move,
            so seek afterwards.
        partitions: the partitions to look at.
        timeout_s: longest wait for the last batches.

    Returns:
        The end offset of each partition.

    Raises:
        TimeoutError: a last batch could not be read within ``timeout_s``.
    """
    ends = await consumer.end_offsets(list(partitions))
    starts = await consumer.beginning_offsets(list(partitions))
    left = {tp: end for tp, end in ends.items() if end > starts[tp]}
    for tp, end in left.items():
        consumer.seek(tp, end - 1)
    async with asyncio.timeout(timeout_s):
        while left:
            await consumer.getmany(*left, timeout_ms=200)
            for tp in list(left):
                position = await consumer.position(tp)
                if position >= left[tp]:
                    ends[tp] = position
                    del left[tp]
    return ends
