"""The worker pool with real processes (a stand-in worker, ``fake_worker.py``): restarts
with backoff, gives up on a crash loop, drains every worker on stop, kills a stuck one."""

import asyncio
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

from service.workers.pool import Worker, WorkerPool

FAKE = Path(__file__).with_name("fake_worker.py")


def fake(behaviours: Callable[[int, int], str], log: Path) -> Callable[[int, Path], list[str]]:
    """The command of a stand-in worker; ``behaviours(index, attempt)`` says what it does."""
    attempts: dict[int, int] = {}

    def command(index: int, socket: Path) -> list[str]:
        attempt = attempts[index] = attempts.get(index, -1) + 1
        return [sys.executable, str(FAKE), str(socket), behaviours(index, attempt), str(log)]

    return command


async def until(check: Callable[[], bool], within: float, what: str) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"{what}: not within {within} s"
        await asyncio.sleep(0.05)


async def test_a_worker_that_exits_is_restarted_after_a_backoff_and_the_pool_is_down_meanwhile(
    tmp_path: Path,
) -> None:
    readied: list[tuple[int, int | None]] = []

    async def on_ready(worker: Worker) -> None:
        readied.append((worker.index, worker.pid))

    command = fake(lambda _index, _attempt: "serve", tmp_path / "log")
    async with WorkerPool(2, command, on_ready=on_ready, backoff_s=(0.5, 1.0)) as pool:
        await until(lambda: pool.all_running, 20, "both workers running")
        first_pid = pool.workers[1].pid
        assert first_pid is not None
        os.kill(first_pid, signal.SIGKILL)
        await until(lambda: not pool.all_running, 10, "worker 1 down after its death")
        await until(lambda: pool.workers[1].last_exit is not None, 10, "its exit seen")
        assert pool.workers[1].last_exit == -9
        await until(lambda: pool.all_running, 20, "worker 1 running again")
        assert pool.workers[1].restarts == 1
        assert pool.workers[1].pid != first_pid
        assert pool.workers[0].restarts == 0
    assert pool.clean_exit  # the restarted one drained on stop like the other
    assert sorted(index for index, _ in readied) == [0, 1, 1]  # told of each start


async def test_a_worker_that_keeps_failing_makes_the_pool_give_up(tmp_path: Path) -> None:
    gave_up: list[bool] = []

    def behaviour(index: int, attempt: int) -> str:
        if index == 0:
            return "serve"
        return "crash-later" if attempt == 0 else "crash"  # ran once, then a crash loop

    command = fake(behaviour, tmp_path / "log")
    async with WorkerPool(
        2, command, on_give_up=lambda: gave_up.append(True), backoff_s=(0.05, 0.1), max_restarts=2
    ) as pool:
        await until(lambda: bool(gave_up), 30, "the pool giving up")
        assert pool.workers[1].phase == "failed"
        assert pool.workers[1].restarts == 2  # started three times: two restarts allowed
        assert pool.workers[0].running  # the other still runs until the supervisor stops
        assert not pool.all_running
    assert gave_up == [True]
    assert not pool.clean_exit


async def test_a_worker_that_fails_before_it_ever_ran_makes_the_pool_give_up_at_once(
    tmp_path: Path,
) -> None:
    # As a single winnow serve exits at once when its model does not load: no crash loop.
    gave_up: list[bool] = []
    command = fake(lambda index, _attempt: "crash" if index == 1 else "serve", tmp_path / "log")
    async with WorkerPool(2, command, on_give_up=lambda: gave_up.append(True)) as pool:
        await until(lambda: bool(gave_up), 20, "the pool giving up")
        assert pool.workers[1].phase == "failed"
        assert pool.workers[1].restarts == 0
    assert not pool.clean_exit


async def test_stop_sends_sigterm_to_every_worker_and_waits_for_each(tmp_path: Path) -> None:
    command = fake(lambda _index, _attempt: "serve", tmp_path / "log")
    async with WorkerPool(3, command) as pool:
        await until(lambda: pool.all_running, 20, "three workers running")
        processes = [worker.process for worker in pool.workers]
    assert [worker.last_exit for worker in pool.workers] == [0, 0, 0]  # SIGTERM: a clean exit
    assert all(p is not None and p.returncode == 0 for p in processes)
    assert pool.clean_exit
    assert not any(worker.socket.parent.exists() for worker in pool.workers)


async def test_a_worker_that_ignores_sigterm_is_killed_after_the_stop_timeout(
    tmp_path: Path,
) -> None:
    command = fake(lambda index, _attempt: "stubborn" if index == 0 else "serve", tmp_path / "log")
    pool = WorkerPool(2, command, stop_timeout_s=1.0)
    async with pool:
        await until(lambda: pool.all_running, 20, "two workers running")
        began = time.monotonic()
    assert time.monotonic() - began < 10
    assert [worker.last_exit for worker in pool.workers] == [-9, 0]
    assert not pool.clean_exit
