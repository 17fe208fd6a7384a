"""The trainer's aiokafka clients: connection keywords, consumer and producer.

A deliberately small counterpart of ``infra.kafka`` (the two roles never
import each other): the same keywords, but fewer startup checks; aiokafka
reports what is left.
"""

from typing import Any

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.helpers import create_ssl_context

from trainer.config import TrainerKafkaSettings
from trainer.errors import TrainerError

MAX_FETCH_BYTES = 16 * 1024 * 1024
"""Per partition and fetch: label requests carry whole images."""


class KafkaConfigError(TrainerError):
    """Kafka settings that could never connect."""


def client_kwargs(settings: TrainerKafkaSettings) -> dict[str, Any]:
    """Keyword arguments common to all aiokafka clients.

    Args:
        settings: where the cluster is and how to authenticate.

    Returns:
        ``bootstrap_servers``, ``client_id``, ``security_protocol``, and the
        SASL credentials or the TLS context the protocol needs.

    Raises:
        KafkaConfigError: no bootstrap address.
    """
    if not (settings.bootstrap or "").strip():
        raise KafkaConfigError("no Kafka bootstrap address: set WINNOW_KAFKA_BOOTSTRAP")
    protocol = settings.security_protocol
    kwargs: dict[str, Any] = {
        "bootstrap_servers": settings.bootstrap,
        "client_id": settings.client_id,
        "security_protocol": protocol,
    }
    if protocol.startswith("SASL"):
        password = settings.sasl_password
        kwargs["sasl_mechanism"] = settings.sasl_mechanism
        kwargs["sasl_plain_username"] = settings.sasl_username
        kwargs["sasl_plain_password"] = password.get_secret_value() if password else None
    if protocol.endswith("SSL"):
        kwargs["ssl_context"] = create_ssl_context(
            cafile=_str(settings.ssl_cafile),
            certfile=_str(settings.ssl_certfile),
            keyfile=_str(settings.ssl_keyfile),
        )
    return kwargs


def create_consumer(
    settings: TrainerKafkaSettings, *topics: str, group_id: str | None, **overrides: Any
) -> AIOKafkaConsumer:
    """A consumer (not started) with manual commits, reading a new group from the start."""
    options: dict[str, Any] = {
        "group_id": group_id,
        "enable_auto_commit": False,
        "auto_offset_reset": "earliest",
        "max_partition_fetch_bytes": MAX_FETCH_BYTES,
        "session_timeout_ms": settings.session_timeout_ms,
        "heartbeat_interval_ms": settings.heartbeat_interval_ms,
    }
    options.update(overrides)
    return AIOKafkaConsumer(*topics, **client_kwargs(settings), **options)


def create_producer(settings: TrainerKafkaSettings, **overrides: Any) -> AIOKafkaProducer:
    """A producer (not started) with ``acks="all"``: offsets are committed after its acks."""
    options: dict[str, Any] = {"acks": "all", "linger_ms": 5, "max_request_size": MAX_FETCH_BYTES}
    options.update(overrides)
    return AIOKafkaProducer(**client_kwargs(settings), **options)


def _str(path: object) -> str | None:
    return None if path is None else str(path)
