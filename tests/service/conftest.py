"""Fixtures for the online role: a real digits model, frame producers, model releases.

The release helpers need the trainer's release encoding: tests may use both roles."""

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from aiokafka import AIOKafkaProducer
from PIL import Image

from infra.kafka.connection import client_kwargs
from infra.kafka.settings import KafkaSettings
from schemas.model_spec import SPEC_KEY, ModelSpec
from service.config import PolicySettings, ScorerSettings, Settings
from trainer.release import publish_release


@pytest.fixture(scope="session")
def digits_model_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from trainer.model_init import init_model

    path = tmp_path_factory.mktemp("models") / "digits.onnx"
    init_model(
        classes=[str(d) for d in range(10)],
        input_size=16,
        arch="small-cnn",
        out=path,
        channels=1,
        seed=0,
    )
    return path


@pytest.fixture(scope="session")
def digit_pngs() -> list[bytes]:
    from sklearn.datasets import load_digits

    images = np.round(load_digits().images * (255 / 16)).astype(np.uint8)
    out = []
    for image in images[:400]:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


@pytest.fixture
def scorer_settings(kafka_settings: KafkaSettings, group_id: str) -> Callable[..., Settings]:
    def make(**policy: object) -> Settings:
        return Settings(
            device="cpu",
            kafka=kafka_settings,
            scorer=ScorerSettings(group_id=group_id, max_batch_size=16, max_wait_ms=10),
            policy=PolicySettings(**{"name": "variable", "budget": 0.1, "seed": 0, **policy}),
        )

    return make


@pytest.fixture(scope="module")
def release_variant(digits_model_path: Path):
    """Makes a loadable copy of the digits model that says it is ``version``."""

    def make(version: str) -> tuple[bytes, ModelSpec]:
        model = onnx.load(str(digits_model_path))
        (prop,) = [p for p in model.metadata_props if p.key == SPEC_KEY]
        spec = ModelSpec.model_validate_json(prop.value).model_copy(update={"version": version})
        prop.value = spec.model_dump_json()
        return model.SerializeToString(), spec

    return make


@pytest.fixture
def publish_model():
    """Publishes an ONNX artifact as a release on the models topic, as the trainer does."""

    async def publish(settings, artifact: bytes, spec: ModelSpec, key: bytes | None = None) -> None:
        producer = AIOKafkaProducer(**client_kwargs(settings.kafka), acks="all")
        await producer.start()
        try:
            await publish_release(producer, settings.kafka.topics.models, artifact, spec, key)
        finally:
            await producer.stop()

    return publish
