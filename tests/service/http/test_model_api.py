"""The model endpoints through the app's lifespan: a scorer that follows releases."""

import asyncio
import time
from pathlib import Path

import onnx
from fastapi.testclient import TestClient
from pydantic import SecretStr

from schemas.model_spec import SPEC_KEY, ModelSpec
from service.http.api import create_app
from tests.service.model.head_releases import full_release, head_release, publish_head


def _variant(path: Path, version: str, labels_trained: int) -> tuple[bytes, ModelSpec]:
    model = onnx.load(str(path))
    (prop,) = [p for p in model.metadata_props if p.key == SPEC_KEY]
    spec = ModelSpec.model_validate_json(prop.value).model_copy(
        update={"version": version, "labels_trained": labels_trained}
    )
    prop.value = spec.model_dump_json()
    return model.SerializeToString(), spec


def _until(client: TestClient, version: str, within: float = 30) -> dict:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        body = client.get("/v1/model")
        if body.status_code == 200 and body.json()["current"]["version"] == version:
            return body.json()
        time.sleep(0.1)
    raise AssertionError(f"not serving {version}: {body.text}")


def test_a_scorer_without_a_model_serves_the_first_release_and_can_pin_back(
    scorer_settings, digits_model_path, publish_model
) -> None:
    settings = scorer_settings()
    settings = settings.model_copy(update={"admin_token": SecretStr("t")})
    first = _variant(digits_model_path, "v1", 0)
    second = _variant(digits_model_path, "v2", 40)
    asyncio.run(publish_model(settings, *first))
    app = create_app(settings)  # no model: waits for a release
    with TestClient(app) as client:
        status = _until(client, "v1")
        assert status["following_releases"] and status["current"]["labels_trained"] == 0
        assert client.get("/v1/policy").json()["cold_start"] is True
        asyncio.run(publish_model(settings, *second))
        status = _until(client, "v2")
        assert [h["version"] for h in status["history"]] == ["v1", "v2"]
        assert client.get("/v1/policy").json()["cold_start"] is False  # a trained model
        assert client.post("/v1/model/pin", json={"version": "v1"}).status_code == 401
        auth = {"Authorization": "Bearer t"}
        pinned = client.post("/v1/model/pin", json={"version": "v1"}, headers=auth)
        assert pinned.status_code == 200, pinned.text
        assert pinned.json()["current"]["version"] == "v1" and pinned.json()["pinned"] == "v1"
        missing = client.post("/v1/model/pin", json={"version": "nope"}, headers=auth)
        assert missing.status_code == 404
        unpinned = client.post("/v1/model/unpin", headers=auth)
        assert unpinned.status_code == 200 and unpinned.json()["pinned"] is None
        _until(client, "v2")
        metrics = client.get("/metrics").text
        assert 'winnow_model_swaps_total{result="ok"}' in metrics


def test_status_says_how_many_answered_labels_the_serving_model_has_not_learned(
    scorer_settings, digits_model_path, publish_model
) -> None:
    settings = scorer_settings().model_copy(update={"admin_token": SecretStr("t")})
    auth = {"Authorization": "Bearer t"}
    artifact, spec = full_release(digits_model_path, "v1", labels_trained=10, labels_unlearned=4)
    asyncio.run(publish_model(settings, artifact, spec))
    with TestClient(create_app(settings)) as client:
        _until(client, "v1")
        assert client.get("/v1/status").json()["model"]["labels_unlearned"] == 4
        head, head_spec, _ = head_release(spec, "v1-h1", 1, labels_trained=14, labels_unlearned=0)
        asyncio.run(publish_head(settings, head, head_spec, "v1"))
        model = _until(client, "v1-h1")
        assert model["current"]["labels_unlearned"] == 0
        status = client.get("/v1/status").json()["model"]
        assert (status["version"], status["labels_trained"], status["labels_unlearned"]) == (
            "v1-h1",
            14,
            0,
        )
        assert "winnow_labels_unlearned 0.0" in client.get("/metrics").text
        pinned = client.post("/v1/model/pin", json={"version": "v1"}, headers=auth)
        assert pinned.status_code == 200, pinned.text
        assert client.get("/v1/status").json()["model"]["labels_unlearned"] == 4
        back = client.post("/v1/model/pin", json={"version": "v1-h1"}, headers=auth)
        assert back.status_code == 200 and back.json()["current"]["version"] == "v1-h1"
