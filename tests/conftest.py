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
from tests.kafka_proxy import FaultProxy, free_port


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[EmbeddedBroker]:
    """The embedded Tansu broker on a free loopback port, for the whole session."""
    with EmbeddedBroker(0) as broker:
        yield broker


@pytest.fixture(scope="module")
def proxied_broker() -> Iterator[FaultProxy]:
    """A broker of the module's own behind a :class:`FaultProxy` that a test can cut.

    The broker advertises the proxy's address, so every connection, metadata-discovered
    ones included, goes through the proxy. Its own broker: a cut never stalls other tests.
    """
    port = free_port()
    with (
        FaultProxy(f"127.0.0.1:{port}") as proxy,
        EmbeddedBroker(port, advertised=proxy.address),
    ):
        yield proxy


@pytest.fixture
def fault_proxy(proxied_broker: FaultProxy) -> Iterator[FaultProxy]:
    """The proxy in front of the module's broker, healed before and after the test."""
    proxied_broker.heal()
    yield proxied_broker
    proxied_broker.heal()


@pytest.fixture
def proxied_kafka_settings(fault_proxy: FaultProxy) -> KafkaSettings:
    """As :func:`kafka_settings`, but through the fault proxy."""
    return _settings(fault_proxy.address)


@pytest.fixture
def kafka_settings(kafka_broker: EmbeddedBroker) -> KafkaSettings:
    """Settings for the session broker, with a topic prefix no other test uses."""
    return _settings(kafka_broker.bootstrap)


def _settings(bootstrap: str) -> KafkaSettings:
    return KafkaSettings(
        bootstrap=bootstrap,
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
