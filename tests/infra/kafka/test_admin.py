"""Topic creation against the real broker."""

import pytest
from aiokafka import AIOKafkaClient

from infra.kafka.admin import ensure_topics
from infra.kafka.connection import client_kwargs
from infra.kafka.settings import KafkaSettings
from schemas.topics import TopicNames
from service.errors import BrokerError, ConfigError


async def _partitions(settings: KafkaSettings) -> dict[str, int]:
    """Partition count of every topic under the test's prefix (all-topics metadata)."""
    client = AIOKafkaClient(**client_kwargs(settings))
    await client.bootstrap()
    try:
        cluster = await client.fetch_all_metadata()
    finally:
        await client.close()
    return {
        topic: len(cluster.partitions_for_topic(topic) or ())
        for topic in cluster.topics()
        if topic.startswith(settings.topic_prefix)
    }


async def test_creates_topics_with_the_configured_partition_count(
    kafka_settings: KafkaSettings,
) -> None:
    names = [f"{kafka_settings.topic_prefix}a", f"{kafka_settings.topic_prefix}b"]
    await ensure_topics(kafka_settings.model_copy(update={"partitions": 4}), names)
    assert await _partitions(kafka_settings) == {names[0]: 4, names[1]: 4}


async def test_an_explicit_partition_count_wins(kafka_settings: KafkaSettings) -> None:
    name = f"{kafka_settings.topic_prefix}two"
    await ensure_topics(kafka_settings, [name], partitions=2)
    assert await _partitions(kafka_settings) == {name: 2}


async def test_is_idempotent_and_leaves_existing_topics_alone(
    kafka_settings: KafkaSettings,
) -> None:
    old, new = f"{kafka_settings.topic_prefix}old", f"{kafka_settings.topic_prefix}new"
    await ensure_topics(kafka_settings, [old])
    await ensure_topics(kafka_settings, [old, new], partitions=5)
    assert await _partitions(kafka_settings) == {old: 3, new: 5}


async def test_winnow_topics_are_all_created(
    kafka_settings: KafkaSettings, winnow_topics: TopicNames
) -> None:
    assert len(winnow_topics.all()) == 7
    assert await _partitions(kafka_settings) == dict.fromkeys(winnow_topics.all(), 3)


async def test_zero_partitions_is_refused(kafka_settings: KafkaSettings) -> None:
    with pytest.raises(ConfigError, match="at least one partition"):
        await ensure_topics(kafka_settings, [f"{kafka_settings.topic_prefix}x"], partitions=0)


async def test_an_unreachable_broker_is_a_broker_error(kafka_settings: KafkaSettings) -> None:
    settings = kafka_settings.model_copy(update={"bootstrap": "127.0.0.1:1"})
    with pytest.raises(BrokerError, match=r"127\.0\.0\.1:1"):
        await ensure_topics(settings, ["anything"])
