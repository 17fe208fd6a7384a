"""Head refits in the running trainer, on the real broker: a few labels, a head-only release
in seconds, served by the scorer's watcher exactly as the trainer computed it."""

import asyncio
import base64
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
import torch
from prometheus_client import generate_latest
from pydantic import SecretStr

import trainer.loop as trainer_loop
from infra.allocator import release_free_memory
from schemas.models import HeadArtifact, ModelManifest
from schemas.pixels import image_to_input
from schemas.release_codec import sha256_hex, verify_signature
from service.config import Settings
from service.model.watcher import ModelReleases
from tests.kafka_helpers import read_json
from tests.trainer.helpers import eventually, feed, loop_settings, manifests
from trainer.evaluate import GateDecision, is_holdout
from trainer.finetune import predict_proba
from trainer.head import embed, head_of
from trainer.loop import Trainer

pytestmark = pytest.mark.slow

Digits = tuple[list[bytes], np.ndarray]
KEY = "the signing key"
HOLDOUT = 0.15  # loop_settings' holdout_fraction


def _learnable(ids: Iterable[int]) -> list[int]:
    """Frame numbers outside the holdout (only these are learned from)."""
    return [i for i in ids if not is_holdout(f"f{i}", HOLDOUT)]


def _held_out(ids: Iterable[int]) -> list[int]:
    return [i for i in ids if is_holdout(f"f{i}", HOLDOUT)]


def _settings(kafka_settings, group_id: str, data_dir: Path, **fields: object):
    base: dict[str, object] = dict(
        head_refit_labels=3,
        round_min_labels=10_000,
        round_max_seconds=3600,
        drift_rounds=False,
        model_signing_key=SecretStr(KEY),
    )
    return loop_settings(kafka_settings, group_id, data_dir, **{**base, **fields})


async def _head_releases(kafka_settings, topic: str, count: int) -> list[tuple[dict, bytes]]:
    """The first ``count`` head-only releases on the models topic: manifest and artifact."""

    def complete(out: list[dict]) -> list[tuple[dict, bytes]]:
        chunks = {(r["version"], r["index"]): r for r in out if r.get("kind") == "chunk"}
        found = []
        for m in manifests(out):
            parts = [chunks.get((m["version"], i)) for i in range(m["chunk_count"])]
            if m.get("base_version") and all(parts):
                found.append((m, b"".join(base64.b64decode(p["data"]) for p in parts)))  # type: ignore[index]
        return found

    records = await read_json(kafka_settings, topic, lambda out: len(complete(out)) >= count)
    return complete(records)


def _metric(trainer: Trainer, name: str) -> float | None:
    return trainer.metrics.registry.get_sample_value(name)


async def test_a_few_labels_publish_a_signed_head_release_within_seconds(
    kafka_settings, group_id, winnow_topics, digits: Digits, tmp_path: Path
) -> None:
    pngs, targets = digits
    async with Trainer(_settings(kafka_settings, group_id, tmp_path)) as trainer:
        cold = trainer.spec
        assert cold is not None and not trainer.head_reports
        ids = _learnable(range(50))[:3]
        started = time.monotonic()
        await feed(kafka_settings, winnow_topics, pngs, targets, ids)
        ((manifest, artifact),) = await _head_releases(kafka_settings, winnow_topics.models, 1)
        seconds = time.monotonic() - started
        await eventually(lambda: trainer.spec.version == manifest["version"], within_s=5)
        assert trainer.base is cold and trainer.store.untrained_count() == 3  # rounds still due
        assert trainer.labels_unlearned == 0
        assert _metric(trainer, "winnow_trainer_labels_unlearned") == 0
        assert _metric(trainer, "winnow_trainer_head_refits_total") is None  # labelled only
        published = generate_latest(trainer.metrics.registry).decode()
        assert 'winnow_trainer_head_refits_total{result="released"} 1.0' in published
        trainer_head = head_of(trainer.model)
    assert seconds < 20, seconds  # labels through the intake, a refit and a release: seconds
    release = ModelManifest.model_validate(manifest)
    assert release.base_version == cold.version and release.parent_version == cold.version
    assert release.spec.labels_trained == 3 and release.spec.labels_unlearned == 0
    assert release.chunk_count == 1 and release.size_bytes == len(artifact) < 64 * 1024
    assert release.sha256 == sha256_hex(artifact)
    assert release.signature is not None and verify_signature(
        artifact, release.signature, KEY.encode(), model_name="winnow", version=release.version
    )
    head = HeadArtifact.model_validate_json(artifact)
    assert head.base_version == cold.version and head.spec == release.spec
    assert np.array_equal(np.asarray(head.weight, np.float32), trainer_head.weight)


