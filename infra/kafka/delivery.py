"""Deliver, then commit: send a set of records and await every acknowledgement.

Every role that produces records for consumed ones (the scorer's decisions and
requests, the trainer's dead letters, HTTP ingest, model releases) sends them
through :class:`Delivery`. A transient broker error (one whose ``retriable``
flag is set, or a timeout) makes it send the whole set again after a backoff;
duplicates are tolerated downstream by frame id. Any other error, or a
transient one that outlasts every backoff, is raised, so the caller commits
nothing it did not deliver.
"""

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError
from aiokafka.structs import RecordMetadata

log = logging.getLogger(__name__)

DEFAULT_BACKOFF_S: tuple[float, ...] = (0.2, 0.5, 1.0, 2.0, 5.0)
"""Waits between attempts; the attempt after the last wait is the final one."""


@dataclass(slots=True, frozen=True)
class OutRecord:
    """One record to produce."""

    topic: str
    key: bytes | None
    value: bytes
    headers: tuple[tuple[str, bytes], ...] = ()


def is_retriable(error: BaseException) -> bool:
    """Whether sending again may succeed: the error says so, or it is a timeout.

    aiokafka marks broker-side transient errors ``retriable``; its client-side
    ``KafkaTimeoutError`` (no broker answered in time, e.g. during an outage)
    is not marked, but it is transient too.
    """
    return bool(getattr(error, "retriable", False)) or isinstance(
        error, KafkaTimeoutError | TimeoutError
    )


class InFlight:
    """Records sent and not yet known to be acknowledged."""

    __slots__ = ("futures", "records")

    def __init__(self, records: Sequence[OutRecord], futures: list["asyncio.Future[Any]"]) -> None:
        self.records = records
        self.futures = futures


class Delivery:
    """Sends records and awaits their acks, retrying transient errors as a whole set.

    Args:
        producer: a started producer.
        backoff_s: waits between attempts.
        what: what is delivered, for log lines.
    """

    def __init__(
        self,
        producer: AIOKafkaProducer,
        *,
        backoff_s: Sequence[float] = DEFAULT_BACKOFF_S,
        what: str = "records",
    ) -> None:
        self._producer = producer
        self._backoff_s = tuple(backoff_s)
        self._what = what

    async def send(self, records: Sequence[OutRecord]) -> InFlight:
        """Hands ``records`` to the producer, in order, without waiting for their acks.

        Raises:
            KafkaError: the producer refused a record at once (e.g. one above
                ``max_request_size``); not retried here.
        """
        send = self._producer.send
        futures = [
            await send(r.topic, r.value, key=r.key, headers=list(r.headers) or None)
            for r in records
        ]
        return InFlight(records, futures)

    async def acked(self, sent: InFlight) -> list[RecordMetadata]:
        """Waits for every ack of ``sent``; on a transient error, sends them all again.

        Returns:
            The metadata (partition, offset) of each record, in the order sent,
            from the attempt that succeeded.

        Raises:
            KafkaError: an error that is not transient, at once, or a transient
                one after the last attempt.
        """
        return await self._deliver(sent.records, sent.futures)

    async def send_all(self, records: Sequence[OutRecord]) -> list[RecordMetadata]:
        """Sends ``records`` and awaits every ack (:meth:`send`, then :meth:`acked`).

        A transient error while handing the records over is retried like one
        in an acknowledgement.

        Returns:
            The metadata of each record, in order; empty for no records.

        Raises:
            KafkaError: as :meth:`acked`.
        """
        if not records:
            return []
        return await self._deliver(records, None)

    async def _deliver(
        self, records: Sequence[OutRecord], futures: "list[asyncio.Future[Any]] | None"
    ) -> list[RecordMetadata]:
        for attempt, backoff in enumerate((*self._backoff_s, None), start=1):
            try:
                if futures is None:
                    futures = (await self.send(records)).futures
                results = await asyncio.gather(*futures, return_exceptions=True)
                error = next((r for r in results if isinstance(r, BaseException)), None)
                if error is None:
                    return cast(list[RecordMetadata], results)
                raise error
            except Exception as error:
                if backoff is None or not is_retriable(error):
                    raise
                log.warning(
                    "producing %d %s failed (attempt %d), sending them again in %.1fs: %r",
                    len(records),
                    self._what,
                    attempt,
                    backoff,
                    error,
                )
                await asyncio.sleep(backoff)
                futures = None
        raise AssertionError("unreachable: the last attempt returns or raises")
