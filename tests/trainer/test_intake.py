"""The intake on the real broker: joins, merge policies, dead letters, restarts."""

import asyncio
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from infra.kafka.settings import KafkaSettings
from schemas.dead_letter import DeadLetter
from schemas.topics import TopicNames
from tests.kafka_helpers import committed_offsets, produce, read_json
from tests.trainer.helpers import eventually, make_request
from trainer.config import TrainerSettings
from trainer.intake import Intake
from trainer.store import SampleStore


def trainer_settings(
    kafka_settings: KafkaSettings, group_id: str, data_dir: Path, **fields: object
) -> TrainerSettings:
    return TrainerSettings(data_dir=data_dir, group_id=group_id, kafka=kafka_settings, **fields)  # type: ignore[arg-type]


def request_record(frame_id: str, **kwargs: object) -> tuple[bytes, bytes, list]:
    return frame_id.encode(), json.dumps(make_request(frame_id, **kwargs)).encode(), []  # type: ignore[arg-type]


def label_record(frame_id: str, label: str | None, annotator: str | None = None) -> tuple:
    value: dict[str, object] = {"frame_id": frame_id, "label": label}
    if label is None:
        value["status"] = "unlabelable"
    if annotator:
        value["annotator"] = annotator
    return frame_id.encode(), json.dumps(value).encode(), []


async def send(settings: KafkaSettings, topic: str, *records: tuple) -> None:
    await produce(settings, topic, records)


async def dead_letters(settings: KafkaSettings, topics: TopicNames, count: int) -> list[dict]:
    return await read_json(settings, topics.dead_letter, lambda records: len(records) >= count)


@pytest.fixture
def make_settings(
    kafka_settings: KafkaSettings, group_id: str, tmp_path: Path
) -> Callable[..., TrainerSettings]:
    return lambda **fields: trainer_settings(kafka_settings, group_id, tmp_path, **fields)


async def test_labels_and_requests_join_in_any_order(
    kafka_settings: KafkaSettings,
    winnow_topics: TopicNames,
    make_settings: Callable[..., TrainerSettings],
) -> None:
    settings = make_settings()
    store = SampleStore(settings.store_path)
    await produce(kafka_settings, winnow_topics.labels, [label_record("late-request", "dog")])
    await produce(kafka_settings, winnow_topics.label_requests, [request_record("late-label")])
    async with Intake(settings, store) as intake:
        await eventually(lambda: store.counts().requests == 1 and store.counts().labels == 1)
        assert store.trainable() == []
        await produce(
            kafka_settings, winnow_topics.label_requests, [request_record("late-request")]
        )
        await produce(kafka_settings, winnow_topics.labels, [label_record("late-label", "bird")])
        await asyncio.wait_for(intake.new_labels.wait(), 30)
        await eventually(lambda: len(store.trainable()) == 2)
        assert intake.counters.requests_received == 2
        assert intake.counters.labels_received == 2
    assert sorted((i.frame_id, i.label) for i in store.trainable()) == [
        ("late-label", "bird"),
        ("late-request", "dog"),
    ]
    store.close()


@pytest.mark.parametrize(("policy", "expected"), [("last", None), ("majority", "cat")])
async def test_a_twice_labeled_frame_resolves_per_policy(
    kafka_settings: KafkaSettings,
    winnow_topics: TopicNames,
    make_settings: Callable[..., TrainerSettings],
    policy: str,
    expected: str | None,
) -> None:
    settings = make_settings(label_merge=policy)
    store = SampleStore(settings.store_path, label_merge=settings.label_merge)
    await produce(kafka_settings, winnow_topics.label_requests, [request_record("f")])
    answers = [("a", "cat"), ("b", "cat"), ("c", "dog"), ("d", None)]
    labels = [label_record("f", value, annotator) for annotator, value in answers]
    await produce(kafka_settings, winnow_topics.labels, labels)
    async with Intake(settings, store) as intake:
        await eventually(lambda: store.counts().labels == 4)
        assert intake.counters.unlabelable == 1
    # "last": the unlabelable answer came last, so the frame does not train;
    # "majority": cat 2, dog 1, unlabelable 1.
    assert store.resolved_label("f") == expected
    store.close()
    store = SampleStore(settings.store_path, label_merge=settings.label_merge)
    await produce(kafka_settings, winnow_topics.labels, [label_record("f", "dog", "d")])
    async with Intake(settings, store):
        await eventually(lambda: store.resolved_label("f") is not None)
        # d changes its answer to dog: last = dog; majority = cat 2, dog 2, a tie -> dog.
        await eventually(lambda: store.counts().unlabelable_answers == 0)
    assert store.resolved_label("f") == "dog"
    assert store.counts().labels == 4
    store.close()


