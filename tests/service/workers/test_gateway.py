"""The supervisor's HTTP app through its lifespan (``TestClient``), in front of stand-in
worker processes (``fake_worker.py``): readiness of all, admin writes guarded and sent to
all, ingest served by the supervisor itself, its OpenAPI document."""

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer
from fastapi.testclient import TestClient
from pydantic import SecretStr

from infra.kafka.connection import client_kwargs
from infra.kafka.settings import KafkaSettings
from service.config import Settings
from service.workers.fanout import AdminFanOut
from service.workers.gateway import create_gateway
from service.workers.pool import WorkerPool
from tests.service.workers.test_fanout import requests
from tests.service.workers.test_pool import fake

TOKEN = "gateway-test-admin-token-93be"


def gateway(kafka_settings: KafkaSettings, behaviours: list[str], log: Path) -> TestClient:
    settings = Settings(kafka=kafka_settings, workers=len(behaviours), admin_token=SecretStr(TOKEN))
    fanout = AdminFanOut(settings.admin_token)
    pool = WorkerPool(
        len(behaviours),
        fake(lambda index, _attempt: behaviours[index], log),
        on_ready=fanout.replay,
        backoff_s=(60.0, 60.0),
    )
    return TestClient(create_gateway(settings, pool, fanout))


def wait_for(
    client: TestClient,
    path: str,
    status: int,
    within: float = 20,
    until: Callable[[dict], bool] = lambda _body: True,
) -> dict:
    """The body of ``path`` once it answers ``status`` and ``until`` holds."""
    deadline = time.monotonic() + within
    while True:
        response = client.get(path)
        done = response.status_code == status and until(response.json())
        if done or time.monotonic() > deadline:
            assert done, response.text
            return response.json()
        time.sleep(0.1)


def test_ready_only_once_every_worker_is_and_says_which_is_not(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    with gateway(kafka_settings, ["serve", "serve"], tmp_path / "log") as client:
        assert client.get("/healthz").json() == {"status": "ok"}
        body = wait_for(client, "/readyz", 200)
        assert [w["ready"] for w in body["workers"]] == [True, True]
    with gateway(kafka_settings, ["serve", "crash-later"], tmp_path / "log") as client:
        # Worker 1 runs a second, exits 3 and waits a minute to start again.
        body = wait_for(client, "/readyz", 503, until=lambda b: b["workers"][1]["last_exit"] == 3)
        assert body["ready"] is False
        assert [(w["worker"], w["ready"]) for w in body["workers"]] == [(0, True), (1, False)]
        assert body["workers"][1]["phase"] == "restarting"
        assert body["workers"][1]["last_exit"] == 3


def puts(log: Path) -> list[tuple[int, str, str, str]]:
    return [request for request in requests(log) if request[1] == "PUT"]


def test_admin_writes_need_the_token_and_reach_every_worker(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    log = tmp_path / "log"
    with gateway(kafka_settings, ["serve", "serve"], log) as client:
        wait_for(client, "/readyz", 200)
        admin = {"Authorization": f"Bearer {TOKEN}"}
        assert client.put("/v1/policy", json={"budget": 0.2}).status_code == 401
        assert client.put("/v1/policy", json={"budget": 2}, headers=admin).status_code == 422
        assert puts(log) == []  # both refused here, before any worker
        answer = client.put("/v1/policy", json={"budget": 0.2}, headers=admin)
        assert answer.status_code == 200
        assert len({pid for pid, *_ in puts(log)}) == 2
        assert {body for *_, body in puts(log)} == {'{"budget":0.2}'}  # as sent, unset left out


async def test_frames_posted_to_the_gateway_land_in_kafka(
    kafka_settings: KafkaSettings, winnow_topics, digit_pngs: list[bytes], tmp_path: Path
) -> None:
    with gateway(kafka_settings, ["serve"], tmp_path / "log") as client:
        answer = client.post(
            "/v1/frames?source_id=cam-1",
            content=digit_pngs[0],
            headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "image/png"},
        )
    assert answer.status_code == 201, answer.text
    (frame_id,) = answer.json()["frame_ids"]
    records = await read_records(kafka_settings, winnow_topics.frames, lambda out: bool(out))
    assert [(r.key, r.value) for r in records] == [(b"cam-1", digit_pngs[0])]
    assert (b"frame-id", frame_id.encode()) in [(k.encode(), v) for k, v in records[0].headers]


async def read_records(settings: KafkaSettings, topic: str, until: Callable[[list], bool]) -> list:
    """Records of ``topic`` from the start, until ``until(records)`` holds."""
    consumer = AIOKafkaConsumer(
        topic, group_id=None, auto_offset_reset="earliest", **client_kwargs(settings)
    )
    await consumer.start()
    out: list = []
    try:
        async with asyncio.timeout(30):
            while not until(out):
                for batch in (await consumer.getmany(timeout_ms=200)).values():
                    out.extend(batch)
    finally:
        await consumer.stop()
    return out


def test_the_openapi_document_lists_the_workers_views(
    kafka_settings: KafkaSettings, tmp_path: Path
) -> None:
    with gateway(kafka_settings, ["serve"], tmp_path / "log") as client:
        paths = client.get("/openapi.json").json()["paths"]
    assert {
        "/readyz",
        "/metrics",
        "/v1/status",
        "/v1/policy",
        "/v1/model/pin",
        "/v1/frames",
    } <= set(paths)
