"""The scorer's checkpoint: the consumer lag comes from the broker, not only from commits."""

from aiokafka import AIOKafkaConsumer

from infra.kafka.admin import topic_partitions
from infra.kafka.connection import client_kwargs
from service.metrics import ScorerMetrics
from service.pipeline.checkpoint import Checkpoint
from tests.kafka_helpers import produce


def _lag(metrics: ScorerMetrics) -> dict[str, float]:
    return {
        s.labels["partition"]: s.value for m in metrics.consumer_lag.collect() for s in m.samples
    }


async def test_a_scorer_that_consumed_nothing_shows_the_frames_waiting(
    kafka_settings, winnow_topics
) -> None:
    topic = winnow_topics.frames
    for _ in range(5):  # one batch each: Tansu's end offset counts a batch as its first record
        await produce(kafka_settings, topic, [(b"camera-0", b"frame", [])])
    consumer = AIOKafkaConsumer(
        group_id=None, auto_offset_reset="earliest", **client_kwargs(kafka_settings)
    )
    await consumer.start()
    try:
        consumer.assign(await topic_partitions(kafka_settings, topic))
        metrics = ScorerMetrics()
        checkpoint = Checkpoint(consumer, metrics)
        await checkpoint.refresh_lag()  # no batch, no commit: a stall
        lag = _lag(metrics)
        assert len(lag) == 3 and sum(lag.values()) == 5
        revoked = [tp for tp in consumer.assignment() if tp.partition != 0]
        await checkpoint.on_partitions_revoked(revoked)
        assert set(_lag(metrics)) == {"0"}, "a revoked partition's lag is no longer reported"
    finally:
        await consumer.stop()
