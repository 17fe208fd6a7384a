"""The scorer: consume, decode, batch, score, decide, route, commit.

Six stages run as supervised tasks joined by small queues, so decoding batch
n+1 overlaps inference of batch n and delivery of batch n-1. CPU work (decode,
ONNX Runtime and the scores) runs in thread pools; the event loop only moves
bytes and decides. On the CPU several batches may be inferred at once
(``WINNOW_SCORER_CPU_PARALLELISM``): the forward stage starts each batch's model
run as soon as a thread is free, and the decide stage takes the runs' outputs
in stream order, so decisions, records and commits keep the stream's order.
Offsets are committed only after every record produced for a batch is
acknowledged (at-least-once from frame to decision): records go through
``infra.kafka.delivery`` and offsets through ``infra.kafka.offsets``.

The scorer keeps the stages, the Kafka clients, model swaps and rebalances.
The rest comes through the constructor: the policy decides (and says which
scores it needs), the scoring engine computes them, the accounting counts what
was delivered, and observers and swap listeners (the drift monitor) see each
scored batch and each model served.
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from infra import blas
from infra.component import Component
from infra.kafka.closing import cancel_all, drain, stop_client
from infra.kafka.consumer import create_consumer
from infra.kafka.delivery import Delivery, InFlight
from infra.kafka.producer import create_producer
from service.config import Settings
from service.metrics import ScorerMetrics
from service.model.inference import CPU, OnnxModel, run_rows
from service.pipeline.accounting import Accounting
from service.pipeline.batching import Batch, collect_batch
from service.pipeline.cap_shares import CapShares
from service.pipeline.checkpoint import DRAIN_TIMEOUT_S, Checkpoint
from service.pipeline.dali_decode import batch_decoder
from service.pipeline.decode import DecodeLimits
from service.pipeline.exemplars import Exemplars
from service.pipeline.records import batch_records
from service.pipeline.run_place import RunPlace
from service.pipeline.watchdog import ProgressWatchdog
from service.scoring.committee import COMMITTEE_UTILITIES
from service.scoring.engine import Forward, Scored, ScoringEngine
from service.selection.filters import DecisionContext
from service.selection.policy import QueryPolicy

log = logging.getLogger(__name__)

_QUEUE_DEPTH = 1
_ACK_DEPTH = 4  # batches sent and waiting for acks: overlaps broker round trips with work

BatchObserver = Callable[[Batch], None]
"""Sees each scored batch (probabilities, embeddings, scores, decisions, inputs) on the event
loop; must return at once (hand heavy work to a task or thread), e.g. the drift monitor."""
SwapListener = Callable[[OnnxModel], None]
"""Told of every model the scorer serves, the first one included, on the event loop."""


@dataclass(slots=True)
class _Running:
    """A batch whose model run has started (None: no frame of it decoded)."""

    batch: Batch
    run: "asyncio.Future[Forward] | None"


@dataclass(slots=True)
class _Sent:
    """A batch whose records are sent and whose acks are awaited."""

    batch: Batch
    records: InFlight
    predictions: list[dict[str, Any]]


class Scorer(Component):
    """Scores every frame on the frames topic and routes the chosen ones for labeling.

    Use as ``async with Scorer(settings, model) as scorer:``; ``stop()`` drains the
    batches in flight, commits what was delivered and nothing more.

    Args:
        settings: ``WINNOW_*``; the Kafka, scorer and (for the defaults) policy parts.
        model: the first model served.
        metrics: the scorer's metrics; a fresh registry if None.
        policy: the query decision; built from ``settings.policy`` if None.
        engine: computes what the policy needs; built from ``settings.policy`` if None.
        accounting: counts delivered batches; one without feedback or hook if None.
        on_batch: observers of each scored batch, in order.
        on_swap: listeners told of each model served (the first at construction).
        broker_reachable: whether the broker answers now (``BrokerWatch.reachable``); a stop
            does not wait to drain while it does not.
    """

    def __init__(
        self,
        settings: Settings,
        model: OnnxModel,
        *,
        metrics: ScorerMetrics | None = None,
        policy: QueryPolicy | None = None,
        engine: ScoringEngine | None = None,
        accounting: Accounting | None = None,
        on_batch: Sequence[BatchObserver] = (),
        on_swap: Sequence[SwapListener] = (),
        broker_reachable: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__()
        self._broker_reachable = broker_reachable
        self.settings = settings
        self.metrics = metrics or ScorerMetrics()
        self.policy = policy or QueryPolicy.from_settings(settings.policy)
        self.accounting = accounting or Accounting(self.metrics, self.policy)
        self.started_at = datetime.now(UTC)
        self._engine = engine or ScoringEngine.from_settings(settings.policy)
        self._on_batch, self._on_swap = tuple(on_batch), tuple(on_swap)
        scorer = settings.scorer
        limits = DecodeLimits(max_bytes=scorer.max_frame_bytes, max_pixels=scorer.max_pixels)
        self._decoder = batch_decoder(scorer, limits, model.provider)
        # Model runs, up to this many batches at once (one on CUDA: the GPU parallelizes).
        self._concurrency = scorer.concurrent_batches if model.provider == CPU else 1
        self._infer_pool = ThreadPoolExecutor(self._concurrency, "winnow-infer")
        self._run_place = RunPlace()  # a model that runs in a blink runs on the loop
        self._runs: set[asyncio.Future[Forward]] = set()  # started, not yet taken to decide
        self._score_pool = ThreadPoolExecutor(1, "winnow-score")  # committees, in stream order
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._delivery: Delivery | None = None
        self._checkpoint: Checkpoint | None = None
        self._watchdog: ProgressWatchdog | None = None
        self._stopping = asyncio.Event()
        self._exemplars = Exemplars(self.policy.memory)
        self._space_model: OnnxModel | None = None  # whose embeddings the policy holds
        self.model = model
        self._serve(model)

    def swap_model(self, model: OnnxModel) -> None:
        """Serves ``model`` from the next batch on; the batch in flight keeps its model."""
        previous = self.model.version
        self._serve(model)
        log.info("model swapped: %s -> %s", previous, model.version)

    def _serve(self, model: OnnxModel) -> None:
        self.model = model
        self.metrics.set_model(model.version, model.provider)
        self.policy.on_model(model.spec.labels_trained, classes=model.spec.classes)
        self._engine.on_model(model)
        for listener in self._on_swap:
            listener(model)

    async def refresh_lag(self) -> None:
        """Updates the consumer lag gauges from the broker (the ``/metrics`` handler's call)."""
        if self._checkpoint is not None:
            await self._checkpoint.refresh_lag()

    @property
    def assigned(self) -> list[TopicPartition]:
        return sorted(self._consumer.assignment()) if self._consumer else []

    # -- lifecycle -------------------------------------------------------------------------

    async def _start(self) -> None:
        """Connects, joins the consumer group and starts the stages."""
        kafka, scorer = self.settings.kafka, self.settings.scorer
        blas.acquire()  # released in _stop, which runs even when a start fails
        # Each batch's records are sent in one event-loop tick: they share requests anyway.
        self._producer = create_producer(kafka, linger_ms=0)
        await self._producer.start()
        self._delivery = Delivery(self._producer, what="scorer records")
        self._consumer = create_consumer(
            kafka, group_id=scorer.group_id, fetch_max_wait_ms=scorer.fetch_max_wait_ms
        )
        shares = CapShares(kafka, self.policy)  # the group's cap, shared by partitions
        shares.joining()  # frames fetched before the first assignment is complete get no share
        self._checkpoint = Checkpoint(self._consumer, self.metrics, shares=shares)
        self._consumer.subscribe([kafka.topics.frames], listener=self._checkpoint)
        await self._consumer.start()
        decode_q: asyncio.Queue[Batch | None] = asyncio.Queue(_QUEUE_DEPTH)
        infer_q: asyncio.Queue[Batch | None] = asyncio.Queue(_QUEUE_DEPTH)
        # batches whose run started, in stream order; at most one waits beyond those running
        decide_q: asyncio.Queue[_Running | None] = asyncio.Queue(1)
        deliver_q: asyncio.Queue[Batch | None] = asyncio.Queue(_QUEUE_DEPTH)
        ack_q: asyncio.Queue[_Sent | None] = asyncio.Queue(_ACK_DEPTH)
        self.supervise(self._fetch_stage(decode_q), "scorer-fetch")
        self.supervise(self._stage(decode_q, infer_q, self._decode), "scorer-decode")
        self.supervise(self._forward_stage(infer_q, decide_q), "scorer-forward")
        self.supervise(self._decide_stage(decide_q, deliver_q), "scorer-decide")
        self.supervise(self._deliver_stage(deliver_q, ack_q), "scorer-deliver")
        self.supervise(self._ack_stage(ack_q), "scorer-ack")
        if scorer.stall_timeout_s > 0:
            consumer, checkpoint = self._consumer, self._checkpoint
            self._watchdog = ProgressWatchdog(
                scorer.stall_timeout_s,
                lag=checkpoint.lag,
                assigned=lambda: bool(consumer.assignment()),
                broker_reachable=self._broker_reachable,
            )
            self.supervise(self._watchdog.run(self._stopping), "scorer-watchdog")
        log.info(
            "scorer started: topic=%s group=%s model=%s provider=%s batches_at_once=%d",
            kafka.topics.frames,
            scorer.group_id,
            self.model.version,
            self.model.provider,
            self._concurrency,
        )

    async def _stop(self) -> None:
        """Drains what is in flight, commits it, and disconnects."""
        self._stopping.set()
        if self._supervised:
            # A crashed stage cannot drain the others, nor can a missing broker: stop waiting.
            pending = await drain(self._supervised, DRAIN_TIMEOUT_S, self._broker_reachable)
            await cancel_all(pending)  # a stage may block in its finally: cancelled again
            await asyncio.gather(*self._supervised, return_exceptions=True)
        await self._settle_runs()
        try:
            if self._checkpoint is not None:
                await self._checkpoint.final_commit()
        finally:
            if self._consumer is not None:
                await stop_client(self._consumer, "the scorer's consumer")
            if self._producer is not None:
                await stop_client(self._producer, "the scorer's producer")
            self._decoder.close()
            self._infer_pool.shutdown(wait=False, cancel_futures=True)
            self._score_pool.shutdown(wait=False, cancel_futures=True)
            blas.release()
        log.info("scorer stopped: counts=%s", self.accounting.counts)

    # -- stages ----------------------------------------------------------------------------

    async def _fetch_stage(self, out: "asyncio.Queue[Batch | None]") -> None:
        assert self._consumer is not None and self._checkpoint is not None
        scorer = self.settings.scorer
        try:
            while not self._stopping.is_set():
                frames = await collect_batch(
                    self._consumer, scorer.max_batch_size, scorer.max_wait_ms
                )
                if frames:
                    batch = Batch(frames=frames)
                    self._checkpoint.consumed(batch)
                    await out.put(batch)
        finally:
            await out.put(None)

    async def _stage(
        self,
        inbox: "asyncio.Queue[Batch | None]",
        out: "asyncio.Queue[Batch | None]",
        work: Callable[[Batch], Awaitable[None]],
    ) -> None:
        while (batch := await inbox.get()) is not None:
            await work(batch)
            await out.put(batch)
        await out.put(None)

    async def _decode(self, batch: Batch) -> None:
        batch.model = self.model  # swaps happen between batches: decode and infer agree
        items = [(f.value, f.headers.content_type) for f in batch.frames]
        started = time.perf_counter()
        batch.inputs, batch.good, batch.poison = await self._decoder.decode(items, batch.model.spec)
        self.metrics.decode_seconds.observe(time.perf_counter() - started)

    async def _forward_stage(
        self, inbox: "asyncio.Queue[Batch | None]", out: "asyncio.Queue[_Running | None]"
    ) -> None:
        """Starts each batch's model run in the infer pool as soon as one of its
        ``concurrency`` threads is free (on the loop when the model runs in a blink:
        :mod:`service.pipeline.run_place`), and passes the batch on with its run."""
        slots = asyncio.Semaphore(self._concurrency)
        while (batch := await inbox.get()) is not None:
            run = None
            if batch.good:
                await slots.acquire()
                run = asyncio.ensure_future(self._forward(batch, slots))
                self._runs.add(run)
            await out.put(_Running(batch, run))
        await out.put(None)

    async def _forward(self, batch: Batch, slots: asyncio.Semaphore) -> Forward:
        assert batch.model is not None and batch.inputs is not None
        loop = asyncio.get_running_loop()
        model, inputs, needs = batch.model, batch.inputs, self.policy.needs
        try:
            started = time.perf_counter()
            if self._run_place.inline(model, len(inputs)):
                forward, took = self._timed_forward(model, inputs, needs)
            else:
                forward, took = await loop.run_in_executor(
                    self._infer_pool, self._timed_forward, model, inputs, needs
                )
            self._run_place.observe(model, len(inputs), took)
            self.metrics.inference_seconds.observe(time.perf_counter() - started)
            return forward
        finally:
            slots.release()

    async def _settle_runs(self) -> None:
        """Cancels the model runs no stage will take any more (a stage crashed, or a stop cut
        the drain short) and says in one warning how many of them had failed, instead of
        asyncio's "Task exception was never retrieved" with a traceback each."""
        runs, self._runs = self._runs, set()
        for run in runs:
            run.cancel()  # a run already done keeps its result or error
        results = await asyncio.gather(*runs, return_exceptions=True)
        errors = [r for r in results if isinstance(r, Exception)]
        if errors:
            log.warning(
                "%d model run(s) left behind when the scorer stopped deciding failed as well: %r",
                len(errors),
                errors[0],
            )

    def _timed_forward(
        self, model: OnnxModel, inputs: np.ndarray, needs: Collection[str]
    ) -> tuple[Forward, float]:
        """The run and its wall time on the thread that ran it (without the hand-off)."""
        started = time.perf_counter()
        forward = self._engine.forward(model, inputs, needs)
        return forward, time.perf_counter() - started

    async def _decide_stage(
        self, inbox: "asyncio.Queue[_Running | None]", out: "asyncio.Queue[Batch | None]"
    ) -> None:
        """Takes the batches in stream order, each once its run is done, and decides them."""
        while (running := await inbox.get()) is not None:
            batch = running.batch
            if running.run is not None:
                self._runs.discard(running.run)
                await self._decide(batch, await running.run)
            batch.inputs = None  # the pixels are no longer needed; free them early
            await out.put(batch)
        await out.put(None)

    async def _decide(self, batch: Batch, forward: Forward) -> None:
        assert batch.model is not None and batch.inputs is not None
        scored = await self._score(batch.model, batch.inputs, forward)
        self.metrics.batch_size.observe(len(batch.good))
        batch.probabilities, batch.embeddings = scored.probabilities, scored.embeddings
        batch.scores = scored.scores
        sources = [batch.frames[i].source_id for i in batch.good]
        context = DecisionContext(scored.embeddings, scored.probabilities, sources)
        await self._rebase(batch.model, batch.inputs)
        batch.decisions = self.policy.decide(scored.scores, context)
        selected = [i for i, row in enumerate(batch.decisions) if row["selected"]]
        self._exemplars.resize(self.policy.memory)  # a live change may switch strategy
        if selected:
            self._exemplars.add(batch.inputs[selected])
        for observer in self._on_batch:
            observer(batch)

    async def _rebase(self, model: OnnxModel, inputs: np.ndarray) -> None:
        """Before the first batch of a new backbone is decided: the frames asked for so far are
        re-embedded by it (in the infer thread), so the embedding strategies keep their memory,
        and the filters drop what they kept of the old space (``QueryPolicy.rebase``, called
        with none when the policy remembers no frame). A head-only release keeps the backbone,
        hence the embeddings: nothing to redo."""
        previous = self._space_model
        if model is previous:
            return
        self._space_model = model
        if previous is None or model.spec.backbone == previous.spec.backbone:
            return
        kept = self._exemplars.stacked(inputs.shape[1:]) if self.policy.memory else None
        if kept is None:  # nothing to re-embed; the filters still drop the old space's rows
            self.policy.rebase(np.zeros((0, 0)), None)
            return
        loop = asyncio.get_running_loop()
        probabilities, embeddings = await loop.run_in_executor(
            self._infer_pool, run_rows, model, kept
        )
        self.policy.rebase(embeddings, probabilities)

    async def _score(self, model: OnnxModel, inputs: np.ndarray, forward: Forward) -> Scored:
        """The engine's scores of a batch whose model run is done. Run again in the rare case
        that the policy's needs changed meanwhile (a live update, or a swap ending cold start)
        to ones the run did not cover (AIFT's views)."""
        loop = asyncio.get_running_loop()
        while True:
            needs = self.policy.needs
            if any(name in COMMITTEE_UTILITIES for name in needs):  # other models' runs
                scored = await loop.run_in_executor(
                    self._score_pool, self._engine.finish, model, inputs, forward, needs
                )
            else:  # a few array operations: cheaper here than a thread's round trip
                scored = self._engine.finish(model, inputs, forward, needs)
            if self.policy.needs.issubset(scored.scores):
                return scored
            forward = await loop.run_in_executor(
                self._infer_pool, self._engine.forward, model, inputs, self.policy.needs
            )

    async def _deliver_stage(
        self, inbox: "asyncio.Queue[Batch | None]", acks: "asyncio.Queue[_Sent | None]"
    ) -> None:
        """Sends each batch's records without waiting for their acks (the ack stage does)."""
        assert self._delivery is not None
        topics, scorer = self.settings.kafka.topics, self.settings.scorer
        try:
            while (batch := await inbox.get()) is not None:
                records, predictions = batch_records(
                    batch,
                    predictions_topic=topics.predictions if scorer.publish_predictions else None,
                    requests_topic=topics.label_requests,
                    dead_letter_topic=topics.dead_letter,
                    max_dead_letter_bytes=scorer.dead_letter_max_value_bytes,
                )
                await acks.put(_Sent(batch, await self._delivery.send(records), predictions))
        finally:
            await acks.put(None)

    async def _ack_stage(self, inbox: "asyncio.Queue[_Sent | None]") -> None:
        """Awaits acks in stream order, then counts the batch and commits its offsets."""
        assert self._delivery is not None and self._checkpoint is not None
        while (sent := await inbox.get()) is not None:
            try:
                await self._delivery.acked(sent.records)
                self.accounting.delivered(sent.batch, sent.predictions)
                self._checkpoint.delivered(sent.batch)
                if self._watchdog is not None:
                    self._watchdog.progressed()
                await self._checkpoint.commit(more_coming=not inbox.empty())
            finally:
                self._checkpoint.settled()
