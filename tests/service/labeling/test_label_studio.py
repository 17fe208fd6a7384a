"""The Label Studio bridge: against a real Label Studio, and against fakes for failure paths.

The main test starts Label Studio from its own venv (skipped when it is not
installed), creates a personal access token as a person does in the UI, and
runs the bridge for real between Label Studio and the test broker. The fakes
cover what a real Label Studio will not do on cue: answer 503, redeliver a
webhook, send a body without a task.
"""

import asyncio
import base64
import copy
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, HTTPException, Request
from fastapi.testclient import TestClient
from pydantic import SecretStr

from infra.kafka.settings import KafkaSettings
from service.labeling.label_studio import (
    Bridge,
    LabelStudioClient,
    LabelStudioSettings,
    WebhookError,
    create_bridge_app,
    label_from_webhook,
    task_from_request,
)
from service.labeling.label_studio_auth import LabelStudioAuthError, PersonalAccessTokenAuth
from tests.kafka_helpers import committed_offsets, end_offsets, produce, read_json
from tests.service.labeling.conftest import DIGITS, digit_png, label_request, produce_requests
from tests.service.labeling.http_server import ServerThread, free_port
from tests.service.labeling.label_studio_process import LabelStudio, label_studio_missing, until


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


def _dropping_label_studio(resent: list[list[dict]], answer: int = 201) -> FastAPI:
    """Label Studio 1.23 as it answers an import whose write it retried on a locked SQLite
    database: the tasks stored, ``prediction_count`` 0 (seen under load in CI)."""
    fake = FastAPI()

    @fake.post("/api/projects/{project_id}/import")
    async def import_tasks(project_id: int, request: Request) -> dict:
        tasks = await request.json()
        ids = list(range(500, 500 + len(tasks)))
        return {"task_count": len(tasks), "prediction_count": 0, "task_ids": ids}

    @fake.post("/api/projects/{project_id}/import/predictions")
    async def import_predictions(project_id: int, request: Request) -> dict:
        assert project_id == 7
        resent.append(await request.json())
        if answer != 201:
            raise HTTPException(answer, "database is locked")
        return {"created": len(resent[-1])}

    return fake


@pytest.mark.parametrize("answer", [201, 500])
async def test_pre_annotations_label_studio_dropped_are_sent_again(answer: int, caplog) -> None:
    """Catches: tasks left without their pre-annotation when Label Studio drops them (the
    labeler then starts from nothing), and a refused second send failing the import (which,
    retried, would duplicate the tasks)."""
    resent: list[list[dict]] = []
    settings = _settings()
    client = LabelStudioClient(
        settings, httpx.ASGITransport(app=_dropping_label_studio(resent, answer))
    )
    requests = [label_request(f"ld{i}", i, prediction=str(i)) for i in range(2)]
    try:
        ids = await client.import_tasks([task_from_request(r, settings) for r in requests])
    finally:
        await client.aclose()
    assert ids == [500, 501]
    (items,) = resent
    assert [(i["task"], i["result"][0]["value"]["choices"]) for i in items] == [
        (500, ["0"]),
        (501, ["1"]),
    ]
    assert all(i["model_version"] == "digits-v1" and i["score"] == 0.4 for i in items)
    said = "sent again: 2 created" if answer == 201 else "refused them again"
    assert said in caplog.text, caplog.text


async def test_webhook_redeliveries_bad_tokens_and_bodies(
    kafka_settings, winnow_topics, group_id
) -> None:
    """What Label Studio will not do on cue: redeliver, omit the task, send a wrong token."""
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


async def test_a_refused_personal_access_token_is_logged_naming_the_setting(
    kafka_settings, winnow_topics, group_id, caplog
) -> None:
    topic = kafka_settings.topics.label_requests
    await produce_requests(kafka_settings, [label_request("lr0", 0)])
    pat = "eyJhbGciOiJIUzI1NiJ9.eyJ0b2tlbl90eXBlIjoicmVmcmVzaCJ9.c2lnbmF0dXJl"  # a JWT
    settings = _settings(group_id).model_copy(update={"api_key": SecretStr(pat)})
    revoked = FastAPI()
    refreshes: list[str] = []

    @revoked.post("/api/token/refresh/")
    async def refresh(request: Request) -> None:
        refreshes.append((await request.json())["refresh"])
        raise HTTPException(401, "Token is blacklisted")

    client = LabelStudioClient(settings, httpx.ASGITransport(app=revoked))
    async with Bridge(kafka_settings, settings, client) as bridge:
        await _until(lambda: "Label Studio import refused" in caplog.text)
        assert bridge.imported == 0
    assert refreshes == [pat], "the token is tried once, then again only after a long pause"
    assert "WINNOW_LABEL_STUDIO_API_KEY" in caplog.text and "Token is blacklisted" in caplog.text
    assert pat not in caplog.text
    assert set((await committed_offsets(kafka_settings, topic, group_id)).values()) == {0}


