"""The release watcher on the real broker: verify, load, swap, reject, catch up, pin."""

import asyncio
import io
import json
from collections import Counter, defaultdict

import numpy as np
import pytest
from aiokafka import AIOKafkaProducer
from PIL import Image
from pydantic import SecretStr

from infra.kafka.connection import client_kwargs
from schemas.models import ModelChunk, ModelManifest
from schemas.pixels import image_to_input
from service.metrics import ScorerMetrics
from service.model import watcher as watcher_module
from service.model.inference import OnnxModel
from service.model.verification import ReleaseError
from service.model.watcher import ModelReleases
from service.pipeline.scorer import Scorer
from tests.kafka_helpers import produce, read_json
from tests.service.model.head_releases import (
    full_release,
    head_release,
    numpy_probabilities,
    publish_head,
)
from trainer.release import build_release, encode_records


def _swaps(metrics: ScorerMetrics, *, zeros: bool = False) -> dict[str, float]:
    """The swap counts by result; every known result is exposed from 0, left out unless
    ``zeros``."""
    out = {}
    for metric in metrics.model_swaps.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total") and (sample.value or zeros):
                out[sample.labels["result"]] = sample.value
    return out


async def _produce_release(settings, manifest: ModelManifest, chunks: list[ModelChunk]) -> None:
    key = manifest.model_name.encode()
    records = [(key, value, []) for value in encode_records(manifest, chunks)]
    await produce(settings.kafka, settings.kafka.topics.models, records)


async def _until(condition, within: float = 30) -> None:
    async with asyncio.timeout(within):
        while not condition():  # noqa: ASYNC110 (polls state another task changes)
            await asyncio.sleep(0.05)


class _Calls:
    def __init__(self) -> None:
        self.versions: list[str] = []

    def __call__(self, model: OnnxModel, manifest: ModelManifest) -> None:
        assert model.version == manifest.version
        self.versions.append(model.version)


async def test_a_published_release_is_delivered_loaded_and_warm(
    scorer_settings, release_variant, winnow_topics, publish_model
) -> None:
    settings = scorer_settings()
    metrics, calls = ScorerMetrics(), _Calls()
    async with ModelReleases(settings, on_model=calls, metrics=metrics) as releases:
        await releases.wait_caught_up(10)
        with pytest.raises(TimeoutError):
            await releases.wait_for_first(0.2)
        artifact, spec = release_variant("v1")
        await publish_model(settings, artifact, spec)
        model = await releases.wait_for_first(30)
        assert model.version == "v1" and calls.versions == ["v1"]
        assert model.run(__import__("numpy").zeros((2, 1, 16, 16), "float32"))[0].shape == (2, 10)
        (info,) = releases.history()
        assert (info.version, info.status, info.pinnable) == ("v1", "active", True)
    assert _swaps(metrics) == {"ok": 1}
    # every result from 0 on, so that an alert's increase() sees a first refusal
    assert {"pinned", "load_failed", "rejected_checksum", "rejected_base"} <= set(
        _swaps(metrics, zeros=True)
    )
    assert metrics.registry.get_sample_value("winnow_model_info", {"version": "v1"}) == 1


