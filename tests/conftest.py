"""Fixtures for the whole suite: one real Kafka-protocol broker per session.

Each test gets its own topic prefix and consumer group, so tests share the
broker but never each other's records or offsets.
"""

import uuid
from collections.abc import Iterator

import pytest

from infra.kafka.admin import ensure_winnow_topics
from infra.kafka.broker import EmbeddedBroker
from infra.kafka.settings import KafkaSettings
from schemas.topics import TopicNames


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[EmbeddedBroker]:
    """The embedded Tansu broker on a free loopback port, for the whole session."""
    with EmbeddedBroker(0) as broker:
        yield broker


@pytest.fixture
def kafka_settings(kafka_broker: EmbeddedBroker) -> KafkaSettings:
    """Settings for the session broker, with a topic prefix no other test uses."""
    return KafkaSettings(
        bootstrap=kafka_broker.bootstrap,
        security_protocol="PLAINTEXT",
        topic_prefix=f"t{uuid.uuid4().hex[:12]}.",
        partitions=3,
        replication_factor=1,
        # Tansu completes a group join after about half the session timeout: keep it short.
        session_timeout_ms=2000,
        heartbeat_interval_ms=500,
    )


@pytest.fixture
def group_id() -> str:
    """A consumer-group name no other test uses."""
    return f"g{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def winnow_topics(kafka_settings: KafkaSettings) -> TopicNames:
    """Winnow's topics, created under the test's prefix with 3 partitions each."""
    await ensure_winnow_topics(kafka_settings)
    return kafka_settings.topics
