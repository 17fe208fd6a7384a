"""Drift alarms on the real broker: a round starts early on an alarm, and only on an alarm."""

import asyncio
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from prometheus_client import generate_latest

from infra.kafka.connection import client_kwargs
from infra.kafka.settings import KafkaSettings
from schemas.drift import DriftEvent
from schemas.topics import TopicNames
from tests.kafka_helpers import produce
from tests.trainer.helpers import eventually
from tests.trainer.helpers import feed as _feed
from tests.trainer.helpers import loop_settings as _settings
from trainer.config import TrainerSettings
from trainer.drift_watch import DriftWatch
from trainer.loop import Trainer
from trainer.main import ensure_trainer_topics
from trainer.metrics import TrainerMetrics

QUIET_S = 1.5
"""How long a test watches for a round that must not start (a drift round starts in ms)."""

Digits = tuple[list[bytes], np.ndarray]


def _event(kind: str = "alarm", detector: str = "mmd") -> bytes:
    event = DriftEvent(
        kind=kind,  # type: ignore[arg-type]
        detector=detector,
        statistic=3.5,
        threshold=1.2,
        window=200,
        model_version="0000-init",
        time=datetime.now(UTC),
        frames=900,
    )
    return event.model_dump_json().encode()


async def _publish(kafka_settings: KafkaSettings, topics: TopicNames, *values: bytes) -> None:
    await produce(kafka_settings, topics.drift, [(b"mmd", value, []) for value in values])


@pytest.fixture
def make_settings(
    kafka_settings: KafkaSettings, group_id: str, tmp_path: Path
) -> Callable[..., TrainerSettings]:
    """Settings under which only a drift alarm can start a round within a test."""

    def make(**fields: object) -> TrainerSettings:
        fields = {"round_min_labels": 1000, "round_max_seconds": 3600, **fields}
        return _settings(kafka_settings, group_id, tmp_path, **fields)

    return make


async def _labels(
    kafka_settings: KafkaSettings, topics: TopicNames, digits: Digits, trainer: Trainer, ids: range
) -> None:
    """Feeds labeled frames and waits until the store has them."""
    pngs, targets = digits
    before = trainer.store.untrained_count()
    await _feed(kafka_settings, topics, pngs, targets, ids)
    await eventually(lambda: trainer.store.untrained_count() == before + len(ids))


def _metrics(trainer: Trainer) -> str:
    return generate_latest(trainer.metrics.registry).decode()


async def test_a_drift_alarm_starts_a_round_before_the_label_count(
    kafka_settings: KafkaSettings,
    winnow_topics: TopicNames,
    digits: Digits,
    make_settings: Callable[..., TrainerSettings],
) -> None:
    async with Trainer(make_settings()) as trainer:
        await _labels(kafka_settings, winnow_topics, digits, trainer, range(0, 8))
        await asyncio.sleep(QUIET_S)
        assert not trainer.reports
        await _publish(kafka_settings, winnow_topics, _event("alarm"))
        await eventually(lambda: len(trainer.reports) == 1, within_s=60)
        report = trainer.reports[0]
        assert report.trigger == "drift" and report.new_labels == 8
        assert trainer.store.untrained_count() == 0
        assert trainer.drift_watch is not None and trainer.drift_watch.last_alarm is not None
        assert trainer.drift_watch.last_alarm.detector == "mmd"
        metrics = _metrics(trainer)
    assert 'winnow_trainer_rounds_triggered_total{trigger="drift"} 1.0' in metrics
    assert 'winnow_trainer_drift_alarms_total{detector="mmd"} 1.0' in metrics


async def test_an_alarm_without_enough_labels_waits_for_them(
    kafka_settings: KafkaSettings,
    winnow_topics: TopicNames,
    digits: Digits,
    make_settings: Callable[..., TrainerSettings],
) -> None:
    async with Trainer(make_settings(drift_round_min_labels=5)) as trainer:
        watch = trainer.drift_watch
        assert watch is not None
        await _labels(kafka_settings, winnow_topics, digits, trainer, range(0, 2))
        await _publish(kafka_settings, winnow_topics, _event("alarm"))
        await eventually(lambda: watch.alarms == 1)
        await asyncio.sleep(QUIET_S)
        assert not trainer.reports
        # the alarm stays pending: the labels that make up the count start the round
        await _labels(kafka_settings, winnow_topics, digits, trainer, range(2, 5))
        await eventually(lambda: len(trainer.reports) == 1, within_s=60)
        assert trainer.reports[0].trigger == "drift" and trainer.reports[0].new_labels == 5
        # the round answered the alarm: later labels wait for the usual count again
        await _labels(kafka_settings, winnow_topics, digits, trainer, range(5, 11))
        await asyncio.sleep(QUIET_S)
        assert len(trainer.reports) == 1


