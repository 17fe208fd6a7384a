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
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaTimeoutError

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
        """Hands ``records`` to the producer without waiting for their acks."""
        send = self._producer.send
        futures = [
            await send(r.topic, r.value, key=r.key, headers=list(r.headers) or None)
            for r in records
        ]
        return InFlight(records, futures)

    async def acked(self, sent: InFlight) -> None:
        """Returns once every record of ``sent`` is acknowledged.

        Raises:
            KafkaError: an error that is not transient, or a transient one after
                the last attempt.
        """
        futures: list[asyncio.Future[Any]] | None = sent.futures
        for attempt, backoff in enumerate((*self._backoff_s, None), start=1):
            try:
                if futures is None:
                    futures = (await self.send(sent.records)).futures
                results = await asyncio.gather(*futures, return_exceptions=True)
                error = next((r for r in results if isinstance(r, BaseException)), None)
                if error is None:
                    return
                raise error
            except Exception as error:
                if backoff is None or not is_retriable(error):
                    raise
                log.warning(
                    "producing %d %s failed (attempt %d), sending them again in %.1fs: %r",
                    len(sent.records),
                    self._what,
                    attempt,
                    backoff,
                    error,
                )
                await asyncio.sleep(backoff)
                futures = None

    async def send_all(self, records: Sequence[OutRecord]) -> None:
        """Sends ``records`` and awaits every ack (:meth:`send`, then :meth:`acked`)."""
        if records:
            await self.acked(await self.send(records))
