"""OffsetTracker: the contiguous done prefix, and committing it on a real consumer group."""

import asyncio

from aiokafka import TopicPartition

from infra.kafka.consumer import create_consumer
from infra.kafka.offsets import OffsetTracker
from infra.kafka.settings import KafkaSettings
from schemas.topics import TopicNames
from tests.kafka_helpers import committed_offsets, produce

TP = TopicPartition("winnow.label-requests", 0)
OTHER = TopicPartition("winnow.label-requests", 1)


def test_out_of_order_done_commits_only_the_contiguous_prefix() -> None:
    tracker = OffsetTracker()
    tracker.consumed_many((TP, o) for o in range(5, 9))
    assert tracker.committable() == {TP: 5} and tracker.pending() == 4
    tracker.committed({TP: 5})
    tracker.done(TP, 6)
    tracker.done(TP, 8)
    assert tracker.committable() == {}, "5 is still open"
    tracker.done(TP, 5)
    assert tracker.committable() == {TP: 7}
    tracker.done(TP, 7)
    assert tracker.committable() == {TP: 9} and tracker.pending() == 0


def test_committable_only_grows_and_partitions_are_independent() -> None:
    tracker = OffsetTracker()
    tracker.consumed_many([(TP, 0), (TP, 1), (OTHER, 10)])
    tracker.done_many([(TP, 0), (OTHER, 10)])
    assert tracker.committable() == {TP: 1, OTHER: 11}
    tracker.committed({TP: 1, OTHER: 11})
    assert tracker.committable() == {}, "nothing new is done"
    tracker.done(TP, 0)  # done twice: no effect
    tracker.done(TP, 99)  # never consumed: ignored
    assert tracker.committable() == {}
    tracker.done(TP, 1)
    assert tracker.committable() == {TP: 2}


def test_forget_drops_a_revoked_partition() -> None:
    tracker = OffsetTracker()
    tracker.consumed_many([(TP, 0), (TP, 1), (OTHER, 0)])
    tracker.committed({TP: 0})
    tracker.forget([TP])
    assert tracker.position(TP) is None and tracker.pending() == 1
    tracker.done(TP, 0)  # a late answer for a revoked record: ignored
    assert TP not in tracker.committable()
    tracker.consumed(TP, 7)  # reassigned later, from the new owner's committed offset
    assert tracker.committable() == {TP: 7, OTHER: 0}


async def test_commit_stores_the_done_prefix_in_the_group(
    kafka_settings: KafkaSettings, winnow_topics: TopicNames, group_id: str
) -> None:
    topic = winnow_topics.labels
    await produce(kafka_settings, topic, [(b"k", f"v{i}".encode(), []) for i in range(6)])
    consumer = create_consumer(kafka_settings, topic, group_id=group_id)
    tracker = OffsetTracker("test")
    await consumer.start()
    try:
        records = []
        async with asyncio.timeout(30):
            while len(records) < 6:
                batches = await consumer.getmany(timeout_ms=200)
                records += [r for batch in batches.values() for r in batch]
        (tp,) = {TopicPartition(r.topic, r.partition) for r in records}  # one key: one partition
        tracker.consumed_many((tp, r.offset) for r in records)
        tracker.done_many((tp, o) for o in (0, 1, 3))
        assert await tracker.commit(consumer) == {tp: 2}
        assert await tracker.commit(consumer) == {}, "nothing new to commit"
        assert (await committed_offsets(kafka_settings, topic, group_id))[tp.partition] == 2
        tracker.done(tp, 2)
        assert await tracker.commit(consumer) == {tp: 4}
    finally:
        await consumer.stop()
    assert (await committed_offsets(kafka_settings, topic, group_id))[tp.partition] == 4