async def test_the_unlearned_count_rises_with_labels_and_drops_to_zero_after_a_refit(
    kafka_settings, group_id, winnow_topics, digits: Digits, tmp_path: Path, monkeypatch
) -> None:
    """Also: the trainer gives freed memory back after each refit and round (without it
    the heap keeps what they freed: see ``infra/allocator.py``), and the first refit after
    a round embeds only the labels that came since (without the round's embeddings every
    label again: a long run's refit after each round re-embedded thousands)."""
    trims: list[bool] = []
    monkeypatch.setattr(
        trainer_loop, "release_free_memory", lambda: trims.append(release_free_memory())
    )
    pngs, targets = digits
    learnable, held = _learnable(range(100)), _held_out(range(100))
    settings = _settings(kafka_settings, group_id, tmp_path, head_refit_labels=4)
    async with Trainer(settings) as trainer:
        cold = trainer.spec
        await feed(kafka_settings, winnow_topics, pngs, targets, [*learnable[:2], held[0]])
        await eventually(lambda: trainer.store.untrained_count() == 3)
        await eventually(lambda: trainer.labels_unlearned == 2)  # the held-out label never counts
        assert not trainer.head_reports and trainer.spec is cold
        await feed(kafka_settings, winnow_topics, pngs, targets, learnable[2:4])
        await eventually(lambda: len(trainer.head_reports) == 1)
        assert trainer.head_reports[0].released and trainer.labels_unlearned == 0
        await eventually(lambda: len(trims) == 1)
        head = trainer.spec
        assert head.labels_trained == 4 and head.labels_unlearned == 0
        # A backbone round learns the same labels into a new full release: heads start over on it.
        report = await trainer.run_round()
        assert report is not None and report.released
        assert len(trims) == 2
        full = trainer.spec
        assert trainer.base is full and full.parent_version == head.version
        assert full.labels_trained == 4 and full.labels_unlearned == 0
        embedded = trainer._embeddings.embedded
        await feed(kafka_settings, winnow_topics, pngs, targets, learnable[4:7])
        await eventually(lambda: trainer.labels_unlearned == 3)
        await feed(kafka_settings, winnow_topics, pngs, targets, learnable[7:8])
        await eventually(lambda: len(trainer.head_reports) == 2)
        assert trainer.labels_unlearned == 0 and trainer.spec.labels_trained == 8
        # The round's refit embedded its labels with the new backbone: this refit embeds
        # only the 4 that came since, not all 9 again.
        assert trainer._embeddings.embedded - embedded == 4
    releases = await _head_releases(kafka_settings, winnow_topics.models, 2)
    assert [m["base_version"] for m, _ in releases] == [cold.version, full.version]


async def test_refits_wait_for_a_share_of_the_labels_as_they_grow(
    kafka_settings, group_id, winnow_topics, digits: Digits, tmp_path: Path
) -> None:
    """Catches head refits at a fixed count of new labels whatever the labels learned: each
    refit fits every label, so their cost would grow with the square of the labels (a long
    run's trainer spent a core on them)."""
    pngs, targets = digits
    learnable = _learnable(range(100))
    settings = _settings(
        kafka_settings, group_id, tmp_path, head_refit_labels=2, head_refit_share=1.0
    )
    async with Trainer(settings) as trainer:
        await feed(kafka_settings, winnow_topics, pngs, targets, learnable[:2])
        await eventually(lambda: len(trainer.head_reports) == 1)
        await feed(kafka_settings, winnow_topics, pngs, targets, learnable[2:4])
        await eventually(lambda: len(trainer.head_reports) == 2)
        assert trainer.spec.labels_trained == 4
        # 4 learned: the next refit waits for 4 new labels, not 2
        await feed(kafka_settings, winnow_topics, pngs, targets, learnable[4:7])
        await eventually(lambda: trainer.labels_unlearned == 3)
        await asyncio.sleep(1.0)
        assert len(trainer.head_reports) == 2
        await feed(kafka_settings, winnow_topics, pngs, targets, learnable[7:8])
        await eventually(lambda: len(trainer.head_reports) == 3)
        assert trainer.labels_unlearned == 0 and trainer.spec.labels_trained == 8


