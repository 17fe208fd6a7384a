"""The labeling app through its lifespan, against the real broker."""

import asyncio

from fastapi.testclient import TestClient

from schemas.labels import Label
from service.labeling.app import create_label_app
from tests.kafka_helpers import committed_offsets, read_json
from tests.service.labeling.conftest import (
    CSRF,
    act_as,
    label_request,
    next_lease,
    produce_requests,
    sign_in,
)


async def test_labelers_never_share_a_frame_and_answers_reach_kafka(
    kafka_settings, winnow_topics, app_settings
) -> None:
    await produce_requests(kafka_settings, [label_request(f"f{i}", i) for i in range(3)])
    with TestClient(create_label_app(kafka_settings, app_settings())) as client:
        alice, bob = sign_in(client, "alice"), sign_in(client, "bob")
        first = next_lease(act_as(client, alice))
        assert first["frame"]["frame_id"] == "f0"
        again = next_lease(client)
        assert again["lease_id"] == first["lease_id"], "one lease per labeler"
        second = next_lease(act_as(client, bob))
        assert second["frame"]["frame_id"] == "f1"
        wrong = client.post(
            "/api/answer", json={"lease_id": first["lease_id"], "label": "1"}, headers=CSRF
        )
        assert wrong.status_code == 409, "bob cannot answer alice's lease"
        bad = client.post(
            "/api/answer", json={"lease_id": second["lease_id"], "label": "cat"}, headers=CSRF
        )
        assert bad.status_code == 422
        ok = client.post(
            "/api/answer", json={"lease_id": second["lease_id"], "label": "7"}, headers=CSRF
        )
        assert ok.status_code == 200, ok.text
        stats = ok.json()["stats"]
        assert stats["my_count"] == 1 and stats["my_rate_per_hour"] > 0
        act_as(client, alice)
        skip = client.post("/api/skip", json={"lease_id": first["lease_id"]}, headers=CSRF)
        assert skip.status_code == 200
        assert next_lease(client)["frame"]["frame_id"] == "f2", "a skipped frame goes to the back"
        unl = client.post(
            "/api/answer",
            json={"lease_id": next_lease(client)["lease_id"], "status": "unlabelable"},
            headers=CSRF,
        )
        assert unl.status_code == 200
        assert next_lease(client)["frame"]["frame_id"] == "f0", "skipped, not dropped"
    labels = [Label.model_validate(r) for r in await _read(kafka_settings, 2)]
    assert [(x.frame_id, x.label, x.status, x.annotator) for x in labels] == [
        ("f1", "7", "labeled", "bob"),
        ("f2", None, "unlabelable", "alice"),
    ]


async def _read(kafka_settings, count: int) -> list[dict]:
    records = await read_json(
        kafka_settings, kafka_settings.topics.labels, lambda r: len(r) >= count, 20
    )
    for record in records:
        record.pop("_key")
    return records


async def test_an_expired_lease_returns_the_frame_to_the_pool(
    kafka_settings, winnow_topics, app_settings
) -> None:
    await produce_requests(kafka_settings, [label_request("only", 1)])
    with TestClient(create_label_app(kafka_settings, app_settings(lease_s=0.5))) as client:
        alice, bob = sign_in(client, "alice"), sign_in(client, "bob")
        held = next_lease(act_as(client, alice))
        assert held["frame"]["frame_id"] == "only"
        assert (
            client.post("/api/next", headers=CSRF).json()["lease"]["lease_id"] == held["lease_id"]
        )
        act_as(client, bob)
        assert client.post("/api/next", headers=CSRF).json()["lease"] is None
        await asyncio.sleep(0.7)
        assert next_lease(client)["frame"]["frame_id"] == "only"
        late = client.post(
            "/api/answer",
            json={"lease_id": held["lease_id"], "label": "1"},
            headers=CSRF,
            cookies=None,
        )
        assert late.status_code == 409


