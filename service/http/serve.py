"""``winnow serve``: the scorer and its HTTP API in one process."""

import logging
import signal
from types import FrameType

import uvicorn

from infra.kafka.broker import EmbeddedBroker
from service.config import Settings
from service.http.api import create_app

log = logging.getLogger(__name__)


def serve(settings: Settings) -> int:
    """Runs until SIGINT/SIGTERM (drains and commits) or a scorer failure (exit 1).

    With no ``WINNOW_KAFKA_BOOTSTRAP`` an embedded broker is started on loopback.
    """
    broker: EmbeddedBroker | None = None
    if settings.kafka.bootstrap is None:
        broker = EmbeddedBroker(settings.kafka.embedded_port)
        broker.start()
        kafka = settings.kafka.model_copy(update={"bootstrap": broker.bootstrap})
        settings = settings.model_copy(update={"kafka": kafka})
        log.info("no WINNOW_KAFKA_BOOTSTRAP: started the embedded broker on %s", broker.bootstrap)
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
                log_level="info",
                lifespan="on",
            )
        )
        # uvicorn drains on SIGTERM, then re-raises it; a drained stop is a clean exit.
        signal.signal(signal.SIGTERM, _exit_cleanly)
        server.run()
        return 0 if server.started and not failed else 1
    finally:
        if broker is not None:
            broker.stop()


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
