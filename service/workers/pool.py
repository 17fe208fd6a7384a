"""The worker processes: started, watched, restarted with backoff, drained on stop.

A worker that exits while the pool is not stopping has failed: its exit status
is logged, the pool is not ready (``/readyz`` answers 503, the worker's
partitions go to the others once the group notices) and the worker is started
again after a backoff (1 s, doubling, at most 30 s). A worker that fails more
than ``max_restarts`` times within ``restart_window_s`` (5 in 10 minutes) is
not started again: the pool gives up (``on_give_up``), and the supervisor
drains the other workers and exits 1, so that the orchestrator restarts the
pod and shows the crash loop, rather than a pod that stays up at part of its
capacity. A worker that fails before it has ever run (a model that does not
load, a broker that refuses the credentials) makes the pool give up at once,
as a single ``winnow serve`` exits at once: restarts cannot mend what never
worked.

Stopping sends SIGTERM to every worker at once (each drains its batches in
flight, commits and leaves the group, as a single ``winnow serve`` does) and
waits for them; a worker still running after ``stop_timeout_s`` is killed.
Workers run in their own session, so a Ctrl-C in a terminal reaches the
supervisor alone and the supervisor stops them; a worker whose supervisor is
gone stops itself (:mod:`service.workers.worker`).
"""

import asyncio
import logging
import shutil
import signal
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from infra.component import Component
from service.workers.client import WorkerUnreachable, call

log = logging.getLogger(__name__)

WorkerPhase = Literal["starting", "running", "restarting", "stopping", "stopped", "failed"]
WorkerCommand = Callable[[int, Path], Sequence[str]]
"""The command line of worker ``index`` listening on ``socket``."""
OnReady = Callable[["Worker"], Awaitable[None]]
"""Called once a (re)started worker answers, before it counts as running; raising fails it."""

_LISTEN_POLL_S = 0.2


@dataclass
class Worker:
    """One worker process as the supervisor sees it."""

    index: int
    socket: Path
    phase: WorkerPhase = "starting"
    process: asyncio.subprocess.Process | None = None
    restarts: int = 0
    last_exit: int | None = None
    problem: str | None = None
    has_run: bool = False
    failures: deque[float] = field(default_factory=deque, repr=False)

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.returncode is None

    @property
    def running(self) -> bool:
        """Started, answering, given the admin changes: a member of the pool's service."""
        return self.phase == "running" and self.alive