async def test_restart_serves_unanswered_frames_again_and_answered_ones_never(
    kafka_settings, winnow_topics, app_settings
) -> None:
    await produce_requests(kafka_settings, [label_request(f"r{i}", i) for i in range(3)])
    settings = app_settings()
    with TestClient(create_label_app(kafka_settings, settings)) as client:
        alice, bob = sign_in(client, "alice"), sign_in(client, "bob")
        lease = next_lease(act_as(client, alice))
        assert lease["frame"]["frame_id"] == "r0"
        answer = {"lease_id": lease["lease_id"], "label": "0"}
        assert client.post("/api/answer", json=answer, headers=CSRF).status_code == 200
        assert next_lease(client)["frame"]["frame_id"] == "r1"  # leased, never answered
        assert next_lease(act_as(client, bob))["frame"]["frame_id"] == "r2"
    committed = await committed_offsets(
        kafka_settings, kafka_settings.topics.label_requests, settings.group_id
    )
    assert committed[0] == 1
    with TestClient(create_label_app(kafka_settings, settings)) as client:
        served = []
        for name in ("dave", "erin", "fay"):
            act_as(client, sign_in(client, name))
            lease = next_lease(client, within=20 if not served else 2)
            served.append(lease and lease["frame"]["frame_id"])
        assert served == ["r1", "r2", None]


async def test_undo_sends_a_corrected_label(kafka_settings, winnow_topics, app_settings) -> None:
    await produce_requests(kafka_settings, [label_request("u0", 0), label_request("u1", 1)])
    with TestClient(create_label_app(kafka_settings, app_settings())) as client:
        act_as(client, sign_in(client, "alice"))
        assert client.post("/api/undo", headers=CSRF).status_code == 404
        lease = next_lease(client)
        client.post("/api/answer", json={"lease_id": lease["lease_id"], "label": "5"}, headers=CSRF)
        assert next_lease(client)["frame"]["frame_id"] == "u1"
        undo = client.post("/api/undo", headers=CSRF).json()["lease"]
        assert undo["correction"] and undo["frame"]["frame_id"] == "u0" and undo["previous"] == "5"
        fixed = client.post(
            "/api/answer", json={"lease_id": undo["lease_id"], "label": "6"}, headers=CSRF
        )
        assert fixed.status_code == 200
        assert next_lease(client)["frame"]["frame_id"] == "u1", (
            "the skipped-for-undo frame comes back"
        )
    labels = await _read(kafka_settings, 2)
    assert [(r["frame_id"], r["label"]) for r in labels] == [("u0", "5"), ("u0", "6")]


async def test_second_opinion_needs_two_labelers_and_counts_disagreement(
    kafka_settings, winnow_topics, app_settings
) -> None:
    await produce_requests(kafka_settings, [label_request("s0", 0)])
    with TestClient(create_label_app(kafka_settings, app_settings(second_opinion=1.0))) as client:
        alice, bob = sign_in(client, "alice"), sign_in(client, "bob")
        lease = next_lease(act_as(client, alice))
        assert next_lease(act_as(client, bob), within=0.3) is None, "never two at a time"
        act_as(client, alice)
        client.post("/api/answer", json={"lease_id": lease["lease_id"], "label": "3"}, headers=CSRF)
        assert client.post("/api/next", headers=CSRF).json()["lease"] is None
        lease = next_lease(act_as(client, bob))
        assert lease["frame"]["frame_id"] == "s0"
        client.post("/api/answer", json={"lease_id": lease["lease_id"], "label": "8"}, headers=CSRF)
        metrics = client.get("/metrics").text
        assert "winnow_label_app_disagreements_total 1.0" in metrics
        assert 'winnow_label_app_labels_total{annotator="bob",status="labeled"} 1.0' in metrics
        assert "winnow_label_app_queue_depth 0.0" in metrics
    labels = await _read(kafka_settings, 2)
    assert sorted((r["annotator"], r["label"]) for r in labels) == [("alice", "3"), ("bob", "8")]
