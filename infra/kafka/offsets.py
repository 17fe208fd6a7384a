"""Which consumed offsets may be committed: the contiguous done prefix per partition.

A record is *done* once everything produced for it is acknowledged (a decision
record, a dead letter, a label), or once it can never be processed. Work can
finish out of order (labelers answer in any order), so a partition's committed
offset only moves up to the first record that is not done yet; everything past
it is read again after a restart or a rebalance (at-least-once). The scorer,
the trainer's intake and the label app all commit through this one class.
"""

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError

log = logging.getLogger(__name__)
# Its own logger: an outage filters the per-attempt lines of this module, never this one.
stop_log = logging.getLogger(f"{__name__}.stop")


ORPHAN_COMMIT = "GroupCoordinator._do_commit_offsets"
"""aiokafka runs each commit request in a task of its own, behind ``asyncio.shield``."""


def _read_orphaned_commits() -> None:
    """Reads the error of aiokafka's commit tasks whose waiter was cancelled.

    ``asyncio.shield`` lets the request run on when a stop or a timeout cancels
    the commit, and stops watching it; if the broker is away the request then
    fails with nobody to read the error, and asyncio logs "Task exception was
    never retrieved" with a traceback during the stop. The error changes
    nothing (the offsets stay uncommitted and are read again), so it is read
    and logged at debug level.
    """
    for task in asyncio.all_tasks():
        if getattr(task.get_coro(), "__qualname__", "") == ORPHAN_COMMIT:
            task.add_done_callback(_read_commit_error)


def _read_commit_error(task: "asyncio.Task[object]") -> None:
    if not task.cancelled() and (error := task.exception()) is not None:
        log.debug("a cancelled offset commit failed afterwards: %r", error)


class OffsetTracker:
    """Tracks consumed and done offsets of each partition (records arrive in order).

    Args:
        name: what the tracker commits for, in log lines (``scorer``, ``intake``).
    """

    def __init__(self, name: str = "consumer") -> None:
        self.name = name
        self._open: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def consumed(self, tp: TopicPartition, offset: int) -> None:
        """Registers a record that is not done yet."""
        self._open.setdefault(tp, set()).add(offset)
        if offset + 1 > self._next.get(tp, 0):
            self._next[tp] = offset + 1

    def consumed_many(self, records: Iterable[tuple[TopicPartition, int]]) -> None:
        """Registers several records, as :meth:`consumed`."""
        for tp, offset in records:
            self.consumed(tp, offset)

    def done(self, tp: TopicPartition, offset: int) -> None:
        """Marks a record done; unknown records (a revoked partition) are ignored."""
        open_offsets = self._open.get(tp)
        if open_offsets is not None:
            open_offsets.discard(offset)

    def done_many(self, records: Iterable[tuple[TopicPartition, int]]) -> None:
        """Marks several records done, as :meth:`done`."""
        for tp, offset in records:
            self.done(tp, offset)

    def pending(self) -> int:
        """Records consumed and not yet done, over all partitions."""
        return sum(len(offsets) for offsets in self._open.values())

    def position(self, tp: TopicPartition) -> int | None:
        """The offset a commit would store for ``tp`` now; None if nothing was consumed."""
        if tp not in self._next:
            return None
        open_offsets = self._open.get(tp)
        return min(open_offsets) if open_offsets else self._next[tp]

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets to commit now: only partitions whose done prefix grew since last time."""
        out = {}
        for tp in self._next:
            position = self.position(tp)
            if position is not None and position > self._committed.get(tp, -1):
                out[tp] = position
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """Records that ``offsets`` were committed."""
        self._committed.update(offsets)

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """Drops revoked partitions; their new owner starts from the committed offset."""
        for tp in partitions:
            self._open.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)

    async def commit(self, consumer: AIOKafkaConsumer) -> dict[TopicPartition, int] | None:
        """Commits the done prefix of every partition ``consumer`` still owns.

        A failed commit is logged and left for the next call: the records after
        the last committed offset are redelivered, never lost.

        Returns:
            The offsets committed (possibly none), or None when the commit failed.
        """
        assigned = consumer.assignment()
        offsets = {tp: o for tp, o in self.committable().items() if tp in assigned}
        if not offsets:
            return {}
        try:
            await consumer.commit(offsets)
        except asyncio.CancelledError:
            _read_orphaned_commits()
            raise
        except KafkaError as error:  # CommitFailedError is a KafkaError too
            log.warning(
                "%s: offset commit failed, records after the last commit will be redelivered: %r",
                self.name,
                error,
            )
            return None
        self.committed(offsets)
        return offsets

    def behind(self) -> list[TopicPartition]:
        """Partitions with records consumed past their last committed offset."""
        return [tp for tp, nxt in self._next.items() if nxt > self._committed.get(tp, -1)]

    async def commit_before_stop(
        self, consumer: AIOKafkaConsumer, timeout_s: float, redone: str
    ) -> bool:
        """The last commit of a stopping consumer: at most ``timeout_s``, and one clear line.

        With the broker away the commit cannot succeed; waiting longer would only
        hold the stop. The partitions whose progress was not committed are named,
        and what their next owner does about it (``redone``: e.g. "their frames
        will be decided again").

        Records consumed and not yet done (in flight when the stop came) are named the
        same way, even when the commit of what was done went through.

        Returns:
            Whether every consumed offset was committed.
        """
        try:
            committed = await asyncio.wait_for(self.commit(consumer), timeout_s)
        except TimeoutError:
            committed = None
        assigned = consumer.assignment()
        partitions = sorted(
            (tp for tp in self.behind() if tp in assigned), key=lambda tp: (tp.topic, tp.partition)
        )
        if committed is not None and not partitions:
            return True
        names = ", ".join(f"{tp.topic}:{tp.partition}" for tp in partitions)
        count = (
            f"{len(partitions)} partitions' offsets"
            if len(partitions) != 1
            else "1 partition's offset"
        )
        if committed is not None:  # the commit went through, but records were still in flight
            stop_log.warning(
                "%s: stopping with records in flight: %s not committed past them (%s); "
                "%s by the next owner",
                self.name,
                count,
                names,
                redone,
            )
            return False
        stop_log.warning(
            "%s: stopping with the broker unreachable: %s not committed (%s); %s by the next owner",
            self.name,
            count,
            names or "none behind",
            redone,
        )
        return False
