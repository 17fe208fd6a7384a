"""Runs ``winnow train`` until SIGINT or SIGTERM, with metrics on its own port."""

import asyncio
import logging
import signal

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from prometheus_client import start_http_server

from trainer.config import TrainerSettings
from trainer.kafka import client_kwargs
from trainer.loop import Trainer
from trainer.metrics import TrainerMetrics

log = logging.getLogger(__name__)
EMBEDDED_DEFAULT = "127.0.0.1:9092"


def run_trainer(settings: TrainerSettings) -> int:
    """Blocks until a signal (exit 0) or a failure of the round loop (exit 1)."""
    if settings.kafka.bootstrap is None:
        settings.kafka.bootstrap = EMBEDDED_DEFAULT
        log.info(
            "no WINNOW_KAFKA_BOOTSTRAP: using %s (`winnow serve`/`winnow broker` default)",
            EMBEDDED_DEFAULT,
        )
    return asyncio.run(_run(settings))


async def _run(settings: TrainerSettings) -> int:
    metrics = TrainerMetrics()
    server, _ = start_http_server(settings.metrics_port, registry=metrics.registry)
    log.info("trainer metrics on http://0.0.0.0:%d/metrics", server.server_address[1])
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await ensure_trainer_topics(settings)
        async with Trainer(settings, metrics) as trainer:
            rounds = asyncio.create_task(trainer.wait())
            stop = asyncio.create_task(stopping.wait())
            await asyncio.wait({rounds, stop}, return_when=asyncio.FIRST_COMPLETED)
            stop.cancel()
            if rounds.done():
                rounds.result()  # raises the loop's failure
                return 1
        return 0
    finally:
        server.shutdown()


async def ensure_trainer_topics(settings: TrainerSettings, partitions: int = 3) -> None:
    """Creates the topics the trainer reads and writes when they are missing."""
    topics = settings.kafka.topics
    names = [topics.label_requests, topics.labels, topics.models, topics.dead_letter]
    if settings.drift_rounds:
        names.append(topics.drift)
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [NewTopic(n, partitions, 1) for n in names if n not in existing]
        if missing:
            await admin.create_topics(missing)
    finally:
        await admin.close()
