"""The test helpers' reader: what it says when a topic holds fewer records than awaited."""

import json

import pytest

from infra.kafka.settings import KafkaSettings
from schemas.topics import TopicNames
from tests import kafka_helpers
from tests.kafka_helpers import produce, read_json


async def test_read_json_reads_every_record_and_says_what_the_broker_holds_when_short(
    kafka_settings: KafkaSettings, winnow_topics: TopicNames
) -> None:
    topic = winnow_topics.labels
    await produce(
        kafka_settings,
        topic,
        [(f"k{i}".encode(), json.dumps({"i": i}).encode(), []) for i in range(5)],
    )
    got = await read_json(kafka_settings, topic, lambda out: len(out) >= 5, 30)
    assert sorted(x["i"] for x in got) == list(range(5))
    assert {x["_key"] for x in got} == {f"k{i}".encode() for i in range(5)}
    with pytest.raises(TimeoutError, match=r"read 5 records in 2 s .*\(5 records\)"):
        await read_json(kafka_settings, topic, lambda out: len(out) >= 6, 2)


async def test_a_stalled_reader_starts_over_without_counting_a_record_twice(
    kafka_settings: KafkaSettings, winnow_topics: TopicNames, monkeypatch: pytest.MonkeyPatch
) -> None:
    topic = winnow_topics.labels
    await produce(
        kafka_settings, topic, [(b"k", json.dumps({"i": i}).encode(), []) for i in range(3)]
    )
    starts: list[float] = []
    real = kafka_helpers._read_from_start

    async def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        starts.append(0)
        return await real(*args, **kwargs)

    monkeypatch.setattr(kafka_helpers, "STALL_S", 1.0)
    monkeypatch.setattr(kafka_helpers, "_read_from_start", counted)
    with pytest.raises(TimeoutError, match=r"read 3 records in 5 s"):
        await read_json(kafka_settings, topic, lambda out: len(out) >= 4, 5)
    assert len(starts) >= 2  # it started over after a second without news
