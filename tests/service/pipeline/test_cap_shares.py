"""A scorer's share of the group's cap: the history of moved partitions, read from the
label-requests topic of the real broker."""

import json
import time
from datetime import UTC, datetime

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra.kafka.connection import client_kwargs
from infra.kafka.settings import KafkaSettings
from service.pipeline.cap_shares import CapShares, _first_since
from service.selection.policy import QueryPolicy
from tests.kafka_proxy import free_port


def _request(frame_id: str, partition: int | None, at: float) -> bytes:
    decision = {"selected": True, "policy": "random", "utility": 0.5}
    if partition is not None:
        decision["cap_partition"] = partition
    requested = datetime.fromtimestamp(at, UTC).isoformat()
    return json.dumps(
        {"frame_id": frame_id, "requested_at": requested, "decision": decision}
    ).encode()


async def _produce(kafka, records: list[tuple[float, bytes]]) -> None:
    producer = AIOKafkaProducer(**client_kwargs(kafka), acks="all")
    await producer.start()
    try:
        for at, value in records:
            await producer.send_and_wait(
                kafka.topics.label_requests, value, partition=0, timestamp_ms=int(at * 1000)
            )
    finally:
        await producer.stop()


async def test_a_new_owner_counts_the_requests_charged_to_its_partitions_in_the_last_hour(
    kafka_settings, winnow_topics
) -> None:
    """The failure it catches: a partition's charges forgotten when it moves (its new owner
    asks again for what the previous owner asked for in the hour), or charges older than an
    hour, or charged to partitions it does not own, counted against it."""
    now = time.time()
    old = [(now - 7200 + i, _request(f"old{i}", 1, now - 7200 + i)) for i in range(30)]
    recent = [
        (now - 600, _request("a", 1, now - 600)),
        (now - 300, _request("b", 2, now - 300)),
        (now - 200, _request("c", 1, now - 200)),
        (now - 100, _request("d", None, now - 100)),  # from before the cap was shared
        (now - 50, b"not json"),
    ]
    await _produce(kafka_settings, old + recent)
    policy = QueryPolicy("random", budget=1.0, window=10, labels_per_hour=12)
    ages = await CapShares(kafka_settings, policy)._history({1, 3})
    assert sorted(ages[1]) == pytest.approx([200, 600], abs=30) and ages[3] == []
    assert 2 not in ages


async def test_requests_in_the_last_batch_all_count(kafka_settings, winnow_topics) -> None:
    """The failure it catches: reading the history only up to the end offset the broker
    answers. Tansu answers its last batch's first offset + 1, so a last batch of several
    requests (a scorer's producer batches them) lost all but its first: a newcomer in the
    three-replica test counted 3 of 4 charges and asked again."""
    now = time.time()
    producer = AIOKafkaProducer(**client_kwargs(kafka_settings), acks="all", linger_ms=200)
    await producer.start()
    try:
        await producer.send_and_wait(
            kafka_settings.topics.label_requests, _request("a", 1, now - 60), partition=0
        )
        batch = [  # one batch: sent together, awaited together
            await producer.send(
                kafka_settings.topics.label_requests, _request(f"b{i}", 1, now), partition=0
            )
            for i in range(4)
        ]
        for delivered in batch:
            await delivered
    finally:
        await producer.stop()
    policy = QueryPolicy("random", budget=1.0, window=10, labels_per_hour=12)
    ages = await CapShares(kafka_settings, policy)._history({1})
    assert len(ages[1]) == 5


async def test_first_since_finds_the_hour_by_timestamps_where_the_broker_does_not(
    kafka_settings, winnow_topics
) -> None:
    now = time.time()
    await _produce(kafka_settings, [(now - 100 + i, b"{}") for i in range(50)])
    reader = AIOKafkaConsumer(
        group_id=None, enable_auto_commit=False, **client_kwargs(kafka_settings)
    )
    await reader.start()
    try:
        tp = TopicPartition(kafka_settings.topics.label_requests, 0)
        reader.assign([tp])
        since_ms = int((now - 100 + 30) * 1000)
        assert await _first_since(reader, tp, since_ms, 0, 50) == 30
        assert await _first_since(reader, tp, int(now * 1000), 0, 50) == 50
        assert await _first_since(reader, tp, 0, 0, 50) == 0
    finally:
        await reader.stop()


async def test_partitions_whose_history_cannot_be_read_count_as_full() -> None:
    """The failure it catches: a broker that does not answer the history read (here: no
    broker at all) escaping the rebalance callback, so the policy never takes its partitions,
    or taking them with empty ledgers (the group would then ask for more than the cap)."""
    kafka = KafkaSettings(bootstrap=f"127.0.0.1:{free_port()}", security_protocol="PLAINTEXT")
    policy = QueryPolicy("random", budget=1.0, window=10, labels_per_hour=12)
    shares = CapShares(kafka, policy, history_timeout_s=5)

    class Consumer:  # the assignment's consumer knows the frames topic's partition count
        @staticmethod
        def partitions_for_topic(topic: str) -> set[int]:
            return set(range(6))

    frames = kafka.topics.frames
    await shares.assigned(Consumer(), [TopicPartition(frames, 1), TopicPartition(frames, 4)])
    assert policy.cap_share == pytest.approx(2 / 6)
    assert policy.labels_per_hour_share == 4
    assert policy.state().cap_charged_last_hour == 4
