"""``winnow train``: labels in, fine-tuned and verified model releases out.

The loop of AIFT (Zhou et al., CVPR 2017) on live streams: the intake joins
label requests with labels in a crash-safe store; after ``round_min_labels``
new labels or ``round_max_seconds`` (whichever comes first), or as soon as a
drift alarm from the scorer finds ``drift_round_min_labels``, a round starts from
the current model (continuous fine-tuning, never from scratch), trains on the
new labels plus a replay of earlier ones weighted towards those the model gets
wrong, measures the candidate on a holdout drawn from the labels, and, if the
release gate lets it through, exports it to ONNX, checks parity and publishes
it on ``winnow.models``. A round builds its candidate aside; the trainer
adopts it as its model only once the release is out and the checkpoint is
saved, and marks the labels trained only then, so a trainer killed mid-round
(or whose publish failed) still serves the model it had and redoes the round.
"""

import asyncio
import copy
import logging
import math
import secrets
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from aiokafka import AIOKafkaProducer

from infra.kafka.producer import create_producer
from schemas.drift import DriftEvent
from schemas.model_spec import ModelSpec
from trainer.architectures import WinnowNet, build_model
from trainer.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from trainer.config import TrainerSettings
from trainer.drift_watch import DriftWatch
from trainer.errors import ModelBuildError
from trainer.evaluate import Prequential, correct, is_holdout, release_gate
from trainer.export import check_parity, export_onnx
from trainer.finetune import (
    FinetuneConfig,
    RoundStats,
    finetune_round,
    predict_proba,
    select_device,
)
from trainer.intake import Intake
from trainer.metrics import TrainerMetrics
from trainer.model_init import default_normalization, seed_everything
from trainer.reference import reference_for
from trainer.release import publish_release
from trainer.samples import Sample, SampleCache, stack
from trainer.store import SampleStore, TrainItem

log = logging.getLogger(__name__)

RoundTrigger = Literal["labels", "timer", "drift", "manual"]
"""What started a round: enough labels, the timer, a drift alarm, or a direct call."""


@dataclass(frozen=True)
class RoundReport:
    """What one round did, for logs, metrics and the demo."""

    version: str
    released: bool
    new_labels: int
    labels_trained: int
    holdout: int
    candidate_accuracy: float | None
    incumbent_accuracy: float | None
    prequential_accuracy: float
    seconds: float
    reason: str
    trigger: RoundTrigger


@dataclass(frozen=True)
class _Split:
    """A round's samples: new ones to train on, earlier ones to replay, and the holdout."""

    train: list[Sample]
    """``new`` and ``replay`` together, in received order."""
    new: list[Sample]
    replay: list[Sample]
    holdout: list[Sample]
    unseen: list[Sample]
    """Every new sample, holdout included: the serving model is scored on them."""


@dataclass(frozen=True)
class _Round:
    """What a round built in its worker thread, for the trainer to adopt after publishing.

    ``model`` and ``spec`` are the candidate to release, or None when the gate
    refused it; ``accuracy`` is the candidate's on the holdout.
    """

    report: RoundReport
    model: WinnowNet | None
    spec: ModelSpec | None
    accuracy: float | None
    prequential: Prequential