class WorkerPool(Component):
    """Keeps ``count`` worker processes running until stopped.

    Use as ``async with WorkerPool(...) as pool:``; :attr:`workers` lists them.
    """

    def __init__(
        self,
        count: int,
        command: WorkerCommand,
        *,
        env: Mapping[str, str] | None = None,
        on_ready: OnReady | None = None,
        on_give_up: Callable[[], None] | None = None,
        backoff_s: tuple[float, float] = (1.0, 30.0),
        max_restarts: int = 5,
        restart_window_s: float = 600.0,
        stop_timeout_s: float = 120.0,
    ) -> None:
        """Prepares the pool; nothing starts before ``start()``.

        Args:
            count: worker processes (at least 1).
            command: the command line of a worker, given its index and socket path.
            env: the workers' environment (None: the supervisor's).
            on_ready: called when a worker answers, before it counts as running.
            on_give_up: called once when a worker has failed too often.
            backoff_s: the first and the longest wait before a restart.
            max_restarts: failures of one worker within ``restart_window_s`` that
                are restarted; one more and the pool gives up.
            restart_window_s: how far back failures count.
            stop_timeout_s: how long a worker may drain before it is killed.
        """
        super().__init__()
        if count < 1:
            raise ValueError(f"a worker pool needs at least one worker, not {count}")
        self.count = count
        self.workers: list[Worker] = []
        self.gave_up = False
        self._command = command
        self._env = None if env is None else dict(env)
        self._on_ready = on_ready
        self._on_give_up = on_give_up
        self._backoff = backoff_s
        self._max_restarts = max_restarts
        self._window = restart_window_s
        self._stop_timeout = stop_timeout_s
        self._stopping = False
        self._folder: Path | None = None

    @property
    def all_running(self) -> bool:
        """Every worker runs, and the pool is not stopping."""
        return not self._stopping and all(worker.running for worker in self.workers)

    @property
    def clean_exit(self) -> bool:
        """After stop: every worker exited 0 and none failed for good."""
        return not self.gave_up and all(worker.last_exit == 0 for worker in self.workers)

    # -- lifecycle -------------------------------------------------------------------------

    async def _start(self) -> None:
        # The sockets go in a folder of the supervisor's own (mode 0700).
        self._folder = Path(tempfile.mkdtemp(prefix="winnow-workers-"))
        self.workers = [
            Worker(index, self._folder / f"worker-{index}.sock") for index in range(self.count)
        ]
        for worker in self.workers:
            self.supervise(self._keep(worker), name=f"worker-{worker.index}")
        log.info("started %d scorer workers (sockets in %s)", self.count, self._folder)

    async def _stop(self) -> None:
        self._stopping = True
        await self._cancel_supervised()  # no restart from here on; the processes stay
        live = [worker for worker in self.workers if worker.alive]
        for worker in live:
            worker.phase = "stopping"
            _signal(worker, signal.SIGTERM)
        if live:
            log.info("SIGTERM sent to %d workers: each drains, commits and leaves", len(live))
            await asyncio.wait(
                [asyncio.ensure_future(_wait(worker)) for worker in live],
                timeout=self._stop_timeout,
            )
        for worker in live:
            if worker.alive:
                log.error(
                    "worker %d (pid %s) still running %.0f s after SIGTERM: killed",
                    worker.index,
                    worker.pid,
                    self._stop_timeout,
                )
                _signal(worker, signal.SIGKILL)
            worker.last_exit = await _wait(worker)
            worker.phase = "stopped"
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
        log.info("workers stopped: exit statuses %s", [w.last_exit for w in self.workers])

    # -- one worker ------------------------------------------------------------------------

    async def _keep(self, worker: Worker) -> None:
        """Runs ``worker``, and again after each failure, until stopped or given up."""
        while True:
            await self._run_once(worker)
            delay = self._failed(worker)
            if delay is None:
                self._give_up(worker)
                return
            worker.phase = "restarting"
            await asyncio.sleep(delay)
            worker.restarts += 1

    async def _run_once(self, worker: Worker) -> None:
        """Starts the process, makes it running once it answers; returns when it exits."""
        worker.socket.unlink(missing_ok=True)  # a dead predecessor's
        worker.phase, worker.problem = "starting", None
        worker.process = await asyncio.create_subprocess_exec(
            *self._command(worker.index, worker.socket),
            env=self._env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.info("worker %d started: pid=%d", worker.index, worker.pid)
        if await self._answers(worker):
            try:
                if self._on_ready is not None:
                    await self._on_ready(worker)
            except Exception as error:
                worker.problem = str(error)
                log.error("worker %d (pid %d) is stopped: %s", worker.index, worker.pid, error)
                _signal(worker, signal.SIGTERM)
            else:
                worker.phase, worker.has_run = "running", True
                log.info("worker %d running: pid=%d", worker.index, worker.pid)
        worker.last_exit = await _wait(worker)

    async def _answers(self, worker: Worker) -> bool:
        """Waits until the worker answers on its socket (its scorer has started)."""
        while worker.alive:
            if worker.socket.exists():
                try:
                    if (await call(worker.socket, "GET", "/healthz", timeout=2.0)).ok:
                        return True
                except WorkerUnreachable:
                    pass
            await asyncio.sleep(_LISTEN_POLL_S)
        return False

    def _failed(self, worker: Worker) -> float | None:
        """Records a failure; the wait before the restart, or None to give up."""
        now = time.monotonic()
        worker.failures.append(now)
        while now - worker.failures[0] > self._window:
            worker.failures.popleft()
        recent = len(worker.failures)
        if recent > self._max_restarts or not worker.has_run:
            worker.phase = "failed"
            return None
        first, longest = self._backoff
        delay = min(longest, first * 2 ** (recent - 1))
        log.error(
            "worker %d (pid %s) exited with status %s; /readyz answers 503 until it runs "
            "again; restarting in %.0f s (failure %d of %d allowed in %.0f s)",
            worker.index,
            worker.pid,
            worker.last_exit,
            delay,
            recent,
            self._max_restarts,
            self._window,
        )
        return delay

    def _give_up(self, worker: Worker) -> None:
        if worker.has_run:
            why = f"failed {len(worker.failures)} times within {self._window:.0f} s"
        else:
            why = "failed before it ever ran (see its log above)"
        log.error(
            "worker %d %s, last exit status %s: giving up; the other workers drain and the "
            "supervisor exits 1",
            worker.index,
            why,
            worker.last_exit,
        )
        if not self.gave_up:
            self.gave_up = True
            if self._on_give_up is not None:
                self._on_give_up()


async def _wait(worker: Worker) -> int:
    assert worker.process is not None
    return await worker.process.wait()


def _signal(worker: Worker, signum: int) -> None:
    if worker.process is not None and worker.process.returncode is None:
        try:
            worker.process.send_signal(signum)
        except ProcessLookupError:
            pass
