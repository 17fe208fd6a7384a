"""The training loop on the real broker: cold start, rounds, releases, restarts."""

import asyncio
import base64
import json
from datetime import UTC, datetime
from pathlib import Path

import pytest
from prometheus_client import generate_latest

from schemas.frames import FrameOrigin
from schemas.label_requests import LabelRequest
from schemas.scores import Decision, Scores
from tests.kafka_helpers import produce, read_json
from trainer.config import TrainerSettings
from trainer.evaluate import accuracy
from trainer.loop import Trainer
from trainer.main import ensure_trainer_topics
from trainer.samples import decode_sample

pytestmark = pytest.mark.slow
CLASSES = [str(d) for d in range(10)]


def _settings(kafka_settings, group_id: str, data_dir: Path, **kw: object) -> TrainerSettings:
    kafka = kafka_settings.model_copy(
        update={"session_timeout_ms": 2000, "heartbeat_interval_ms": 500}
    )
    base = dict(
        data_dir=data_dir,
        group_id=group_id,
        classes=CLASSES,
        arch="small-cnn",
        input_size=16,
        channels=1,
        device="cpu",
        round_min_labels=60,
        round_max_seconds=600,
        holdout_fraction=0.15,
        kafka=kafka,
    )
    return TrainerSettings(**{**base, **kw})


def _request(frame_id: str, png: bytes) -> bytes:
    request = LabelRequest.model_validate(
        {
            "frame_id": frame_id,
            "source_id": "cam",
            "origin": FrameOrigin(topic="frames", partition=0, offset=int(frame_id[1:])),
            "requested_at": datetime.now(UTC),
            "model_version": "0000-init",
            "classes": CLASSES,
            "content_type": "image/png",
            "image": base64.b64encode(png),
            "label": "0",
            "confidence": 0.1,
            "probabilities": {c: 0.1 for c in CLASSES},
            "scores": Scores(least_confidence=1, margin=1, entropy=1),
            "decision": Decision(selected=True, reason="cold_start", policy="random", utility=1),
        }
    )
    return request.model_dump_json().encode()


async def _feed(kafka_settings, topics, pngs, targets, ids: range) -> None:
    await produce(
        kafka_settings,
        topics.label_requests,
        [(f"f{i}".encode(), _request(f"f{i}", pngs[i]), []) for i in ids],
    )
    await produce(
        kafka_settings,
        topics.labels,
        [
            (
                f"f{i}".encode(),
                json.dumps({"frame_id": f"f{i}", "label": str(targets[i])}).encode(),
                [],
            )
            for i in ids
        ],
    )


def _manifests(records: list[dict]) -> list[dict]:
    return [r for r in records if r.get("kind") == "manifest"]


async def test_cold_start_release_then_rounds_that_learn(
    kafka_settings, group_id, winnow_topics, digits, tmp_path: Path
) -> None:
    pngs, targets = digits
    settings = _settings(kafka_settings, group_id, tmp_path)
    test_ids = range(1500, 1797)
    async with Trainer(settings) as trainer:
        first = _manifests(
            await read_json(
                kafka_settings, winnow_topics.models, lambda out: len(_manifests(out)) >= 1
            )
        )
        assert first[0]["spec"]["labels_trained"] == 0
        initial = trainer.model
        spec = trainer.spec
        test = [decode_sample(f"t{i}", pngs[i], int(targets[i]), spec) for i in test_ids]
        initial_acc = accuracy(initial, test, trainer.device)
        # Two batches of labels, each joined and then learned from: rounds run as labels
        # come, and one more round takes what is left under round_min_labels (a round the
        # gate rejects still uses them). Two batches make at least two rounds, however the
        # intake's polls fall against the round loop's counts.
        for labels in (range(0, 150), range(150, 300)):
            await _feed(kafka_settings, winnow_topics, pngs, targets, labels)
            async with asyncio.timeout(240):
                while len(trainer.store.trainable()) < labels.stop:  # noqa: ASYNC110 - polls
                    await asyncio.sleep(0.2)
                while trainer.store.untrained_count():
                    await trainer.run_round()
        released = [r for r in trainer.reports if r.released]
        manifests = _manifests(
            await read_json(
                kafka_settings,
                winnow_topics.models,
                lambda out: len(_manifests(out)) >= 1 + len(released),
            )
        )
        final_acc = accuracy(trainer.model, test, trainer.device)
        report = trainer.reports[-1]
    versions = [m["version"] for m in manifests]
    assert len(set(versions)) == len(versions) >= 3
    latest = manifests[-1]["spec"]
    assert latest["parent_version"] == manifests[-2]["version"]
    assert "holdout_accuracy" in latest["metrics"] and report.holdout > 0
    assert final_acc > initial_acc + 0.3, (initial_acc, final_acc)


async def test_labels_survive_a_restart_and_train_in_the_next_round(
    kafka_settings, group_id, winnow_topics, digits, tmp_path: Path
) -> None:
    pngs, targets = digits
    settings = _settings(kafka_settings, group_id, tmp_path, round_min_labels=10_000)
    async with Trainer(settings) as trainer:
        await _feed(kafka_settings, winnow_topics, pngs, targets, range(0, 40))
        async with asyncio.timeout(60):
            while trainer.store.untrained_count() < 40:  # noqa: ASYNC110 - polls the store
                await asyncio.sleep(0.1)
        cold_version = trainer.spec.version
    # a new trainer on the same data directory: same model lineage, labels still there
    async with Trainer(settings) as again:
        assert again.spec.version == cold_version
        assert again.store.untrained_count() == 40
        report = await again.run_round()
        assert report is not None and report.released and report.new_labels == 40
        assert again.store.untrained_count() == 0
        metrics = generate_latest(again.metrics.registry).decode()
        assert 'winnow_trainer_rounds_total{result="released"} 1.0' in metrics
        assert 'winnow_trainer_releases_total{result="published"} 1.0' in metrics
        assert "winnow_trainer_prequential_accuracy" in metrics
    models = _manifests(
        await read_json(kafka_settings, winnow_topics.models, lambda out: len(_manifests(out)) >= 2)
    )
    assert [m["spec"]["labels_trained"] for m in models] == [0, report.labels_trained]


async def test_topics_are_created_when_missing(kafka_settings, tmp_path: Path) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    from infra.kafka.connection import client_kwargs

    settings = _settings(kafka_settings, "g", tmp_path)
    await ensure_trainer_topics(settings)
    await ensure_trainer_topics(settings)  # idempotent
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    topics = settings.kafka.topics
    wanted = {topics.label_requests, topics.labels, topics.models, topics.dead_letter}
    assert wanted <= existing
