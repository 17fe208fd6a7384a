"""End to end: a scorer with the drift monitor attached publishes schema-valid events."""

import pytest

from schemas.drift import DriftEvent
from service.config import DriftSettings
from service.drift.monitor import DriftMonitor
from service.metrics import ScorerMetrics
from service.model.inference import OnnxModel
from service.pipeline.scorer import Scorer
from tests.kafka_helpers import produce, read_json

pytestmark = pytest.mark.slow


async def test_scorer_publishes_drift_statistics_on_the_drift_topic(
    scorer_settings, digits_model_path, digit_pngs, winnow_topics
) -> None:
    settings = scorer_settings()
    drift = DriftSettings(
        ert=500,
        warmup_frames=100,
        statistic_every=50,
        calibration_frames=100_000,
        embedding_window=16,
        class_window=40,
    )
    settings = settings.model_copy(update={"drift": drift})
    model = OnnxModel.load(digits_model_path, device="cpu")
    # a trained model: the monitor sits out the cold start of an untrained one
    model._spec = model.spec.model_copy(update={"labels_trained": 50})
    frames = [
        (f"cam-{i % 2}".encode(), png, [("content-type", b"image/png")])
        for i, png in enumerate(digit_pngs[:300])
    ]
    metrics = ScorerMetrics()
    async with DriftMonitor(settings.drift, settings.kafka, metrics) as m:
        # the monitor hears the first model at construction, then each scored batch
        scorer = Scorer(settings, model, metrics=metrics, on_batch=[m.observe], on_swap=[m.on_swap])
        async with scorer:
            await produce(settings.kafka, winnow_topics.frames, frames)
            records = await read_json(
                settings.kafka,
                winnow_topics.drift,
                # every source and every detector: on a busy machine one detector's first
                # statistic can come a batch after the others'
                lambda out: (
                    {r["source_id"] for r in out if r["kind"] == "statistic"}
                    >= {None, "cam-0", "cam-1"}
                    and {r["detector"] for r in out if r["kind"] == "statistic"}
                    >= {"embedding", "prediction", "uncertainty"}
                ),
            )
            status = m.status()
    events = [
        DriftEvent.model_validate({k: v for k, v in r.items() if k != "_key"}) for r in records
    ]
    assert {r["_key"] for r in records} <= {b"embedding", b"prediction", b"uncertainty"}
    assert all(e.model_version == model.version for e in events)
    assert {e.detector for e in events if e.kind == "statistic"} == {
        "embedding",
        "prediction",
        "uncertainty",
    }
    assert status.reference == "warmup" and status.reference_frames >= 100