async def test_a_corrupted_chunk_is_rejected_and_a_clean_republish_is_served(
    scorer_settings, release_variant, winnow_topics
) -> None:
    settings = scorer_settings()
    metrics, calls = ScorerMetrics(), _Calls()
    async with ModelReleases(settings, on_model=calls, metrics=metrics) as releases:
        await releases.wait_caught_up(10)
        manifest, chunks = build_release(*release_variant("v1"), None)
        data = bytearray(chunks[0].data)
        data[len(data) // 2] ^= 0x01
        corrupted = chunks[0].model_copy(update={"data": bytes(data)})
        await _produce_release(settings, manifest, [corrupted, *chunks[1:]])
        await _until(lambda: "rejected_checksum" in _swaps(metrics))
        assert calls.versions == [] and releases.model is None
        assert [(i.status, i.reason) for i in releases.history()] == [("rejected", "checksum")]
        await _produce_release(settings, manifest, chunks)  # the same release, intact
        assert (await releases.wait_for_first(30)).version == "v1"
        assert [(i.status, i.reason) for i in releases.history()] == [("active", None)]
    assert calls.versions == ["v1"]
    assert _swaps(metrics) == {"rejected_checksum": 1, "ok": 1}


async def test_with_a_key_unsigned_missigned_and_replayed_releases_are_rejected(
    scorer_settings, release_variant, winnow_topics, publish_model
) -> None:
    settings = scorer_settings()
    settings = settings.model_copy(update={"model_signing_key": SecretStr("the key")})
    await publish_model(settings, *release_variant("unsigned"), key=None)
    await publish_model(settings, *release_variant("wrong-key"), key=b"another key")
    # A genuine signature of one version, copied onto another version's manifest.
    genuine, _ = build_release(*release_variant("genuine"), b"the key")
    replay, chunks = build_release(*release_variant("replayed"), None)
    replay = replay.model_copy(update={"signature": genuine.signature})
    await _produce_release(settings, replay, chunks)
    metrics, calls = ScorerMetrics(), _Calls()
    async with ModelReleases(settings, on_model=calls, metrics=metrics) as releases:
        await releases.wait_caught_up(30)
        assert releases.model is None and calls.versions == []
        await publish_model(settings, *release_variant("signed"), key=b"the key")
        assert (await releases.wait_for_first(30)).version == "signed"
        reasons = {i.version: i.reason for i in releases.history()}
    assert calls.versions == ["signed"]
    assert reasons == {
        "unsigned": "unsigned",
        "wrong-key": "signature",
        "replayed": "signature",
        "signed": None,
    }
    assert _swaps(metrics) == {"rejected_unsigned": 1, "rejected_signature": 2, "ok": 1}


async def test_a_late_watcher_loads_only_the_newest_release(
    scorer_settings, release_variant, winnow_topics, monkeypatch, publish_model
) -> None:
    settings = scorer_settings()
    for version in ("r1", "r2", "r3"):
        await publish_model(settings, *release_variant(version))
    loads: list[bytes] = []
    real = watcher_module.load_and_warm

    def counting(artifact: bytes, device: str, threads: int | None = None) -> OnnxModel:
        loads.append(artifact)
        return real(artifact, device, threads)

    monkeypatch.setattr(watcher_module, "load_and_warm", counting)
    calls = _Calls()
    async with ModelReleases(settings, on_model=calls) as releases:
        assert (await releases.wait_for_first(30)).version == "r3"
        await releases.wait_caught_up(10)
        history = [(i.version, i.status) for i in releases.history()]
    assert len(loads) == 1 and calls.versions == ["r3"]
    assert history == [("r1", "available"), ("r2", "available"), ("r3", "active")]


async def test_when_the_newest_does_not_load_the_next_newest_is_served(
    scorer_settings, release_variant, winnow_topics, publish_model
) -> None:
    settings = scorer_settings()
    await publish_model(settings, *release_variant("ok-1"))
    await publish_model(settings, *release_variant("ok-2"))
    _, spec = release_variant("broken")
    await publish_model(settings, b"not an onnx file at all", spec)  # sha256 matches: a bad export
    metrics, calls = ScorerMetrics(), _Calls()
    async with ModelReleases(settings, on_model=calls, metrics=metrics) as releases:
        assert (await releases.wait_for_first(30)).version == "ok-2"
        status = {i.version: (i.status, i.reason) for i in releases.history()}
    assert calls.versions == ["ok-2"]
    assert status["broken"] == ("rejected", "load")
    assert _swaps(metrics) == {"load_failed": 1, "ok": 1}


async def test_a_manifest_whose_spec_differs_from_the_file_is_rejected(
    scorer_settings, release_variant, winnow_topics, publish_model
) -> None:
    settings = scorer_settings()
    artifact, _ = release_variant("file-version")
    _, claimed = release_variant("claimed-version")
    await publish_model(settings, artifact, claimed)
    metrics = ScorerMetrics()
    async with ModelReleases(settings, metrics=metrics) as releases:
        await releases.wait_caught_up(30)
        assert releases.model is None
        assert [(i.status, i.reason) for i in releases.history()] == [("rejected", "spec")]
    assert _swaps(metrics) == {"rejected_spec": 1}


async def test_pin_goes_back_and_holds_until_unpin(
    scorer_settings, release_variant, winnow_topics, publish_model
) -> None:
    settings = scorer_settings()
    metrics, calls = ScorerMetrics(), _Calls()
    async with ModelReleases(
        settings, on_model=calls, metrics=metrics, keep_artifacts=3
    ) as releases:
        await releases.wait_caught_up(10)
        for version in ("p1", "p2"):
            await publish_model(settings, *release_variant(version))
            await _until(lambda v=version: releases.active_version == v)
        pinned = await releases.pin("p1")
        assert pinned.version == "p1" and releases.pinned == "p1"
        await publish_model(settings, *release_variant("p3"))
        await _until(lambda: "p3" in {i.version for i in releases.history()})
        await asyncio.sleep(0.3)
        assert releases.active_version == "p1" and calls.versions == ["p1", "p2", "p1"]
        swapped = await releases.unpin()
        assert swapped is not None and swapped.version == "p3"
        assert releases.pinned is None and calls.versions == ["p1", "p2", "p1", "p3"]
        with pytest.raises(ReleaseError) as unknown:
            await releases.pin("never-published")
        assert unknown.value.reason == "unknown"
        await publish_model(settings, *release_variant("p4"))  # keeps 3 artifacts: p1 is evicted
        await _until(lambda: releases.active_version == "p4")
        with pytest.raises(ReleaseError) as evicted:
            await releases.pin("p1")
        assert evicted.value.reason == "evicted"
        assert [i.pinnable for i in releases.history()] == [False, True, True, True]
    assert _swaps(metrics) == {"ok": 4, "pinned": 1}


def _headers(frame_id: str) -> list[tuple[str, bytes]]:
    return [("frame-id", frame_id.encode()), ("content-type", b"image/png")]


@pytest.mark.slow
async def test_swap_under_load_scores_every_frame_once_and_switches_once_per_partition(
    scorer_settings, digits_model_path, digit_pngs, release_variant, winnow_topics, publish_model
) -> None:
    settings = scorer_settings()
    model_a = OnnxModel.load(digits_model_path, device="cpu")
    artifact_b, spec_b = release_variant("B")
    producer = AIOKafkaProducer(**client_kwargs(settings.kafka), acks="all")
    produced = 0
    swapped_after: list[int] = []

    async def stream(start: int, stop: int) -> None:
        nonlocal produced
        for i in range(start, stop):
            key = f"cam-{i % 3}".encode()
            await producer.send(
                winnow_topics.frames, digit_pngs[i], key=key, headers=_headers(f"f{i}")
            )
            produced = i + 1
            if i % 10 == 9:
                await producer.flush()
                await asyncio.sleep(0.03)
        await producer.flush()

    await producer.start()
    try:
        async with Scorer(settings, model_a) as scorer:

            def swap(model: OnnxModel, _: ModelManifest) -> None:
                swapped_after.append(produced)
                scorer.model = model

            async with ModelReleases(
                settings, on_model=swap, current_version=model_a.version
            ) as releases:
                await releases.wait_caught_up(10)
                await stream(0, 100)
                await read_json(settings.kafka, winnow_topics.predictions, lambda o: len(o) >= 50)
                publish = asyncio.create_task(publish_model(settings, artifact_b, spec_b))
                await stream(100, 300)
                await publish
                await _until(lambda: releases.active_version == "B")
                predictions = await read_json(
                    settings.kafka,
                    winnow_topics.predictions,
                    lambda o: len({p["frame_id"] for p in o}) >= 300,
                )
    finally:
        await producer.stop()
    # A clean run scores each frame once (the broker's end offsets are not exact on Tansu).
    assert scorer.accounting.counts["selected"] + scorer.accounting.counts["not_selected"] == 300
    everything = await read_json(settings.kafka, winnow_topics.predictions, lambda o: len(o) >= 300)
    assert len(everything) == 300
    counts = Counter(p["frame_id"] for p in predictions)
    assert set(counts) == {f"f{i}" for i in range(300)} and max(counts.values()) == 1
    (cut,) = swapped_after
    by_partition = defaultdict(list)
    for p in sorted(predictions, key=lambda p: p["origin"]["offset"]):
        by_partition[p["origin"]["partition"]].append(p["model_version"])
        if int(p["frame_id"][1:]) >= cut:
            assert p["model_version"] == "B", p["frame_id"]
    for versions in by_partition.values():
        switch = versions.index("B") if "B" in versions else len(versions)
        assert set(versions[:switch]) <= {model_a.version} and set(versions[switch:]) <= {"B"}
    versions = Counter(p["model_version"] for p in predictions)
    assert versions[model_a.version] >= 50 and versions["B"] >= 300 - cut


# -- head-only releases ----------------------------------------------------------------------


def _inputs(pngs: list[bytes], spec) -> np.ndarray:
    return np.stack([image_to_input(Image.open(io.BytesIO(png)), spec) for png in pngs[:32]])


async def test_a_head_release_is_served_on_its_base_and_matches_the_numpy_head(
    scorer_settings, digits_model_path, winnow_topics, publish_model, digit_pngs
) -> None:
    settings = scorer_settings()
    metrics, calls = ScorerMetrics(), _Calls()
    async with ModelReleases(settings, on_model=calls, metrics=metrics) as releases:
        await releases.wait_caught_up(10)
        artifact, spec = full_release(digits_model_path, "v1", labels_unlearned=4)
        await publish_model(settings, artifact, spec)
        base = await releases.wait_for_first(30)
        assert metrics.registry.get_sample_value("winnow_labels_unlearned") == 4
        head_bytes, head_spec, head = head_release(spec, "v1-h1", 1, labels_unlearned=0)
        await publish_head(settings, head_bytes, head_spec, "v1")
        await _until(lambda: releases.active_version == "v1-h1")
        served = releases.model
        history = [(i.version, i.status, i.pinnable) for i in releases.history()]
    assert served is not None and served.spec == head_spec
    inputs = _inputs(digit_pngs, spec)
    probabilities, embeddings = served.run(inputs)
    assert np.array_equal(embeddings, base.run(inputs)[1])
    assert np.abs(probabilities - numpy_probabilities(embeddings, head)).max() < 1e-5
    assert calls.versions == ["v1", "v1-h1"] and _swaps(metrics) == {"ok": 2}
    assert history == [("v1", "available", True), ("v1-h1", "active", True)]
    assert metrics.registry.get_sample_value("winnow_labels_unlearned") == 0


async def test_a_tampered_or_rebased_head_release_is_rejected_and_the_old_model_serves(
    scorer_settings, release_variant, winnow_topics, publish_model
) -> None:
    key = b"the key"
    settings = scorer_settings().model_copy(update={"model_signing_key": SecretStr("the key")})
    metrics, calls = ScorerMetrics(), _Calls()
    async with ModelReleases(settings, on_model=calls, metrics=metrics) as releases:
        await releases.wait_caught_up(10)
        for version in ("v0", "v1"):
            await publish_model(settings, *release_variant(version), key=key)
            await _until(lambda v=version: releases.active_version == v)
        _, spec = release_variant("v1")
        head_bytes, head_spec, _ = head_release(spec, "h1", 1)
        genuine, chunks = build_release(head_bytes, head_spec, key, base_version="v1")
        # A changed weight under the genuine signature: the digest is recomputed, the
        # signature cannot be.
        raw = json.loads(head_bytes)
        raw["weight"][0][0] += 1.0
        tampered_bytes = json.dumps(raw).encode()
        tampered, tampered_chunks = build_release(
            tampered_bytes, head_spec, None, base_version="v1"
        )
        tampered = tampered.model_copy(update={"signature": genuine.signature})
        await _produce_release(settings, tampered, tampered_chunks)
        await _until(lambda: "rejected_signature" in _swaps(metrics))
        # The genuine head put on another backbone by editing the manifest: the artifact
        # names its base, and the signature covers the artifact.
        rebased = genuine.model_copy(update={"base_version": "v0"})
        await _produce_release(settings, rebased, chunks)
        await _until(lambda: "rejected_spec" in _swaps(metrics))
        assert releases.active_version == "v1" and calls.versions == ["v0", "v1"]
        await _produce_release(settings, genuine, chunks)  # the release as signed
        await _until(lambda: releases.active_version == "h1")
    assert calls.versions == ["v0", "v1", "h1"]
    assert _swaps(metrics) == {"ok": 3, "rejected_signature": 1, "rejected_spec": 1}


async def test_a_head_release_for_an_unknown_base_is_rejected(
    scorer_settings, release_variant, winnow_topics, publish_model
) -> None:
    settings = scorer_settings()
    metrics, calls = ScorerMetrics(), _Calls()
    async with ModelReleases(settings, on_model=calls, metrics=metrics) as releases:
        await releases.wait_caught_up(10)
        artifact, spec = release_variant("v1")
        await publish_model(settings, artifact, spec)
        await releases.wait_for_first(30)
        orphan, orphan_spec, _ = head_release(spec, "h-orphan", 1)
        await publish_head(settings, orphan, orphan_spec, "never-published")
        await _until(lambda: "rejected_base" in _swaps(metrics))
        on_head, on_head_spec, _ = head_release(spec, "h1", 2)
        await publish_head(settings, on_head, on_head_spec, "v1")
        await _until(lambda: releases.active_version == "h1")
        nested, nested_spec, _ = head_release(spec, "h-on-h1", 3)  # a head's base must be full
        await publish_head(settings, nested, nested_spec, "h1")
        await _until(lambda: _swaps(metrics).get("rejected_base") == 2)
        status = {i.version: (i.status, i.reason) for i in releases.history()}
        assert releases.active_version == "h1"
    assert status["h-orphan"] == ("rejected", "base") and status["h-on-h1"] == ("rejected", "base")
    assert calls.versions == ["v1", "h1"]


async def test_pin_back_to_an_earlier_head_release_until_its_base_is_evicted(
    scorer_settings, release_variant, winnow_topics, publish_model, digit_pngs
) -> None:
    settings = scorer_settings()
    metrics, calls = ScorerMetrics(), _Calls()
    async with ModelReleases(
        settings, on_model=calls, metrics=metrics, keep_artifacts=1
    ) as releases:
        await releases.wait_caught_up(10)
        artifact, spec = release_variant("v1")
        await publish_model(settings, artifact, spec)
        heads = {}
        for version, seed in (("h1", 1), ("h2", 2)):
            head_bytes, head_spec, heads[version] = head_release(spec, version, seed)
            await publish_head(settings, head_bytes, head_spec, "v1")
            await _until(lambda v=version: releases.active_version == v)
        pinned = await releases.pin("h1")
        probabilities, embeddings = pinned.run(_inputs(digit_pngs, spec))
        assert np.abs(probabilities - numpy_probabilities(embeddings, heads["h1"])).max() < 1e-5
        assert releases.active_version == "h1" and releases.pinned == "h1"
        assert (await releases.unpin()).version == "h2"  # type: ignore[union-attr]
        # A new backbone, then a head on it: v1 (kept one full artifact) goes, with its heads.
        artifact, spec_v2 = release_variant("v2")
        await publish_model(settings, artifact, spec_v2)
        await _until(lambda: releases.active_version == "v2")
        head_bytes, head_spec, _ = head_release(spec_v2, "v2-h1", 4)
        await publish_head(settings, head_bytes, head_spec, "v2")
        await _until(lambda: releases.active_version == "v2-h1")
        with pytest.raises(ReleaseError) as evicted:
            await releases.pin("h1")
        assert evicted.value.reason == "evicted"
        late, late_spec, _ = head_release(spec, "h3", 5)  # a head on the evicted base
        await publish_head(settings, late, late_spec, "v1")
        await _until(lambda: "rejected_base" in _swaps(metrics))
        pinnable = {i.version: i.pinnable for i in releases.history()}
    assert pinnable == {
        "v1": False,
        "h1": False,
        "h2": False,
        "v2": True,
        "v2-h1": True,
        "h3": False,
    }
    assert calls.versions == ["v1", "h1", "h2", "h1", "h2", "v2", "v2-h1"]
