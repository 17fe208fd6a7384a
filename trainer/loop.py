"""``winnow train``: labels in, fine-tuned and verified model releases out.

The loop of AIFT (Zhou et al., CVPR 2017) on live streams, at two speeds. The
intake joins label requests with labels in a crash-safe store. After every
``head_refit_labels`` new labels (or ``head_refit_share`` of those learned,
when more) the trainer refits the classification head on the frozen
embeddings of every label and publishes a small head-only release (seconds;
:mod:`trainer.refit`). After ``round_min_labels`` new labels
or ``round_max_seconds`` (whichever comes first), or as soon as a drift alarm
from the scorer finds ``drift_round_min_labels``, a backbone round starts from
the current model (continuous fine-tuning, never from scratch), trains on the
new labels plus a replay of earlier ones weighted towards those the model gets
wrong (:mod:`trainer.rounds`), and a full release replaces backbone and head.
Both kinds pass the paired release gate on a holdout drawn from the labels.

A round or refit builds its candidate aside; the trainer adopts it only once
the release is out (and, for a round, the checkpoint saved and the labels
marked trained), so a trainer killed mid-round, or whose publish failed,
still serves the model it had and redoes the work. Head refits go on while a
backbone round trains; a refit whose backbone a round replaced meanwhile is
dropped, not published.
"""

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from aiokafka import AIOKafkaProducer

from infra import blas
from infra.allocator import release_free_memory
from infra.component import Component
from infra.kafka.producer import create_producer
from schemas.model_spec import ModelSpec
from trainer.architectures import WinnowNet
from trainer.checkpoint import save_checkpoint
from trainer.config import TrainerSettings
from trainer.drift_watch import DriftWatch
from trainer.evaluate import Prequential
from trainer.finetune import select_device
from trainer.head import EmbeddingCache
from trainer.intake import Intake
from trainer.lineage import initial_model, onnx_artifact
from trainer.metrics import TrainerMetrics
from trainer.refit import (
    BuiltHead,
    HeadReport,
    build_head,
    head_artifact,
    refit_wait,
    restore_head,
    save_head,
    unlearned,
)
from trainer.release import publish_release
from trainer.round_worker import RoundWorker
from trainer.rounds import (
    BuiltRound,
    RoundInputs,
    RoundReport,
    RoundSettings,
    RoundTrigger,
    build_round,
    split_items,
)
from trainer.samples import SampleCache
from trainer.store import SampleStore, TrainItem
from trainer.triggers import RoundTriggers

log = logging.getLogger(__name__)

__all__ = ["HeadReport", "RoundReport", "RoundTrigger", "Trainer"]


T = TypeVar("T")

TORCH_THREADS = ("rounds", "heads")
"""The trainer's torch work runs on two threads of its own, one for backbone rounds (and the
releases and checkpoints they make) and one for head refits, so a refit need not wait for a
round. Through asyncio's default executor it landed on whichever of up to six threads was
free, each of which then kept its own OpenMP team, allocator arena and oneDNN caches."""

REPORTS_KEPT = 1_000
"""Round and head-refit reports a trainer keeps: the latest, not its whole history (a
soak's trainer made 550 in an hour)."""


