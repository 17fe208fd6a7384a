"""What the trainer's tests share: settings, label requests, feeding the broker, polling."""

import asyncio
import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from infra.kafka.settings import KafkaSettings
from schemas.frames import FrameOrigin
from schemas.label_requests import LabelRequest
from schemas.model_spec import ModelSpec
from schemas.scores import Decision, Scores
from schemas.topics import TopicNames
from tests.kafka_helpers import produce
from trainer.config import TrainerSettings

DIGIT_CLASSES = [str(d) for d in range(10)]
"""The classes of the digits the loop's tests learn (see the ``digits`` fixture)."""

REQUEST_CLASSES = ["cat", "dog", "bird"]
"""The classes of :func:`make_request`'s requests."""


def digit_spec(version: str, side: int = 16, channels: int = 1, std: float = 0.5) -> ModelSpec:
    """The spec of a small CNN over the ten digits, ``side`` x ``side`` pixels."""
    return ModelSpec(
        version=version,
        arch="small-cnn",
        classes=DIGIT_CLASSES,
        input_size=(side, side),
        channels=channels,
        mean=[0.5] * channels,
        std=[std] * channels,
        embedding_dim=128,
    )


def make_request(
    frame_id: str, *, predicted: str = "cat", classes: list[str] = REQUEST_CLASSES
) -> dict:
    """A valid label request as its JSON dict (image as base64)."""
    return {
        "frame_id": frame_id,
        "source_id": "cam-1",
        "origin": {"topic": "winnow.frames", "partition": 0, "offset": 7},
        "requested_at": datetime(2024, 5, 1, tzinfo=UTC).isoformat(),
        "model_version": "v1",
        "classes": classes,
        "content_type": "image/png",
        "image": "iVBORw0KGgo=",  # the PNG signature
        "label": predicted,
        "confidence": 0.5,
        "probabilities": {c: 1 / len(classes) for c in classes},
        "scores": {"least_confidence": 0.5, "margin": 0.5, "entropy": 0.9},
        "decision": {"selected": True, "reason": "uncertainty", "policy": "fixed", "utility": 0.9},
    }


def loop_settings(
    kafka_settings: KafkaSettings, group_id: str, data_dir: Path, **kw: object
) -> TrainerSettings:
    """Settings of a trainer that learns the digits on CPU, small and fast."""
    kafka = kafka_settings.model_copy(
        update={"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}
    )
    base = dict(
        data_dir=data_dir,
        group_id=group_id,
        classes=DIGIT_CLASSES,
        arch="small-cnn",
        input_size=16,
        channels=1,
        device="cpu",
        round_min_labels=60,
        round_max_seconds=600,
        holdout_fraction=0.15,
        head_refit_labels=0,  # backbone rounds only, unless a test asks for head refits
        kafka=kafka,
    )
    return TrainerSettings(**{**base, **kw})  # type: ignore[arg-type]


def digit_request(frame_id: str, png: bytes) -> LabelRequest:
    """The label request of a digit frame ``f<n>`` (its offset is ``n``)."""
    return LabelRequest.model_validate(
        {
            "frame_id": frame_id,
            "source_id": "cam",
            "origin": FrameOrigin(topic="frames", partition=0, offset=int(frame_id[1:])),
            "requested_at": datetime.now(UTC),
            "model_version": "0000-init",
            "classes": DIGIT_CLASSES,
            "content_type": "image/png",
            "image": base64.b64encode(png),
            "label": "0",
            "confidence": 0.1,
            "probabilities": {c: 0.1 for c in DIGIT_CLASSES},
            "scores": Scores(least_confidence=1, margin=1, entropy=1),
            "decision": Decision(selected=True, reason="cold_start", policy="random", utility=1),
        }
    )


async def feed(
    kafka_settings: KafkaSettings, topics: TopicNames, pngs: list[bytes], targets, ids: range
) -> None:
    """Produces the requests of digits ``ids``, then their labels."""
    await produce(
        kafka_settings,
        topics.label_requests,
        [
            (f"f{i}".encode(), digit_request(f"f{i}", pngs[i]).model_dump_json().encode(), [])
            for i in ids
        ],
    )
    await produce(
        kafka_settings,
        topics.labels,
        [
            (
                f"f{i}".encode(),
                json.dumps({"frame_id": f"f{i}", "label": str(targets[i])}).encode(),
                [],
            )
            for i in ids
        ],
    )


def manifests(records: list[dict]) -> list[dict]:
    """The release manifests among records read from the models topic."""
    return [r for r in records if r.get("kind") == "manifest"]


async def eventually(check: Callable[[], bool], within_s: float = 30) -> None:
    """Returns once ``check()`` is true; fails after ``within_s`` seconds."""
    deadline = asyncio.get_running_loop().time() + within_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {within_s}s")
        await asyncio.sleep(0.1)
