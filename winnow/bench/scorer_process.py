"""The scorer of ``winnow bench throughput``, in a process of its own, measuring its host cost.

Run by the bench as ``python -m winnow.bench.scorer_process --model M ...`` with the
``WINNOW_KAFKA_*`` environment of the run. It loads the model, starts a
:class:`~service.pipeline.scorer.Scorer` on the (preloaded) frames topic and talks to the
bench with one JSON object per line on stdout:

- ``{"event": "starting"}`` just before the scorer starts (the join begins);
- ``{"event": "assigned"}`` once it owns partitions: its CPU clock and profiler start;
- after the bench writes a line to stdin (it has read every decision back):
  ``{"event": "result", ...}`` with the CPU time of the window, per thread and per stage
  (:mod:`winnow.bench.host_cost`), and how many predictions the scorer delivered.

Its own process, so that the OS's CPU time is the scorer's alone: the broker, the frames'
producer and the consumer that reads decisions back all run elsewhere.
"""

import argparse
import asyncio
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from infra.kafka.settings import KafkaSettings
from service.config import PolicySettings, ScorerSettings, Settings
from service.metrics import ScorerMetrics
from service.model.inference import OnnxModel
from service.pipeline.accounting import Accounting
from service.pipeline.scorer import Scorer
from service.selection.policy import QueryPolicy
from winnow.bench.host_cost import (
    STAGES,
    CpuClock,
    StageSampler,
    stage_breakdown,
    thread_names,
)

BENCH_FETCH_MAX_WAIT_MS = 20
"""The bench's scorer fetch wait: its partitions stay small and its frames come in large
batches, where the embedded broker answers a short wait; a short wait keeps its latency
figures those of the scorer, not of the broker's long poll (the soak uses 500 ms,
see ``ScorerSettings.fetch_max_wait_ms``)."""

JOIN_TIMEOUT_S = 60.0


def _emit(event: str, **fields: Any) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


async def _stdin_line() -> bytes:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    return await reader.readline()


async def _first(*awaitables: "asyncio.Future[Any]") -> None:
    """Waits for the first to finish; a failure of any of them is raised."""
    done, _ = await asyncio.wait(awaitables, return_when=asyncio.FIRST_COMPLETED)
    for task in done:
        task.result()


async def run(args: argparse.Namespace) -> None:
    settings = Settings(
        device=args.device,
        kafka=KafkaSettings(),
        scorer=ScorerSettings(
            max_batch_size=args.batch_size,
            group_id=args.group_id,
            fetch_max_wait_ms=BENCH_FETCH_MAX_WAIT_MS,
        ),
        policy=PolicySettings(),
    )
    model = OnnxModel.load(  # WINNOW_SCORER_CPU_THREADS sizes its pool, as in a worker
        Path(args.model), args.device, intra_op_threads=settings.scorer.inference_threads
    )
    model.warm_up(args.batch_size)
    delivered = 0

    def count(predictions: list[dict[str, Any]]) -> None:
        nonlocal delivered
        delivered += len(predictions)

    metrics, policy = ScorerMetrics(), QueryPolicy.from_settings(settings.policy)
    accounting = Accounting(metrics, policy, on_predictions=count)
    scorer = Scorer(settings, model, metrics=metrics, policy=policy, accounting=accounting)
    sampler = StageSampler(args.sample_ms / 1000) if args.sample_ms > 0 else None
    if sampler is not None:
        sampler.start()
    _emit("starting")
    await scorer.start()
    try:
        await _measure(scorer, sampler, lambda: delivered)
    finally:  # a scorer that failed is stopped too, so that the process ends and says why
        if sampler is not None:
            sampler.stop()
        await scorer.stop()


async def _measure(
    scorer: Scorer, sampler: StageSampler | None, delivered: Callable[[], int]
) -> None:
    """From the scorer's start to the bench's stop: the measured window's result event."""
    watch = asyncio.create_task(scorer.wait(), name="scorer")
    try:
        deadline = time.monotonic() + JOIN_TIMEOUT_S
        while not scorer.assigned:
            if watch.done():
                await watch
                raise RuntimeError("the scorer stopped before joining its group")
            if time.monotonic() > deadline:
                raise RuntimeError(f"no partitions assigned within {JOIN_TIMEOUT_S:g} s")
            await asyncio.sleep(0.002)
        start = CpuClock.snapshot()
        if sampler is not None:
            sampler.resume()
        _emit("assigned")
        await _first(asyncio.ensure_future(_stdin_line()), watch)
        end = CpuClock.snapshot()
        if sampler is not None:
            sampler.pause()
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
    threads = CpuClock.per_thread(start, end)
    profiler_s = threads.pop(sampler.native_id or 0, 0.0) if sampler is not None else 0.0
    process_s = end.process_s - start.process_s - profiler_s
    stages = stage_breakdown(threads, sampler.counts if sampler else {}, process_s)
    by_name: dict[str, float] = {}
    for tid, name in thread_names(list(threads)).items():
        by_name[name] = by_name.get(name, 0.0) + threads[tid]
    _emit(
        "result",
        cpu_s=process_s,
        profiler_cpu_s=profiler_s,
        stages_cpu_s={s: stages[s] for s in STAGES},
        threads_cpu_s=by_name,
        samples=sampler.samples if sampler is not None else 0,
        delivered=delivered(),
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m winnow.bench.scorer_process")
    parser.add_argument("--model", required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--group-id", required=True)
    parser.add_argument("--sample-ms", type=float, default=2.0, help="0: no stage profile")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    asyncio.run(run(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
