"""Fixtures for the labeling side: label requests on the real broker, app settings."""

import base64
import io
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from fastapi.testclient import TestClient
from PIL import Image
from pydantic import SecretStr

from infra.kafka.connection import client_kwargs
from infra.kafka.settings import KafkaSettings
from schemas.frames import FrameOrigin
from schemas.label_requests import LabelRequest
from schemas.scores import Decision, Scores
from service.config import LabelAppSettings
from service.labeling.auth import COOKIE

DIGITS = [str(d) for d in range(10)]
CSRF = {"X-Winnow-Csrf": "1"}


def digit_png(index: int) -> bytes:
    from sklearn.datasets import load_digits

    image = np.round(load_digits().images[index] * (255 / 16)).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(image).resize((64, 64), Image.Resampling.NEAREST).save(buffer, format="PNG")
    return buffer.getvalue()


def label_request(
    frame_id: str, index: int = 0, source_id: str | None = "cam-1", prediction: str = "3"
) -> LabelRequest:
    """A label request as the scorer would publish it, with a real digit image."""
    probabilities = {c: (0.4 if c == prediction else 0.6 / 9) for c in DIGITS}
    return LabelRequest(
        frame_id=frame_id,
        source_id=source_id,
        origin=FrameOrigin(topic="winnow.frames", partition=0, offset=index),
        captured_at=datetime(2026, 5, 1, 12, 0, index % 60, tzinfo=UTC),
        requested_at=datetime.now(UTC),
        model_version="digits-v1",
        classes=DIGITS,
        content_type="image/png",
        image=base64.b64encode(digit_png(index)),
        label=prediction,
        confidence=0.4,
        probabilities=probabilities,
        scores=Scores(least_confidence=0.67, margin=0.7, entropy=0.9),
        decision=Decision(
            selected=True, reason="uncertainty", policy="variable", utility=0.9, threshold=0.5
        ),
    )


async def produce_requests(
    settings: KafkaSettings, requests: Iterable[LabelRequest], partition: int | None = 0
) -> None:
    """Produces label requests (to one partition by default, so their order is known)."""
    producer = AIOKafkaProducer(**client_kwargs(settings), acks="all")
    await producer.start()
    try:
        for request in requests:
            await producer.send_and_wait(
                settings.topics.label_requests,
                request.model_dump_json().encode(),
                key=request.frame_id.encode(),
                partition=partition,
            )
    finally:
        await producer.stop()


@pytest.fixture
def app_settings(group_id: str) -> Callable[..., LabelAppSettings]:
    def make(**overrides: object) -> LabelAppSettings:
        values: dict[str, object] = {
            "team_token": SecretStr("team-secret"),
            "user_tokens": SecretStr("carol:carol-token"),
            "session_secret": SecretStr("test-session-secret"),
            "group_id": group_id,
            "lease_s": 60.0,
            "commit_interval_s": 0.2,
            **overrides,
        }
        return LabelAppSettings(**values)  # type: ignore[arg-type]

    return make


def sign_in(client: TestClient, name: str, token: str = "team-secret") -> str:
    """Signs in; returns the session cookie (see :func:`act_as`)."""
    client.cookies.clear()
    response = client.post("/login", data={"name": name, "token": token}, follow_redirects=False)
    assert response.status_code == 303, response.text
    return response.cookies[COOKIE]


def act_as(client: TestClient, cookie: str) -> TestClient:
    """Makes the client's next requests those of the labeler who owns ``cookie``."""
    client.cookies.clear()
    client.cookies.set(COOKIE, cookie)
    return client


def next_lease(client: TestClient, within: float = 20) -> dict:
    """Asks for a frame until one comes (the group join takes about a second)."""
    deadline = time.monotonic() + within
    while True:
        response = client.post("/api/next", headers=CSRF)
        assert response.status_code == 200, response.text
        lease = response.json()["lease"]
        if lease is not None or time.monotonic() > deadline:
            return lease
        time.sleep(0.1)