# -- against a real Label Studio --------------------------------------------------------
def labeling_config(classes: list[str]) -> str:
    """The README's labeling config, with the test's classes as choices."""
    choices = "".join(f'<Choice value="{c}"/>' for c in [*classes, "unlabelable"])
    return (
        "<View>\n"
        '  <Image name="image" value="$image" zoom="true"/>\n'
        '  <Choices name="choice" toName="image" choice="single">\n'
        f"    {choices}\n"
        "  </Choices>\n"
        "</View>"
    )


def _choice(value: str) -> list[dict[str, Any]]:
    """An annotation result as the labeling UI submits it for the Choices tag."""
    return [
        {
            "from_name": "choice",
            "to_name": "image",
            "type": "choices",
            "value": {"choices": [value]},
        }
    ]


@pytest.fixture
def label_studio(tmp_path: Path) -> Iterator[LabelStudio]:
    """Label Studio on a free loopback port with a fresh SQLite database; killed at the end."""
    missing = label_studio_missing()
    if missing:
        pytest.skip(missing)
    studio = LabelStudio(tmp_path)
    try:
        try:
            studio.start()
        except RuntimeError as error:
            pytest.fail(str(error))
        yield studio
    finally:
        studio.stop()


async def _tasks(api: httpx.AsyncClient, project: int, count: int) -> list[dict[str, Any]]:
    answer = await api.get("/api/tasks/", params={"project": project})
    answer.raise_for_status()
    tasks: list[dict[str, Any]] = answer.json()["tasks"]
    return tasks if len(tasks) >= count else []


async def _predictions(api: httpx.AsyncClient, task: int) -> list[dict[str, Any]]:
    answer = await api.get("/api/predictions/", params={"task": task})
    answer.raise_for_status()
    predictions: list[dict[str, Any]] = answer.json()
    return predictions


async def _labels(kafka_settings: KafkaSettings, count: int, within_s: float) -> list[dict]:
    try:
        return await read_json(
            kafka_settings, kafka_settings.topics.labels, lambda r: len(r) >= count, within_s
        )
    except TimeoutError:
        raise AssertionError(
            f"fewer than {count} labels on {kafka_settings.topics.labels} within {within_s:.0f}s: "
            "did Label Studio deliver the webhook? (its log follows)"
        ) from None