async def test_the_scorer_serves_the_head_release_exactly_as_the_trainer_computed_it(
    kafka_settings, group_id, winnow_topics, digits: Digits, tmp_path: Path
) -> None:
    pngs, targets = digits
    scorer = Settings(device="cpu", kafka=kafka_settings, model_signing_key=SecretStr(KEY))
    async with Trainer(_settings(kafka_settings, group_id, tmp_path)) as trainer:
        async with ModelReleases(scorer) as releases:
            await releases.wait_caught_up(30)
            await eventually(lambda: releases.active_version == trainer.spec.version)
            await feed(kafka_settings, winnow_topics, pngs, targets, _learnable(range(50))[:6])
            await eventually(lambda: len(trainer.head_reports) >= 1, within_s=30)
            head_version = trainer.head_reports[0].version
            await eventually(lambda: releases.active_version == head_version, within_s=30)
            served, model = releases.model, trainer.model
            history = {i.version: i.status for i in releases.history()}
    assert served is not None and served.version == head_version
    assert history[head_version] == "active" and served.spec.labels_trained >= 3
    inputs = np.stack([image_to_input_png(png, served.spec) for png in pngs[1000:1064]])
    probabilities, embeddings = served.run(inputs)
    head = head_of(model)
    logits = embeddings.astype(np.float64) @ head.weight.T.astype(np.float64) + head.bias
    expected = np.exp(logits - logits.max(axis=1, keepdims=True))
    expected /= expected.sum(axis=1, keepdims=True)
    assert np.abs(probabilities - expected).max() < 1e-5
    # and the backbone is the trainer's, so the scorer computes what torch computes
    assert np.abs(embeddings - embed(model, inputs, torch.device("cpu"))).max() < 1e-4
    assert np.abs(probabilities - predict_proba(model, inputs, torch.device("cpu"))).max() < 1e-4


def image_to_input_png(png: bytes, spec) -> np.ndarray:
    import io

    from PIL import Image

    return image_to_input(Image.open(io.BytesIO(png)), spec)


async def test_a_restarted_trainer_serves_on_from_its_last_head_release(
    kafka_settings, group_id, winnow_topics, digits: Digits, tmp_path: Path
) -> None:
    pngs, targets = digits
    settings = _settings(kafka_settings, group_id, tmp_path)
    async with Trainer(settings) as trainer:
        await feed(kafka_settings, winnow_topics, pngs, targets, _learnable(range(50))[:3])
        await eventually(lambda: len(trainer.head_reports) == 1)
        head_spec, base, head = trainer.spec, trainer.base, head_of(trainer.model)
    quiet = settings.model_copy(update={"head_refit_labels": 0})
    async with Trainer(quiet) as again:
        assert again.spec == head_spec and again.base == base
        assert np.array_equal(head_of(again.model).weight, head.weight)
    models = manifests(
        await read_json(kafka_settings, winnow_topics.models, lambda out: len(manifests(out)) >= 2)
    )
    assert [m["version"] for m in models] == [base.version, head_spec.version]  # none again


async def test_a_refused_head_is_not_published_and_waits_for_new_labels(
    kafka_settings, group_id, winnow_topics, digits: Digits, tmp_path: Path, monkeypatch
) -> None:
    pngs, targets = digits
    refused = GateDecision(False, 0.1, 0.9, 0.02, "refused by the test")
    monkeypatch.setattr("trainer.refit.release_gate", lambda *args, **kwargs: refused)
    learnable = _learnable(range(60))
    async with Trainer(_settings(kafka_settings, group_id, tmp_path)) as trainer:
        cold = trainer.spec
        await feed(kafka_settings, winnow_topics, pngs, targets, learnable[:3])
        await eventually(lambda: len(trainer.head_reports) == 1)
        await asyncio.sleep(1.0)  # no retry of the same labels
        assert len(trainer.head_reports) == 1 and not trainer.head_reports[0].released
        assert trainer.spec is cold and trainer.labels_unlearned == 3
        await feed(kafka_settings, winnow_topics, pngs, targets, learnable[3:6])
        await eventually(lambda: len(trainer.head_reports) == 2)
        assert trainer.labels_unlearned == 6
        published = generate_latest(trainer.metrics.registry).decode()
    assert 'winnow_trainer_head_refits_total{result="rejected"} 2.0' in published
    models = manifests(
        await read_json(kafka_settings, winnow_topics.models, lambda out: len(manifests(out)) >= 1)
    )
    assert [m["version"] for m in models] == [cold.version]
