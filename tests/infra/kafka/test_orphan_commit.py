"""A commit cancelled while aiokafka's shielded request runs on leaves no unread error.

aiokafka's ``GroupCoordinator.commit_offsets`` awaits ``asyncio.shield(self._do_commit_offsets(
...))``. When a stop or a timeout cancels the commit while that request waits on a broker that
is away, the request runs on unwatched; when it then fails, asyncio logs "Task exception was
never retrieved" with a traceback in the middle of a clean stop (seen once in CI in the label
app's outage test). Timing decides whether a real broker shows it, so this test stands in for
aiokafka's coordinator with the same shape: a ``GroupCoordinator._do_commit_offsets`` coroutine
behind ``asyncio.shield``.
"""

import asyncio
import gc
import logging

import pytest
from aiokafka import TopicPartition
from aiokafka.errors import NodeNotReadyError

from infra.kafka.offsets import OffsetTracker


class GroupCoordinator:
    """aiokafka's name, so the tracker finds the request's task as it finds the real one."""

    def __init__(self) -> None:
        self.fail = asyncio.Event()

    async def _do_commit_offsets(self) -> None:
        await self.fail.wait()
        raise NodeNotReadyError("Attempt to send a request to node which is not ready")


class Consumer:
    """A consumer's ``assignment`` and ``commit``, the commit shaped as aiokafka's."""

    def __init__(self, coordinator: GroupCoordinator) -> None:
        self._coordinator = coordinator

    def assignment(self) -> set[TopicPartition]:
        return {TopicPartition("t", 0)}

    async def commit(self, offsets: object) -> None:
        await asyncio.shield(self._coordinator._do_commit_offsets())


async def test_a_cancelled_commit_whose_request_fails_later_logs_no_traceback(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    coordinator = GroupCoordinator()
    tracker = OffsetTracker("test")
    tracker.consumed(TopicPartition("t", 0), 0)
    tracker.done(TopicPartition("t", 0), 0)
    commit = asyncio.create_task(tracker.commit(Consumer(coordinator)))
    await asyncio.sleep(0.05)
    commit.cancel()
    with pytest.raises(asyncio.CancelledError):
        await commit
    coordinator.fail.set()  # the broker's answer, after the stop gave up waiting
    for _ in range(5):
        await asyncio.sleep(0.01)
    gc.collect()
    await asyncio.sleep(0.01)
    messages = [r.getMessage() for r in caplog.records]
    assert not [m for m in messages if "never retrieved" in m], messages
    assert any("a cancelled offset commit failed afterwards" in m for m in messages)
