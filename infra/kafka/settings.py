"""How every role reaches Kafka: one settings class, read from ``WINNOW_KAFKA_*``.

The scorer, the trainer, the label app, the producer client and the demo all
connect through this class (and ``infra.kafka.connection.client_kwargs``), so
SASL and TLS are configured once and mean the same everywhere.
"""

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.topics import TopicNames


class KafkaSettings(BaseSettings):
    """How to reach Kafka. No bootstrap address means: start the embedded broker."""

    model_config = SettingsConfigDict(env_prefix="WINNOW_KAFKA_", extra="ignore", frozen=True)

    bootstrap: str | None = Field(default=None, description="host:port[,host:port]")
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = None
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    ssl_cafile: Path | None = None
    ssl_certfile: Path | None = None
    ssl_keyfile: Path | None = None
    topic_prefix: str = "winnow."
    partitions: int = Field(default=3, ge=1, description="partitions of topics Winnow creates")
    replication_factor: int = Field(default=1, ge=1)
    client_id: str = "winnow"
    session_timeout_ms: int = Field(
        default=10_000,
        ge=1000,
        description="consumer-group session; a dead member's partitions move after this long",
    )
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)
    embedded_port: int = Field(default=9092, ge=1, le=65535)

    @property
    def topics(self) -> TopicNames:
        return TopicNames.with_prefix(self.topic_prefix)
