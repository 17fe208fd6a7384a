"""Release tampering and replay on the real broker: the serving model stays, with a reason.

Decided behaviour (see ``service.model.watcher`` and ``service.model.assembler``):
chunks are numbered, so chunks in another order are put together by index; a
chunk repeated with other bytes (``chunks``) or chunks missing (``incomplete``)
refuse the release; an old, validly signed release published again after a
newer one is a ``replay`` and is not served; pinning back stays the operator's.
"""

import asyncio
import base64
import logging

import onnx
import pytest
from fastapi.testclient import TestClient
from pydantic import SecretStr

from schemas.model_spec import SPEC_KEY, ModelSpec
from schemas.models import ModelChunk, ModelManifest
from service.http.api import create_app
from service.metrics import ScorerMetrics
from service.model.watcher import ModelReleases
from tests.kafka_helpers import produce
from trainer.release import build_release, encode_records

KEY = b"release-signing-key"


@pytest.fixture
def signed(scorer_settings, digits_model_path):
    """Settings with a signing key, and a maker of signed releases of the digits model."""
    settings = scorer_settings().model_copy(
        update={"model_signing_key": SecretStr(KEY.decode()), "admin_token": SecretStr("adm")}
    )

    def release(version: str, parent: str | None = None, pieces: int = 4):
        model = onnx.load(str(digits_model_path))
        (prop,) = [p for p in model.metadata_props if p.key == SPEC_KEY]
        spec = ModelSpec.model_validate_json(prop.value).model_copy(
            update={"version": version, "parent_version": parent}
        )
        prop.value = spec.model_dump_json()
        artifact = model.SerializeToString()
        manifest, _ = build_release(artifact, spec, KEY)
        return _rechunk(manifest, artifact, pieces)

    return settings, release


