"""One small base for Winnow's long-lived async parts.

A component is started once and stopped once (``stop()`` is idempotent and
safe before ``start()``), works as ``async with``, and runs its background
work as *supervised* tasks: a task that crashes is logged with its component's
name at once, not when someone happens to await it, and ``stop()`` cancels and
awaits whatever is still running. ``CancelledError`` is never swallowed. While
someone awaits :meth:`Component.wait`, a crash goes to them instead (they get it
at once, and report it once: a stall, for instance, is one line, not two).
"""

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, Self

from infra.errors import WinnowError

log = logging.getLogger(__name__)


class Component:
    """Base of long-lived parts: subclasses implement ``_start`` and ``_stop``.

    ``_stop`` runs before the remaining supervised tasks are cancelled, so a
    subclass can let them drain first (and commit what they finished).
    """

    def __init__(self) -> None:
        self._supervised: list[asyncio.Task[Any]] = []
        self._started = False
        self._stopped = False
        self._waiters = 0

    @property
    def running(self) -> bool:
        """Started and not yet stopped."""
        return self._started and not self._stopped

    async def start(self) -> None:
        """Starts the component; a second call, or one after :meth:`stop`, does nothing."""
        if self._started or self._stopped:  # started after a stop, it could never be stopped
            return
        self._started = True
        try:
            await self._start()
        except BaseException:
            # Undo what the failed start acquired: ``async with`` never calls __aexit__ here.
            await self.stop()
            raise

    async def stop(self) -> None:
        """Stops the component; idempotent, and a no-op if it never started."""
        if self._stopped or not self._started:
            self._stopped = True
            return
        self._stopped = True
        try:
            await self._stop()
        finally:
            await self._cancel_supervised()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _start(self) -> None:
        """Connects and starts background work (override)."""

    async def _stop(self) -> None:
        """Drains and releases what ``_start`` acquired (override)."""

    def supervise(self, coro: Coroutine[Any, Any, Any], name: str) -> "asyncio.Task[Any]":
        """Runs ``coro`` as a background task whose crash is logged at once."""
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._log_crash)
        self._supervised.append(task)
        return task

    async def wait(self) -> None:
        """Returns when every supervised task has ended; raises the first failure, which the
        caller reports: a crash while someone waits here is not logged by the component."""
        if not self._supervised:
            return
        self._waiters += 1
        try:
            done, _ = await asyncio.wait(self._supervised, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            self._waiters -= 1
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def _cancel_supervised(self) -> None:
        pending = [t for t in self._supervised if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)

    def _log_crash(self, task: "asyncio.Task[Any]") -> None:
        if task.cancelled() or task.exception() is None or self._waiters:
            return
        error = task.exception()
        if isinstance(error, WinnowError):  # raised on purpose, with its reason: one line
            log.error(
                "%s: background task %s stopped: %s", type(self).__name__, task.get_name(), error
            )
            return
        log.error(
            "%s: background task %s crashed",
            type(self).__name__,
            task.get_name(),
            exc_info=error,
        )
