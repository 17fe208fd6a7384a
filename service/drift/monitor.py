"""The drift monitor: the scorer's detectors, off the hot path.

The scorer calls :meth:`DriftMonitor.observe` with each scored batch on the
event loop; it only enqueues. One task takes the batches in order and runs the
detectors in a worker thread; on an alarm it counts it, publishes a
``DriftEvent`` on ``winnow.drift`` and tells ``on_alarm`` (the root wires it to the
labeling budget's boost). Every
``statistic_every`` frames a detector's statistic is published too. A detector
alarms once per reference on each track: a shift that stays is one change, not
one alarm each time the detector's window refills. After the first alarm the
next ``warmup_frames`` frames become the anchor of the new regime, and the
detectors re-arm on them (or the next swap takes them).

On a swap to a new backbone (a full release) the detectors reset: with the
release's reference when it carries one (and ``use_release_reference``), else
with the anchor frames re-scored by the new model, else with a reference
built from the first ``warmup_frames`` frames it scores. Thresholds are
calibrated in a thread each time. A head-only swap (``ModelSpec.backbone_version``
unchanged) leaves the embeddings as they were: the embedding detector keeps
its reference, threshold and state, and only the detectors that read the
head's outputs follow the new head, at most once per ``head_rearm_frames``
frames (see :meth:`DriftMonitor._follow_head`). Detectors run on all frames
together and, per source id (the frame key), for up to ``max_sources`` sources.
"""

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from infra.component import Component
from infra.kafka.closing import stop_client
from infra.kafka.producer import create_producer
from infra.kafka.settings import KafkaSettings
from schemas.api import DetectorState, DriftStatus
from schemas.drift import DriftEvent, DriftReference
from service.config import DriftSettings
from service.drift.calibrate import calibrated
from service.drift.detectors import Detector, Rows
from service.drift.heads import HEAD_DETECTORS, LinearHead, with_head
from service.metrics import ScorerMetrics
from service.model.inference import run_rows
from service.pipeline.batching import Batch

log = logging.getLogger(__name__)

ALL = None  # the source key of the overall track


@dataclass
class _Observed:
    version: str
    sources: list[str | None]
    embeddings: np.ndarray
    probabilities: np.ndarray
    inputs: np.ndarray | None = None  # only while the anchor frames are being collected


@dataclass
class _Swap:
    version: str
    reference: DriftReference | None
    paused: bool = False
    model: object = None
    backbone: str = ""
    head: LinearHead | None = None  # from the model's metadata, where it has one


@dataclass
class _Track:
    """The detectors of one source (or of all sources together)."""

    detectors: list[Detector]
    alarms: dict[str, int] = field(default_factory=dict)
    # Detectors that alarmed against the current reference: quiet until it is replaced
    # (a shift that stays would otherwise alarm again each time a window refills).
    alarmed: set[str] = field(default_factory=set)
    last_alarm: dict[str, datetime] = field(default_factory=dict)
    since_statistic: dict[str, int] = field(default_factory=dict)


AlarmListener = Callable[[DriftEvent], None]
"""Told of each alarm on the event loop; must return at once."""


