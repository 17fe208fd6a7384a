"""The Component base: one start, one stop, supervised background tasks."""

import asyncio
import logging

import pytest

from infra.component import Component


class Probe(Component):
    """Records what the base calls; runs the background work a test gives it."""

    def __init__(self, *work: tuple[str, object]) -> None:
        super().__init__()
        self.calls: list[str] = []
        self.work = work
        self.running_during_stop: list[bool] = []

    async def _start(self) -> None:
        self.calls.append("start")
        for name, coro in self.work:
            self.supervise(coro, name=name)  # type: ignore[arg-type]

    async def _stop(self) -> None:
        self.calls.append("stop")
        self.running_during_stop = [not task.done() for task in self._supervised]


async def _forever(cleaned: list[str], name: str) -> None:
    try:
        await asyncio.sleep(3600)
    finally:
        cleaned.append(name)


async def _crash(after_s: float = 0.0) -> None:
    await asyncio.sleep(after_s)
    raise RuntimeError("the background work broke")


async def test_start_and_stop_run_once_however_often_they_are_called() -> None:
    probe = Probe()
    assert not probe.running
    async with probe as entered:
        assert entered is probe
        assert probe.running
        await probe.start()
        assert probe.calls == ["start"]
    assert not probe.running
    await probe.stop()
    await probe.stop()
    assert probe.calls == ["start", "stop"]


async def test_stop_before_start_does_nothing_and_the_component_stays_down() -> None:
    probe = Probe()
    await probe.stop()
    assert probe.calls == []
    await probe.start()  # a shutdown that came first wins: nothing to leak
    assert probe.calls == [] and not probe.running
    await probe.stop()
    assert probe.calls == []


async def test_a_crashing_task_is_logged_with_the_components_name_at_once_and_wait_raises_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    cleaned: list[str] = []
    probe = Probe(("steady", _forever(cleaned, "steady")), ("flaky", _crash()))
    with caplog.at_level(logging.ERROR, logger="infra.component"):
        async with probe:
            for _ in range(50):  # nobody awaits the task: the log must come by itself
                if caplog.records:
                    break
                await asyncio.sleep(0.01)
            (record,) = caplog.records
            assert "Probe" in record.getMessage() and "flaky" in record.getMessage()
            assert record.exc_info is not None and isinstance(record.exc_info[1], RuntimeError)
            with pytest.raises(RuntimeError, match="the background work broke"):
                await probe.wait()
    assert cleaned == ["steady"], "stop still cancels the task that did not crash"


async def test_a_crash_while_someone_waits_goes_to_them_and_is_not_logged_twice(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Catches a failure reported twice, once by the component and once by its owner (the
    scorer's stall was two ERROR lines with the same text); with no waiter it is logged,
    as the test above checks."""
    cleaned: list[str] = []
    probe = Probe(("steady", _forever(cleaned, "steady")), ("flaky", _crash(after_s=0.05)))
    with caplog.at_level(logging.ERROR, logger="infra.component"):
        async with probe:
            with pytest.raises(RuntimeError, match="the background work broke"):
                await asyncio.wait_for(probe.wait(), 5)
            await asyncio.sleep(0.05)  # the done callback has run
    assert caplog.records == []
    assert cleaned == ["steady"]


async def test_wait_returns_when_the_tasks_end_and_when_stop_cancels_them() -> None:
    await asyncio.wait_for(Probe().wait(), 1)  # nothing supervised: nothing to wait for
    done = Probe(("quick", asyncio.sleep(0.01)))
    async with done:
        await asyncio.wait_for(done.wait(), 5)
    cleaned: list[str] = []
    probe = Probe(("loop", _forever(cleaned, "loop")))
    await probe.start()
    waiter = asyncio.create_task(probe.wait())
    await asyncio.sleep(0.01)
    assert not waiter.done()
    await probe.stop()
    await asyncio.wait_for(waiter, 5)  # cancelled by stop is an end, not a failure
    assert cleaned == ["loop"]


async def test_stop_lets_subclass_drain_first_then_cancels_and_awaits_the_tasks() -> None:
    cleaned: list[str] = []
    probe = Probe(("a", _forever(cleaned, "a")), ("b", _forever(cleaned, "b")))
    await probe.start()
    await asyncio.sleep(0.01)
    await probe.stop()
    assert probe.running_during_stop == [True, True], "_stop runs before the cancellation"
    assert sorted(cleaned) == ["a", "b"], "stop returns only after the tasks have finished"
    assert all(task.cancelled() for task in probe._supervised)


async def test_stop_never_swallows_the_callers_cancellation() -> None:
    entered_cleanup = asyncio.Event()

    async def slow_to_die() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            entered_cleanup.set()
            await asyncio.sleep(3600)  # a cleanup that takes long; cancelled again below
            raise

    probe = Probe(("slow", slow_to_die()))
    await probe.start()
    await asyncio.sleep(0.01)
    stopper = asyncio.create_task(probe.stop())
    await asyncio.wait_for(entered_cleanup.wait(), 5)
    stopper.cancel()  # whoever called stop() is being cancelled (e.g. a second SIGTERM)
    with pytest.raises(asyncio.CancelledError):
        await stopper
    assert stopper.cancelled()
    assert probe._supervised[0].done()


async def test_a_cancelled_start_is_not_swallowed_either() -> None:
    class SlowStart(Component):
        async def _start(self) -> None:
            await asyncio.sleep(3600)

    component = SlowStart()
    starter = asyncio.create_task(component.start())
    await asyncio.sleep(0.01)
    starter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await starter
    await component.stop()  # and stop afterwards still works


async def test_a_failed_start_releases_what_it_acquired() -> None:
    released: list[str] = []

    class Failing(Component):
        async def _start(self) -> None:
            self.supervise(asyncio.sleep(3600), name="held")
            raise RuntimeError("the broker said no")

        async def _stop(self) -> None:
            released.append("stopped")

    component = Failing()
    with pytest.raises(RuntimeError, match="the broker said no"):
        async with component:
            pass  # never reached: __aexit__ is not called when __aenter__ raises
    assert released == ["stopped"]
    assert all(task.done() for task in component._supervised)
    assert not component.running
