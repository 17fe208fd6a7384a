"""Topic creation against the real broker."""

import pytest
from aiokafka import AIOKafkaClient, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import InvalidReplicationFactorError

from infra.errors import BrokerError, ConfigError
from infra.kafka.admin import _check_created, ensure_topics, topic_partitions
from infra.kafka.connection import client_kwargs
from infra.kafka.settings import KafkaSettings
from schemas.topics import TopicNames


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


async def _replicas(settings: KafkaSettings, topic: str) -> set[int]:
    """How many replicas the partitions of ``topic`` have, as the broker reports them."""
    admin = AIOKafkaAdminClient(**client_kwargs(settings))
    await admin.start()
    try:
        (described,) = await admin.describe_topics([topic])
    finally:
        await admin.close()
    return {len(p["replicas"]) for p in described["partitions"]}


async def test_new_topics_get_the_configured_replication_factor(
    kafka_settings: KafkaSettings,
) -> None:
    # Tansu accepts any factor and reports that many replicas, so the request is visible.
    one, two = f"{kafka_settings.topic_prefix}rf1", f"{kafka_settings.topic_prefix}rf2"
    await ensure_topics(kafka_settings, [one])
    await ensure_topics(kafka_settings.model_copy(update={"replication_factor": 2}), [two])
    assert await _replicas(kafka_settings, one) == {1}
    assert await _replicas(kafka_settings, two) == {2}


def test_a_refused_replication_factor_names_the_setting(kafka_settings: KafkaSettings) -> None:
    settings = kafka_settings.model_copy(update={"replication_factor": 3})
    refusal = [
        ("t.frames", InvalidReplicationFactorError.errno, "Replication factor: 3 larger than 1")
    ]
    with pytest.raises(BrokerError, match="WINNOW_KAFKA_REPLICATION_FACTOR=3"):
        _check_created(refusal, settings, partitions=3)
    _check_created([("t.frames", 0, None)], settings, partitions=3)  # success: no error


async def test_topic_partitions_lists_every_partition_and_creates_nothing(
    kafka_settings: KafkaSettings,
) -> None:
    name, absent = f"{kafka_settings.topic_prefix}p", f"{kafka_settings.topic_prefix}absent"
    await ensure_topics(kafka_settings, [name], partitions=4)
    assert await topic_partitions(kafka_settings, name) == [
        TopicPartition(name, p) for p in range(4)
    ]
    assert await topic_partitions(kafka_settings, absent) == []
    assert absent not in await _partitions(kafka_settings), "asking must not auto-create it"


async def test_topic_partitions_of_an_unreachable_broker_is_a_broker_error(
    kafka_settings: KafkaSettings,
) -> None:
    settings = kafka_settings.model_copy(update={"bootstrap": "127.0.0.1:1"})
    with pytest.raises(BrokerError, match=r"127\.0\.0\.1:1"):
        await topic_partitions(settings, "anything")