class Trainer(Component):
    """Owns the model lineage: intake, head refits, rounds, evaluation, export and releases.

    Use as ``async with Trainer(settings) as trainer:``; :meth:`wait` raises
    the failure of any of its loops.

    Attributes:
        model: the serving model (the last one released).
        spec: its spec: a full release's, or a head-only release's on ``base``.
        base: the spec of the full release whose backbone serves.
        reports: the latest backbone rounds (``REPORTS_KEPT`` at most);
            ``head_reports``: the latest head refits. The metrics count them all.
        labels_unlearned: answered labels (holdout excluded) the serving release
            has not learned from, as last counted.
    """

    def __init__(
        self,
        settings: TrainerSettings,
        metrics: TrainerMetrics | None = None,
        *,
        broker_reachable: Callable[[], bool] = lambda: True,
    ) -> None:
        super().__init__()
        self.settings = settings
        self.metrics = metrics or TrainerMetrics()
        self.store = SampleStore(settings.store_path, label_merge=settings.label_merge)
        self.intake = Intake(settings, self.store, broker_reachable=broker_reachable)
        self.drift_watch = (
            DriftWatch(settings.kafka, self.metrics) if settings.drift_rounds else None
        )
        self.device = select_device(settings.device)
        self.prequential = Prequential()
        self.reports: deque[RoundReport] = deque(maxlen=REPORTS_KEPT)
        self.head_reports: deque[HeadReport] = deque(maxlen=REPORTS_KEPT)
        self.model: WinnowNet | None = None
        self.spec: ModelSpec | None = None
        self.base: ModelSpec | None = None
        self.incumbent_accuracy: float | None = None
        self.labels_unlearned = 0
        self._checkpoints = settings.data_dir / "checkpoints"
        self._samples = SampleCache(int(settings.sample_cache_mb * 2**20))
        self._embeddings = EmbeddingCache()
        self._covered: dict[str, str] = {}  # what the serving head-only release learned from
        self._attempted: dict[str, str] = {}  # what the last refit on this backbone fit
        self._producer: AIOKafkaProducer | None = None
        self._round_lock = asyncio.Lock()
        self._head_lock = asyncio.Lock()
        self._adopt_lock = asyncio.Lock()  # one release published and adopted at a time
        self._round_wake = asyncio.Event()
        self._head_wake = asyncio.Event()
        self._triggers = RoundTriggers(settings, self.drift_watch)
        self._torch: dict[str, ThreadPoolExecutor] = {}
        self._blas = False  # holds infra.blas's one-thread limit
        self.round_worker: RoundWorker | None = None
        """Trains backbone rounds in a child process (``round_worker_rounds``); None: here."""

    async def _start(self) -> None:
        """Loads or creates the model (publishing a cold-start release), then starts intake."""
        try:
            await self._start_parts()
        except BaseException:
            await self.stop()  # a failed start leaves no client open
            raise

    async def _start_parts(self) -> None:
        blas.acquire()  # released in _stop, which runs even when a start fails
        self._blas = True
        self._checkpoints.mkdir(parents=True, exist_ok=True)
        self._torch = {
            name: ThreadPoolExecutor(1, thread_name_prefix=f"winnow-{name}")
            for name in TORCH_THREADS
        }
        if self.settings.round_worker_rounds > 0:
            started = self.metrics.round_workers
            self.round_worker = RoundWorker(
                self.settings.round_worker_rounds,
                on_start=lambda reason: started.labels(reason=reason).inc(),
            )
        self._producer = create_producer(self.settings.kafka)
        await self._producer.start()
        model, spec, fresh = await self._on("rounds", initial_model, self.settings)
        served = spec
        if fresh:
            served = spec = spec.model_copy(update={"labels_unlearned": await self._unlearned({})})
            await self._release(model, spec)
        else:
            model, served = await self._on("rounds", restore_head, self._checkpoints, model, spec)
        self.model, self.spec, self.base = model, served, spec
        self.metrics.labels_trained.set(served.labels_trained)
        await self.intake.start()
        if self.drift_watch is not None:
            await self.drift_watch.start()
        self.supervise(self._dispatch(), name="trainer-wake")
        self.supervise(self._run(), name="trainer-rounds")
        self.supervise(self._follow_labels(), name="trainer-head-refits")
        log.info(
            "trainer started: model %s (%s, %d classes) on %s",
            served.version,
            served.arch,
            len(served.classes),
            self.device,
        )

    async def _stop(self) -> None:
        """Stops the loops, then the intake; a round in progress is redone on the next start."""
        await self._cancel_supervised()
        if self.drift_watch is not None:
            await self.drift_watch.stop()
        await self.intake.stop()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        self.store.close()
        if self.round_worker is not None:  # a round training in it fails; redone next start
            await asyncio.to_thread(self.round_worker.close)
        for pool in self._torch.values():  # a round cut short is redone on the next start
            pool.shutdown(wait=False, cancel_futures=True)
        self._torch = {}
        if self._blas:
            blas.release()
            self._blas = False

    async def _on(self, thread: str, work: Callable[..., T], *args: Any) -> T:
        """``work(*args)`` on one of the trainer's torch threads (``TORCH_THREADS``)."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._torch[thread], functools.partial(work, *args))

    @property
    def _gate(self) -> RoundSettings:
        return RoundSettings.of(self.settings)

    # -- the loops -------------------------------------------------------------------------

    async def _dispatch(self) -> None:
        """Wakes the round loop and the head refits on each batch of new labels."""
        while True:
            await self.intake.new_labels.wait()
            self.intake.new_labels.clear()
            self._round_wake.set()
            self._head_wake.set()

    async def _run(self) -> None:
        settings = self.settings
        last_round = time.monotonic()
        while True:
            # cleared before counting, so labels or an alarm that come after the count wake the wait
            self._round_wake.clear()
            self._triggers.take_alarm()
            untrained = await asyncio.to_thread(self.store.untrained_count)
            waited = time.monotonic() - last_round
            trigger = self._triggers.trigger(untrained, waited)
            if trigger is not None:
                await self.run_round(trigger)
                last_round = time.monotonic()
                continue
            timeout = settings.round_max_seconds - waited if untrained else None
            await self._triggers.wait(self._round_wake, timeout)

    async def _follow_labels(self) -> None:
        """Counts the unlearned labels as they come; refits the head every few new ones."""
        while True:
            self._head_wake.clear()
            if await self._refit_due():
                await self.refit_head()
                continue
            await self._head_wake.wait()

    async def _refit_due(self) -> bool:
        """Updates the unlearned count; whether enough new labels came since the last refit.

        Enough: ``head_refit_labels``, or ``head_refit_share`` of the labels the
        last refit fit when that is more (:func:`~trainer.refit.refit_wait`).
        """
        pending = await asyncio.to_thread(self.store.pending)
        settings = self.settings
        fraction, every = settings.holdout_fraction, settings.head_refit_labels
        self._set_unlearned(unlearned(pending, self._covered, fraction))
        needed = refit_wait(len(self._attempted), every, settings.head_refit_share)
        return every > 0 and unlearned(pending, self._attempted, fraction) >= needed

    # -- head refits -----------------------------------------------------------------------

    async def refit_head(self) -> HeadReport | None:
        """Refits the serving head on every label and publishes a head-only release.

        Returns:
            What the refit did; None when no label can train yet, or when a
            backbone round replaced the backbone meanwhile (the refit is dropped).
        """
        report = await self._refit_head()
        await asyncio.to_thread(release_free_memory)  # what the refit freed goes back
        return report

    async def _refit_head(self) -> HeadReport | None:
        async with self._head_lock:
            started = time.perf_counter()
            model, spec, base = self.model, self.spec, self.base
            assert model is not None and spec is not None and base is not None
            items = await asyncio.to_thread(self.store.trainable)
            built = await self._on(
                "heads",
                build_head,
                model,
                spec,
                base,
                items,
                self._embeddings,
                self.store.images,
                self._gate,
                self.device,
            )
            if built is None:
                return None
            async with self._adopt_lock:
                if self.base is not base:
                    self.metrics.head_refits.labels(result="stale").inc()
                    return None
                self._attempted = built.fit
                if built.spec is not None:
                    await self._release_head(built, base)
            self._account_head(built.report, time.perf_counter() - started)
            return built.report

    async def _release_head(self, built: BuiltHead, base: ModelSpec) -> None:
        """Publishes a head-only release, saves it, and serves it."""
        assert built.spec is not None and built.model is not None
        spec = built.spec.model_copy(update={"labels_unlearned": await self._unlearned(built.fit)})
        artifact = head_artifact(spec, base.version, built.head, float(built.model.dropout.p))
        await self._publish(artifact, spec, base_version=base.version)
        await asyncio.to_thread(save_head, self._checkpoints, artifact)
        self.model, self.spec, self._covered = built.model, spec, built.fit
        self._released(spec)
        log.info(
            "published head release %s on %s (%d labels, %d bytes)",
            spec.version,
            base.version,
            spec.labels_trained,
            len(artifact),
        )

    # -- backbone rounds -------------------------------------------------------------------

    async def run_round(self, trigger: RoundTrigger = "manual") -> RoundReport | None:
        """One round on every untrained label; None when there was nothing to learn.

        The candidate becomes :attr:`model` only after its release is published
        and checkpointed; if that fails, the error propagates and the model, the
        spec and the labels' marks stay as they were.

        Args:
            trigger: what started the round, for the log and
                ``winnow_trainer_rounds_triggered_total``.
        """
        async with self._round_lock:
            items = await asyncio.to_thread(self.store.trainable)
            new_items = [item for item in items if item.untrained]
            if not new_items:
                return None
            unreleased = set(await asyncio.to_thread(self.store.trained_unreleased))
            assert self.model is not None and self.spec is not None and self.base is not None
            start = RoundInputs(self.model, self.spec, self.base, self.prequential, unreleased)
            built, embeddings = await self._on("rounds", self._build_round, items, start, trigger)
            async with self._adopt_lock:
                released = await self._adopt_round(built, items, embeddings)
                await asyncio.to_thread(self.store.mark_trained, new_items, released)
            self.prequential = built.prequential
            self._account(built.report)
            await asyncio.to_thread(release_free_memory)  # what the round freed goes back
            self._head_wake.set()  # count again: the labels that came during the round
            return built.report

    def _build_round(
        self, items: list[TrainItem], start: RoundInputs, trigger: RoundTrigger
    ) -> tuple[BuiltRound, EmbeddingCache]:
        """The CPU/GPU part of a round, in a worker thread: builds a candidate, adopts nothing.

        Also returns the embeddings the round's head refit made with the candidate's
        backbone: if the candidate serves, the next refits start from them instead of
        embedding every label again.
        """
        fraction = self.settings.holdout_fraction
        split = split_items(items, start.spec, self._samples, self.store.images, fraction)
        embeddings = EmbeddingCache()

        def refit(candidate: WinnowNet) -> tuple[WinnowNet, dict[str, str]]:
            # Every label there is now, those that came while the backbone trained too, so
            # the release knows them all; the round's frames are decoded already.
            now, spec = self.store.trainable(), start.spec
            known = {s.frame_id: s for s in (*split.train, *split.holdout)}
            built = build_head(
                candidate,
                spec,
                spec,
                now,
                embeddings,
                self.store.images,
                self._gate,
                self.device,
                decoded=known,
            )
            return (built.model, built.fit) if built and built.model else (candidate, {})

        worker = self.round_worker
        finetune = None if worker is None else worker.finetune  # None: in this thread
        built = build_round(start, split, self._gate, self.device, trigger, refit, finetune)
        return built, embeddings

    async def _adopt_round(
        self, built: BuiltRound, items: list[TrainItem], embeddings: EmbeddingCache
    ) -> str | None:
        """Publishes and serves the round's candidate; its version, or None when refused.

        ``embeddings``: the round's head refit's, made with the candidate's backbone; they
        become the head refits' cache under the new version.
        """
        if built.model is None or built.spec is None:
            return None
        assert self.spec is not None
        learned = {item.frame_id: item.label for item in items} | built.head_fit
        spec = built.spec.model_copy(
            update={
                # a head-only release may have come out while the round trained
                "parent_version": self.spec.version,
                "labels_unlearned": await self._unlearned(learned),
                "precision": self.settings.precision,  # a changed setting takes effect here
            }
        )
        await self._release(built.model, spec)
        self.model, self.spec, self.base = built.model, spec, spec
        self.incumbent_accuracy = built.accuracy
        # The new backbone learned every label the round saw, its head those that came
        # since too: head refits start over on it from there.
        self._covered, self._attempted = dict(built.head_fit), dict(built.head_fit)
        self._embeddings = embeddings.under(spec.version)
        return spec.version

    # -- releases --------------------------------------------------------------------------

    async def _release(self, model: WinnowNet, spec: ModelSpec) -> None:
        """Exports, checks parity, publishes, then saves the checkpoint."""
        artifact = await self._on("rounds", onnx_artifact, model, spec)
        await self._publish(artifact, spec)
        await self._on("rounds", save_checkpoint, self._checkpoints, model, spec)
        self._released(spec)
        log.info("published model %s (%d labels)", spec.version, spec.labels_trained)

    async def _publish(
        self, artifact: bytes, spec: ModelSpec, base_version: str | None = None
    ) -> None:
        assert self._producer is not None
        key = self.settings.model_signing_key
        await publish_release(
            self._producer,
            self.settings.kafka.topics.models,
            artifact,
            spec,
            key.get_secret_value().encode() if key else None,
            model_name=self.settings.model_name,
            base_version=base_version,
        )

    def _released(self, spec: ModelSpec) -> None:
        self.metrics.releases.labels(result="published").inc()
        self.metrics.labels_trained.set(spec.labels_trained)
        if spec.labels_unlearned is not None:
            self._set_unlearned(spec.labels_unlearned)

    async def _unlearned(self, learned: Mapping[str, str]) -> int:
        """Answered labels (holdout excluded) missing from ``learned`` and every full release."""
        pending = await asyncio.to_thread(self.store.pending)
        return unlearned(pending, learned, self.settings.holdout_fraction)

    def _set_unlearned(self, count: int) -> None:
        self.labels_unlearned = count
        self.metrics.labels_unlearned.set(count)

    def _account(self, report: RoundReport) -> None:
        self.reports.append(report)
        self.metrics.round_done(report, self.incumbent_accuracy)
        self.metrics.sample_cache(self._samples.nbytes, self._samples.decoded_again)

    def _account_head(self, report: HeadReport, seconds: float) -> None:
        self.head_reports.append(report)
        self.metrics.head_refit_done(report, seconds)
        if not report.released:
            log.info("head refit not released: %s", report.reason)
