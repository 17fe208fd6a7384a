"""The progress watchdog tells a stalled scorer from an idle one, an outage and a rebalance."""

import asyncio

import pytest
from aiokafka import TopicPartition

from service.pipeline.watchdog import ProgressWatchdog, ScorerStalled, where_tasks_wait

TP = TopicPartition("frames", 0)


class _World:
    """What the watchdog reads: the lag, the assignment, the broker; changed by the test."""

    def __init__(self, waiting: int = 5) -> None:
        self.waiting, self.assigned, self.reachable, self.hangs = waiting, True, True, False

    async def lag(self) -> dict[TopicPartition, int]:
        if self.hangs:
            await asyncio.Event().wait()
        return {TP: self.waiting}

    def watchdog(self, timeout_s: float = 0.2) -> ProgressWatchdog:
        return ProgressWatchdog(
            timeout_s,
            lag=self.lag,
            assigned=lambda: self.assigned,
            broker_reachable=lambda: self.reachable,
            check_every_s=0.05,
            lag_timeout_s=0.2,
        )


async def test_frames_waiting_and_nothing_decided_is_a_stall() -> None:
    """Catches: a scorer that stops deciding while its lag grows and stays up (the soak's
    minute-33 stall)."""
    world = _World(waiting=140_000)
    watchdog = world.watchdog()
    await watchdog.check()  # within the timeout: nothing to say yet
    await asyncio.sleep(0.25)
    with pytest.raises(ScorerStalled, match="140000 frames wait"):
        await watchdog.check()


async def test_a_lag_that_cannot_be_read_while_the_broker_answers_is_a_stall() -> None:
    """Catches: a wedged connection hiding the stall because the lag query hangs on it too."""
    world = _World()
    world.hangs = True
    watchdog = world.watchdog()
    await asyncio.sleep(0.25)
    with pytest.raises(ScorerStalled, match="lag cannot be read"):
        await watchdog.check()


async def test_an_idle_scorer_is_not_stalled_and_gets_a_full_timeout_when_frames_come() -> None:
    """Catches: restarting a scorer that has nothing to do."""
    world = _World(waiting=0)
    watchdog = world.watchdog()
    await asyncio.sleep(0.25)
    await watchdog.check()
    world.waiting = 10  # frames arrive: the scorer has a full timeout to decide them
    await watchdog.check()
    assert watchdog.idle_s < 0.2


async def test_progress_within_the_timeout_is_not_a_stall() -> None:
    """Catches: a busy scorer with a standing lag taken for a stalled one."""
    world = _World(waiting=1000)
    watchdog = world.watchdog()
    for _ in range(6):
        await asyncio.sleep(0.1)
        watchdog.progressed()
        await watchdog.check()


@pytest.mark.parametrize("cause", ["outage", "rebalance"])
async def test_an_outage_or_a_rebalance_is_not_a_stall_and_restarts_the_clock(cause) -> None:
    """Catches: a scorer restarted during a broker outage (which it must ride out) or just
    after one, before it had a chance to resume."""
    world = _World(waiting=1000)
    watchdog = world.watchdog()
    if cause == "outage":
        world.reachable = False
    else:
        world.assigned = False
    await asyncio.sleep(0.3)
    await watchdog.check()
    world.reachable = world.assigned = True
    await watchdog.check()  # back: a full timeout to resume
    await asyncio.sleep(0.25)
    with pytest.raises(ScorerStalled):
        await watchdog.check()


async def test_run_stops_when_asked_and_raises_a_stall() -> None:
    """Catches: a watchdog that holds up the scorer's stop, or never fires when running."""
    world = _World(waiting=0)
    stopping = asyncio.Event()
    task = asyncio.create_task(world.watchdog().run(stopping))
    await asyncio.sleep(0.3)
    stopping.set()
    await asyncio.wait_for(task, 1)

    world.waiting = 3
    with pytest.raises(ScorerStalled):
        await asyncio.wait_for(world.watchdog().run(asyncio.Event()), 2)


async def test_a_stall_says_where_each_task_waits(caplog) -> None:
    """Catches: a stall that stops the scorer without saying what never completed (the soak's
    stalls left nothing to debug but a py-spy dump)."""

    async def waits_for_an_ack(never: asyncio.Event) -> None:
        await never.wait()

    never = asyncio.Event()
    task = asyncio.create_task(waits_for_an_ack(never), name="scorer-ack")
    await asyncio.sleep(0)
    try:
        said = where_tasks_wait()
        line = said.split("scorer-ack: ")[1].splitlines()[0]
        assert "waits_for_an_ack > asyncio/locks.py:" in line and line.endswith(" wait"), line
        world = _World(waiting=7)
        watchdog = world.watchdog()
        await asyncio.sleep(0.25)
        with pytest.raises(ScorerStalled):
            await watchdog.check()
        assert "scorer-ack: " in caplog.text and "waits_for_an_ack" in caplog.text
    finally:
        task.cancel()