async def test_a_statistic_does_not_start_a_round(
    kafka_settings: KafkaSettings,
    winnow_topics: TopicNames,
    digits: Digits,
    make_settings: Callable[..., TrainerSettings],
) -> None:
    async with Trainer(make_settings()) as trainer:
        watch = trainer.drift_watch
        assert watch is not None
        await _labels(kafka_settings, winnow_topics, digits, trainer, range(0, 4))
        await _publish(kafka_settings, winnow_topics, _event("statistic"), _event("statistic"))
        await eventually(lambda: watch.statistics == 2)
        await asyncio.sleep(QUIET_S)
        assert not trainer.reports and watch.alarms == 0
        assert "winnow_trainer_drift_alarms_total{" not in _metrics(trainer)


async def test_malformed_drift_records_are_skipped(
    kafka_settings: KafkaSettings,
    winnow_topics: TopicNames,
    digits: Digits,
    make_settings: Callable[..., TrainerSettings],
) -> None:
    async with Trainer(make_settings()) as trainer:
        watch = trainer.drift_watch
        assert watch is not None
        await _labels(kafka_settings, winnow_topics, digits, trainer, range(0, 4))
        await _publish(
            kafka_settings,
            winnow_topics,
            b"{not json",
            b"\xff\xfe\x00",
            b'{"kind": "alarm", "detector": "mmd"}',  # an alarm without its fields
            _event("alarm").replace(b'"alarm"', b'"panic"'),
        )
        await eventually(lambda: watch.invalid == 4)
        await asyncio.sleep(QUIET_S)
        assert not trainer.reports
        # the watcher and the round loop are still there: a real alarm after them works
        await _publish(kafka_settings, winnow_topics, _event("alarm", detector="cusum"))
        await eventually(lambda: len(trainer.reports) == 1, within_s=60)
        assert trainer.reports[0].trigger == "drift" and watch.alarms == 1


async def test_alarms_do_not_start_rounds_when_drift_rounds_are_off(
    kafka_settings: KafkaSettings,
    winnow_topics: TopicNames,
    digits: Digits,
    make_settings: Callable[..., TrainerSettings],
) -> None:
    settings = make_settings(drift_rounds=False)
    async with Trainer(settings) as trainer, DriftWatch(settings.kafka, TrainerMetrics()) as probe:
        assert trainer.drift_watch is None
        await _labels(kafka_settings, winnow_topics, digits, trainer, range(0, 4))
        await _publish(kafka_settings, winnow_topics, _event("alarm"))
        await eventually(lambda: probe.alarms == 1)  # the alarm is there to be read
        await asyncio.sleep(QUIET_S)
        assert not trainer.reports


async def test_an_alarm_from_before_the_start_does_not_start_a_round(
    kafka_settings: KafkaSettings,
    winnow_topics: TopicNames,
    digits: Digits,
    make_settings: Callable[..., TrainerSettings],
) -> None:
    """The failure it catches: old alarms read as new. Three alarms sent together make one
    batch, whose end Tansu answers as its first offset + 1: a watcher starting at that answer
    took the other two as new."""
    await _publish(kafka_settings, winnow_topics, *[_event("alarm") for _ in range(3)])
    async with Trainer(make_settings()) as trainer:
        await _labels(kafka_settings, winnow_topics, digits, trainer, range(0, 4))
        await asyncio.sleep(QUIET_S)
        assert not trainer.reports
        assert trainer.drift_watch is not None and trainer.drift_watch.alarms == 0


async def test_the_watcher_outlives_an_unreachable_broker() -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    kafka = KafkaSettings(bootstrap=f"127.0.0.1:{port}")
    watch = DriftWatch(kafka, TrainerMetrics(), ready_timeout_s=0.5)
    await watch.start()  # returns, though it cannot connect
    assert watch.running
    with pytest.raises(TimeoutError):  # the watch loop neither ends nor crashes: it retries
        async with asyncio.timeout(0.5):
            await watch.wait()
    await watch.stop()
    assert not watch.running
    await asyncio.wait_for(watch.wait(), 5)  # stopped: the loop was cancelled and awaited
    await watch.stop()  # idempotent


async def test_the_trainers_topics_follow_the_kafka_settings(
    kafka_settings: KafkaSettings, make_settings: Callable[..., TrainerSettings]
) -> None:
    # Tansu accepts any replication factor and reports that many replicas.
    kafka = kafka_settings.model_copy(update={"partitions": 2, "replication_factor": 2})
    settings = make_settings().model_copy(update={"kafka": kafka})
    await ensure_trainer_topics(settings)
    topics = settings.kafka.topics
    names = [topics.label_requests, topics.labels, topics.models, topics.dead_letter, topics.drift]
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        described = {t["topic"]: t["partitions"] for t in await admin.describe_topics(names)}
    finally:
        await admin.close()
    assert set(described) == set(names)
    for name, partitions in described.items():
        assert len(partitions) == 2, name
        assert {len(p["replicas"]) for p in partitions} == {2}, name
