"""Typed settings of the online role, read from ``WINNOW_*`` environment variables.

Each concern has its own settings class and prefix (``WINNOW_KAFKA_``,
``WINNOW_SCORER_``, ``WINNOW_POLICY_``, ``WINNOW_HTTP_``); ``Settings`` nests
them. Nothing is built at import time: ``Settings()`` is called in ``main()``
or by a test.
"""

from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from infra.cpus import available_cpus, cpu_limit
from infra.kafka.settings import KafkaSettings
from schemas.api import ColdStartName, FilterName, PolicyName, SelectorName, UtilityName

MAX_CONCURRENT_BATCHES = 4
"""The most batches the scorer infers at once on the CPU (``cpu_parallelism`` ``batches``): each
run holds its own activations (ResNet-18 at 224, batch 32, one thread a run: one run grew the
process by 229 MB, two at once by 311 MB, four by 621 MB), so a many-core machine runs several
threads per batch rather than dozens of batches."""


class ScorerSettings(BaseSettings):
    """The scorer's hot path: batching, decoding limits, routing."""

    model_config = SettingsConfigDict(env_prefix="WINNOW_SCORER_", extra="ignore", frozen=True)

    model_path: Path | None = Field(default=None, description="an ONNX file with winnow metadata")
    group_id: str = "winnow-scorer"
    max_batch_size: int = Field(default=32, ge=1, le=4096)
    max_wait_ms: int = Field(default=20, ge=0, description="longest wait to fill a batch")
    fetch_max_wait_ms: int = Field(
        default=20,
        ge=1,
        le=60_000,
        description="how long the broker may hold a fetch while no frame waits; the embedded "
        "broker (Tansu) answers a short wait with nothing once a partition holds ~100,000 "
        "one-record batches, so long runs on it need 500 (the soak sets it)",
    )
    cpu_threads: int = Field(
        default=0,
        ge=0,
        description="threads of ONNX Runtime's pool for one inference; 0: the CPUs this process "
        "may use (affinity mask and cgroup CPU quota), which `serve --workers N` divides among "
        "its N processes",
    )
    cpu_parallelism: Literal["batches", "operators"] = Field(
        default="batches",
        description="how inference on the CPU uses its threads: `batches` runs up to "
        "4 batches at once, each on its share of the threads (no thread waits inside an "
        "operator for one that decoding or the Kafka client delayed); `operators` runs one "
        "batch at a time across all of them (a batch's latency is lower, its throughput is "
        "not); on CUDA one batch runs at a time either way",
    )
    decode_workers: int = Field(
        default=0,
        ge=0,
        description="decode threads; 0: half the CPUs this process may use (at most 4), leaving "
        "the rest to inference",
    )
    decoder: Literal["cpu", "dali", "dali-cpu"] = Field(
        default="cpu",
        description="who turns JPEG frames into model input: `cpu` (libjpeg-turbo and Pillow in "
        "`decode_workers` threads); `dali` decodes, resizes and normalizes JPEG batches on the "
        "GPU with NVIDIA DALI where the model runs on CUDA (install winnow-stream[dali]; "
        "elsewhere the scorer warns and uses `cpu`); `dali-cpu` runs DALI's pipeline on the "
        "CPU, slower than `cpu`, to test that path without a GPU. PNG frames and whatever DALI "
        "refuses are decoded by `cpu` either way",
    )
    max_frame_bytes: int = Field(default=20 * 1024 * 1024, gt=0)
    max_pixels: int = Field(default=50_000_000, gt=0, description="checked before full decode")
    publish_predictions: bool = True
    follow_releases: bool = Field(
        default=True, description="swap in verified releases from the models topic"
    )
    keep_releases: int = Field(default=5, ge=1, description="verified artifacts kept for pinning")
    dead_letter_max_value_bytes: int = Field(default=900 * 1024, ge=0)
    stall_timeout_s: float = Field(
        default=120.0,
        ge=0,
        description="no frame decided for this long while frames wait and the broker answers: "
        "the scorer stops so that it is restarted (0: never)",
    )

    @property
    def inference_threads(self) -> int | None:
        """ONNX Runtime's intra-op threads for one batch. ``operators``: ``cpu_threads``, else
        the CPUs this process may use where an affinity mask or a cgroup quota limits them,
        else None (ONNX Runtime's own default, one thread per physical core). ``batches``: the
        threads (``cpu_threads``, else the CPUs this process may use) divided among the
        :attr:`concurrent_batches`."""
        if self.cpu_parallelism == "operators":
            return self.cpu_threads or cpu_limit()
        # at least 1: never more batches than threads
        return self._cpu_threads_total // self.concurrent_batches

    @property
    def concurrent_batches(self) -> int:
        """Batches inferred at once on the CPU: one for ``operators``; for ``batches`` one per
        thread, at most :data:`MAX_CONCURRENT_BATCHES` (each holds its own activations)."""
        if self.cpu_parallelism == "operators":
            return 1
        return min(MAX_CONCURRENT_BATCHES, self._cpu_threads_total)

    @property
    def _cpu_threads_total(self) -> int:
        return self.cpu_threads or available_cpus()

    @property
    def decode_threads(self) -> int:
        """Decode threads: ``decode_workers``, or half the CPUs this process may use (1 to 4).

        Not divided among ``--workers`` processes: on a GPU host decoding is the CPUs' work.
        """
        return self.decode_workers or max(1, min(4, available_cpus() // 2))


def _default_filters() -> list[FilterName]:
    return ["pal", "rare"]


class PolicySettings(BaseSettings):
    """The query decision: utility, threshold policy and budget."""

    model_config = SettingsConfigDict(env_prefix="WINNOW_POLICY_", extra="ignore", frozen=True)

    name: PolicyName = Field(
        default="quantile",
        description="the query strategy once the cold start hands over; quantile: the "
        "utility against the top budget quantile of the recent ones, balanced to spend the "
        "budget",
    )
    utility: UtilityName = Field(
        default="margin", description="the uncertainty compared (blended with coverage)"
    )
    budget: float = Field(default=0.05, gt=0, le=1)
    window: int = Field(default=1000, gt=0)
    labels_per_hour: float | None = Field(default=None, ge=0)
    seed: int | None = None
    params: dict[str, float] = Field(default_factory=dict)
    cold_start: ColdStartName = Field(
        default="herding",
        description="what chooses until the model has learned from labels: a coverage "
        "strategy (herding, probcover, typiclust) in the model's embedding space, random, "
        "or none (the configured strategy from the start)",
    )
    cold_start_per_class: float = Field(
        default=5.0,
        ge=0,
        description="labels per class the model must have learned from before the configured "
        "strategy takes over from the cold start (0: the first model that learned from any)",
    )
    cold_start_random: bool | None = Field(
        default=None,
        description="former switch: true is cold_start=random, false is cold_start=none",
    )
    competence_window: int = Field(
        default=50, ge=1, description="answers over which the model's accuracy is measured"
    )
    competence_min_answers: int = Field(
        default=10, ge=1, description="answers before the accuracy moves the uncertainty blend"
    )
    backpressure_waiting: int = Field(
        default=200, ge=0, description="unanswered requests that mean the team is behind; 0: none"
    )
    backpressure_wait_s: float = Field(
        default=900.0, ge=0, description="a request unanswered this long means behind; 0: none"
    )
    backpressure_window_s: float = Field(
        default=600.0, gt=0, description="seconds over which request and answer rates are measured"
    )
    filters: list[FilterName] = Field(
        default_factory=_default_filters,
        description="stream filters: dedup, density, balance, audit, rare (class-aware), "
        "pal (the utility becomes PAL's expected gain)",
    )
    filter_params: dict[str, float] = Field(
        default_factory=dict,
        description="knobs of the filters (service.selection.filters.StreamFilters)",
    )
    selector: SelectorName = Field(
        default="none", description="which frames of a batch to label: coreset or badge"
    )
    aift_views: int = Field(default=8, ge=2, le=64, description="augmented views per frame")
    aift_alpha: float = Field(default=0.25, gt=0, le=1, description="views kept by majority")
    aift_majority: bool = Field(default=True, description="AIFT majority selection")
    aift_flips: bool = Field(default=False, description="AIFT views may be mirrored")
    mc_passes: int = Field(default=16, ge=2, le=256, description="MC-dropout passes for bald")
    mc_dropout: float = Field(default=0.3, gt=0, lt=1, description="the head's dropout rate")
    committee: Literal["mc_dropout", "releases"] = Field(
        default="mc_dropout",
        description="members of vote_entropy / average_kl: MC-dropout passes or the last releases",
    )
    committee_size: int = Field(default=3, ge=2, le=16, description="releases in the committee")


DriftDetectorName = Literal["embedding", "prediction", "uncertainty"]


def _all_drift_detectors() -> list[DriftDetectorName]:
    return ["embedding", "prediction", "uncertainty"]


class DriftSettings(BaseSettings):
    """Online drift detection in the scorer, and the response to an alarm."""

    model_config = SettingsConfigDict(env_prefix="WINNOW_DRIFT_", extra="ignore", frozen=True)

    enabled: bool = True
    detectors: list[DriftDetectorName] = Field(default_factory=_all_drift_detectors)
    ert: int = Field(
        default=10_000, ge=100, description="expected frames between false alarms, per detector"
    )
    ert_scope: Literal["detector", "monitor"] = Field(
        default="detector",
        description="detector: each detector alarms falsely every ERT frames; monitor: the "
        "detectors together do (each gets a higher threshold)",
    )
    embedding_window: int = Field(default=64, ge=2, description="frames in the MMD test window")
    class_window: int = Field(default=200, ge=2, description="frames in the class-mix window")
    cusum_k: float = Field(default=0.5, ge=0, description="CUSUM slack, in entropy std units")
    warmup_frames: int = Field(
        default=1000,
        ge=50,
        description="frames after a swap that make the reference when the release carries none",
    )
    use_release_reference: bool = Field(
        default=False,
        description="use the reference a release carries instead of warming up on the stream; "
        "off by default: a release's reference comes from actively selected (uncertain) frames, "
        "so the undrifted stream looks drifted against it",
    )
    head_rearm_frames: int = Field(
        default=500,
        ge=0,
        description="after a head-only swap (same backbone) the prediction and uncertainty "
        "detectors take the new head's reference and are recalibrated at most once per this "
        "many frames; meanwhile they watch through the head they were calibrated for",
    )
    per_source: bool = Field(default=True, description="also track each source id (frame key)")
    max_sources: int = Field(default=32, ge=0, description="sources tracked at once")
    statistic_every: int = Field(
        default=1000, ge=1, description="publish each detector's statistic every N frames"
    )
    boost_factor: float = Field(default=3.0, ge=1, description="budget multiplier after an alarm")
    boost_seconds: float = Field(default=300.0, gt=0)
    calibration_frames: int = Field(default=1_200_000, ge=10_000)
    queue_batches: int = Field(default=256, ge=1, description="batches waiting; more are dropped")
    seed: int = 0


class HttpSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="WINNOW_HTTP_", extra="ignore", frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=8000, ge=0, le=65535)


class IngestSettings(BaseSettings):
    """HTTP ingest (``POST /v1/frames``): who may write, how much, how fast."""

    model_config = SettingsConfigDict(env_prefix="WINNOW_INGEST_", extra="ignore", frozen=True)

    tokens: SecretStr | None = Field(
        default=None,
        description="comma-separated bearer tokens that may post frames (the admin token may too)",
    )
    max_body_bytes: int = Field(
        default=32 * 1024 * 1024, gt=0, description="largest request body, checked while reading"
    )
    max_frames_per_request: int = Field(default=64, ge=1)
    rate: float = Field(default=100.0, ge=0, description="frames per second per token; 0: no limit")
    burst: float = Field(default=200.0, ge=1, description="frames a token may send at once")
    ack_timeout_s: float = Field(default=30.0, gt=0, description="longest wait for Kafka's acks")

    def token_list(self) -> list[str]:
        """The configured ingest tokens, without blanks."""
        raw = self.tokens.get_secret_value() if self.tokens else ""
        return [token.strip() for token in raw.split(",") if token.strip()]


class Settings(BaseSettings):
    """All settings of ``winnow serve``."""

    model_config = SettingsConfigDict(env_prefix="WINNOW_", extra="ignore", frozen=True)

    device: Literal["auto", "cpu", "cuda"] = "auto"
    workers: int = Field(
        default=1,
        ge=1,
        description="scorer processes on this machine, one consumer-group member each, behind "
        "one HTTP endpoint (service.workers); 1: a single process, no supervisor",
    )
    gpu_requested: bool = Field(
        default=False,
        description="a GPU was given to this scorer (the Helm chart sets it with a GPU "
        "resource): with device auto it still scores on CPU when CUDA is unusable, and "
        "winnow_gpu_requested lets an alert say so",
    )
    admin_token: SecretStr | None = None
    model_signing_key: SecretStr | None = None
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)
    scorer: ScorerSettings = Field(default_factory=ScorerSettings)
    policy: PolicySettings = Field(default_factory=PolicySettings)
    http: HttpSettings = Field(default_factory=HttpSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)