@pytest.mark.slow
@pytest.mark.timeout(600)
async def test_label_studio_annotations_reach_the_labels_topic(
    kafka_settings, winnow_topics, group_id, label_studio: LabelStudio
) -> None:
    studio = label_studio
    with studio.log_on_failure():
        token = await studio.personal_access_token()
        clock = [0.0]  # the test's clock: five minutes pass on cue
        auth = PersonalAccessTokenAuth(
            token, f"{studio.url}/api/token/refresh/", clock=lambda: clock[0]
        )
        async with httpx.AsyncClient(base_url=studio.url, auth=auth, timeout=30) as api:
            created = await api.post(
                "/api/projects/", json={"title": "Winnow", "label_config": labeling_config(DIGITS)}
            )
            assert created.status_code == 201, created.text
            project = created.json()["id"]
            clock[0] += 300 - 29  # Label Studio's access tokens live 300s: renewed 30s early
            assert (await api.get(f"/api/projects/{project}/")).status_code == 200
            assert auth.refreshes == 2, "a second access token, taken before the first expired"
            settings = LabelStudioSettings(
                url=studio.url,
                api_key=SecretStr(token),  # auto: a JWT, so a personal access token
                project_id=project,
                webhook_token=SecretStr("hook-secret"),
                group_id=group_id,
                port=free_port(),
            )
            requests = [label_request(f"ls-real-{i}", i, prediction=str(i)) for i in range(3)]
            await produce_requests(kafka_settings, requests)
            app = create_bridge_app(kafka_settings, settings)
            with ServerThread(app, settings.port) as bridge:
                # what the README tells a user to set up in Settings, Webhooks
                hook = await api.post(
                    "/api/webhooks/",
                    json={
                        "project": project,
                        "url": f"{bridge.url}/webhook",
                        "send_payload": True,
                        "send_for_all_actions": False,
                        "actions": ["ANNOTATION_CREATED", "ANNOTATION_UPDATED"],
                        "headers": {"Authorization": "Token hook-secret"},
                    },
                )
                assert hook.status_code == 201, hook.text
                tasks = await until(
                    lambda: _tasks(api, project, 3), "the bridge imports 3 requests as tasks", 120
                )
                by_frame = {t["data"]["frame_id"]: t for t in tasks}
                assert sorted(by_frame) == ["ls-real-0", "ls-real-1", "ls-real-2"]
                first = by_frame["ls-real-0"]
                png = base64.b64encode(digit_png(0)).decode()
                assert first["data"]["image"] == f"data:image/png;base64,{png}"
                assert first["data"]["least_confidence"] == 0.67
                # Label Studio 1.23 stores an import's tasks and predictions in one transaction;
                # awaited all the same, and on failure the tasks as listed say what came
                listed = [
                    (t["id"], t["data"]["frame_id"], t.get("total_predictions")) for t in tasks
                ]
                (prediction,) = await until(
                    lambda: _predictions(api, first["id"]),
                    f"the task's pre-annotation (tasks listed: {listed})",
                    60,
                )
                assert prediction["model_version"] == "digits-v1"
                assert prediction["result"][0]["value"] == {"choices": ["0"]}

                # a labeler answers 0, corrects it to 6, and can't tell on another frame
                answer = await api.post(
                    f"/api/tasks/{first['id']}/annotations/",
                    json={"result": _choice("0"), "lead_time": 2.5},
                )
                assert answer.status_code == 201, answer.text
                fixed = await api.patch(
                    f"/api/annotations/{answer.json()['id']}/", json={"result": _choice("6")}
                )
                assert fixed.status_code == 200, fixed.text
                cant = await api.post(
                    f"/api/tasks/{by_frame['ls-real-1']['id']}/annotations/",
                    json={"result": _choice("unlabelable")},
                )
                assert cant.status_code == 201, cant.text
                labels = await _labels(kafka_settings, 3, 60)
                async with httpx.AsyncClient(base_url=bridge.url) as plain:
                    health = (await plain.get("/healthz")).json()
        assert health == {"status": "ok", "imported": 3}
        got = sorted((r["frame_id"], r.get("label"), r["status"], r["annotator"]) for r in labels)
        assert got == [
            ("ls-real-0", "0", "labeled", "label-studio:user-1"),
            ("ls-real-0", "6", "labeled", "label-studio:user-1"),
            ("ls-real-1", None, "unlabelable", "label-studio:user-1"),
        ]
        first_frame = [r["label"] for r in labels if r["frame_id"] == "ls-real-0"]
        assert first_frame == ["0", "6"], "the correction comes after the answer"
        assert all(r["_key"] == r["frame_id"].encode() for r in labels)

        # Label Studio refuses a legacy token by default, and the bridge says what to do.
        legacy = settings.model_copy(update={"api_key": SecretStr(await studio.legacy_token())})
        client = LabelStudioClient(legacy)
        try:
            with pytest.raises(LabelStudioAuthError) as refused:
                await client.import_tasks([task_from_request(requests[2], legacy)])
        finally:
            await client.aclose()
        assert "legacy token authentication has been disabled" in str(refused.value)
        assert "WINNOW_LABEL_STUDIO_API_KEY" in str(refused.value)

        # an import into a project that does not exist names the setting to check
        elsewhere = settings.model_copy(update={"project_id": project + 100})
        client = LabelStudioClient(elsewhere)
        try:
            with pytest.raises(LabelStudioAuthError, match="WINNOW_LABEL_STUDIO_PROJECT_ID"):
                await client.import_tasks([task_from_request(requests[2], elsewhere)])
        finally:
            await client.aclose()
