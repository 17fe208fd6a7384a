"""Kafka plumbing of every role: connection settings, clients, topics, embedded broker.

Every client is built from :class:`~infra.kafka.settings.KafkaSettings` through
:func:`client_kwargs`, so TLS and SASL are configured in one place.
"""

from infra.kafka.admin import (
    ensure_topics,
    ensure_winnow_topics,
    topic_partitions,
    wait_for_broker,
)
from infra.kafka.broker import EmbeddedBroker, run_broker_forever
from infra.kafka.connection import client_kwargs
from infra.kafka.consumer import consumer_lag, create_consumer
from infra.kafka.producer import create_producer

__all__ = [
    "EmbeddedBroker",
    "client_kwargs",
    "consumer_lag",
    "create_consumer",
    "create_producer",
    "ensure_topics",
    "ensure_winnow_topics",
    "run_broker_forever",
    "topic_partitions",
    "wait_for_broker",
]
