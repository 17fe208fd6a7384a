"""The labels-per-hour cap, held by the scorer's consumer group as a whole.

The cap ``C`` is cut into one share per partition of the frames topic: partition
``p`` of ``P`` holds ``C // P`` slots, plus one for the first ``C % P`` partitions,
so the shares add up to ``C`` exactly. A replica may select a frame while any
partition it owns has a free slot (its shares are pooled: a busy partition may use
an idle sibling's slots), and each selection is charged to one owned partition
with room. A partition's ledger (the times of the charges made to it in the last
hour) goes with the partition when it moves: the new owner rebuilds it from the
label-requests topic, where every request names the partition it was charged to
(``decision.cap_partition``; see ``service.pipeline.cap_shares``). No ledger ever
holds more than its slots, so the group's requests in any hour stay within ``C``,
however many replicas run and however often partitions move.

A policy outside a consumer group (tests, the demo before it joins) holds the whole
cap until :meth:`GroupCap.assign` is called.
"""

import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping

from service.selection.budget import HourlyCap

_HOUR_S = 3600.0


def partition_slots(cap: int, total: int, partition: int) -> int:
    """The share of a cap of ``cap`` per hour that partition ``partition`` of ``total`` holds."""
    return cap // total + (1 if partition < cap % total else 0)


class GroupCap:
    """At most ``labels_per_hour`` selections in any 3600 s by the whole consumer group.

    Same calls as :class:`~service.selection.budget.HourlyCap` (``allows``, ``record``,
    ``count_last_hour``, ``set_rate``), plus the partition moves.

    Args:
        labels_per_hour: the group's cap (its floor is used), or None / 0 for none.
        clock: seconds, monotonic; tests pass a fake one.
    """

    def __init__(
        self, labels_per_hour: float | None, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._clock = clock
        self._mine: deque[float] = deque()  # this replica's own selections
        self._ledgers: dict[int, deque[float]] = {}  # owned partition -> its charges
        self._total: int | None = None  # frames partitions; None: not in a group yet
        self._suspended = False  # between a revocation and the next assignment
        self._cap: int | None = None
        self.labels_per_hour: float | None = None
        self.set_rate(labels_per_hour)

    validate = staticmethod(HourlyCap.validate)

    def set_rate(self, labels_per_hour: float | None) -> None:
        """Changes the cap (None or 0 removes it); the ledgers are kept.

        Only this replica hears the change: set it on every replica (the environment)
        for the group's cap to change."""
        self._cap = self.validate(labels_per_hour)
        self.labels_per_hour = None if self._cap is None else float(labels_per_hour or 0)

    # -- the partition moves ----------------------------------------------------------------

    def assign(
        self,
        owned: Iterable[int],
        total: int,
        ages: Mapping[int, Iterable[float]] | None = None,
        unknown: Iterable[int] = (),
    ) -> None:
        """The replica owns ``owned`` of ``total`` frames partitions from now on.

        Ledgers of partitions kept are kept; those of partitions given up are dropped.

        Args:
            owned: the frames partitions assigned to this replica.
            total: how many partitions the frames topic has.
            ages: for newly assigned partitions, how many seconds ago each request charged
                to them in the last hour was made (read from the label-requests topic).
            unknown: newly assigned partitions whose history could not be read: they count
                as full for the next hour (the cap holds; the share is lost meanwhile).
        """
        if total < 1:
            raise ValueError(f"a frames topic has at least one partition, got {total}")
        now = self._clock()
        owned = set(owned)
        ages = ages or {}
        ledgers = {p: self._ledgers.get(p, deque()) for p in owned}
        for p in owned - set(self._ledgers):
            ledgers[p] = deque(sorted(now - max(0.0, age) for age in ages.get(p, ())))
        for p in set(unknown) & owned:
            if self._cap is not None:
                ledgers[p] = deque([now] * partition_slots(self._cap, total, p))
        self._ledgers, self._total, self._suspended = ledgers, total, False

    def suspend(self) -> None:
        """Joining the group, or partitions are being revoked: nothing is selected until the
        next assignment (frames fetched before it is complete are decided without a share)."""
        self._suspended = True

    @property
    def grouped(self) -> bool:
        """Whether partitions were ever assigned (the cap is then shared by the group)."""
        return self._total is not None

    @property
    def owned(self) -> list[int]:
        return sorted(self._ledgers)

    @property
    def share(self) -> float:
        """This replica's fraction of the frames partitions (1 outside a group)."""
        if self._suspended:
            return 0.0
        return 1.0 if self._total is None else len(self._ledgers) / self._total

    @property
    def limit(self) -> int | None:
        """This replica's share of the cap, in labels per hour; None without a cap."""
        if self._cap is None:
            return None
        if self._suspended:
            return 0
        if self._total is None:
            return self._cap
        return sum(partition_slots(self._cap, self._total, p) for p in self._ledgers)

    # -- the HourlyCap calls ----------------------------------------------------------------

    def now(self) -> float:
        return self._clock()

    def allows(self, now: float | None = None) -> bool:
        """Whether one more selection now keeps the group within the cap."""
        if self._cap is None:
            return True
        if self._suspended:
            return False
        now = self._clock() if now is None else now
        if self._total is None:
            return len(_expired(self._mine, now)) < self._cap
        return self._roomiest(now) is not None

    def record(self, now: float | None = None) -> int | None:
        """Records one selection; returns the partition it was charged to (None outside a
        group). Without a cap, or without room (a selection the cap did not allow), the least
        charged owned partition is charged, so no ledger ever under-counts."""
        now = self._clock() if now is None else now
        _expired(self._mine, now).append(now)
        if self._total is None or not self._ledgers:
            return None
        partition = self._roomiest(now)
        if partition is None:
            partition = min(sorted(self._ledgers), key=lambda p: len(self._ledgers[p]))
        self._ledgers[partition].append(now)
        return partition

    @property
    def count_last_hour(self) -> int:
        """This replica's own selections in the last 3600 s."""
        return len(_expired(self._mine, self._clock()))

    @property
    def charged_last_hour(self) -> int:
        """Selections charged to the partitions this replica owns, by any replica, in the
        last 3600 s (what its share is measured against); its own outside a group."""
        if self._total is None:
            return self.count_last_hour
        now = self._clock()
        return sum(len(_expired(ledger, now)) for ledger in self._ledgers.values())

    def _roomiest(self, now: float) -> int | None:
        """The owned partition with the most free slots (lowest number on ties); None if
        none has one, while suspended, or without a cap."""
        if self._suspended or self._total is None or self._cap is None:
            return None
        best, room = None, 0
        for p in sorted(self._ledgers):
            free = partition_slots(self._cap, self._total, p) - len(_expired(self._ledgers[p], now))
            if free > room:
                best, room = p, free
        return best


def _expired(times: deque[float], now: float) -> deque[float]:
    """``times`` without the entries older than an hour (dropped in place)."""
    horizon = now - _HOUR_S
    while times and times[0] <= horizon:
        times.popleft()
    return times