class LabelAppSettings(BaseSettings):
    """The labeling web app (``winnow label-app``): access, leases, offsets."""

    model_config = SettingsConfigDict(env_prefix="WINNOW_LABEL_APP_", extra="ignore", frozen=True)

    team_token: SecretStr | None = Field(
        default=None, description="one token the whole team signs in with (name typed freely)"
    )
    user_tokens: SecretStr | None = Field(
        default=None, description="per-user tokens, 'name:token,name:token'; the name is fixed"
    )
    session_secret: SecretStr | None = Field(
        default=None, description="signs session cookies; random per start when unset"
    )
    session_max_age_s: int = Field(default=12 * 3600, ge=60)
    cookie_secure: bool = Field(default=False, description="set the cookie's Secure flag (HTTPS)")
    group_id: str = "winnow-label-app"
    lease_s: float = Field(default=120.0, gt=0, description="how long a labeler holds a frame")
    max_buffered: int = Field(default=500, ge=1, description="frames held in memory, at most")
    second_opinion: float = Field(
        default=0.0, ge=0, le=1, description="fraction of frames shown to two labelers"
    )
    commit_interval_s: float = Field(default=1.0, gt=0)
    host: str = "127.0.0.1"
    port: int = Field(default=8100, ge=0, le=65535)

    def token_users(self) -> dict[str, str]:
        """Per-user tokens as ``{token: name}``.

        Raises:
            ValueError: an entry is not ``name:token`` or a token is used twice.
        """
        raw = self.user_tokens.get_secret_value() if self.user_tokens else ""
        users: dict[str, str] = {}
        for entry in filter(None, (e.strip() for e in raw.split(","))):
            name, sep, token = entry.partition(":")
            if not (sep and name.strip() and token.strip()):
                raise ValueError("WINNOW_LABEL_APP_USER_TOKENS wants 'name:token' pairs")
            if token.strip() in users:
                raise ValueError("WINNOW_LABEL_APP_USER_TOKENS uses a token twice")
            users[token.strip()] = name.strip()
        return users
