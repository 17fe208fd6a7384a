"""``winnow serve``: the scorer and its HTTP API in one process.

With ``--workers N`` (N > 1) the same function runs in each worker process,
listening on a private Unix socket instead of a TCP port; the supervisor
(:mod:`service.workers`) answers on the port for all of them.
"""

import logging
import signal
from pathlib import Path
from types import FrameType

import uvicorn

from infra.kafka.broker import EmbeddedBroker
from service.config import Settings
from service.http.api import create_app

log = logging.getLogger(__name__)


def serve(settings: Settings, *, uds: Path | None = None) -> int:
    """Runs until SIGINT/SIGTERM (drains and commits) or a scorer failure (exit 1).

    With no ``WINNOW_KAFKA_BOOTSTRAP`` an embedded broker is started on loopback.

    Args:
        settings: everything ``winnow serve`` reads from the environment.
        uds: listen on this Unix socket instead of ``settings.http`` (a worker of
            ``--workers N``; its supervisor's requests are not access-logged).
    """
    settings, broker = start_embedded_broker(settings)
    failed: list[bool] = []
    server: uvicorn.Server | None = None

    def stop_server() -> None:
        failed.append(True)
        if server is not None:
            server.should_exit = True

    try:
        app = create_app(settings, on_failure=stop_server)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=settings.http.host,
                port=settings.http.port,
                uds=None if uds is None else str(uds),
                log_level="info",
                access_log=uds is None,
                lifespan="on",
            )
        )
        # uvicorn drains on SIGTERM, then re-raises it; a drained stop is a clean exit.
        signal.signal(signal.SIGTERM, exit_cleanly)
        server.run()
        return 0 if server.started and not failed else 1
    finally:
        if broker is not None:
            broker.stop()


def start_embedded_broker(settings: Settings) -> tuple[Settings, EmbeddedBroker | None]:
    """Starts the embedded broker when no bootstrap is configured; the settings that use it."""
    if settings.kafka.bootstrap is not None:
        return settings, None
    broker = EmbeddedBroker(settings.kafka.embedded_port)
    broker.start()
    kafka = settings.kafka.model_copy(update={"bootstrap": broker.bootstrap})
    log.info("no WINNOW_KAFKA_BOOTSTRAP: started the embedded broker on %s", broker.bootstrap)
    return settings.model_copy(update={"kafka": kafka}), broker


def exit_cleanly(signum: int, frame: FrameType | None) -> None:
    """The SIGTERM handler after uvicorn's own: a drained stop exits 0."""
    raise SystemExit(0)
