"""The Label Studio bridge against a fake that checks requests as Label Studio documents them."""

import asyncio
import base64
import copy
from collections.abc import Callable

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.testclient import TestClient
from pydantic import SecretStr

from service.labeling.label_studio import (
    Bridge,
    LabelStudioClient,
    LabelStudioSettings,
    WebhookError,
    create_bridge_app,
    label_from_webhook,
    task_from_request,
)
from tests.kafka_helpers import committed_offsets, end_offsets, produce, read_json
from tests.service.labeling.conftest import digit_png, label_request, produce_requests


def _settings(group_id: str = "g") -> LabelStudioSettings:
    return LabelStudioSettings(
        url="http://label-studio.test",
        api_key=SecretStr("ls-key"),
        project_id=7,
        webhook_token=SecretStr("hook-secret"),
        group_id=group_id,
    )


def _webhook(
    action: str,
    frame_id: str,
    choice: str,
    annotation_id: int = 17,
    updated: str = "2021-08-17T13:52:48.536370Z",
) -> dict:
    """Shaped as Label Studio's webhook reference shows (annotation, task, project)."""
    return {
        "action": action,
        "annotation": {
            "id": annotation_id,
            "result": [
                {
                    "value": {"choices": [choice]},
                    "id": "WArqkkifYE",
                    "from_name": "choice",
                    "to_name": "image",
                    "type": "choices",
                    "origin": "manual",
                }
            ],
            "was_cancelled": False,
            "ground_truth": False,
            "created_at": "2021-08-17T13:52:48.536303Z",
            "updated_at": updated,
            "lead_time": 37.13,
            "prediction": {},
            "result_count": 0,
            "task": 19,
            "completed_by": 1,
        },
        "task": {
            "id": 19,
            "data": {"image": "data:image/png;base64,AAAA", "frame_id": frame_id},
            "project": 7,
        },
        "project": {"id": 7, "title": "Winnow"},
    }


def test_a_label_request_becomes_a_task_with_a_pre_annotation() -> None:
    task = task_from_request(label_request("f1", 4, prediction="4"), _settings())
    data = task["data"]
    assert data["image"] == "data:image/png;base64," + base64.b64encode(digit_png(4)).decode()
    assert data["frame_id"] == "f1" and data["source_id"] == "cam-1"
    assert (data["least_confidence"], data["margin"], data["entropy"]) == (0.67, 0.7, 0.9)
    assert data["reason"] == "uncertainty" and data["captured_at"].startswith("2026-05-01T12:00:04")
    assert task["predictions"] == [
        {
            "model_version": "digits-v1",
            "score": 0.4,
            "result": [
                {
                    "from_name": "choice",
                    "to_name": "image",
                    "type": "choices",
                    "value": {"choices": ["4"]},
                }
            ],
        }
    ]


def test_webhook_annotations_become_labels() -> None:
    s = _settings()
    label = label_from_webhook(_webhook("ANNOTATION_CREATED", "f9", "3"), s, {})
    assert label is not None
    assert (label.frame_id, label.label, label.status, label.annotator) == (
        "f9",
        "3",
        "labeled",
        "label-studio:user-1",
    )
    assert label.labeled_at is not None and label.labeled_at.year == 2021
    cant = label_from_webhook(_webhook("ANNOTATION_UPDATED", "f9", "unlabelable"), s, {})
    assert cant is not None and cant.status == "unlabelable" and cant.label is None
    no_task = _webhook("ANNOTATION_CREATED", "f9", "3")
    del no_task["task"]
    assert label_from_webhook(no_task, s, {19: "from-import"}).frame_id == "from-import"  # type: ignore[union-attr]
    with pytest.raises(WebhookError):
        label_from_webhook(no_task, s, {})
    skipped = _webhook("ANNOTATION_CREATED", "f9", "3")
    skipped["annotation"]["was_cancelled"] = True
    assert label_from_webhook(skipped, s, {}) is None
    assert label_from_webhook({"action": "TASKS_CREATED", "tasks": []}, s, {}) is None
    other = _webhook("ANNOTATION_CREATED", "f9", "3")
    other["annotation"]["result"][0]["from_name"] = "something-else"
    with pytest.raises(WebhookError):
        label_from_webhook(other, s, {})


def _fake_label_studio(imports: list[list[dict]]) -> FastAPI:
    """Checks the import request exactly as Label Studio's API reference documents it."""
    fake = FastAPI()
    next_id = iter(range(100, 10_000))

    @fake.post("/api/projects/{project_id}/import")
    async def import_tasks(project_id: int, request: Request) -> dict:
        if request.headers.get("authorization") != "Token ls-key":
            raise HTTPException(401, "Authentication credentials were not provided.")
        assert project_id == 7
        assert request.headers["content-type"] == "application/json"
        assert request.query_params.get("return_task_ids") == "true"
        tasks = await request.json()
        assert isinstance(tasks, list) and tasks
        for task in tasks:
            assert set(task) == {"data", "predictions"}
            assert task["data"]["image"].startswith("data:image/png;base64,")
            (prediction,) = task["predictions"]
            assert set(prediction) == {"model_version", "score", "result"}
            (result,) = prediction["result"]
            assert result["type"] == "choices" and result["from_name"] == "choice"
        imports.append(tasks)
        ids = [next(next_id) for _ in tasks]
        return {
            "task_count": len(tasks),
            "annotation_count": 0,
            "predictions_count": len(tasks),
            "duration": 0.01,
            "file_upload_ids": [],
            "could_be_tasks_list": False,
            "found_formats": [],
            "data_columns": [],
            "task_ids": ids,
        }

    return fake


