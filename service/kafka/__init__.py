"""Kafka plumbing of the online role: connection settings, clients, topics, embedded broker.

Every client is built from :class:`~service.config.KafkaSettings` through
:func:`client_kwargs`, so TLS and SASL are configured in one place.
"""

from service.kafka.admin import ensure_topics, ensure_winnow_topics, wait_for_broker
from service.kafka.broker import EmbeddedBroker, run_broker_forever
from service.kafka.connection import client_kwargs
from service.kafka.consumer import consumer_lag, create_consumer
from service.kafka.producer import create_producer

__all__ = [
    "EmbeddedBroker",
    "client_kwargs",
    "consumer_lag",
    "create_consumer",
    "create_producer",
    "ensure_topics",
    "ensure_winnow_topics",
    "run_broker_forever",
    "wait_for_broker",
]