class Trainer:
    """Owns the model lineage: intake, rounds, evaluation, export and releases."""

    def __init__(self, settings: TrainerSettings, metrics: TrainerMetrics | None = None) -> None:
        self.settings = settings
        self.metrics = metrics or TrainerMetrics()
        self.store = SampleStore(settings.store_path, label_merge=settings.label_merge)
        self.intake = Intake(settings, self.store)
        self.drift_watch = (
            DriftWatch(settings.kafka, self.metrics) if settings.drift_rounds else None
        )
        self.device = select_device(settings.device)
        self.prequential = Prequential()
        self.reports: list[RoundReport] = []
        self.model: WinnowNet | None = None
        self.spec: ModelSpec | None = None
        self.incumbent_accuracy: float | None = None
        self._samples = SampleCache()
        self._producer: AIOKafkaProducer | None = None
        self._task: asyncio.Task[None] | None = None
        self._round_lock = asyncio.Lock()
        self._drift_pending: DriftEvent | None = None

    async def __aenter__(self) -> "Trainer":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Loads or creates the model (publishing a cold-start release), then starts intake."""
        (self.settings.data_dir / "checkpoints").mkdir(parents=True, exist_ok=True)
        self._producer = create_producer(self.settings.kafka)
        await self._producer.start()
        model, spec, fresh = await asyncio.to_thread(self._initial_model)
        if fresh:
            await self._release(model, spec)
        self.model, self.spec = model, spec
        self.metrics.labels_trained.set(spec.labels_trained)
        await self.intake.start()
        if self.drift_watch is not None:
            await self.drift_watch.start()
        self._task = asyncio.create_task(self._run(), name="trainer-rounds")
        log.info(
            "trainer started: model %s (%s, %d classes) on %s",
            spec.version,
            spec.arch,
            len(spec.classes),
            self.device,
        )

    async def stop(self) -> None:
        """Stops the rounds and the intake; a round in progress is redone on the next start."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.drift_watch is not None:
            await self.drift_watch.stop()
        await self.intake.stop()
        if self._producer is not None:
            await self._producer.stop()
            self._producer = None
        self.store.close()

    async def wait(self) -> None:
        """Returns when the round loop ends; raises its failure."""
        if self._task is not None:
            await self._task

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        settings = self.settings
        last_round = time.monotonic()
        while True:
            # cleared before counting, so labels or an alarm that come after the count wake the wait
            self.intake.new_labels.clear()
            alarm = self._take_drift_alarm()
            untrained = await asyncio.to_thread(self.store.untrained_count)
            waited = time.monotonic() - last_round
            trigger = self._trigger(untrained, waited)
            if trigger is not None:
                self._drift_pending = None  # whatever starts it, the round answers the alarm
                await self.run_round(trigger)
                last_round = time.monotonic()
                continue
            if alarm is not None:
                log.info(
                    "drift alarm waits for labels: detector=%s untrained=%d needed=%d",
                    alarm.detector,
                    untrained,
                    settings.drift_round_min_labels,
                )
            timeout = settings.round_max_seconds - waited if untrained else None
            await self._wait_for_labels_or_drift(timeout)

    def _trigger(self, untrained: int, waited: float) -> RoundTrigger | None:
        """Why a round starts now, if one does: labels, then the timer, then a drift alarm."""
        settings, alarm = self.settings, self._drift_pending
        if untrained >= settings.round_min_labels:
            return "labels"
        if untrained and waited >= settings.round_max_seconds:
            return "timer"
        if alarm is None or untrained < settings.drift_round_min_labels:
            return None
        log.info(
            "round triggered by a drift alarm: detector=%s source=%s model=%s untrained=%d",
            alarm.detector,
            alarm.source_id,
            alarm.model_version,
            untrained,
        )
        return "drift"

    def _take_drift_alarm(self) -> DriftEvent | None:
        """A drift alarm that came since the last look; it stays pending until a round runs."""
        watch = self.drift_watch
        if watch is None or not watch.alarm.is_set():
            return None
        watch.alarm.clear()
        self._drift_pending = watch.last_alarm
        return watch.last_alarm

    async def _wait_for_labels_or_drift(self, seconds: float | None) -> None:
        """Returns when labels grow, a drift alarm comes, or ``seconds`` pass (None: no limit)."""
        events = [self.intake.new_labels]
        if self.drift_watch is not None:
            events.append(self.drift_watch.alarm)
        waiters = [asyncio.create_task(event.wait()) for event in events]
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            await asyncio.gather(*waiters, return_exceptions=True)

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
            built = await asyncio.to_thread(self._train, items, unreleased, trigger)
            if built.model is not None and built.spec is not None:
                await self._release(built.model, built.spec)
                self.model, self.spec = built.model, built.spec
                self.incumbent_accuracy = built.accuracy
            released = built.spec.version if built.spec is not None else None
            await asyncio.to_thread(self.store.mark_trained, new_items, released)
            self.prequential = built.prequential
            self._account(built.report)
            return built.report

    def _train(self, items: list[TrainItem], unreleased: set[str], trigger: RoundTrigger) -> _Round:
        """The CPU/GPU part of a round, in a worker thread: builds a candidate, adopts nothing.

        Args:
            items: every trainable frame; the untrained ones are the round's new labels.
            unreleased: frames refused candidates trained on since the last release;
                a release counts them in ``labels_trained``.
            trigger: what started the round.
        """
        assert self.model is not None and self.spec is not None
        started, model, spec = time.perf_counter(), self.model, self.spec
        split = self._split(items, spec)
        prequential = _scored(self.prequential, model, split.unseen, self.device)
        candidate, stats = self._fit(model, spec, split)
        holdout = split.holdout
        candidate_right = correct(candidate, holdout, self.device) if holdout else None
        incumbent_right = correct(model, holdout, self.device) if holdout else None
        gate = release_gate(
            candidate_right,
            incumbent_right,
            self.settings.release_margin,
            alpha=self.settings.release_alpha,
        )
        candidate_acc = None if math.isnan(gate.candidate) else gate.candidate
        incumbent_acc = None if math.isnan(gate.incumbent) else gate.incumbent
        carried = sum(1 for s in split.replay if s.frame_id in unreleased)
        labels_trained = spec.labels_trained + len(split.new) + carried
        version = _next_version(spec, labels_trained)
        log.info(
            "round (trigger=%s): %d new, %d replayed, %d holdout, loss %.4f in %.1fs; %s: %s",
            trigger,
            stats.new,
            stats.replayed,
            len(holdout),
            stats.loss,
            stats.seconds,
            "release " + version if gate.accepted else "rejected",
            gate.reason,
        )
        released = None
        if gate.accepted:
            metrics = _metrics(candidate_acc, prequential, len(holdout), stats.loss)
            released = spec.model_copy(
                update={
                    "version": version,
                    "parent_version": spec.version,
                    "labels_trained": labels_trained,
                    "metrics": {**metrics, "generation": float(_generation(spec) + 1)},
                    "reference": reference_for(
                        candidate, split.train, holdout, self.device, self.settings.seed
                    ),
                }
            )
        report = RoundReport(
            version=version if gate.accepted else spec.version,
            released=gate.accepted,
            new_labels=len(split.unseen),
            labels_trained=labels_trained if gate.accepted else spec.labels_trained,
            holdout=len(holdout),
            candidate_accuracy=candidate_acc,
            incumbent_accuracy=incumbent_acc,
            prequential_accuracy=prequential.accuracy,
            seconds=time.perf_counter() - started,
            reason=gate.reason,
            trigger=trigger,
        )
        chosen = candidate if gate.accepted else None
        return _Round(report, chosen, released, candidate_acc, prequential)

    def _fit(
        self, model: WinnowNet, spec: ModelSpec, split: _Split
    ) -> tuple[WinnowNet, RoundStats]:
        """A fine-tuned copy of ``model``; ``model`` itself is left as it is."""
        candidate = copy.deepcopy(model)
        stats = finetune_round(
            candidate,
            split.new,
            split.replay,
            FinetuneConfig.for_arch(spec.arch, seed=self.settings.seed),
            self.device,
            progress=lambda p: log.debug(
                "round: epoch %d loss %.4f (%.1fs)", int(p["epoch"]), p["loss"], p["seconds"]
            ),
        )
        return candidate, stats

    def _split(self, items: list[TrainItem], spec: ModelSpec) -> _Split:
        """Decodes the round's frames (only those not decoded before) and splits them."""
        labeled = []
        for item in items:
            if item.label in spec.classes:
                labeled.append((item.frame_id, spec.classes.index(item.label)))
            else:
                log.warning(
                    "skipping frame %s: label %r is not a class of the model",
                    item.frame_id,
                    item.label,
                )
        samples = self._samples.samples(labeled, spec, self.store.images)
        fraction = self.settings.holdout_fraction
        new_ids = {item.frame_id for item in items if item.untrained}
        train = [s for s in samples if not is_holdout(s.frame_id, fraction)]
        return _Split(
            train=train,
            new=[s for s in train if s.frame_id in new_ids],
            replay=[s for s in train if s.frame_id not in new_ids],
            holdout=[s for s in samples if is_holdout(s.frame_id, fraction)],
            unseen=[s for s in samples if s.frame_id in new_ids],
        )

    # -- releases --------------------------------------------------------------------------

    async def _release(self, model: WinnowNet, spec: ModelSpec) -> None:
        """Exports, checks parity, publishes, then saves the checkpoint."""
        assert self._producer is not None
        artifact = await asyncio.to_thread(self._export, model, spec)
        key = self.settings.model_signing_key
        await publish_release(
            self._producer,
            self.settings.kafka.topics.models,
            artifact,
            spec,
            key.get_secret_value().encode() if key else None,
            model_name=self.settings.model_name,
        )
        await asyncio.to_thread(
            save_checkpoint, self.settings.data_dir / "checkpoints", model, spec
        )
        self.metrics.releases.labels(result="published").inc()
        self.metrics.labels_trained.set(spec.labels_trained)
        log.info("published model %s (%d labels)", spec.version, spec.labels_trained)

    def _export(self, model: WinnowNet, spec: ModelSpec) -> bytes:
        with tempfile.TemporaryDirectory(prefix="winnow-export-") as tmp:
            path = Path(tmp) / "model.onnx"
            export_onnx(model, spec, path)
            check_parity(model, path, spec)
            return path.read_bytes()

    def _initial_model(self) -> tuple[WinnowNet, ModelSpec, bool]:
        """The latest checkpoint, a given one, or a fresh model (cold start)."""
        settings = self.settings
        found = latest_checkpoint(settings.data_dir / "checkpoints") or settings.init_checkpoint
        if found is not None:
            model, spec = load_checkpoint(found)
            return model, spec, found == settings.init_checkpoint
        if len(settings.classes) < 2:
            raise ModelBuildError(
                "no checkpoint in the data directory: set WINNOW_TRAINER_CLASSES (or --classes) "
                "to at least two class names to create the first model"
            )
        seed_everything(settings.seed)
        arch = settings.first_arch
        model = build_model(
            arch,
            len(settings.classes),
            settings.channels,
            weights=settings.init_weights,
            pretrained=settings.first_pretrained,
        )
        mean, std = default_normalization(settings.channels, arch)
        spec = ModelSpec(
            name=settings.model_name,
            version=f"0000-init-{secrets.token_hex(3)}",
            arch=arch,
            classes=list(settings.classes),
            input_size=(settings.input_size, settings.input_size),
            channels=settings.channels,
            mean=list(mean),
            std=list(std),
            embedding_dim=model.embedding_dim,
            metrics={"generation": 0.0},
        )
        return model, spec, True

    def _account(self, report: RoundReport) -> None:
        self.reports.append(report)
        self.metrics.rounds.labels(result="released" if report.released else "rejected").inc()
        self.metrics.rounds_triggered.labels(trigger=report.trigger).inc()
        if not report.released:
            self.metrics.releases.labels(result="rejected").inc()
        self.metrics.round_seconds.observe(report.seconds)
        self.metrics.labels_received.inc(report.new_labels)
        self.metrics.prequential_accuracy.set(report.prequential_accuracy)
        if self.incumbent_accuracy is not None:
            self.metrics.holdout_accuracy.set(self.incumbent_accuracy)


def _scored(
    prequential: Prequential, model: WinnowNet, new: list[Sample], device: torch.device
) -> Prequential:
    """``prequential`` with ``model`` scored on labels it has not seen yet (test, then train).

    A copy: the trainer adopts it once the round's labels are marked trained.
    """
    scored = copy.deepcopy(prequential)
    if new:
        inputs, labels = stack(new)
        predicted = predict_proba(model, inputs, device).argmax(axis=1)
        for correct in (predicted == labels).tolist():
            scored.update(bool(correct))
    return scored


def _generation(spec: ModelSpec) -> int:
    return int(spec.metrics.get("generation", 0))


def _next_version(spec: ModelSpec, labels_trained: int) -> str:
    return f"{_generation(spec) + 1:04d}-{labels_trained}l-{secrets.token_hex(3)}"


def _metrics(
    holdout_acc: float | None, prequential: Prequential, holdout: int, loss: float
) -> dict[str, float]:
    out = {
        "prequential_accuracy": prequential.accuracy,
        "holdout_size": float(holdout),
        "train_loss": loss,
    }
    if holdout_acc is not None:
        out["holdout_accuracy"] = holdout_acc
    return {k: float(v) for k, v in out.items() if not np.isnan(v)}
