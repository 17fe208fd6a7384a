"""A rebalance of the label app's group while an answer is on its way to Kafka."""

import asyncio

from aiokafka import TopicPartition

from infra.kafka.settings import KafkaSettings
from service.labeling.queue import LabelQueue, _Rebalance
from tests.service.labeling.conftest import label_request

TP = TopicPartition("winnow.label-requests", 0)


class _SlowProducer:
    """Acknowledges a send only when told to."""

    def __init__(self) -> None:
        self.ack = asyncio.Event()
        self.sent: list[bytes] = []

    async def send_and_wait(self, topic: str, value: bytes, key: bytes) -> None:
        self.sent.append(key)
        await self.ack.wait()


class _Consumer:
    def __init__(self) -> None:
        self.commits: list[dict[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return {TP}

    async def commit(self, offsets: dict[TopicPartition, int]) -> None:
        self.commits.append(dict(offsets))


async def test_a_revocation_waits_for_answers_in_flight_and_commits_their_frames(
    app_settings,
) -> None:
    """The failure it catches: partitions given up (their done prefix committed) while a
    label is on its way, so the next owner serves the frame to a second labeler while the
    first one's answer is still being accepted: one frame leased twice at once."""
    queue = LabelQueue(KafkaSettings(bootstrap="127.0.0.1:1"), app_settings())
    producer, consumer = _SlowProducer(), _Consumer()
    queue._producer, queue._consumer = producer, consumer  # type: ignore[assignment]
    queue._add(TP, 0, label_request("f0").model_dump_json().encode())
    lease = queue.next("ann")
    assert lease is not None
    answering = asyncio.create_task(queue.answer(lease.id, "ann", "3"))
    await asyncio.sleep(0.01)
    assert producer.sent == [b"f0"]
    revoking = asyncio.create_task(_Rebalance(queue).on_partitions_revoked({TP}))
    await asyncio.sleep(0.1)
    assert not revoking.done(), "the revocation waits for the label's acknowledgement"
    producer.ack.set()
    await answering
    await revoking
    assert consumer.commits == [{TP: 1}], "the answered frame is committed before it moves"
    assert len(queue.pool) == 0
