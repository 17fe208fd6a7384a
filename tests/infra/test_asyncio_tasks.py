"""``winnow_asyncio_tasks``: the count a soak reads to see a task leak."""

import asyncio
import threading

from prometheus_client import CollectorRegistry

from infra.asyncio_tasks import track_asyncio_tasks


async def test_the_gauge_counts_live_tasks_even_when_scraped_from_another_thread() -> None:
    """Would catch a gauge that counts nothing, or only from the loop's own thread (the
    trainer's metrics server scrapes from a thread of its own)."""
    registry = CollectorRegistry()
    track_asyncio_tasks(registry)

    def scraped() -> float:
        found: list[float | None] = []
        thread = threading.Thread(
            target=lambda: found.append(registry.get_sample_value("winnow_asyncio_tasks"))
        )
        thread.start()
        thread.join()
        assert found[0] is not None
        return found[0]

    before = scraped()
    stop = asyncio.Event()
    tasks = [asyncio.create_task(stop.wait()) for _ in range(5)]
    await asyncio.sleep(0)
    assert scraped() == before + 5
    stop.set()
    await asyncio.gather(*tasks)
    assert scraped() == before
