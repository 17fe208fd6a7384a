"""Fixtures for the online role: a real digits model and frame producers."""

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infra.kafka.settings import KafkaSettings
from service.config import PolicySettings, ScorerSettings, Settings


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