async def test_bridge_imports_requests_and_publishes_webhook_labels_once(
    kafka_settings, winnow_topics, group_id
) -> None:
    await produce_requests(kafka_settings, [label_request(f"ls{i}", i) for i in range(3)])
    imports: list[list[dict]] = []
    transport = httpx.ASGITransport(app=_fake_label_studio(imports))
    app = create_bridge_app(kafka_settings, _settings(group_id), transport)
    with TestClient(app) as client:
        for _ in range(200):  # the group join and the first import take a moment
            if sum(map(len, imports)) >= 3:
                break
            await asyncio.sleep(0.1)
        assert sorted(t["data"]["frame_id"] for batch in imports for t in batch) == [
            "ls0",
            "ls1",
            "ls2",
        ]
        assert client.get("/healthz").json() == {"status": "ok", "imported": 3}
        hook = {"Authorization": "Token hook-secret"}
        created = _webhook("ANNOTATION_CREATED", "ls1", "5", annotation_id=40)
        assert client.post("/webhook", json=created).status_code == 401
        assert (
            client.post(
                "/webhook", json=created, headers={"Authorization": "Token nope"}
            ).status_code
            == 401
        )
        first = client.post("/webhook", json=created, headers=hook)
        assert first.status_code == 200 and first.json()["published"]["label"] == "5"
        again = client.post("/webhook", json=copy.deepcopy(created), headers=hook)
        assert again.json()["published"] is None, "a redelivery is not published twice"
        updated = _webhook(
            "ANNOTATION_UPDATED", "ls1", "6", annotation_id=40, updated="2021-08-17T14:00:00Z"
        )
        assert (
            client.post("/webhook", json=updated, headers=hook).json()["published"]["label"] == "6"
        )
        no_task = _webhook("ANNOTATION_CREATED", "ignored", "2", annotation_id=41)
        no_task.pop("task")
        no_task["annotation"]["task"] = 100  # the fake numbers imported tasks from 100
        by_id = client.post("/webhook", json=no_task, headers=hook).json()["published"]
        assert by_id["frame_id"] == imports[0][0]["data"]["frame_id"]
        assert (
            client.post("/webhook", json={"action": "ANNOTATION_CREATED"}, headers=hook).status_code
            == 422
        )
    labels = await read_json(
        kafka_settings, kafka_settings.topics.labels, lambda r: len(r) >= 3, 20
    )
    assert [(r["frame_id"], r["label"], r["annotator"]) for r in labels] == [
        ("ls1", "5", "label-studio:user-1"),
        ("ls1", "6", "label-studio:user-1"),
        (imports[0][0]["data"]["frame_id"], "2", "label-studio:user-1"),
    ]
    assert all(r["_key"] == r["frame_id"].encode() for r in labels)


async def _until(check: Callable[[], bool], within_s: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + within_s
    while not check():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"not true within {within_s}s")
        await asyncio.sleep(0.05)


async def test_the_bridge_commits_only_what_label_studio_took(
    kafka_settings, winnow_topics, group_id
) -> None:
    topic = kafka_settings.topics.label_requests
    await produce_requests(kafka_settings, [label_request(f"lb{i}", i) for i in range(2)])
    await produce(kafka_settings, topic, [(b"junk", b"{not a label request", [])])
    settings = _settings(group_id)
    refused: list[int] = []
    down = FastAPI()

    @down.post("/api/projects/{project_id}/import")
    async def unavailable(project_id: int) -> None:
        refused.append(project_id)
        raise HTTPException(503, "Label Studio is restarting")

    client = LabelStudioClient(settings, httpx.ASGITransport(app=down))
    async with Bridge(kafka_settings, settings, client) as bridge:
        await _until(lambda: len(refused) >= 2)  # fetched, and retrying the import
        assert bridge.imported == 0
    assert set((await committed_offsets(kafka_settings, topic, group_id)).values()) == {0}

    imports: list[list[dict]] = []
    client = LabelStudioClient(settings, httpx.ASGITransport(app=_fake_label_studio(imports)))
    async with Bridge(kafka_settings, settings, client) as bridge:
        await _until(lambda: bridge.imported >= 2)
    # nothing was skipped by the stop above, and the unreadable record is done too
    assert sorted(t["data"]["frame_id"] for batch in imports for t in batch) == ["lb0", "lb1"]
    ends = await end_offsets(kafka_settings, topic)
    assert sum(ends.values()) == 3
    assert await committed_offsets(kafka_settings, topic, group_id) == ends
