"""Runs the labeling app or the Label Studio bridge under uvicorn."""

import logging
import signal
from collections.abc import Callable
from types import FrameType

import uvicorn
from fastapi import FastAPI

from infra.kafka.broker import EmbeddedBroker
from infra.kafka.settings import KafkaSettings

log = logging.getLogger(__name__)


def serve_app(
    kafka: KafkaSettings,
    build: Callable[[KafkaSettings, Callable[[], None]], FastAPI],
    host: str,
    port: int,
) -> int:
    """Runs ``build(kafka, on_failure)`` (a FastAPI app factory) until SIGINT/SIGTERM (exit 0),
    or until the app calls ``on_failure`` (exit 1, so the orchestrator restarts it).

    With no ``WINNOW_KAFKA_BOOTSTRAP`` the embedded broker is started on loopback.
    """
    broker: EmbeddedBroker | None = None
    if kafka.bootstrap is None:
        broker = EmbeddedBroker(kafka.embedded_port)
        broker.start()
        kafka = kafka.model_copy(update={"bootstrap": broker.bootstrap})
        log.info("no WINNOW_KAFKA_BOOTSTRAP: started the embedded broker on %s", broker.bootstrap)
    failed: list[bool] = []
    server: uvicorn.Server | None = None

    def stop_server() -> None:
        failed.append(True)
        if server is not None:
            server.should_exit = True

    try:
        app = build(kafka, stop_server)
        server = uvicorn.Server(
            uvicorn.Config(app, host=host, port=port, log_level="info", lifespan="on")
        )
        signal.signal(signal.SIGTERM, _exit_cleanly)
        server.run()
        return 0 if server.started and not failed else 1
    finally:
        if broker is not None:
            broker.stop()


def _exit_cleanly(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)
