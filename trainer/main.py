"""Runs ``winnow train`` until SIGINT or SIGTERM, with metrics on its own port."""

import asyncio
import logging
import signal

from prometheus_client import start_http_server

from infra.asyncio_tasks import track_asyncio_tasks
from infra.cpus import cpu_limit
from infra.errors import WinnowError
from infra.kafka.admin import ensure_topics
from infra.kafka.outage import BrokerWatch, describe_fatal, is_fatal
from trainer.config import TrainerSettings
from trainer.loop import Trainer
from trainer.metrics import TrainerMetrics

log = logging.getLogger(__name__)


def torch_thread_count(settings: TrainerSettings) -> int | None:
    """``torch_threads``; with 0 the CPUs a cgroup quota or affinity mask leaves the process,
    where that is below the machine's cores; None: torch's own default.

    torch counts the machine's cores, so a pod limited to 2 CPUs on a 64-core node would run
    64 threads that spin and get throttled.
    """
    return settings.torch_threads or cpu_limit()


def apply_torch_threads(settings: TrainerSettings) -> None:
    """Sets torch's intra-op threads for the process (:func:`torch_thread_count`).

    Process-wide, so the command sets it, not the ``Trainer`` (tests run several in one
    process); the round worker's child takes the same count.
    """
    threads = torch_thread_count(settings)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
        log.info("torch runs %d thread(s) per operation", threads)


def run_trainer(settings: TrainerSettings) -> int:
    """Blocks until a signal (exit 0) or a failure of the round loop (exit 1).

    A broker outage is ridden out (logged once, then summarised); an error Kafka will
    keep refusing (credentials, ACLs), or a ``WinnowError`` (a reason given on purpose),
    ends the process with one line and exit 1; anything else with its traceback.

    With no ``WINNOW_KAFKA_BOOTSTRAP`` the trainer connects to the embedded
    broker's address (``127.0.0.1:WINNOW_KAFKA_EMBEDDED_PORT``), where
    ``winnow serve`` and ``winnow broker`` start it.
    """
    if settings.kafka.bootstrap is None:
        embedded = f"127.0.0.1:{settings.kafka.embedded_port}"
        kafka = settings.kafka.model_copy(update={"bootstrap": embedded})
        settings = settings.model_copy(update={"kafka": kafka})
        log.info(
            "no WINNOW_KAFKA_BOOTSTRAP: using %s (`winnow serve`/`winnow broker` default)",
            embedded,
        )
    apply_torch_threads(settings)
    try:
        return asyncio.run(_run(settings))
    except Exception as error:
        if is_fatal(error):
            log.error("%s", describe_fatal("trainer", error))
        elif isinstance(error, WinnowError):  # a reason given on purpose: one line
            log.error("trainer stopped: %s", error)
        else:
            raise
        return 1


async def _run(settings: TrainerSettings) -> int:
    metrics = TrainerMetrics()
    track_asyncio_tasks(metrics.registry)
    server, _ = start_http_server(settings.metrics_port, registry=metrics.registry)
    log.info("trainer metrics on http://0.0.0.0:%d/metrics", server.server_address[1])
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stopping.set)
    try:
        await ensure_trainer_topics(settings)
        # The watch first and last: it quiets the clients' retries while the trainer stops.
        async with (
            BrokerWatch(settings.kafka, "trainer") as broker,
            Trainer(settings, metrics, broker_reachable=lambda: broker.reachable) as trainer,
        ):
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


async def ensure_trainer_topics(settings: TrainerSettings) -> None:
    """Creates the topics the trainer reads and writes when they are missing.

    New topics get ``WINNOW_KAFKA_PARTITIONS`` partitions and
    ``WINNOW_KAFKA_REPLICATION_FACTOR`` replicas; existing ones are left alone.

    Raises:
        ConfigError: the connection settings are inconsistent.
        BrokerError: the broker is unreachable or refused a topic (e.g. more
            replicas than it has brokers).
    """
    topics = settings.kafka.topics
    names = [topics.label_requests, topics.labels, topics.models, topics.dead_letter]
    if settings.drift_rounds:
        names.append(topics.drift)
    await ensure_topics(settings.kafka, names)
