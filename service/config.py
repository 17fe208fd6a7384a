"""Typed settings of the online role, read from ``WINNOW_*`` environment variables.

Each concern has its own settings class and prefix (``WINNOW_KAFKA_``,
``WINNOW_SCORER_``, ``WINNOW_POLICY_``, ``WINNOW_HTTP_``); ``Settings`` nests
them. Nothing is built at import time: ``Settings()`` is called in ``main()``
or by a test.
"""

import os
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.api import PolicyName, UtilityName
from schemas.topics import TopicNames


class KafkaSettings(BaseSettings):
    """How to reach Kafka. No bootstrap address means: start the embedded broker."""

    model_config = SettingsConfigDict(env_prefix="WINNOW_KAFKA_", extra="ignore")

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


class ScorerSettings(BaseSettings):
    """The scorer's hot path: batching, decoding limits, routing."""

    model_config = SettingsConfigDict(env_prefix="WINNOW_SCORER_", extra="ignore")

    model_path: Path | None = Field(default=None, description="an ONNX file with winnow metadata")
    group_id: str = "winnow-scorer"
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: int = Field(default=20, ge=0, description="longest wait to fill a batch")
    decode_workers: int = Field(
        default_factory=lambda: max(1, min(4, (os.cpu_count() or 2) // 2)),
        ge=1,
        description="decode threads; half the cores (at most 4) leaves the rest to inference",
    )
    max_frame_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_pixels: int = Field(default=50_000_000, gt=0, description="checked before full decode")
    publish_predictions: bool = True
    follow_releases: bool = Field(
        default=True, description="swap in verified releases from the models topic"
    )
    keep_releases: int = Field(default=5, ge=1, description="verified artifacts kept for pinning")
    dead_letter_max_value_bytes: int = Field(default=900 * 1024, ge=0)


class PolicySettings(BaseSettings):
    """The query decision: utility, threshold policy and budget."""

    model_config = SettingsConfigDict(env_prefix="WINNOW_POLICY_", extra="ignore")

    name: PolicyName = "variable"
    utility: UtilityName = "entropy"
    budget: float = Field(default=0.05, gt=0, le=1)
    window: int = Field(default=1000, gt=0)
    labels_per_hour: float | None = Field(default=None, ge=0)
    seed: int | None = None
    params: dict[str, float] = Field(default_factory=dict)
    cold_start_random: bool = Field(
        default=True,
        description="sample at random within the budget until the model has learned from labels",
    )


class HttpSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WINNOW_HTTP_", extra="ignore")

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)


class Settings(BaseSettings):
    """All settings of ``winnow serve``."""

    model_config = SettingsConfigDict(env_prefix="WINNOW_", extra="ignore")

    device: Literal["auto", "cpu", "cuda"] = "auto"
    admin_token: SecretStr | None = None
    model_signing_key: SecretStr | None = None
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    scorer: ScorerSettings = Field(default_factory=ScorerSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
