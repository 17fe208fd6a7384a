"""Typed settings of the learning role, read from ``WINNOW_TRAINER_*`` and ``WINNOW_KAFKA_*``.

The trainer reaches Kafka through :class:`~infra.kafka.settings.KafkaSettings`,
the one connection class every role shares, so SASL and TLS mean the same
here as in the scorer. Settings are frozen: change one by copy
(``settings.model_copy(update=...)``). Nothing is built at import time:
``TrainerSettings()`` is called in ``main()`` or by a test.
"""

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.kafka.settings import KafkaSettings
from schemas.model_spec import Precision
from trainer.arch_defaults import (
    ARCHITECTURES,
    PRETRAINED_ARCHITECTURES,
    default_arch,
    default_pretrained,
)

TRAINER_CLIENT_ID = "winnow-trainer"
"""The trainer's Kafka client id unless ``WINNOW_KAFKA_CLIENT_ID`` sets one."""


SAMPLE_CACHE_MB = 1024
"""The trainer's default budget for decoded pixels (``WINNOW_TRAINER_SAMPLE_CACHE_MB``):
about 7,000 frames at 224 x 224 RGB, 1.3 million at 28 x 28 gray."""


def with_trainer_client_id(kafka: KafkaSettings) -> KafkaSettings:
    """``kafka``, with the trainer's client id if no client id was set explicitly.

    Args:
        kafka: connection settings; a ``client_id`` given to them (or read
            from ``WINNOW_KAFKA_CLIENT_ID``) is kept.

    Returns:
        ``kafka`` itself, or a copy whose ``client_id`` is ``winnow-trainer``.
    """
    if "client_id" in kafka.model_fields_set:
        return kafka
    return kafka.model_copy(update={"client_id": TRAINER_CLIENT_ID})


