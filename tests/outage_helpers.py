"""What the broker-outage tests share: a role's log in slices, polling, readiness, record keys."""

import asyncio
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

from aiokafka import AIOKafkaConsumer

from infra.kafka.admin import topic_partitions
from infra.kafka.connection import client_kwargs
from infra.kafka.settings import KafkaSettings

OUTAGE_S = 30.0
"""How long the slow tests cut the broker off: what issue 14 asks a role to ride out."""

MAX_LINES_PER_OUTAGE = 5
"""WARNING and ERROR lines a role may write for one outage (before: thousands)."""


class RoleLog:
    """The log file of a role's process, read in slices between marks."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def lines(self) -> list[str]:
        return self.path.read_text(errors="replace").splitlines()

    def mark(self) -> int:
        return len(self.lines())

    def since(self, mark: int) -> list[str]:
        return self.lines()[mark:]

    def tail(self, n: int = 60) -> str:
        return "\n".join(self.lines()[-n:])


def loud(lines: list[str]) -> list[str]:
    """The WARNING and ERROR lines (and traceback lines) among ``lines``."""
    return [
        line
        for line in lines
        if " WARNING " in line or " ERROR " in line or line.startswith(("ERROR:", "Traceback"))
    ]


def http_status(url: str) -> int | None:
    """The HTTP status of a GET, or None when nothing answers."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return None


async def until(condition: Callable[[], object], within: float, step: float = 0.25) -> float:
    """Waits (polling) until ``condition()`` is true; returns the seconds it took."""
    started = time.monotonic()
    async with asyncio.timeout(within):
        while not await asyncio.to_thread(condition):  # noqa: ASYNC110 - polls another process
            await asyncio.sleep(step)
    return time.monotonic() - started


async def watch_readiness(url: str, seconds: float) -> list[int | None]:
    """Polls ``url`` for ``seconds``; the statuses seen, in order."""
    seen = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        seen.append(await asyncio.to_thread(http_status, url))
        await asyncio.sleep(0.5)
    return seen


async def record_keys(settings: KafkaSettings, topic: str) -> dict[tuple[int, int], bytes]:
    """``(partition, offset) -> key`` of every record now in ``topic``."""
    partitions = await topic_partitions(settings, topic)
    consumer = AIOKafkaConsumer(
        group_id=None, auto_offset_reset="earliest", **client_kwargs(settings)
    )
    await consumer.start()
    out: dict[tuple[int, int], bytes] = {}
    try:
        consumer.assign(partitions)
        ends = await consumer.end_offsets(partitions)
        async with asyncio.timeout(60):
            while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    for r in records:
                        out[(tp.partition, r.offset)] = r.key or b""
    finally:
        await consumer.stop()
    return out
