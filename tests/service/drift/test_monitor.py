"""The drift monitor: alarms boost the budget for a while, swaps reset, warm-up references,
head-only swaps keep the embedding detector and move the head detectors to the new head."""

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime

import numpy as np

from schemas.drift import DriftReference
from schemas.frames import FrameHeaders, FrameOrigin
from service.config import DriftSettings
from service.drift.calibrate import calibrated
from service.drift.detectors import Rows
from service.drift.heads import LinearHead, with_head
from service.drift.monitor import DriftMonitor
from service.metrics import ScorerMetrics
from service.model.inference import RUN_ROWS
from service.pipeline.batching import Batch, InboundFrame
from service.runtime import boost_on_alarm
from service.selection.policy import QueryPolicy
from tests.service.drift.synthetic import head_metadata, linear_head, outputs


@dataclass
class _Spec:
    version: str
    reference: DriftReference | None
    labels_trained: int = 100
    backbone_version: str | None = None


@dataclass
class _Model:
    spec: _Spec

    @property
    def version(self) -> str:
        return self.spec.version


def _batch(model: _Model, embeddings: np.ndarray, probabilities: np.ndarray) -> Batch:
    frames = [
        InboundFrame(
            origin=FrameOrigin(topic="f", partition=0, offset=i),
            key=f"cam-{i % 2}".encode(),
            value=b"",
            headers=FrameHeaders(),
            raw_headers=(),
            timestamp_ms=None,
        )
        for i in range(len(embeddings))
    ]
    batch = Batch(frames=frames, model=model)  # type: ignore[arg-type]
    batch.good = list(range(len(frames)))
    batch.embeddings, batch.probabilities = embeddings, probabilities
    return batch


def _settings(**overrides: object) -> DriftSettings:
    base = {
        "ert": 2000,
        "embedding_window": 32,
        "class_window": 100,
        "calibration_frames": 200_000,
        "statistic_every": 200,
        "use_release_reference": True,  # these tests hand the monitor its reference directly
    }
    return DriftSettings(**{**base, **overrides})