class TrainerSettings(BaseSettings):
    """All settings of ``winnow train``."""

    model_config = SettingsConfigDict(
        env_prefix="WINNOW_TRAINER_", extra="ignore", populate_by_name=True, frozen=True
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
    head_refit_labels: int = Field(
        default=3,
        ge=0,
        description="new labels (holdout excluded) that start a refit of the classification "
        "head on frozen embeddings and a head-only release; 0: backbone rounds only",
    )
    head_refit_share: float = Field(
        default=0.01,
        ge=0,
        le=1,
        description="and at least this share of the labels the last refit learned from: "
        "each refit fits every label, so refits at a fixed count would cost more and more "
        "as labels grow; 0: every head_refit_labels whatever the count",
    )
    torch_threads: int = Field(
        default=0,
        ge=0,
        description="torch's threads within one operation (rounds, refits, and the round "
        "worker's child); 0: the CPUs a cgroup quota or affinity mask leaves the process, "
        "else torch's default (one per core). On a machine whose cores the scorer shares, 1 "
        "can be much faster: idle threads spin at every operation's end",
    )
    shrink: float | None = Field(
        default=None,
        gt=0,
        le=1,
        description="before a backbone round on every label, multiply each weight by this "
        "(shrink and perturb, Ash and Adams 2020); 1: off; unset: the architecture's "
        "default (0.6 for the small CNN, off for torchvision backbones)",
    )
    perturb: float | None = Field(
        default=None,
        ge=0,
        description="and add Gaussian noise of this standard deviation; 0: none; unset: the "
        "architecture's default (0.01 for the small CNN, 0 for torchvision backbones)",
    )
    lr_schedule: Literal["constant", "cosine"] = Field(
        default="constant",
        description="the learning rate over a backbone round: constant, or lowered to 0 along "
        "half a cosine so that the round ends where its last steps settle",
    )
    train_precision: Literal["auto", "fp32", "bf16"] = Field(
        default="auto",
        description="the arithmetic of a backbone round's training steps (the weights and "
        "evaluation stay float32; the export's is `precision`): bf16 autocast, fp32, or auto "
        "(bf16 on a CPU with AMX for the small CNN and ResNet-18, which train about twice as "
        "fast there; fp32 elsewhere: depthwise networks such as EfficientNet-Lite0 train "
        "slower in bf16 on the CPU, and CUDA is not measured yet)",
    )
    class_balance: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="weigh each class in the loss by (mean count / its count) ** this, in "
        "backbone rounds and head refits alike; 0: unweighted; 1: every class weighs as much "
        "in total, for a stream where a rare class matters as much as the common one; the "
        "release gate then weighs the held-out frames the same way",
    )
    round_worker_rounds: int = Field(
        default=0,
        ge=0,
        description="train backbone rounds in a child process that a fresh one replaces "
        "after this many rounds, so that what training leaves in memory goes back with the "
        "process (the trainer keeps evaluation, head refits and exports); it costs about "
        "400 MB (the child's torch) and did not lower the trainer's own growth in the "
        "60-minute soak; 0 (the default): rounds train in the trainer's own process",
    )
    sample_cache_mb: float = Field(
        default=SAMPLE_CACHE_MB,
        ge=0,
        description="memory for decoded labeled frames, which every round reads (about "
        "150 KB a frame at 224 x 224 RGB, 0.8 KB at 28 x 28 gray); frames past it are read "
        "from the store and decoded again each time a round uses them, so the trainer's "
        "memory stops growing with the labels; keep it well under the memory limit",
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    metrics_port: int = Field(default=9100, ge=0, le=65535)
    release_margin: float = Field(
        default=0.02,
        ge=0,
        description="how much lower a candidate's holdout accuracy (class-weighted when "
        "class_balance is on) may be",
    )
    release_alpha: float = Field(
        default=0.05,
        gt=0,
        lt=1,
        description="a candidate is refused only if a paired test finds it worse at this level",
    )
    model_signing_key: SecretStr | None = Field(
        default=None,
        validation_alias=AliasChoices("WINNOW_MODEL_SIGNING_KEY", "model_signing_key"),
        description="HMAC key that signs model releases (shared with the scorer)",
    )
    kafka: KafkaSettings = Field(
        default_factory=KafkaSettings,
        validate_default=True,
        description="the cluster; client id winnow-trainer unless WINNOW_KAFKA_CLIENT_ID is set",
    )
    # The first model, when the data directory has no checkpoint yet (cold start).
    classes: list[str] = Field(default_factory=list, description="class names, in order")
    arch: str | None = Field(
        default=None,
        description="architecture of the first model; unset: efficientnet_lite0 for an "
        "input_size of 64 and up, small-cnn below (see first_arch)",
    )
    input_size: int = Field(default=32, ge=8)
    channels: Literal[1, 3] = Field(default=3, description="input channels: 1 (gray) or 3")
    pretrained: bool | None = Field(
        default=None,
        description="load the packaged ImageNet weights into the first model's backbone; "
        "unset: true for efficientnet_lite0 unless init_weights is given",
    )
    init_weights: Path | None = Field(
        default=None, description="a local torchvision checkpoint (pretrained) for the backbone"
    )
    init_checkpoint: Path | None = Field(
        default=None, description="a trainer checkpoint (.pt) to start from instead"
    )
    precision: Precision = Field(
        default="fp32",
        description="the arithmetic inside each full release's ONNX graph: fp16 halves the "
        "file and suits GPU scorers (tensor cores); on a CPU scorer fp32 is faster. Applies "
        "from the next full release; head-only releases keep their base's",
    )
    model_name: str = "winnow"
    seed: int = 0

    @field_validator("channels", mode="before")
    @classmethod
    def _channels_from_text(cls, value: object) -> object:
        """``WINNOW_TRAINER_CHANNELS=1`` arrives as text; a Literal of ints would refuse it."""
        if isinstance(value, str) and value.strip() in ("1", "3"):
            return int(value)
        return value

    @field_validator("kafka")
    @classmethod
    def _trainer_client_id(cls, kafka: KafkaSettings) -> KafkaSettings:
        return with_trainer_client_id(kafka)

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, arch: str | None) -> str | None:
        if arch is not None and arch not in ARCHITECTURES:
            raise ValueError(f"unknown architecture {arch!r}; choose one of {list(ARCHITECTURES)}")
        return arch

    @model_validator(mode="after")
    def _one_source_of_weights(self) -> "TrainerSettings":
        if self.pretrained and self.init_weights is not None:
            raise ValueError("set either pretrained or init_weights, not both")
        if self.pretrained and self.first_arch not in PRETRAINED_ARCHITECTURES:
            raise ValueError(
                f"no packaged pretrained weights for {self.first_arch} (only "
                f"{list(PRETRAINED_ARCHITECTURES)}); use init_weights for a local checkpoint"
            )
        return self

    @property
    def first_arch(self) -> str:
        """The first model's architecture: ``arch``, or the default for ``input_size``."""
        return self.arch if self.arch is not None else default_arch(self.input_size)

    @property
    def first_pretrained(self) -> bool:
        """Whether the first model loads packaged ImageNet weights (``pretrained`` or default)."""
        if self.pretrained is not None:
            return self.pretrained
        return default_pretrained(self.first_arch, has_weights=self.init_weights is not None)

    @property
    def store_path(self) -> Path:
        """The SQLite file of the sample store."""
        return self.data_dir / "samples.sqlite3"
