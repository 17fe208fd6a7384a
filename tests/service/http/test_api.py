"""The HTTP API through the app's lifespan: the scorer really starts and stops."""

import time

from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.http.api import create_app
from service.model.inference import OnnxModel
from tests.kafka_helpers import read_json


def _wait_ready(client: TestClient, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = client.get("/readyz")
        if response.status_code == 200:
            return response.json()
        time.sleep(0.1)
    raise AssertionError(f"not ready after {timeout}s: {response.json()}")


def test_health_readiness_status_and_metrics(scorer_settings, digits_model_path) -> None:
    settings = scorer_settings()
    app = create_app(settings, OnnxModel.load(digits_model_path, device="cpu"))
    with TestClient(app) as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        ready = _wait_ready(client)
        assert ready["model_loaded"] and ready["partitions_assigned"] == 3
        status = client.get("/v1/status").json()
        assert status["ready"] is True
        assert status["model"]["classes"] == [str(d) for d in range(10)]
        assert status["policy"]["name"] == "variable"
        assert status["policy"]["backpressure"]["engaged"] is False  # no answer yet
        assert status["labeling"]["recent_recall"] == {}
        assert len(status["partitions"]) == 3
        metrics = client.get("/metrics").text
        for name in (
            "winnow_frames_total",
            "winnow_inference_seconds",
            "winnow_batch_size",
            "winnow_decision_latency_seconds",
            "winnow_query_threshold",
            "winnow_budget_used_ratio",
            "winnow_model_info",
            "winnow_label_requests_total",
            "winnow_requests_waiting",
            "winnow_backpressure_budget_factor",
            "winnow_uncertainty_blend",
        ):
            assert name in metrics, name
        assert client.get("/openapi.json").json()["info"]["title"] == "Winnow scorer"
    assert client.get("/healthz").status_code == 200  # app still answers after shutdown


def test_readyz_is_503_before_the_scorer_runs(scorer_settings, digits_model_path) -> None:
    app = create_app(scorer_settings(), OnnxModel.load(digits_model_path, device="cpu"))
    client = TestClient(app)  # no `with`: lifespan has not run
    response = client.get("/readyz")
    assert response.status_code == 503 and response.json()["ready"] is False


def test_policy_writes_need_the_admin_token(scorer_settings, digits_model_path) -> None:
    settings = scorer_settings()
    settings = settings.model_copy(update={"admin_token": SecretStr("s3cret")})
    app = create_app(settings, OnnxModel.load(digits_model_path, device="cpu"))
    with TestClient(app) as client:
        assert client.put("/v1/policy", json={"budget": 0.2}).status_code == 401
        wrong = {"Authorization": "Bearer nope"}
        assert client.put("/v1/policy", json={"budget": 0.2}, headers=wrong).status_code == 401
        good = {"Authorization": "Bearer s3cret"}
        response = client.put("/v1/policy", json={"budget": 0.2, "name": "split"}, headers=good)
        assert response.status_code == 200, response.text
        assert response.json()["budget"] == 0.2 and response.json()["name"] == "split"
        assert client.get("/v1/policy").json()["name"] == "split"
        bad = client.put("/v1/policy", json={"budget": 7}, headers=good)
        assert bad.status_code == 422


def test_policy_writes_are_refused_without_a_configured_token(
    scorer_settings, digits_model_path
) -> None:
    app = create_app(scorer_settings(), OnnxModel.load(digits_model_path, device="cpu"))
    with TestClient(app) as client:
        response = client.put(
            "/v1/policy", json={"budget": 0.2}, headers={"Authorization": "Bearer anything"}
        )
        assert response.status_code == 403
        assert "WINNOW_ADMIN_TOKEN" in response.json()["detail"]


def test_live_policy_change_takes_effect_on_the_stream(
    scorer_settings, digits_model_path, digit_pngs
) -> None:
    import asyncio

    from tests.kafka_helpers import produce

    settings = scorer_settings(name="random", budget=0.01)
    settings = settings.model_copy(update={"admin_token": SecretStr("t")})
    app = create_app(settings, OnnxModel.load(digits_model_path, device="cpu"))
    topics = settings.kafka.topics
    with TestClient(app) as client:
        _wait_ready(client)
        response = client.put(
            "/v1/policy", json={"budget": 1.0}, headers={"Authorization": "Bearer t"}
        )
        assert response.status_code == 200
        frames = [
            (b"cam", png, [("frame-id", f"f{i}".encode())]) for i, png in enumerate(digit_pngs[:20])
        ]
        asyncio.run(produce(settings.kafka, topics.frames, frames))
        requests = asyncio.run(
            read_json(settings.kafka, topics.label_requests, lambda out: len(out) >= 20)
        )
    assert {r["frame_id"] for r in requests} == {f"f{i}" for i in range(20)}


def test_status_scores_labels_against_the_scorers_own_requests(
    scorer_settings, digits_model_path, digit_pngs
) -> None:
    import asyncio
    import json

    from tests.kafka_helpers import produce

    settings = scorer_settings(name="random", budget=1.0)
    topics = settings.kafka.topics
    app = create_app(settings, OnnxModel.load(digits_model_path, device="cpu"))
    with TestClient(app) as client:
        _wait_ready(client)
        frames = [
            (b"cam", png, [("frame-id", f"f{i}".encode())]) for i, png in enumerate(digit_pngs[:25])
        ]
        asyncio.run(produce(settings.kafka, topics.frames, frames))
        requests = asyncio.run(
            read_json(settings.kafka, topics.label_requests, lambda out: len(out) >= 25)
        )
        labels = [
            (
                r["frame_id"].encode(),
                json.dumps({"frame_id": r["frame_id"], "label": r["label"]}).encode(),
                [],
            )
            for r in requests
        ]
        asyncio.run(produce(settings.kafka, topics.labels, labels))
        deadline = time.monotonic() + 20
        while (labeling := client.get("/v1/status").json()["labeling"])["answered"] < 25:
            assert time.monotonic() < deadline, labeling
            time.sleep(0.1)
    assert labeling["recent_accuracy"] == 1.0  # every label agreed with the prediction
    assert labeling["stop"] is True and "can stop" in labeling["verdict"]