async def test_unknown_class_is_dead_lettered_with_its_origin(
    kafka_settings: KafkaSettings,
    winnow_topics: TopicNames,
    make_settings: Callable[..., TrainerSettings],
) -> None:
    settings = make_settings()
    store = SampleStore(settings.store_path)
    classes = ["normal", "pneumonia"]
    known = request_record("known", predicted="normal", classes=classes)
    early = request_record("early", predicted="normal", classes=classes)
    await send(kafka_settings, winnow_topics.label_requests, known)
    await produce(kafka_settings, winnow_topics.labels, [label_record("known", "cat")])
    # This label arrives before its request: it is judged when the request comes.
    await produce(kafka_settings, winnow_topics.labels, [label_record("early", "dog")])
    async with Intake(settings, store) as intake:
        letters = await dead_letters(kafka_settings, winnow_topics, 1)
        await eventually(lambda: store.counts().pending_labels == 1)
        await send(kafka_settings, winnow_topics.label_requests, early)
        letters = await dead_letters(kafka_settings, winnow_topics, 2)
        await eventually(lambda: store.counts().labels == 0)
        assert intake.counters.dead_letters["unknown_class"] == 2
    assert store.trainable() == []
    store.close()
    parsed = {r["_key"]: DeadLetter.model_validate(r) for r in letters}
    assert set(parsed) == {b"known", b"early"}
    for key, letter in parsed.items():
        assert letter.reason == "unknown_class"
        assert letter.role == "trainer"
        assert letter.origin.topic == winnow_topics.labels
        assert letter.value is not None
        assert json.loads(letter.value)["frame_id"] == key.decode()


async def test_an_orphan_label_is_dead_lettered_after_its_grace(
    kafka_settings: KafkaSettings,
    winnow_topics: TopicNames,
    make_settings: Callable[..., TrainerSettings],
) -> None:
    settings = make_settings(orphan_grace_s=1.0)
    store = SampleStore(settings.store_path)
    await produce(kafka_settings, winnow_topics.labels, [label_record("ghost", "cat", "a")])
    async with Intake(settings, store) as intake:
        letters = await dead_letters(kafka_settings, winnow_topics, 1)
        await eventually(lambda: store.counts().labels == 0)
        assert intake.counters.dead_letters["unknown_frame"] == 1
    letter = DeadLetter.model_validate(letters[0])
    assert letters[0]["_key"] == b"ghost"
    assert letter.reason == "unknown_frame"
    assert letter.origin.topic == winnow_topics.labels
    assert letter.origin.offset == 0
    store.close()


async def test_invalid_records_are_dead_lettered_and_do_not_block(
    kafka_settings: KafkaSettings,
    winnow_topics: TopicNames,
    make_settings: Callable[..., TrainerSettings],
) -> None:
    settings = make_settings()
    store = SampleStore(settings.store_path)
    broken = {"frame_id": "f", "image": "not base64!"}
    bad_request: tuple = (b"f", json.dumps(broken).encode(), [])
    await send(kafka_settings, winnow_topics.label_requests, bad_request, request_record("f"))
    bad_label = (b"f", b"{not json", [("trace", b"x")])
    await send(kafka_settings, winnow_topics.labels, bad_label, label_record("f", "dog"))
    async with Intake(settings, store) as intake:
        letters = await dead_letters(kafka_settings, winnow_topics, 2)
        await eventually(lambda: len(store.trainable()) == 1)
        assert intake.counters.dead_letters["invalid_schema"] == 2
    store.close()
    by_topic = {r["origin"]["topic"]: DeadLetter.model_validate(r) for r in letters}
    assert set(by_topic) == {winnow_topics.labels, winnow_topics.label_requests}
    letter = by_topic[winnow_topics.labels]
    assert letter.reason == "invalid_schema"
    assert letter.value == b"{not json"
    assert letter.headers == {"trace": "x"}
    assert "Label" in letter.detail
    letter = by_topic[winnow_topics.label_requests]
    assert letter.reason == "invalid_schema"
    assert "model_version" in letter.detail


async def test_a_restarted_intake_rereads_nothing_and_loses_nothing(
    kafka_settings: KafkaSettings,
    winnow_topics: TopicNames,
    make_settings: Callable[..., TrainerSettings],
) -> None:
    settings = make_settings()
    frames = [f"f{i:02d}" for i in range(50)]
    await produce(kafka_settings, winnow_topics.label_requests, [request_record(f) for f in frames])
    await produce(
        kafka_settings, winnow_topics.labels, [label_record(f, "dog") for f in frames[:25]]
    )
    store = SampleStore(settings.store_path)
    async with Intake(settings, store) as intake:
        await eventually(lambda: store.counts().labels == 25)
        await eventually(lambda: intake.offsets.pending() == 0)
    store.close()
    committed = await committed_offsets(
        kafka_settings, winnow_topics.label_requests, settings.group_id
    )
    assert sum(committed.values()) == 50, "every request is done and committed"

    await produce(
        kafka_settings, winnow_topics.labels, [label_record(f, "dog") for f in frames[25:]]
    )
    store = SampleStore(settings.store_path)
    async with Intake(settings, store) as intake:
        assert intake.new_labels.is_set()  # untrained frames from the first run
        await eventually(lambda: store.counts().labels == 50)
        await asyncio.sleep(1)  # anything re-read would arrive now
        assert intake.counters.requests_received == 0
        assert intake.counters.labels_received == 25
    assert sorted(i.frame_id for i in store.trainable()) == frames
    assert store.counts().labels == 50
    store.close()


async def test_a_plain_json_label_is_accepted(
    kafka_settings: KafkaSettings,
    winnow_topics: TopicNames,
    make_settings: Callable[..., TrainerSettings],
) -> None:
    settings = make_settings()
    store = SampleStore(settings.store_path)
    await produce(kafka_settings, winnow_topics.label_requests, [request_record("plain")])
    plain = b'{"frame_id": "plain", "label": "bird"}'
    await produce(kafka_settings, winnow_topics.labels, [(None, plain, [])])
    async with Intake(settings, store):
        await eventually(lambda: len(store.trainable()) == 1)
    assert [(i.frame_id, i.label) for i in store.trainable()] == [("plain", "bird")]
    store.close()