async def _feed(monitor: DriftMonitor, model: _Model, rng, frames: int, **shift) -> None:
    for _ in range(frames // 50):
        monitor.observe(_batch(model, *outputs(50, rng, **shift)))
    await monitor.idle()


async def test_an_alarm_boosts_the_budget_until_the_configured_time_has_passed(
    reference,
) -> None:
    now = [0.0]
    policy = QueryPolicy(budget=0.05, clock=lambda: now[0])
    metrics = ScorerMetrics()
    settings = _settings(detectors=["embedding"], ert=5000, boost_factor=4.0, boost_seconds=60.0)
    async with DriftMonitor(
        settings,
        None,
        metrics,
        on_alarm=boost_on_alarm(policy, settings),
    ) as monitor:
        model = _Model(_Spec("v1", reference))
        monitor.on_swap(model)
        rng = np.random.default_rng(0)
        await _feed(monitor, model, rng, 300)
        assert monitor.alarms == 0 and not policy.boosted
        await _feed(monitor, model, rng, 300, shift=2.0)
        assert monitor.alarms >= 1
        assert policy.state().effective_budget == 0.2
        assert {e.detector for e in monitor.events} == {"embedding"}
        assert metrics.drift_alarms.labels(detector="embedding")._value.get() >= 1
        now[0] = 59.0
        policy.decide({"entropy": np.zeros(1)})
        assert policy.boosted
        now[0] = 61.0
        policy.decide({"entropy": np.zeros(1)})
        assert not policy.boosted and policy.state().effective_budget == 0.05
        status = monitor.status()
        assert status.reference == "training" and status.alarms == monitor.alarms
        sources = {d.source_id for d in status.detectors}
        assert sources == {None, "cam-0", "cam-1"}


async def test_a_swap_resets_the_detectors_with_the_new_reference(reference) -> None:
    settings = _settings(detectors=["embedding"], ert=5000)
    async with DriftMonitor(settings, None, ScorerMetrics()) as monitor:
        old = _Model(_Spec("v1", reference))
        monitor.on_swap(old)
        rng = np.random.default_rng(1)
        await _feed(monitor, old, rng, 500)
        assert max(d.frames for d in monitor.status().detectors) > 0
        shifted = DriftReference.build(*outputs(3000, rng, shift=2.0), seed=1)
        new = _Model(_Spec("v2", shifted))
        monitor.on_swap(new)
        monitor.observe(_batch(old, *outputs(50, rng)))  # scored by the old model: ignored
        await monitor.idle()
        status = monitor.status()
        assert status.model_version == "v2" and status.detectors == []
        # frames like the new reference raise no alarm, though they drifted from the old one
        await _feed(monitor, new, rng, 500, shift=2.0)
        assert monitor.alarms == 0
        assert all(d.frames > 0 for d in monitor.status().detectors)


async def test_without_a_release_reference_the_first_frames_become_the_reference() -> None:
    async with DriftMonitor(_settings(warmup_frames=400), None, ScorerMetrics()) as monitor:
        model = _Model(_Spec("v1", None))
        monitor.on_swap(model)
        rng = np.random.default_rng(2)
        await _feed(monitor, model, rng, 200)
        assert monitor.status().reference is None
        assert monitor.status().warmup_frames_left == 200
        await _feed(monitor, model, rng, 300)
        status = monitor.status()
        assert status.reference == "warmup" and status.reference_frames == 400
        assert all(d.threshold is not None for d in status.detectors)


async def test_observe_returns_at_once_and_drops_when_the_queue_is_full(reference) -> None:
    monitor = DriftMonitor(_settings(queue_batches=2), None, ScorerMetrics())
    model = _Model(_Spec("v1", reference))
    rng = np.random.default_rng(3)
    for _ in range(5):  # the worker is not started: nothing is taken off the queue
        monitor.observe(_batch(model, *outputs(10, rng)))
    assert monitor.status().dropped_batches == 3
    await asyncio.sleep(0)
    assert datetime.now(UTC)  # the loop is alive


async def test_an_untrained_model_is_not_watched() -> None:
    async with DriftMonitor(_settings(warmup_frames=100), None, ScorerMetrics()) as monitor:
        model = _Model(_Spec("cold", None, labels_trained=0))
        monitor.on_swap(model)
        await _feed(monitor, model, np.random.default_rng(0), 400)
        status = monitor.status()
    assert status.paused and status.warmup_frames_left == 100 and status.alarms == 0


@dataclass
class _Echo(_Model):
    """A model whose input rows are its embeddings (and probabilities): re-scoring is exact."""

    classes: int = 5  # as the synthetic outputs of conftest

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return inputs[:, -self.classes :], inputs[:, : -self.classes]


async def test_a_new_model_rescores_the_anchor_frames_instead_of_warming_up_on_the_stream() -> None:
    rng = np.random.default_rng(3)
    settings = _settings(warmup_frames=200, use_release_reference=False)
    async with DriftMonitor(settings, None, ScorerMetrics()) as monitor:
        first = _Echo(_Spec("v1", None))
        monitor.on_swap(first)
        for _ in range(5):  # 5 of each 50 frames are sent for labeling: 45 kept
            embeddings, probabilities = outputs(50, rng)
            batch = _batch(first, embeddings, probabilities)
            batch.inputs = np.concatenate([embeddings, probabilities], axis=1)
            batch.decisions = [
                {
                    "selected": i % 10 == 0,
                    "reason": "random" if i % 10 == 0 else None,
                    "policy": "random",
                    "utility": 0.5,
                    "threshold": None,
                }
                for i in range(50)
            ]
            monitor.observe(batch)
        await monitor.idle()
        assert monitor.status().reference == "warmup"
        second = _Echo(_Spec("v2", None))
        monitor.on_swap(second)  # no warm-up needed: the anchor frames are re-scored
        await monitor.idle()
        status = monitor.status()
        assert status.model_version == "v2" and status.warmup_frames_left == 0
        assert status.reference_frames == 5 * 45  # the frames sent for labeling are left out
        # a shifted stream now alarms against the anchored reference
        await _feed(monitor, second, rng, 800, shift=3.0)
        assert monitor.alarms >= 1
        third = _Echo(_Spec("v3", None))
        monitor.on_swap(third)  # after an alarm the next model warms up on the new regime
        await monitor.idle()
        assert monitor.status().warmup_frames_left == 200


def test_a_monitor_wide_ert_raises_every_threshold(reference) -> None:
    def thresholds(scope: str) -> list[float]:
        detectors, _ = calibrated(reference, _settings(ert_scope=scope))
        return [d.threshold for d in detectors]

    each, together = thresholds("detector"), thresholds("monitor")
    assert len(each) == 3 and all(t > e for t, e in zip(together, each, strict=True))


@dataclass
class _Headed(_Model):
    """A model whose inputs are its embeddings, with a linear head: re-scoring is exact and
    counted; its head is in its metadata, as the trainer's export writes it."""

    weight: np.ndarray = field(default_factory=lambda: linear_head(0)[0])
    bias: np.ndarray = field(default_factory=lambda: linear_head(0)[1])
    rows: list[int] = field(default_factory=list)  # frames in each run

    @property
    def rescored(self) -> int:
        """Frames this model re-scored in all (the anchor's 200 once: 200)."""
        return sum(self.rows)

    @property
    def metadata(self) -> dict[str, str]:
        return head_metadata(self.weight, self.bias)

    def probabilities(self, embeddings: np.ndarray) -> np.ndarray:
        return LinearHead(self.weight, self.bias).probabilities(embeddings)

    def run(self, inputs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self.rows.append(len(inputs))
        return self.probabilities(inputs), inputs


def _headed(version: str, backbone: str | None = None, *, seed: int = 0, **head) -> _Headed:
    weight, bias = linear_head(seed, **head)
    return _Headed(_Spec(version, None, backbone_version=backbone), weight, bias)


async def _stream(
    monitor: DriftMonitor, model: _Headed, rng, frames: int, per_batch: int = 50, **shift
) -> list[np.ndarray]:
    """Feeds ``frames`` frames scored by ``model``, none sent for labeling; their embeddings."""
    fed = []
    for _ in range(frames // per_batch):
        embeddings, _ = outputs(per_batch, rng, **shift)
        batch = _batch(model, embeddings, model.probabilities(embeddings))
        batch.inputs = embeddings
        batch.decisions = [
            {"selected": False, "reason": None, "policy": "p", "utility": 0.0, "threshold": None}
            for _ in embeddings
        ]
        monitor.observe(batch)
        fed.append(embeddings)
    await monitor.idle()
    return fed


ANCHOR = 200  # anchor frames (the warm-up) in the tests of the default path


def _anchored(**overrides: object) -> DriftSettings:
    """The default path: no release reference, the anchor frames re-scored on each backbone."""
    return _settings(**{"use_release_reference": False, "warmup_frames": ANCHOR, **overrides})


async def _first_alarm(swap_at: int | None, rng_seed: int = 7) -> tuple[int, int, int]:
    """Frames of a shifted stream until the first alarm, with a head-only swap after
    ``swap_at`` of them (or none); and the frames each model re-scored."""
    rng = np.random.default_rng(rng_seed)
    async with DriftMonitor(
        _anchored(detectors=["embedding"], per_source=False), None, ScorerMetrics()
    ) as monitor:
        first, head = _headed("v1"), _headed("v1-h1", "v1", seed=1)
        monitor.on_swap(first)
        await _stream(monitor, first, rng, 200)  # the anchor: re-scored by v1
        await _stream(monitor, first, rng, 400)
        assert monitor.alarms == 0
        serving, shifted = first, 0
        while monitor.alarms == 0 and shifted < 1000:
            if shifted == swap_at:
                monitor.on_swap(head)
                serving = head
            await _stream(monitor, serving, rng, 4, per_batch=4, shift=0.3)
            shifted += 4
        assert monitor.alarms >= 1 and monitor.events[0].model_version == serving.version
        return shifted, first.rescored, head.rescored


async def test_a_head_only_swap_keeps_the_evidence_of_a_shift_under_way() -> None:
    alone, rescored, _ = await _first_alarm(None)
    window = _anchored().embedding_window
    assert alone > 2 * window and rescored == ANCHOR  # the shift takes a while to show
    swap_at = alone - window // 2  # a reset detector would need a full window after it
    with_swap, rescored, head_rescored = await _first_alarm(swap_at)
    assert with_swap == alone  # the same frame: the window and threshold went on as they were
    assert rescored == ANCHOR and head_rescored == 0  # and the anchor was not re-scored


def _thresholds(monitor: DriftMonitor) -> dict[str, float | None]:
    return {d.detector: d.threshold for d in monitor.status().detectors if d.source_id is None}


async def test_the_head_detectors_follow_a_new_head_on_the_anchor_embeddings() -> None:
    rng = np.random.default_rng(11)
    settings = _anchored(ert=10_000, per_source=False, head_rearm_frames=100)
    async with DriftMonitor(settings, None, ScorerMetrics()) as monitor:
        first = _headed("v1")
        monitor.on_swap(first)
        anchor = np.concatenate(await _stream(monitor, first, rng, 200))
        await _stream(monitor, first, rng, 50)
        before, thresholds = monitor.reference, _thresholds(monitor)
        assert before is not None and monitor.head_reference is before
        biased = _headed("v1-h1", "v1", seed=1, favour=0, by=4.0)  # predicts class 0 mostly
        monitor.on_swap(biased)
        await _stream(monitor, biased, rng, 100)  # due 100 frames after the last calibration
        after = monitor.head_reference
        assert monitor.reference is before and after is not before
        assert monitor.calibrations == 2 and first.rescored == ANCHOR and biased.rescored == 0
        # the new head's outputs on the anchor frames, as a full re-arm would have built them
        probabilities = biased.probabilities(anchor)
        built = DriftReference.build(anchor, probabilities, seed=settings.seed, origin="warmup")
        assert after == built
        assert after.class_mix[0] > 0.6 > 0.3 > before.class_mix[0]
        now = _thresholds(monitor)
        assert now["embedding"] == thresholds["embedding"]
        assert now["prediction"] != thresholds["prediction"]
        # the biased head's outputs raise no alarm against its own reference ...
        await _stream(monitor, biased, rng, 300)
        assert monitor.alarms == 0
        # ... where the old head's reference would have taken them for drift
        (stale,), _ = calibrated(before, settings, ["prediction"])
        embeddings, _ = outputs(300, rng)
        assert stale.update(Rows.from_outputs(before, embeddings, biased.probabilities(embeddings)))

        second = _headed("v2", seed=2)  # a full release: a new backbone
        monitor.on_swap(second)
        await monitor.idle()
        assert monitor.status().detectors == [] and second.rescored == ANCHOR  # the anchor
        assert max(second.rows) <= RUN_ROWS  # a few rows a run: the arena stays small
        assert monitor.calibrations == 3 and monitor.reference is not before
        assert monitor.head_reference is monitor.reference


async def test_a_burst_of_head_swaps_costs_one_calibration_per_setting_frames() -> None:
    rng = np.random.default_rng(12)
    settings = _anchored(ert=10_000, per_source=False, head_rearm_frames=300)
    async with DriftMonitor(settings, None, ScorerMetrics()) as monitor:
        first = _headed("v1")
        monitor.on_swap(first)
        anchor = np.concatenate(await _stream(monitor, first, rng, 200))
        await _stream(monitor, first, rng, 50)
        assert monitor.calibrations == 1
        heads = [_headed(f"v1-h{i}", "v1", seed=i) for i in range(1, 16)]
        followed = []
        for head in heads:  # a new head every 40 frames, 600 frames in all
            monitor.on_swap(head)
            await _stream(monitor, head, rng, 40, per_batch=40)
            followed.append(monitor.calibrations)
        assert monitor.processed == 650
        assert monitor.calibrations == 1 + 2  # at 330 and 650 frames: one per 300 at most
        assert followed.index(2) == 6 and followed.index(3) == 14
        assert all(h.rescored == 0 for h in heads) and first.rescored == ANCHOR
        last, reference = heads[-1], monitor.reference
        assert reference is not None
        expected = with_head(reference, anchor, LinearHead(last.weight, last.bias), 0)
        assert monitor.head_reference == expected  # the latest head, not one of the burst


async def test_a_head_swap_takes_the_release_reference_for_the_head_detectors() -> None:
    rng = np.random.default_rng(13)
    first = _headed("v1")
    head = _headed("v1-h1", "v1", seed=1, favour=0, by=2.0)
    embeddings, _ = outputs(2000, rng)
    first.spec.reference = DriftReference.build(embeddings, first.probabilities(embeddings))
    part = embeddings[:1000]  # the trainer builds it on its holdout
    head.spec.reference = DriftReference.build(part, head.probabilities(part))
    settings = _settings(per_source=False, head_rearm_frames=0, warmup_frames=50)
    async with DriftMonitor(settings, None, ScorerMetrics()) as monitor:
        monitor.on_swap(first)
        await _stream(monitor, first, rng, 150)  # 50 make the anchor, 100 are watched
        before = {d.detector: d for d in monitor.status().detectors}
        assert before["embedding"].frames == 100 and monitor.alarms == 0
        monitor.on_swap(head)
        await monitor.idle()
        assert monitor.reference is first.spec.reference
        assert monitor.head_reference is head.spec.reference
        after = {d.detector: d for d in monitor.status().detectors}
        assert after["embedding"] == before["embedding"]  # threshold, statistic, frames
        assert after["prediction"].frames == 0
        assert after["prediction"].threshold != before["prediction"].threshold
        assert monitor.calibrations == 2 and first.rescored == head.rescored == 0


async def test_after_an_alarm_a_head_swap_takes_a_new_reference() -> None:
    rng = np.random.default_rng(14)
    async with DriftMonitor(_anchored(per_source=False), None, ScorerMetrics()) as monitor:
        first = _headed("v1")
        monitor.on_swap(first)
        await _stream(monitor, first, rng, 250)
        await _stream(monitor, first, rng, 300, shift=2.0)
        assert monitor.alarms >= 1
        head = _headed("v1-h1", "v1", seed=1)
        monitor.on_swap(head)  # the stream moved: the reference is taken anew, as on any swap
        await monitor.idle()
        status = monitor.status()
        assert status.detectors == [] and status.warmup_frames_left == 200
        await _stream(monitor, head, rng, 200, shift=2.0)
        assert head.rescored == ANCHOR and monitor.status().reference_frames == ANCHOR


async def test_a_shift_that_stays_alarms_once_per_detector_and_source(reference) -> None:
    """Caught: each detector alarming again every time its window refilled while a shift
    stayed and no new model came: 379 alarms in these 6,000 shifted frames (63 a thousand,
    5 a second at 80 fps, every one logged, published, boosting the budget and starting
    a round), where the change was one; 3 now."""
    async with DriftMonitor(_settings(ert=10_000), None, ScorerMetrics()) as monitor:
        model = _Model(_Spec("v1", reference))
        monitor.on_swap(model)
        rng = np.random.default_rng(1)
        await _feed(monitor, model, rng, 1000)
        before = monitor.alarms
        for _ in range(6):
            await _feed(monitor, model, rng, 1000, shift=2.0)
        assert monitor.alarms > before  # the shift is seen...
        raised = [(e.detector, e.source_id) for e in monitor.events]
        assert len(raised) == len(set(raised)) == monitor.alarms  # ...once by each
        status = monitor.status()
        assert all(d.alarms <= 1 for d in status.detectors)
        assert {(d.detector, d.source_id) for d in status.detectors if d.alarmed} == set(raised)
        assert all(d.frames > 0 for d in status.detectors)  # and each keeps watching


async def test_after_an_alarm_the_new_regime_becomes_the_reference_without_a_swap() -> None:
    """Caught: a monitor that, once it has alarmed, never compares with anything but the
    old regime while no model comes (a trainer down, or no labels): it would stay quiet
    through every later change, or alarm on and on about the first."""
    rng = np.random.default_rng(5)
    settings = _anchored(per_source=False, ert=20_000)  # a false alarm in 500 frames: 7 %
    async with DriftMonitor(settings, None, ScorerMetrics()) as monitor:
        first = _headed("v1")
        monitor.on_swap(first)
        await _stream(monitor, first, rng, 400)  # the anchor, then the first regime
        assert monitor.calibrations == 1 and monitor.alarms == 0
        shifted = 0
        while monitor.alarms == 0 and shifted < 1000:
            await _stream(monitor, first, rng, 50, shift=2.0)
            shifted += 50
        assert monitor.alarms >= 1
        for _ in range(ANCHOR // 50 + 1):  # one at a time, as a scorer sends them
            await _stream(monitor, first, rng, 50, shift=2.0)
        assert monitor.calibrations == 2 and first.rescored == 2 * ANCHOR
        status = monitor.status()
        assert status.reference == "warmup" and status.reference_frames == ANCHOR
        assert not any(d.alarmed for d in status.detectors)
        alarms = monitor.alarms
        await _stream(monitor, first, rng, 500, shift=2.0)  # the new regime is normal now
        assert monitor.alarms == alarms
        back = 0
        while monitor.alarms == alarms and back < 1000:  # and a change from it is seen
            await _stream(monitor, first, rng, 50)
            back += 50
        assert monitor.alarms > alarms
