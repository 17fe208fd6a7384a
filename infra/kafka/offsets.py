"""Which consumed offsets may be committed: the contiguous done prefix per partition.

A label request is *done* once a label for it is acknowledged by Kafka (or it
is unreadable and can never be labeled). Labelers answer out of order, so the
committed offset of a partition only moves up to the first record that is not
done yet; everything past it is read again after a restart (at-least-once).
"""

from aiokafka import TopicPartition


class DonePrefix:
    """Tracks consumed and done offsets of each partition (records arrive in order)."""

    def __init__(self) -> None:
        self._open: dict[TopicPartition, set[int]] = {}
        self._next: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}

    def consumed(self, tp: TopicPartition, offset: int) -> None:
        """Registers a record that is not done yet."""
        self._open.setdefault(tp, set()).add(offset)
        self._next[tp] = max(self._next.get(tp, 0), offset + 1)

    def done(self, tp: TopicPartition, offset: int) -> None:
        """Marks a record done; unknown records (a revoked partition) are ignored."""
        self._open.get(tp, set()).discard(offset)

    def committable(self) -> dict[TopicPartition, int]:
        """Offsets to commit now: only partitions whose done prefix grew since last time."""
        out = {}
        for tp, next_offset in self._next.items():
            open_offsets = self._open.get(tp)
            position = min(open_offsets) if open_offsets else next_offset
            if position > self._committed.get(tp, -1):
                out[tp] = position
        return out

    def committed(self, offsets: dict[TopicPartition, int]) -> None:
        """Records that ``offsets`` were committed."""
        self._committed.update(offsets)

    def forget(self, partitions: set[TopicPartition]) -> None:
        """Drops revoked partitions; their new owner starts from the committed offset."""
        for tp in partitions:
            self._open.pop(tp, None)
            self._next.pop(tp, None)
            self._committed.pop(tp, None)
