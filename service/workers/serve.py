"""``winnow serve --workers N``: the supervisor process.

It starts the embedded broker if no bootstrap is configured (as a single
``winnow serve`` does), then serves the gateway (:mod:`service.workers.gateway`)
on the HTTP port; the gateway's lifespan runs the worker pool. SIGTERM or
SIGINT stops the HTTP server, then every worker drains and commits; the exit
status is 0 when every worker exited 0, and 1 when one did not or the pool gave
up on a worker that kept failing.
"""

import logging
import os
import signal
import sys
from pathlib import Path

import uvicorn

from infra.cpus import share_of_cpus
from service.config import ScorerSettings, Settings
from service.http.serve import exit_cleanly, start_embedded_broker
from service.workers.fanout import AdminFanOut
from service.workers.gateway import create_gateway
from service.workers.pool import WorkerPool

log = logging.getLogger(__name__)


def serve_workers(settings: Settings, *, verbose: bool = False) -> int:
    """Runs ``settings.workers`` scorer processes behind one HTTP endpoint until stopped."""
    settings, broker = start_embedded_broker(settings)
    server: uvicorn.Server | None = None

    def give_up() -> None:
        if server is not None:
            server.should_exit = True

    fanout = AdminFanOut(settings.admin_token)
    pool = WorkerPool(
        settings.workers,
        lambda index, socket: worker_command(index, socket, settings, verbose=verbose),
        env=worker_env(settings),
        on_ready=fanout.replay,
        on_give_up=give_up,
    )
    try:
        app = create_gateway(settings, pool, fanout)
        server = uvicorn.Server(
            uvicorn.Config(
                app,
                host=settings.http.host,
                port=settings.http.port,
                log_level="info",
                lifespan="on",
            )
        )
        signal.signal(signal.SIGTERM, exit_cleanly)
        try:
            server.run()
        except SystemExit:  # the re-raised SIGTERM, after the drain
            pass
        return 0 if server.started and pool.clean_exit else 1
    finally:
        if broker is not None:
            broker.stop()


def worker_command(index: int, socket: Path, settings: Settings, *, verbose: bool) -> list[str]:
    """The command line of worker ``index``: ``winnow serve`` on its socket."""
    command = [sys.executable, "-m", "winnow.cli", *(["-v"] if verbose else []), "serve"]
    if settings.scorer.model_path is not None:
        command += ["--model", str(settings.scorer.model_path.resolve())]
    return [
        *command,
        "--device",
        settings.device,
        "--worker-socket",
        str(socket),
        "--worker-index",
        str(index),
    ]


def worker_cpu_threads(scorer: ScorerSettings, workers: int) -> int:
    """ONNX Runtime's threads in each of ``workers`` scorer processes: the operator's
    ``cpu_threads``, else the process's share of the CPUs."""
    return scorer.cpu_threads or share_of_cpus(workers)


def worker_env(settings: Settings, environ: dict[str, str] | None = None) -> dict[str, str]:
    """The workers' environment: the supervisor's, with the broker it resolved.

    Each worker gets its share of the CPUs for inference (``WINNOW_SCORER_CPU_THREADS``),
    unless one was set: N sessions each sized to every core would run N times as many
    threads as there are CPUs.
    """
    env = dict(os.environ if environ is None else environ)
    env["WINNOW_WORKERS"] = "1"
    env["WINNOW_SCORER_CPU_THREADS"] = str(worker_cpu_threads(settings.scorer, settings.workers))
    if settings.kafka.bootstrap is not None:
        env["WINNOW_KAFKA_BOOTSTRAP"] = settings.kafka.bootstrap
    return env
