"""Stopping a Kafka client within a bounded time, whether or not the broker answers.

``AIOKafkaProducer.stop()`` waits for every unsent batch (up to the request
timeout, 40 s) and ``AIOKafkaConsumer.stop()`` leaves the group; with the
broker away neither can finish in time, and aiokafka 0.14's fetcher lets the
cancellation of a fetch that was backing off escape from ``consumer.stop()``
as a ``CancelledError``. A role stopping during an outage must still exit
within its drain timeout, with one clear line rather than a traceback.
"""

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from typing import Any

log = logging.getLogger(__name__)

CLOSE_TIMEOUT_S = 5.0


async def stop_client(client: Any, what: str, timeout_s: float = CLOSE_TIMEOUT_S) -> bool:
    """Stops an aiokafka producer, consumer or admin client within ``timeout_s``.

    Args:
        client: anything with ``async stop()``, or ``close()`` for the admin client.
        what: names the client in the log line when it could not stop cleanly.
        timeout_s: longest wait for a clean stop; then its connections are closed.

    Returns:
        Whether it stopped cleanly; if not, unsent records were dropped (their
        frames were never committed, so they are read again).

    Raises:
        CancelledError: when the caller itself is cancelled (never swallowed).
    """
    stop = getattr(client, "stop", None) or client.close
    task = asyncio.create_task(stop(), name=f"stop {what}")
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    if done and not task.cancelled() and task.exception() is None:
        return True
    if not done:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        log.info("%s did not stop within %.0f s; closing its connections", what, timeout_s)
    elif not task.cancelled():
        log.info("%s stopped with %r; closing its connections", what, task.exception())
    # What stop() did not reach: the connections (a private attribute on the consumer).
    inner = getattr(client, "_client", None) or getattr(client, "client", None)
    if inner is not None and inner is not client and hasattr(inner, "close"):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(inner.close(), 1.0)
    return False


async def drain(
    tasks: "list[asyncio.Task[Any]]",
    timeout_s: float,
    reachable: "Callable[[], bool]",
    poll_s: float = 0.25,
) -> "set[asyncio.Task[Any]]":
    """Waits for ``tasks`` to end, at most ``timeout_s``, and no longer once the broker is away.

    Draining means delivering what is in flight and committing it; with the broker
    unreachable neither can happen, so a stop during an outage does not wait for it.
    Returns at the first task that fails, too (a crashed stage cannot drain the others).

    Returns:
        The tasks still running.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    if any(_failed(t) for t in tasks):
        return {t for t in tasks if not t.done()}
    pending = {t for t in tasks if not t.done()}
    while pending and reachable():
        left = deadline - loop.time()
        if left <= 0:
            break
        done, pending = await asyncio.wait(
            pending, timeout=min(poll_s, left), return_when=asyncio.FIRST_EXCEPTION
        )
        if any(_failed(t) for t in done):
            break
    return pending


def _failed(task: "asyncio.Task[Any]") -> bool:
    return task.done() and not task.cancelled() and task.exception() is not None


async def cancel_all(tasks: "Iterable[asyncio.Task[Any]]", every_s: float = 0.5) -> None:
    """Cancels ``tasks`` and waits until each has ended, cancelling again those that go on.

    A pipeline stage cancelled while its ``finally`` hands an end marker to a full queue
    (whose reader is gone) blocks there; a second cancellation ends it.
    """
    pending = {t for t in tasks if not t.done()}
    while pending:
        for task in pending:
            task.cancel()
        _, pending = await asyncio.wait(pending, timeout=every_s)
