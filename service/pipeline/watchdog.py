"""The scorer's progress watchdog: a scorer that stopped deciding while frames wait stops.

A Kafka client can wedge without an error: the 60-minute soak saw a scorer
stay ready, keep swapping models and never decide another frame while its lag
grew by 140,000 (its event loop idle in ``select``). Nothing inside the process
notices that, and an orchestrator only restarts what fails its probes or exits.
So the watchdog looks from outside the pipeline: when no batch was delivered
for ``stall_timeout_s`` while the broker answers, the partitions are assigned
and the broker's end offsets show frames past the delivered position (or the
lag cannot be read at all), the scorer is stalled and stops with
:class:`ScorerStalled`. ``winnow serve`` then exits non-zero (or its worker pool
restarts the worker); offsets are committed only for delivered frames, so the
restarted scorer decides every frame the stalled one did not.

An idle scorer (no frames waiting), a broker outage (ridden out, as
:mod:`infra.kafka.outage` promises) and a rebalance (no partitions) are never
stalls.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from aiokafka import TopicPartition

from infra.errors import WinnowError

log = logging.getLogger(__name__)

LAG_TIMEOUT_S = 10.0


class ScorerStalled(WinnowError):
    """Frames waited and none was decided for the stall timeout while the broker answered."""


class ProgressWatchdog:
    """Stops a scorer whose pipeline delivered nothing for too long while frames wait.

    Args:
        stall_timeout_s: how long without a delivered batch makes a stall, if frames wait.
        lag: the frames past the delivered position of each assigned partition, from the
            broker (raises or hangs when it cannot be read).
        assigned: whether the scorer holds partitions now.
        broker_reachable: whether the broker answers now; an outage is never a stall.
        check_every_s: time between checks; a quarter of the timeout if None.
        lag_timeout_s: how long reading the lag may take before it counts as unreadable.
    """

    def __init__(
        self,
        stall_timeout_s: float,
        *,
        lag: Callable[[], Awaitable[dict[TopicPartition, int]]],
        assigned: Callable[[], bool],
        broker_reachable: Callable[[], bool],
        check_every_s: float | None = None,
        lag_timeout_s: float = LAG_TIMEOUT_S,
    ) -> None:
        self.stall_timeout_s = stall_timeout_s
        self._lag, self._assigned, self._broker_reachable = lag, assigned, broker_reachable
        self._check_every_s = check_every_s or max(0.5, stall_timeout_s / 4)
        self._lag_timeout_s = lag_timeout_s
        self._last_progress = time.monotonic()

    def progressed(self) -> None:
        """A batch was delivered (or the pipeline has just started)."""
        self._last_progress = time.monotonic()

    @property
    def idle_s(self) -> float:
        """Seconds since the last delivered batch."""
        return time.monotonic() - self._last_progress

    async def run(self, stopping: asyncio.Event) -> None:
        """Checks until ``stopping`` is set; raises :class:`ScorerStalled` on a stall."""
        while not stopping.is_set():
            try:
                await asyncio.wait_for(stopping.wait(), self._check_every_s)
            except TimeoutError:
                await self.check()

    async def check(self) -> None:
        """Raises :class:`ScorerStalled` if the scorer is stalled now."""
        if not self._broker_reachable() or not self._assigned():
            # An outage or a rebalance: once over, the scorer gets a full timeout to resume.
            self.progressed()
            return
        idle = self.idle_s
        if idle < self.stall_timeout_s:
            return
        try:
            waiting = sum((await asyncio.wait_for(self._lag(), self._lag_timeout_s)).values())
            where = f"{waiting} frames wait"
        except Exception as error:  # any failure to read the lag is the same here
            if not self._broker_reachable():
                return
            waiting = -1
            where = f"the broker answers but the lag cannot be read ({type(error).__name__})"
        if waiting == 0:
            self.progressed()  # idle, not stalled: the next check waits a full timeout again
            return
        log.warning("where the scorer's tasks wait at the stall:\n%s", where_tasks_wait())
        raise ScorerStalled(
            f"scorer stalled: no frame decided for {idle:.0f} s while {where} "
            f"(WINNOW_SCORER_STALL_TIMEOUT_S={self.stall_timeout_s:g}); stopping so that it is "
            "restarted (offsets are committed only for delivered frames: none is lost)"
        )


def where_tasks_wait() -> str:
    """One line per task of this event loop: its name and the chain of coroutines it waits
    in, outermost first (file:line function), so that a stall says what never completed."""
    lines = []
    for task in sorted(asyncio.all_tasks(), key=lambda t: t.get_name()):
        lines.append(f"  {task.get_name()}: {_chain(task.get_coro())}")
    return "\n".join(lines)


def _chain(coro: object) -> str:
    links = []
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            path = "/".join(frame.f_code.co_filename.split("/")[-2:])
            links.append(f"{path}:{frame.f_lineno} {frame.f_code.co_name}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " > ".join(links) or "?"