class DriftMonitor(Component):
    """Online drift detection for one scorer.

    Args:
        settings: ``WINNOW_DRIFT_*``.
        kafka: where ``winnow.drift`` is; None publishes nothing.
        metrics: the scorer's metrics (drift gauges and counter).
        on_alarm: told of each alarm (the root boosts the budget with it).
        clock: wall-clock time of events (tests fake it).
    """

    def __init__(
        self,
        settings: DriftSettings,
        kafka: KafkaSettings | None,
        metrics: ScorerMetrics,
        *,
        on_alarm: AlarmListener | None = None,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        super().__init__()
        self.settings = settings
        self.metrics = metrics
        for name in settings.detectors:  # from 0 at startup: increase() then sees a first alarm
            metrics.drift_alarms.labels(detector=name)
        self._on_alarm = on_alarm
        self.events: list[DriftEvent] = []  # alarms only, the most recent ones
        self._kafka = kafka
        self._clock = clock
        self._queue: asyncio.Queue[_Observed | _Swap] = asyncio.Queue(settings.queue_batches)
        self._producer: AIOKafkaProducer | None = None
        self._version: str | None = None
        self._paused = False
        # The anchor: the input tensors of the frames that made the last warm-up reference.
        # Each new model re-scores them, so the reference stays in the regime it was taken
        # from across swaps (frequent releases would otherwise keep re-learning a drifted
        # stream as "normal"). After an alarm the anchor is taken anew from the stream.
        self._anchor: np.ndarray | None = None
        self._anchor_parts: list[np.ndarray] = []
        self._anchor_count = 0
        self._collecting_anchor = True
        self._model: object = None
        self._reference: DriftReference | None = None
        self._prototypes: list[Detector] = []
        self._tracks: OrderedDict[str | None, _Track] = OrderedDict()
        self._warmup: list[_Observed] = []
        self._warmup_count = 0
        self._calibrating = False
        self._dropped = 0
        # Head-only swaps: the backbone watched, the versions served on it, the head the
        # head detectors are calibrated for, and the embeddings of the reference frames
        # (when the monitor built the reference) that a new head is applied to.
        self._backbone: str | None = None
        self._versions: set[str] = set()
        self._head: LinearHead | None = None
        self._head_version: str | None = None
        self._head_reference: DriftReference | None = None
        self._embeddings: np.ndarray | None = None
        self._pending: _Swap | None = None  # the latest head the head detectors still lag
        self._head_armed_at = 0  # self.processed when the head detectors were calibrated
        self._each_ert = float(settings.ert)  # the per-detector ERT of the thresholds
        self._rebase = False  # an alarm since the reference was taken: take a new one
        self.alarms = 0
        self.processed = 0  # frames the detectors have seen
        self.calibrations = 0  # detector sets calibrated (each costs seconds of CPU)

    # -- lifecycle -------------------------------------------------------------------------

    async def _start(self) -> None:
        if self._kafka is not None:
            self._producer = create_producer(self._kafka)
            await self._producer.start()
        self.supervise(self._run(), name="drift-monitor")

    async def _stop(self) -> None:
        """Stops the worker (batches still queued are dropped)."""
        await self._cancel_supervised()
        if self._producer is not None:
            await stop_client(self._producer, "the drift monitor's producer")
            self._producer = None

    async def idle(self) -> None:
        """Waits until every queued batch has been processed (tests, benchmarks)."""
        await self._queue.join()

    # -- the scorer's hooks (event loop, must return at once) ------------------------------

    def observe(self, batch: Batch) -> None:
        """Enqueues a scored batch's outputs; drops it if the queue is full."""
        if batch.model is None or batch.probabilities is None or batch.embeddings is None:
            return
        sources = [batch.frames[i].source_id for i in batch.good]
        inputs = None
        if self._collecting_anchor and batch.inputs is not None:
            # Frames sent for labeling are left out: the model will be trained on them, and
            # a reference it has learned by heart would make the stream look drifted.
            kept = [row for row, d in enumerate(batch.decisions) if not d["selected"]]
            inputs = batch.inputs[kept]  # fancy indexing copies
        item = _Observed(
            batch.model.version, sources, batch.embeddings, batch.probabilities, inputs
        )
        self._put(item)

    def on_swap(self, model: object) -> None:
        """A new model: reset the detectors with its reference (or warm up), or, on the
        same backbone, follow its head."""
        spec = model.spec  # type: ignore[attr-defined]
        use = self.settings.use_release_reference
        # An untrained model's outputs are noise and its budget is spent at random anyway:
        # nothing to watch until it has learned from labels (cold start).
        paused = spec.labels_trained == 0
        backbone = spec.backbone_version or spec.version  # older models: their own
        swap = _Swap(
            spec.version,
            spec.reference if use else None,
            paused,
            model,
            backbone,
            LinearHead.of(model),
        )
        self._put(swap, force=True)

    def _put(self, item: "_Observed | _Swap", force: bool = False) -> None:
        try:
            self._queue.put_nowait(item)
        except asyncio.QueueFull:
            if not force:
                self._dropped += 1
                return
            # a swap must not be lost: make room by dropping the oldest batch
            self._queue.get_nowait()
            self._queue.task_done()
            self._dropped += 1
            self._queue.put_nowait(item)

    # -- the worker ------------------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            item = await self._queue.get()
            try:
                if isinstance(item, _Swap):
                    await self._swap(item)
                else:
                    await self._observe(item)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("drift monitor: a batch failed; detectors keep running")
            finally:
                self._queue.task_done()

    async def _swap(self, swap: _Swap) -> None:
        if self._keeps_backbone(swap):
            await self._follow_head(swap)
        else:
            await self._reset(swap)

    def _keeps_backbone(self, swap: _Swap) -> bool:
        """Whether ``swap`` is a new head on the watched backbone that the monitor can follow
        without re-scoring: both heads known, and a way to the new head's reference."""
        if swap.paused or self._paused or self._rebase or swap.backbone != self._backbone:
            return False
        if swap.head is None:
            return False
        if self._reference is None:
            return True  # the reference is still being taken: it will be the new head's
        if self._head is None:
            return False
        released = self.settings.use_release_reference and swap.reference is not None
        return released or self._embeddings is not None

    async def _reset(self, swap: _Swap) -> None:
        self._version, self._warmup, self._warmup_count = swap.version, [], 0
        self._paused, self._model = swap.paused, swap.model
        self._tracks, self._reference, self._prototypes = OrderedDict(), None, []
        self._backbone, self._versions = swap.backbone, {swap.version}
        self._head, self._head_version, self._pending = swap.head, swap.version, None
        self._embeddings, self._head_reference, self._rebase = None, None, False
        if swap.paused:
            return
        if swap.reference is not None:
            await self._arm(swap.reference)
            origin = "from the release"
        elif self._anchor is not None and await self._arm_from_anchor():
            origin = f"from {len(self._anchor)} anchor frames, re-scored"
        else:
            origin = f"from the next {self.settings.warmup_frames} frames"
        log.info("drift: model %s, reference %s", swap.version, origin)

    async def _follow_head(self, swap: _Swap) -> None:
        """A new head on the watched backbone.

        The embeddings do not change, so the embedding detector keeps its reference,
        threshold and state: a shift under way goes on accumulating evidence. The
        prediction and uncertainty detectors read the head's outputs; they take the new
        head's reference (its outputs on the reference frames' embeddings, in numpy) and
        are recalibrated, at most once per ``head_rearm_frames`` frames, on the latest
        head then. Meanwhile they watch the stream through the head they were calibrated
        for (applied to each frame's embedding), not through the new head against the old
        head's reference: a new head's outputs differ from the old ones by design, and
        that difference would read as drift, so a false alarm. Their reference,
        threshold and state stay matched, and the false-alarm rate stays the calibrated
        one; pausing them instead would leave the outputs unwatched while heads come
        faster than that.
        """
        self._version, self._model = swap.version, swap.model
        self._versions.add(swap.version)
        if self._reference is None:
            self._head, self._head_version = swap.head, swap.version
            log.info(
                "drift: model %s, a new head; the reference is still being taken", swap.version
            )
            return
        self._pending = swap
        log.info(
            "drift: model %s, a new head on backbone %s: embedding detector kept",
            swap.version,
            swap.backbone,
        )
        await self._follow_when_due()

    async def _follow_when_due(self) -> None:
        """Recalibrates the head detectors on the latest head, once enough frames have passed."""
        if self._pending is None:
            return
        if self.processed - self._head_armed_at < self.settings.head_rearm_frames:
            return
        swap, self._pending = self._pending, None
        self._calibrating = True
        try:
            reference, detectors = await asyncio.to_thread(self._head_detectors, swap)
        finally:
            self._calibrating = False
        if detectors:
            self.calibrations += 1
        fresh = {d.name: d for d in detectors}
        self._prototypes = [fresh.get(d.name, d) for d in self._prototypes]
        for track in self._tracks.values():
            track.detectors = [
                fresh[d.name].fresh() if d.name in fresh else d for d in track.detectors
            ]
        self._head, self._head_version = swap.head, swap.version
        self._head_reference, self._head_armed_at = reference, self.processed
        for detector in detectors:
            self.metrics.set_drift_threshold(detector.name, detector.threshold)
        log.info(
            "drift: head detectors follow model %s: %s",
            swap.version,
            ", ".join(f"{d.name}>{d.threshold:.4g}" for d in detectors) or "none",
        )

    def _head_detectors(self, swap: _Swap) -> tuple[DriftReference, list[Detector]]:
        """The head detectors on ``swap``'s head, calibrated as the others were (thread)."""
        assert self._reference is not None and swap.head is not None
        s = self.settings
        if s.use_release_reference and swap.reference is not None:
            reference = swap.reference
        else:
            assert self._embeddings is not None
            reference = with_head(self._reference, self._embeddings, swap.head, s.seed)
        names = [d.name for d in self._prototypes if d.name in HEAD_DETECTORS]
        if not names:
            return reference, []
        detectors, _ = calibrated(reference, s, names, self._each_ert)
        return reference, detectors

    async def _arm_from_anchor(self) -> bool:
        """Scores the anchor frames with the current model and arms on them."""
        assert self._anchor is not None
        try:
            probabilities, embeddings = await asyncio.to_thread(
                run_rows,
                self._model,  # type: ignore[arg-type]
                self._anchor,
            )
        except Exception as error:  # e.g. a new model with another input size
            log.warning(
                "drift: the anchor frames do not fit model %s (%s); collecting anew",
                self._version,
                error,
            )
            self._reset_anchor()
            return False
        await self._arm(await self._build(embeddings, probabilities, "warmup"))
        self._embeddings = np.asarray(embeddings, dtype=np.float32)
        return True

    def _reset_anchor(self) -> None:
        self._anchor, self._anchor_parts, self._collecting_anchor = None, [], True
        self._anchor_count = 0

    async def _build(
        self, embeddings: np.ndarray, probabilities: np.ndarray, origin: Literal["warmup"]
    ) -> DriftReference:
        return await asyncio.to_thread(
            DriftReference.build,
            embeddings,
            probabilities,
            seed=self.settings.seed,
            origin=origin,
        )

    async def _arm(self, reference: DriftReference) -> None:
        s = self.settings
        self._calibrating = True
        try:
            prototypes, self._each_ert = await asyncio.to_thread(calibrated, reference, s)
        finally:
            self._calibrating = False
        self.calibrations += 1
        self._reference, self._prototypes = reference, prototypes
        self._head_reference, self._head_armed_at = reference, self.processed
        self._tracks = OrderedDict()
        for detector in prototypes:
            self.metrics.set_drift_threshold(detector.name, detector.threshold)
        log.info(
            "drift: detectors armed for ERT %d frames: %s",
            s.ert,
            ", ".join(f"{d.name}>{d.threshold:.4g}" for d in prototypes),
        )

    async def _observe(self, item: _Observed) -> None:
        if item.inputs is not None and self._collecting_anchor:
            await self._collect_anchor(item.inputs)
            return
        if item.version not in self._versions or self._paused:
            return  # scored by a model the monitor no longer watches, or an untrained one
        if self._reference is None:
            await self._warm(item)
            return
        events = await asyncio.to_thread(self._process, item)
        for event in events:
            await self._emit(event)
        await self._follow_when_due()

    async def _collect_anchor(self, inputs: np.ndarray) -> None:
        """Keeps the first frames' inputs (whatever model scored them) as the anchor."""
        self._anchor_parts.append(inputs)
        self._anchor_count += len(inputs)
        if self._anchor_count < self.settings.warmup_frames:
            return
        self._anchor = _bounded(np.concatenate(self._anchor_parts))
        self._anchor_parts, self._collecting_anchor = [], False
        if self._model is None or self._paused:
            return
        if self._reference is None:
            await self._arm_from_anchor()
        elif self._rebase:
            await self._rearm_after_alarm()

    async def _rearm_after_alarm(self) -> None:
        """The anchor frames of the regime after an alarm are in, and no new backbone came
        meanwhile (a swap would have taken them): the detectors re-arm on them with the
        model served now, so that they watch for the next change instead of staying quiet
        about this one (each detector alarms once per reference)."""
        assert self._anchor is not None
        frames = len(self._anchor)
        if self._pending is not None:  # the head served now, not yet followed
            self._head, self._head_version = self._pending.head, self._pending.version
            self._pending = None
        if await self._arm_from_anchor():
            self._rebase = False
            log.info(
                "drift: model %s, reference from the %d frames after the alarm",
                self._version,
                frames,
            )

    async def _warm(self, item: _Observed) -> None:
        self._warmup.append(item)
        self._warmup_count += len(item.sources)
        if self._warmup_count < self.settings.warmup_frames:
            return
        embeddings = np.concatenate([w.embeddings for w in self._warmup])
        probabilities = np.concatenate([w.probabilities for w in self._warmup])
        if self._head is not None and any(w.version != self._head_version for w in self._warmup):
            probabilities = self._head.probabilities(embeddings)  # heads changed meanwhile
        self._warmup = []
        await self._arm(await self._build(embeddings, probabilities, "warmup"))
        self._embeddings = np.asarray(embeddings, dtype=np.float32)

    def _process(self, item: _Observed) -> list[DriftEvent]:
        """Runs the detectors on one batch (worker thread); returns the events to publish."""
        assert self._reference is not None
        probabilities = item.probabilities
        if item.version != self._head_version and self._head is not None:
            # the head detectors watch through the head they are calibrated for
            probabilities = self._head.probabilities(item.embeddings)
        rows = Rows.from_outputs(self._reference, item.embeddings, probabilities)
        events = self._run_track(ALL, rows)
        if self.settings.per_source and self.settings.max_sources > 0:
            sources = np.asarray([s or "" for s in item.sources])
            for source in dict.fromkeys(item.sources):
                if source is not None:
                    events += self._run_track(source, rows.take(sources == source))
        self.processed += len(rows)
        return events

    def _track(self, source: str | None) -> _Track:
        track = self._tracks.get(source)
        if track is None:
            sources = [k for k in self._tracks if k is not None]
            if source is not None and len(sources) >= self.settings.max_sources:
                del self._tracks[sources[0]]  # the least recently seen source
            track = _Track([d.fresh() for d in self._prototypes])
            self._tracks[source] = track
        elif source is not None:
            self._tracks.move_to_end(source)
        return track

    def _run_track(self, source: str | None, rows: Rows) -> list[DriftEvent]:
        track, events = self._track(source), []
        for detector in track.detectors:
            alarms = detector.update(rows)
            name = detector.name
            if alarms and name not in track.alarmed:  # one alarm a detector per reference
                track.alarmed.add(name)
                events.append(self._event("alarm", detector, source, alarms[0][1]))
                track.alarms[name] = track.alarms.get(name, 0) + 1
                track.last_alarm[name] = self._clock()
            seen = track.since_statistic.get(name, 0) + len(rows)
            if seen >= self.settings.statistic_every and np.isfinite(detector.statistic):
                events.append(self._event("statistic", detector, source, detector.statistic))
                seen = 0
            track.since_statistic[name] = seen
        return events

    def _event(
        self, kind: str, detector: Detector, source: str | None, statistic: float
    ) -> DriftEvent:
        return DriftEvent(
            kind=kind,  # type: ignore[arg-type]
            detector=detector.name,
            source_id=source,
            statistic=float(statistic),
            threshold=float(detector.threshold),
            window=detector.window,
            model_version=self._version or "",
            time=self._clock(),
            frames=detector.frames,
        )

    async def _emit(self, event: DriftEvent) -> None:
        if event.source_id is None:
            self.metrics.drift_score.labels(detector=event.detector).set(event.statistic)
        if event.kind == "alarm":
            self.alarms += 1
            if not self._rebase:  # the first alarm against this reference
                self._reset_anchor()  # the reference moves to the new regime once collected
            self._rebase = True  # then, or at the next swap (head-only or not) before it
            self.metrics.drift_alarms.labels(detector=event.detector).inc()
            self.events = [*self.events[-99:], event]
            log.warning(
                "drift alarm: detector=%s source=%s statistic=%.4g threshold=%.4g model=%s",
                event.detector,
                event.source_id,
                event.statistic,
                event.threshold,
                event.model_version,
            )
            if self._on_alarm is not None:
                self._on_alarm(event)
        if self._producer is not None and self._kafka is not None:
            try:
                await self._producer.send(
                    self._kafka.topics.drift,
                    event.model_dump_json().encode(),
                    key=event.detector.encode(),
                )
            except KafkaError as error:
                log.warning("drift event not published (%s): %s", event.kind, error)

    def update_gauges(self) -> None:
        """Sets ``winnow_drift_score`` from the overall track (between events)."""
        track = self._tracks.get(ALL)
        for detector in track.detectors if track else []:
            if np.isfinite(detector.statistic):
                self.metrics.drift_score.labels(detector=detector.name).set(detector.statistic)

    # -- status ----------------------------------------------------------------------------

    @property
    def reference(self) -> DriftReference | None:
        """What the embedding detector compares with (None while it is being taken)."""
        return self._reference

    @property
    def head_reference(self) -> DriftReference | None:
        """What the prediction and uncertainty detectors compare with: ``reference``, or
        since a head-only swap, the same frames through the head they follow."""
        return self._head_reference

    def status(self) -> DriftStatus:
        s = self.settings
        states = []
        for source, track in list(self._tracks.items()):
            for d in track.detectors:
                states.append(
                    DetectorState(
                        detector=d.name,
                        source_id=source,
                        statistic=float(d.statistic) if np.isfinite(d.statistic) else None,
                        threshold=float(d.threshold) if np.isfinite(d.threshold) else None,
                        window=d.window,
                        frames=d.frames,
                        alarms=track.alarms.get(d.name, 0),
                        last_alarm=track.last_alarm.get(d.name),
                        alarmed=d.name in track.alarmed,
                    )
                )
        reference = self._reference
        return DriftStatus(
            enabled=s.enabled,
            paused=self._paused,
            model_version=self._version,
            reference=reference.origin if reference else None,
            reference_frames=reference.frames if reference else 0,
            warmup_frames_left=0
            if reference
            else max(0, s.warmup_frames - max(self._warmup_count, self._anchor_count)),
            calibrating=self._calibrating,
            ert=s.ert,
            alarms=self.alarms,
            dropped_batches=self._dropped,
            detectors=states,
        )


ANCHOR_MAX_BYTES = 64 * 1024 * 1024


def _bounded(inputs: np.ndarray, max_bytes: int = ANCHOR_MAX_BYTES) -> np.ndarray:
    """Evenly spaced anchor frames within a memory bound (camera-sized inputs are large)."""
    per_frame = max(1, inputs[0].nbytes) if len(inputs) else 1
    keep = max(1, max_bytes // per_frame)
    if len(inputs) <= keep:
        return inputs
    return inputs[np.linspace(0, len(inputs) - 1, keep).astype(int)]
