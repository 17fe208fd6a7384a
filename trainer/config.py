"""Typed settings of the learning role, read from ``WINNOW_TRAINER_*`` and ``WINNOW_KAFKA_*``.

The trainer reads the same ``WINNOW_KAFKA_*`` variables as the online role but
through its own class, so that ``trainer`` never imports ``service``. Nothing
is built at import time: ``TrainerSettings()`` is called in ``main()`` or by a
test.
"""

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from schemas.topics import TopicNames


class TrainerKafkaSettings(BaseSettings):
    """How the trainer reaches Kafka (the connection fields of the service's settings)."""

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
    client_id: str = "winnow-trainer"
    session_timeout_ms: int = Field(default=10_000, ge=1000)
    heartbeat_interval_ms: int = Field(default=3_000, ge=100)

    @property
    def topics(self) -> TopicNames:
        return TopicNames.with_prefix(self.topic_prefix)


class TrainerSettings(BaseSettings):
    """All settings of ``winnow train``."""

    model_config = SettingsConfigDict(
        env_prefix="WINNOW_TRAINER_", extra="ignore", populate_by_name=True
    )

    data_dir: Path = Field(default=Path("./winnow-data"), description="the sample store lives here")
    group_id: str = "winnow-trainer"
    label_merge: Literal["last", "majority"] = Field(
        default="last", description="how several answers for one frame become one label"
    )
    orphan_grace_s: float = Field(
        default=300.0,
        gt=0,
        description="how long a label may wait for its request before it is dead-lettered",
    )
    holdout_fraction: float = Field(default=0.1, ge=0, lt=1)
    round_min_labels: int = Field(default=20, ge=1)
    round_max_seconds: float = Field(default=120.0, gt=0)
    drift_rounds: bool = Field(
        default=True, description="start a round early when the scorer publishes a drift alarm"
    )
    drift_round_min_labels: int = Field(
        default=1,
        ge=1,
        description="the fewest untrained labels a round started by a drift alarm needs",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    release_margin: float = Field(default=0.02, ge=0)
    model_signing_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("WINNOW_MODEL_SIGNING_KEY", "model_signing_key"),
        description="HMAC key that signs model releases (shared with the scorer)",
    )
    kafka: TrainerKafkaSettings = Field(default_factory=TrainerKafkaSettings)
    # The first model, when the data directory has no checkpoint yet (cold start).
    classes: list[str] = Field(default_factory=list, description="class names, in order")
    arch: str = "small-cnn"
    input_size: int = Field(default=32, ge=8)
    channels: Literal[1, 3] = 3
    init_weights: Path | None = Field(
        default=None, description="a local torchvision checkpoint (pretrained) for the backbone"
    )
    init_checkpoint: Path | None = Field(
        default=None, description="a trainer checkpoint (.pt) to start from instead"
    )
    model_name: str = "winnow"
    seed: int = 0

    @property
    def store_path(self) -> Path:
        """The SQLite file of the sample store."""
        return self.data_dir / "samples.sqlite3"
