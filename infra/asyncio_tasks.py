"""A gauge of the asyncio tasks alive in a role's event loop.

Each role's ``/metrics`` exposes ``winnow_asyncio_tasks``: a count that only
grows while the load stays steady is a task leak (``winnow bench soak`` watches
it over time, next to RSS, file descriptors and threads).
"""

import asyncio

from prometheus_client import CollectorRegistry, Gauge


def track_asyncio_tasks(
    registry: CollectorRegistry, loop: asyncio.AbstractEventLoop | None = None
) -> Gauge:
    """Adds ``winnow_asyncio_tasks`` to ``registry``, counted at each scrape.

    Args:
        registry: the role's registry.
        loop: the event loop to count (default: the running one). The scrape may
            come from another thread, as the trainer's metrics server does.
    """
    watched = loop or asyncio.get_running_loop()
    gauge = Gauge(
        "winnow_asyncio_tasks",
        "asyncio tasks not yet done in this process's event loop",
        registry=registry,
    )
    gauge.set_function(lambda: len(asyncio.all_tasks(watched)))
    return gauge
