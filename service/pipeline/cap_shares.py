"""The scorer's share of the group's labels-per-hour cap, moved with its partitions.

On every assignment the policy learns which frames partitions this replica owns
and how many the topic has (``QueryPolicy.assign_partitions``); on revocation it
stops charging the cap until the next assignment. For each partition newly
owned, the last hour of the label-requests topic is read and every request
charged to that partition (``decision.cap_partition``) goes into its ledger, so
the requests the previous owner made still count. The requests topic is the
shared truth: no other store, no coordination between replicas.

If that history cannot be read in time, the new partitions count as full for the
hour: the cap still holds, the share is lost meanwhile (logged).
"""

import asyncio
import json
import logging
import time
from collections.abc import Collection
from datetime import datetime

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

from infra.errors import WinnowError
from infra.kafka.admin import topic_partitions
from infra.kafka.connection import client_kwargs
from infra.kafka.settings import KafkaSettings
from service.selection.policy import QueryPolicy

log = logging.getLogger(__name__)

HOUR_S = 3600.0
HISTORY_TIMEOUT_S = 10.0
CLOCK_MARGIN_S = 300.0  # read a little more than the hour: the replicas' clocks differ


class CapShares:
    """Tells the policy its partitions on each rebalance (the checkpoint calls it).

    Args:
        kafka: the cluster and the topic names.
        policy: the scorer's policy, whose cap is shared.
        history_timeout_s: longest read of the requests topic on an assignment.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        policy: QueryPolicy,
        *,
        history_timeout_s: float = HISTORY_TIMEOUT_S,
    ) -> None:
        self._kafka = kafka
        self._policy = policy
        self._timeout_s = history_timeout_s
        self._owned: set[int] = set()

    def joining(self) -> None:
        """Before the consumer joins: no share until the first assignment is complete."""
        self._policy.revoke_partitions()

    def revoked(self) -> None:
        self._policy.revoke_partitions()

    async def assigned(
        self, consumer: AIOKafkaConsumer, assigned: Collection[TopicPartition]
    ) -> None:
        """Sets the policy's share from ``assigned`` and the history of the partitions new to it."""
        topic = self._kafka.topics.frames
        owned = {tp.partition for tp in assigned if tp.topic == topic}
        total = await self._partition_count(consumer, topic)
        new = owned - self._owned
        ages: dict[int, list[float]] = {}
        unknown: set[int] = set()
        if new and self._policy.capped:
            try:
                ages = await asyncio.wait_for(self._history(new), self._timeout_s)
            except (KafkaError, WinnowError, TimeoutError, OSError) as error:
                log.warning(
                    "cap share: the history of frames partitions %s could not be read (%r); "
                    "they count as full for the next hour",
                    sorted(new),
                    error,
                )
                unknown = new
        self._policy.assign_partitions(sorted(owned), total, ages, sorted(unknown))
        self._owned = owned
        log.info(
            "cap share: partitions %s of %d, %s labels per hour, %d charged in the last hour "
            "(%d read for the partitions new here)",
            sorted(owned),
            total,
            self._policy.labels_per_hour_share,
            self._policy.state().cap_charged_last_hour,
            sum(len(a) for a in ages.values()),
        )

    async def _partition_count(self, consumer: AIOKafkaConsumer, topic: str) -> int:
        known = consumer.partitions_for_topic(topic)
        if known:
            return len(known)
        return max(1, len(await topic_partitions(self._kafka, topic)))

    async def _history(self, partitions: Collection[int]) -> dict[int, list[float]]:
        """The age in seconds of each request of the last hour charged to ``partitions``."""
        topic = self._kafka.topics.label_requests
        tps = await topic_partitions(self._kafka, topic)
        ages: dict[int, list[float]] = {p: [] for p in partitions}
        if not tps:
            return ages
        reader = AIOKafkaConsumer(
            group_id=None, enable_auto_commit=False, **client_kwargs(self._kafka)
        )
        await reader.start()
        try:
            reader.assign(tps)
            since_ms = int((time.time() - HOUR_S - CLOCK_MARGIN_S) * 1000)
            found = await reader.offsets_for_times({tp: since_ms for tp in tps})
            ends = await reader.end_offsets(tps)
            left = {}
            for tp in tps:
                at = found.get(tp)
                if at is None or at.offset >= ends[tp]:
                    continue  # nothing written since
                start = at.offset
                if at.timestamp < since_ms:  # the broker did not look the time up (Tansu)
                    start = await _first_since(reader, tp, since_ms, start, ends[tp])
                if start < ends[tp]:
                    reader.seek(tp, start)
                    left[tp] = ends[tp]
            while left:
                # every record read counts, also past ``ends``: Tansu answers the end offset
                # with its last batch's first offset + 1, so its last batch ends further on
                batches = await reader.getmany(*left, timeout_ms=200)
                for records in batches.values():
                    for record in records:
                        _charge(record.value, ages)
                for tp in list(left):
                    if await reader.position(tp) >= left[tp]:
                        del left[tp]
        finally:
            await reader.stop()
        return ages


async def _first_since(
    reader: AIOKafkaConsumer, tp: TopicPartition, since_ms: int, lo: int, hi: int
) -> int:
    """The first offset in ``[lo, hi)`` written at ``since_ms`` or later (``hi`` if none), by
    binary search on the record timestamps (append order), for brokers that do not answer
    ``offsets_for_times``; ``lo`` where a record cannot be read (reading more is safe)."""
    while lo < hi:
        mid = (lo + hi) // 2
        reader.seek(tp, mid)
        records = (await reader.getmany(tp, timeout_ms=1000, max_records=1)).get(tp, [])
        if not records:
            return lo
        record = records[0]
        if record.timestamp >= since_ms or record.offset >= hi:
            hi = mid
        else:
            lo = record.offset + 1
    return lo


def _charge(value: bytes | None, ages: dict[int, list[float]]) -> None:
    """Adds one request to ``ages`` if it was charged to one of its partitions in the last hour."""
    try:
        request = json.loads(value or b"")
        partition = request["decision"].get("cap_partition")
        requested = datetime.fromisoformat(request["requested_at"]).timestamp()
    except (ValueError, KeyError, TypeError, AttributeError):
        return  # not a scorer's request, or one from before the cap was shared
    age = time.time() - requested
    if partition in ages and age < HOUR_S:
        ages[partition].append(age)
