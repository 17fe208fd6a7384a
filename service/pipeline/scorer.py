"""The scorer: consume, decode, batch, infer, score, decide, route, commit.

Four stages run as tasks joined by small queues, so decoding batch n+1 overlaps
inference of batch n and delivery of batch n-1. CPU work (decode, ONNX
Runtime) runs in thread pools; the event loop only moves bytes and decides.
Offsets are committed only after every record produced for a batch is
acknowledged (at-least-once from frame to decision).
"""

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import CommitFailedError, KafkaError

from infra.kafka.consumer import create_consumer
from infra.kafka.producer import create_producer
from schemas.predictions import Prediction
from service.config import Settings
from service.metrics import ScorerMetrics
from service.model.inference import OnnxModel
from service.pipeline.batching import Batch, collect_batch
from service.pipeline.decode import DecodeLimits, prepare_batch
from service.pipeline.records import OutRecord, batch_records
from service.scoring.aift import AIFT_UTILITIES, ViewMaker, ViewSpec, aift_utilities
from service.scoring.committee import (
    COMMITTEE_UTILITIES,
    ReleaseCommittee,
    committee_utilities,
    head_of,
    mc_dropout_probabilities,
)
from service.scoring.uncertainty import score_batch
from service.selection.filters import DecisionContext
from service.selection.policy import QueryPolicy
from service.selection.stopping import LabelFeedback

log = logging.getLogger(__name__)

_QUEUE_DEPTH = 1
_ACK_DEPTH = 4  # batches sent and waiting for acks: overlaps broker round trips with work
_COMMIT_INTERVAL_S = 0.05
_DRAIN_TIMEOUT_S = 30.0
_SEND_RETRY_BACKOFF_S = (0.2, 0.5, 1.0, 2.0, 5.0)

PredictionHook = Callable[[list[Prediction]], None]
BatchObserver = Callable[[Batch], None]
"""Sees each scored batch (probabilities, embeddings, scores, decisions) on the event loop;
must return at once (hand heavy work to a task or thread), e.g. the drift monitor."""
SwapListener = Callable[[OnnxModel], None]


@dataclass(slots=True)
class _Sent:
    """A batch whose records are sent and whose acks are awaited."""

    batch: Batch
    records: list[OutRecord]
    futures: list["asyncio.Future[Any]"]
    predictions: list[dict[str, Any]]


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, scorer: "Scorer") -> None:
        self._scorer = scorer

    async def on_partitions_revoked(self, revoked: list[TopicPartition]) -> None:
        await self._scorer._on_revoked(revoked)

    async def on_partitions_assigned(self, assigned: list[TopicPartition]) -> None:
        log.info("partitions assigned: %s", sorted(f"{tp.topic}:{tp.partition}" for tp in assigned))


