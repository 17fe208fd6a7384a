"""The drift monitor: alarms boost the budget for a while, swaps reset, warm-up references."""

import asyncio
from dataclasses import dataclass
from datetime import UTC, datetime

import numpy as np

from schemas.drift import DriftReference
from schemas.frames import FrameHeaders, FrameOrigin
from service.config import DriftSettings
from service.drift.monitor import DriftMonitor
from service.metrics import ScorerMetrics
from service.pipeline.batching import Batch, InboundFrame
from service.runtime import boost_on_alarm
from service.selection.policy import QueryPolicy
from tests.service.drift.synthetic import outputs


@dataclass
class _Spec:
    version: str
    reference: DriftReference | None
    labels_trained: int = 100


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
        monitor = DriftMonitor(_settings(ert_scope=scope), None, ScorerMetrics())
        return [d.threshold for d in monitor._calibrated(reference)]

    each, together = thresholds("detector"), thresholds("monitor")
    assert len(each) == 3 and all(t > e for t, e in zip(together, each, strict=True))