def _rechunk(manifest: ModelManifest, artifact: bytes, pieces: int):
    """The same signed release in ``pieces`` chunks (the digits model fits in one)."""
    size = -(-len(artifact) // pieces)
    parts = [artifact[i : i + size] for i in range(0, len(artifact), size)]
    chunks = [
        ModelChunk(
            model_name=manifest.model_name,
            version=manifest.version,
            index=i,
            count=len(parts),
            data=base64.b64encode(part),
        )
        for i, part in enumerate(parts)
    ]
    return manifest.model_copy(update={"chunk_count": len(parts)}), chunks


async def _publish(settings, manifest: ModelManifest, chunks: list[ModelChunk]) -> None:
    """The records as they are given: in this order, with these repeats or gaps."""
    key = manifest.model_name.encode()
    values = [manifest.model_dump_json().encode()] + [c.model_dump_json().encode() for c in chunks]
    await produce(settings.kafka, settings.kafka.topics.models, [(key, v, []) for v in values])


async def _replay(settings, manifest, chunks) -> None:
    """Byte for byte what was published before, published again."""
    key = manifest.model_name.encode()
    values = encode_records(manifest, chunks)
    await produce(settings.kafka, settings.kafka.topics.models, [(key, v, []) for v in values])


def _count(metrics: ScorerMetrics, result: str) -> float:
    return metrics.registry.get_sample_value("winnow_model_swaps_total", {"result": result}) or 0


async def _until(condition, within: float = 30) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 (polls state another task changes)
            await asyncio.sleep(0.05)


async def test_an_old_signed_release_replayed_live_does_not_replace_the_newer_one(
    signed, winnow_topics, caplog
) -> None:
    """Catches a validly signed old release, published again on the models topic, being
    served over the newer one (live, and again after a restart that reads the topic from
    the start), or refused without a log line and a metric, or made unpinnable."""
    settings, release = signed
    v1, v2 = release("v1"), release("v2", parent="v1")
    metrics = ScorerMetrics()
    async with ModelReleases(settings, metrics=metrics) as releases:
        await releases.wait_caught_up(10)
        await _publish(settings, *v1)
        await _until(lambda: releases.active_version == "v1")
        await _publish(settings, *v2)
        await _until(lambda: releases.active_version == "v2")
        with caplog.at_level(logging.WARNING, logger="service.model.watcher"):
            await _replay(settings, *v1)
            await _until(lambda: _count(metrics, "rejected_replay") == 1)
        await asyncio.sleep(0.3)
        assert releases.active_version == "v2"
        assert "release replay refused" in caplog.text and "superseded by v2" in caplog.text
        history = {i.version: (i.status, i.pinnable) for i in releases.history()}
        assert history == {"v1": ("available", True), "v2": ("active", True)}
        assert (await releases.pin("v1")).version == "v1", "going back stays possible"
    restarted = ScorerMetrics()
    async with ModelReleases(settings, metrics=restarted) as releases:
        assert (await releases.wait_for_first(30)).version == "v2"
        await releases.wait_caught_up(10)
        assert releases.active_version == "v2"
    assert _count(restarted, "rejected_replay") == 1 and _count(restarted, "ok") == 1


async def test_a_replay_whose_original_is_gone_from_the_topic_is_refused_by_lineage(
    signed, winnow_topics
) -> None:
    """Catches a replayed release served at startup when the topic no longer holds its
    first publication (retention): the newer release names it as its parent."""
    settings, release = signed
    await _publish(settings, *release("v2", parent="v1"))
    await _publish(settings, *release("v1"))  # the old one, published after
    metrics = ScorerMetrics()
    async with ModelReleases(settings, metrics=metrics) as releases:
        assert (await releases.wait_for_first(30)).version == "v2"
        await releases.wait_caught_up(10)
        assert releases.active_version == "v2"
    assert _count(metrics, "rejected_replay") == 1


async def test_reordered_chunks_are_served_and_conflicting_or_missing_ones_are_refused(
    signed, winnow_topics, caplog
) -> None:
    """Catches a valid release refused because its chunks came in another order, and a
    release served (or held silently) when a chunk is repeated with other bytes or is
    missing: each is refused with its reason and the serving model stays."""
    settings, release = signed
    metrics = ScorerMetrics()
    async with ModelReleases(settings, metrics=metrics) as releases:
        await releases.wait_caught_up(10)
        manifest, chunks = release("r1")
        await _publish(settings, manifest, [chunks[2], chunks[0], chunks[3], chunks[0], chunks[1]])
        await _until(lambda: releases.active_version == "r1")
        manifest, chunks = release("r2", parent="r1")
        forged = chunks[1].model_copy(update={"data": chunks[2].data})
        await _publish(settings, manifest, [chunks[0], forged, chunks[1], chunks[2], chunks[3]])
        await _until(lambda: _count(metrics, "rejected_chunks") == 1)
        manifest, chunks = release("r3", parent="r1")
        with caplog.at_level(logging.WARNING, logger="service.model.watcher"):
            await _publish(settings, manifest, [chunks[0], chunks[3]])
            await _publish(settings, *release("r4", parent="r1"))
            await _until(lambda: releases.active_version == "r4")
        assert "chunks 1, 2 of 4 never arrived" in caplog.text
        reasons = {i.version: (i.status, i.reason) for i in releases.history()}
    assert reasons == {
        "r1": ("available", None),
        "r2": ("rejected", "chunks"),
        "r3": ("rejected", "incomplete"),
        "r4": ("active", None),
    }
    assert _count(metrics, "rejected_incomplete") == 1 and _count(metrics, "ok") == 2


def test_pin_and_unpin_through_the_admin_api_still_go_back_after_a_replay(
    signed, winnow_topics
) -> None:
    """Catches the replay guard blocking the operator: a rollback to an older version
    through POST /v1/model/pin is served, and unpin returns to the newest release."""
    settings, release = signed
    settings = settings.model_copy(
        update={"scorer": settings.scorer.model_copy(update={"follow_releases": True})}
    )
    v1, v2 = release("v1"), release("v2", parent="v1")
    asyncio.run(_publish(settings, *v1))
    asyncio.run(_publish(settings, *v2))
    asyncio.run(_replay(settings, *v1))
    auth = {"Authorization": "Bearer adm"}
    with TestClient(create_app(settings)) as client:
        status = _serving(client, "v2")
        assert [(h["version"], h["status"]) for h in status["history"]] == [
            ("v1", "available"),
            ("v2", "active"),
        ]
        pinned = client.post("/v1/model/pin", json={"version": "v1"}, headers=auth)
        assert pinned.status_code == 200, pinned.text
        assert pinned.json()["current"]["version"] == "v1" and pinned.json()["pinned"] == "v1"
        unpinned = client.post("/v1/model/unpin", headers=auth)
        assert unpinned.status_code == 200 and unpinned.json()["current"]["version"] == "v2"
        metrics = client.get("/metrics").text
    assert 'winnow_model_swaps_total{result="rejected_replay"} 1.0' in metrics


def _serving(client: TestClient, version: str, within: float = 30) -> dict:
    import time

    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        body = client.get("/v1/model")
        if body.status_code == 200 and body.json()["current"]["version"] == version:
            return body.json()
        time.sleep(0.1)
    raise AssertionError(f"not serving {version}: {body.text}")