class Scorer:
    """Scores every frame on the frames topic and routes the chosen ones for labeling.

    Use as ``async with Scorer(settings, model) as scorer:``; ``stop()`` drains
    the batches in flight, commits what was delivered and nothing more.
    """

    def __init__(
        self,
        settings: Settings,
        model: OnnxModel,
        *,
        metrics: ScorerMetrics | None = None,
        policy: QueryPolicy | None = None,
        on_predictions: PredictionHook | None = None,
    ) -> None:
        self.settings = settings
        self.model = model
        self.metrics = metrics or ScorerMetrics()
        self.policy = policy or QueryPolicy.from_settings(settings.policy)
        self.started_at = datetime.now(UTC)
        self.counts = {"selected": 0, "not_selected": 0, "invalid": 0}
        self._on_predictions = on_predictions
        self.feedback = LabelFeedback(settings.kafka, self.metrics)
        self.observers: list[BatchObserver] = []
        self.swap_listeners: list[SwapListener] = []
        self._limits = DecodeLimits(
            max_bytes=settings.scorer.max_frame_bytes, max_pixels=settings.scorer.max_pixels
        )
        self._topics = settings.kafka.topics
        self._consumer: AIOKafkaConsumer | None = None
        self._producer: AIOKafkaProducer | None = None
        self._decode_pool = ThreadPoolExecutor(settings.scorer.decode_workers, "winnow-decode")
        self._infer_pool = ThreadPoolExecutor(1, "winnow-infer")
        self._tasks: list[asyncio.Task[None]] = []
        self._delivered: dict[TopicPartition, int] = {}
        self._committed: dict[TopicPartition, int] = {}
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._stopping = asyncio.Event()
        self._stopped = False
        policy_settings = settings.policy
        self._views = ViewMaker(
            ViewSpec(count=policy_settings.aift_views, flips=policy_settings.aift_flips)
        )
        self.committee = ReleaseCommittee(policy_settings.committee_size)
        self.swap_listeners.append(self.committee.add)
        self._mc_rng = np.random.default_rng(policy_settings.seed)
        self.committee.add(model)
        self._apply_model(model)

    def swap_model(self, model: OnnxModel) -> None:
        """Serves ``model`` from the next batch on; the batch in flight keeps its model."""
        previous = self.model.version
        self._apply_model(model)
        for listener in self.swap_listeners:
            listener(model)
        log.info("model swapped: %s -> %s", previous, model.version)

    def _apply_model(self, model: OnnxModel) -> None:
        self.model = model
        self.metrics.set_model(model.version)
        self.policy.cold_start = (
            self.settings.policy.cold_start_random and model.spec.labels_trained == 0
        )

    # -- lifecycle -------------------------------------------------------------------------

    async def __aenter__(self) -> "Scorer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Connects, joins the consumer group and starts the stages."""
        kafka = self.settings.kafka
        # Each batch's records are sent in one event-loop tick: they share requests anyway.
        self._producer = create_producer(kafka, linger_ms=0)
        await self._producer.start()
        self._consumer = create_consumer(
            kafka,
            group_id=self.settings.scorer.group_id,
            fetch_max_wait_ms=min(100, max(5, self.settings.scorer.max_wait_ms)),
        )
        self._consumer.subscribe([self._topics.frames], listener=_Rebalance(self))
        await self._consumer.start()
        await self.feedback.start()
        decode_q: asyncio.Queue[Batch | None] = asyncio.Queue(_QUEUE_DEPTH)
        infer_q: asyncio.Queue[Batch | None] = asyncio.Queue(_QUEUE_DEPTH)
        deliver_q: asyncio.Queue[Batch | None] = asyncio.Queue(_QUEUE_DEPTH)
        ack_q: asyncio.Queue[_Sent | None] = asyncio.Queue(_ACK_DEPTH)
        self._tasks = [
            asyncio.create_task(self._fetch_stage(decode_q), name="scorer-fetch"),
            asyncio.create_task(self._stage(decode_q, infer_q, self._decode), name="scorer-decode"),
            asyncio.create_task(self._stage(infer_q, deliver_q, self._infer), name="scorer-infer"),
            asyncio.create_task(self._deliver_stage(deliver_q, ack_q), name="scorer-deliver"),
            asyncio.create_task(self._ack_stage(ack_q), name="scorer-ack"),
        ]
        log.info(
            "scorer started: topic=%s group=%s model=%s provider=%s",
            self._topics.frames,
            self.settings.scorer.group_id,
            self.model.version,
            self.model.provider,
        )

    async def wait(self) -> None:
        """Returns when the stages end; raises the first stage failure."""
        if not self._tasks:
            return
        done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if not task.cancelled() and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    async def stop(self) -> None:
        """Drains what is in flight, commits it, and disconnects. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        self._stopping.set()
        if self._tasks:
            _, pending = await asyncio.wait(self._tasks, timeout=_DRAIN_TIMEOUT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            await self.feedback.stop()
            if self._consumer is not None:
                await self._commit()
        finally:
            if self._consumer is not None:
                await self._consumer.stop()
            if self._producer is not None:
                await self._producer.stop()
            self._decode_pool.shutdown(wait=False, cancel_futures=True)
            self._infer_pool.shutdown(wait=False, cancel_futures=True)
        log.info("scorer stopped: counts=%s", self.counts)

    @property
    def assigned(self) -> list[TopicPartition]:
        return sorted(self._consumer.assignment()) if self._consumer else []

    # -- stages ----------------------------------------------------------------------------

    async def _fetch_stage(self, out: "asyncio.Queue[Batch | None]") -> None:
        assert self._consumer is not None
        scorer = self.settings.scorer
        try:
            while not self._stopping.is_set():
                frames = await collect_batch(
                    self._consumer, scorer.max_batch_size, scorer.max_wait_ms
                )
                if frames:
                    self._in_flight += 1
                    self._idle.clear()
                    await out.put(Batch(frames=frames))
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
        spec = batch.model.spec
        items = [(f.value, f.headers.content_type) for f in batch.frames]
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        parts = _split(items, self.settings.scorer.decode_workers)
        results = await asyncio.gather(
            *(
                loop.run_in_executor(self._decode_pool, prepare_batch, part, spec, self._limits)
                for _, part in parts
            )
        )
        inputs, good, poison = [], [], []
        for (start, _), (part_inputs, part_good, part_poison) in zip(parts, results, strict=True):
            inputs.append(part_inputs)
            good.extend(start + i for i in part_good)
            poison.extend((start + i, e) for i, e in part_poison)
        batch.inputs = np.concatenate(inputs) if len(inputs) > 1 else inputs[0]
        batch.good, batch.poison = good, poison
        self.metrics.decode_seconds.observe(time.perf_counter() - started)
        for index, error in poison:
            origin = batch.frames[index].origin
            log.warning(
                "dead-lettering frame topic=%s partition=%d offset=%d reason=%s: %s",
                origin.topic,
                origin.partition,
                origin.offset,
                error.reason,
                error.detail,
            )

    def _run_and_score(
        self, model: OnnxModel, inputs: np.ndarray, utility: str
    ) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
        """Inference and scores, in the infer thread. AIFT's views go through the same
        ``run`` call as the frames (N·(1+m) rows); committee scores only when named."""
        n = len(inputs)
        if utility in AIFT_UTILITIES:
            rows = np.concatenate([inputs, self._views(inputs)])
            all_probabilities, all_embeddings = model.run(rows)
            probabilities, embeddings = all_probabilities[:n], all_embeddings[:n]
            views = all_probabilities[n:].reshape(n, self._views.count, -1)
            scores = score_batch(probabilities)
            policy = self.settings.policy
            scores.update(aift_utilities(views, policy.aift_alpha, policy.aift_majority))
            return probabilities, embeddings, scores
        probabilities, embeddings = model.run(inputs)
        scores = score_batch(probabilities)
        if utility in COMMITTEE_UTILITIES:
            scores.update(
                committee_utilities(
                    self._committee_samples(model, inputs, probabilities, embeddings)
                )
            )
        return probabilities, embeddings, scores

    def _committee_samples(
        self,
        model: OnnxModel,
        inputs: np.ndarray,
        probabilities: np.ndarray,
        embeddings: np.ndarray,
    ) -> np.ndarray:
        """(T, N, C): MC-dropout passes over the head, or the last releases' outputs."""
        policy = self.settings.policy
        head = (
            head_of(model) if policy.committee == "mc_dropout" or policy.utility == "bald" else None
        )
        if head is not None:
            weight, bias, rate = head
            return mc_dropout_probabilities(
                embeddings.astype(np.float64), weight, bias, rate, policy.mc_passes, self._mc_rng
            )
        return self.committee.samples(inputs, probabilities)

    async def _infer(self, batch: Batch) -> None:
        assert batch.model is not None and batch.inputs is not None
        if batch.good:
            loop = asyncio.get_running_loop()
            started = time.perf_counter()
            utility = "entropy" if self.policy.cold_start else self.policy.utility
            probabilities, embeddings, scores = await loop.run_in_executor(
                self._infer_pool, self._run_and_score, batch.model, batch.inputs, utility
            )
            self.metrics.inference_seconds.observe(time.perf_counter() - started)
            self.metrics.batch_size.observe(len(batch.good))
            batch.probabilities, batch.embeddings = probabilities, embeddings
            scores.setdefault(self.policy.utility, np.zeros(len(batch.good)))  # cold start
            batch.scores = scores
            context = DecisionContext(
                embeddings, probabilities, [batch.frames[i].source_id for i in batch.good]
            )
            batch.decisions = self.policy.decide(batch.scores, context)
            for observer in self.observers:
                observer(batch)
        batch.inputs = None  # the pixels are no longer needed; free them early

    async def _deliver_stage(
        self, inbox: "asyncio.Queue[Batch | None]", acks: "asyncio.Queue[_Sent | None]"
    ) -> None:
        """Sends each batch's records without waiting for their acks (the ack stage does)."""
        topics, scorer = self._topics, self.settings.scorer
        try:
            while (batch := await inbox.get()) is not None:
                records, predictions = batch_records(
                    batch,
                    predictions_topic=topics.predictions if scorer.publish_predictions else None,
                    requests_topic=topics.label_requests,
                    dead_letter_topic=topics.dead_letter,
                    max_dead_letter_bytes=scorer.dead_letter_max_value_bytes,
                )
                await acks.put(_Sent(batch, records, await self._send(records), predictions))
        finally:
            await acks.put(None)

    async def _ack_stage(self, inbox: "asyncio.Queue[_Sent | None]") -> None:
        """Awaits acks in stream order, then marks the offsets done and commits them."""
        last_commit = 0.0
        while (sent := await inbox.get()) is not None:
            try:
                await self._await_acks(sent)
                self._account(sent.batch, sent.predictions)
                for (topic, partition), offset in sent.batch.next_offsets().items():
                    self._delivered[TopicPartition(topic, partition)] = offset
                now = time.monotonic()
                if inbox.empty() or now - last_commit >= _COMMIT_INTERVAL_S:
                    await self._commit()
                    last_commit = now
            finally:
                self._in_flight -= 1
                if self._in_flight == 0:
                    self._idle.set()

    async def _send(self, records: list[OutRecord]) -> list["asyncio.Future[Any]"]:
        assert self._producer is not None
        return [await self._producer.send(r.topic, r.value, key=r.key) for r in records]

    async def _await_acks(self, sent: "_Sent") -> None:
        """Awaits every ack; on broker errors sends the whole set again (duplicates are ok)."""
        futures = sent.futures
        for attempt, backoff in enumerate((*_SEND_RETRY_BACKOFF_S, None)):
            try:
                await asyncio.gather(*futures)
                return
            except KafkaError as error:
                if backoff is None:
                    raise
                log.warning(
                    "produce failed (attempt %d), retrying in %.1fs: %s",
                    attempt + 1,
                    backoff,
                    error,
                )
                await asyncio.sleep(backoff)
                futures = await self._send(sent.records)

    def _account(self, batch: Batch, predictions: list[dict[str, Any]]) -> None:
        metrics, now = self.metrics, time.time()
        for _, error in batch.poison:
            metrics.frames.labels(outcome="invalid").inc()
            metrics.dead_letters.labels(reason=error.reason).inc()
        self.counts["invalid"] += len(batch.poison)
        selected = [p for p in predictions if p["decision"]["selected"]]
        self.counts["selected"] += len(selected)
        self.counts["not_selected"] += len(predictions) - len(selected)
        metrics.frames.labels(outcome="selected").inc(len(selected))
        metrics.frames.labels(outcome="not_selected").inc(len(predictions) - len(selected))
        for prediction in selected:
            self.feedback.requested(prediction["frame_id"], prediction["label"])
            metrics.label_requests.labels(
                reason=prediction["decision"]["reason"] or "unknown"
            ).inc()
        for index in batch.good:
            captured = batch.frames[index].captured_epoch()
            if captured is not None:
                metrics.decision_latency.observe(max(0.0, now - captured))
        state = self.policy.state()
        metrics.query_threshold.set(
            state.threshold if state.threshold is not None else float("nan")
        )
        metrics.budget_used.set(state.budget_used)
        if predictions and self._on_predictions is not None:
            self._on_predictions([Prediction.model_validate(p) for p in predictions])

    # -- offsets ---------------------------------------------------------------------------

    async def _commit(self) -> None:
        assert self._consumer is not None
        assigned = self._consumer.assignment()
        offsets = {
            tp: offset
            for tp, offset in self._delivered.items()
            if tp in assigned and self._committed.get(tp) != offset
        }
        if offsets:
            try:
                await self._consumer.commit(offsets)
            except (CommitFailedError, KafkaError) as error:
                self.metrics.commits.labels(result="failed").inc()
                log.warning("offset commit failed, records will be redelivered: %s", error)
                return
            self.metrics.commits.labels(result="ok").inc()
            self._committed.update(offsets)
        for tp in assigned:
            highwater = self._consumer.highwater(tp)
            if highwater is not None and tp in self._delivered:
                lag = max(0, highwater - self._delivered[tp])
                self.metrics.consumer_lag.labels(topic=tp.topic, partition=str(tp.partition)).set(
                    lag
                )

    async def _on_revoked(self, revoked: list[TopicPartition]) -> None:
        """Lets the batches in flight finish, then commits them before giving partitions up."""
        try:
            await asyncio.wait_for(self._idle.wait(), _DRAIN_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                "rebalance: batches still in flight after %.0fs; they will be redelivered",
                _DRAIN_TIMEOUT_S,
            )
        await self._commit()
        for tp in revoked:
            self._delivered.pop(tp, None)
            self._committed.pop(tp, None)
        log.info("partitions revoked: %s", sorted(f"{tp.topic}:{tp.partition}" for tp in revoked))


def _split(items: list[Any], parts: int) -> list[tuple[int, list[Any]]]:
    """Splits a batch into contiguous parts for the decode pool: (start index, items)."""
    size = max(1, -(-len(items) // parts))
    return [(start, items[start : start + size]) for start in range(0, len(items), size)]
