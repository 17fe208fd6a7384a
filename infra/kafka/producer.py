"""The producer every online component uses."""

from typing import Any

from aiokafka import AIOKafkaProducer

from infra.kafka.connection import client_kwargs
from infra.kafka.settings import KafkaSettings

MAX_REQUEST_BYTES = 8 * 1024 * 1024
"""Largest produce request: frames and label requests carry whole images."""


def create_producer(settings: KafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """A producer (not yet started) for Winnow's at-least-once path.

    ``acks="all"``: the scorer commits a consumed frame's offset only after the
    records it produced for that frame are acknowledged, and that promise is
    only as strong as the acknowledgement. With ``acks=1`` a leader could ack,
    crash before its followers copy the record, and the committed frame would
    never be scored again.

    Args:
        settings: where the cluster is and how to authenticate.
        **overrides: any ``AIOKafkaProducer`` argument, replacing the defaults
            (``acks="all"``, ``linger_ms=5``, ``max_request_size`` 8 MiB, no
            compression: JPEG and PNG frames do not shrink).

    Returns:
        The producer; the caller calls ``await producer.start()`` and ``stop()``.

    Raises:
        ConfigError: the connection settings are inconsistent.
    """
    options: dict[str, Any] = {
        "acks": "all",
        "linger_ms": 5,
        "max_request_size": MAX_REQUEST_BYTES,
        "compression_type": None,
    }
    options.update(overrides)
    return AIOKafkaProducer(**client_kwargs(settings), **options)
