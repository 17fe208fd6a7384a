"""The training loop on the real broker: cold start, rounds, releases, restarts."""

import asyncio
import threading
from collections import Counter
from collections.abc import AsyncIterator, Iterable
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from prometheus_client import generate_latest

from infra.errors import BrokerError
from schemas.labels import Label
from schemas.models import ModelChunk
from service.model.inference import OnnxModel
from tests.kafka_helpers import read_json
from tests.trainer.helpers import digit_request, feed, loop_settings, manifests
from trainer.evaluate import GateDecision, accuracy, is_holdout
from trainer.loop import REPORTS_KEPT, Trainer
from trainer.main import ensure_trainer_topics
from trainer.refit import HeadReport
from trainer.samples import decode_sample

pytestmark = pytest.mark.slow

Digits = tuple[list[bytes], np.ndarray]


@pytest.fixture
async def trainer(
    kafka_settings, group_id, winnow_topics, tmp_path: Path
) -> AsyncIterator[Trainer]:
    """A started trainer whose rounds run only when the test calls ``run_round``."""
    async with Trainer(_manual_rounds(kafka_settings, group_id, tmp_path)) as started:
        yield started


def _manual_rounds(kafka_settings, group_id: str, data_dir: Path, **kw: object):
    """Settings of a trainer whose rounds run only when the test calls ``run_round``."""
    return loop_settings(
        kafka_settings,
        group_id,
        data_dir,
        round_min_labels=10_000,
        round_max_seconds=3600,
        drift_rounds=False,
        **kw,
    )


def _store_labels(trainer: Trainer, digits: Digits, ids: Iterable[int]) -> None:
    """Digit frames and their labels, written to the store as the intake would."""
    pngs, targets = digits
    for i in ids:
        trainer.store.add_request(digit_request(f"f{i}", pngs[i]))
        trainer.store.add_label(Label(frame_id=f"f{i}", label=str(targets[i])))


def _weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _unchanged(model: torch.nn.Module, weights: dict[str, torch.Tensor]) -> bool:
    return all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


async def test_a_failed_publish_leaves_the_serving_model_and_the_labels(
    trainer: Trainer, digits: Digits, monkeypatch: pytest.MonkeyPatch
) -> None:
    _store_labels(trainer, digits, range(40))
    model, spec, weights = trainer.model, trainer.spec, _weights(trainer.model)

    async def unreachable(*args: object, **kwargs: object) -> None:
        raise BrokerError("the broker is gone")

    monkeypatch.setattr("trainer.loop.publish_release", unreachable)
    with pytest.raises(BrokerError):
        await trainer.run_round()
    assert trainer.model is model and trainer.spec == spec and _unchanged(model, weights)
    assert trainer.store.untrained_count() == 40 and not trainer.reports
    assert trainer.prequential.count == 0
    monkeypatch.undo()
    report = await trainer.run_round()  # the round again, published this time
    assert report is not None and report.released and report.new_labels == 40
    assert trainer.spec.version == report.version and trainer.spec.parent_version == spec.version
    assert trainer.model is not model and _unchanged(model, weights)
    assert trainer.store.untrained_count() == 0 and trainer.prequential.count == 40


async def test_a_refused_candidate_is_not_adopted_and_the_next_release_counts_its_labels(
    trainer: Trainer, digits: Digits, monkeypatch: pytest.MonkeyPatch
) -> None:
    _store_labels(trainer, digits, range(40))
    model, spec, weights = trainer.model, trainer.spec, _weights(trainer.model)
    refused = GateDecision(False, 0.1, 0.9, 0.02, "refused by the test")
    monkeypatch.setattr("trainer.rounds.release_gate", lambda *args, **kwargs: refused)
    report = await trainer.run_round()
    assert report is not None and not report.released and report.version == spec.version
    assert trainer.model is model and trainer.spec == spec and _unchanged(model, weights)
    assert trainer.store.untrained_count() == 0  # used: the next round replays them
    monkeypatch.undo()
    _store_labels(trainer, digits, range(40, 60))
    report = await trainer.run_round()
    assert report is not None and report.released and report.new_labels == 20
    fraction = trainer.settings.holdout_fraction
    learned = [i for i in range(60) if not is_holdout(f"f{i}", fraction)]
    assert report.labels_trained == trainer.spec.labels_trained == len(learned)


async def test_a_round_reads_each_image_once(
    trainer: Trainer, digits: Digits, monkeypatch: pytest.MonkeyPatch
) -> None:
    reads: Counter[str] = Counter()
    images = trainer.store.images

    def counted(frame_ids: Iterable[str]) -> dict[str, bytes]:
        frame_ids = list(frame_ids)
        reads.update(frame_ids)
        return images(frame_ids)

    monkeypatch.setattr(trainer.store, "images", counted)
    _store_labels(trainer, digits, range(40))
    await trainer.run_round()
    assert reads == Counter(f"f{i}" for i in range(40))
    _store_labels(trainer, digits, range(40, 60))
    await trainer.run_round()  # decodes the new frames only, and replays the others
    assert reads == Counter(f"f{i}" for i in range(60))


async def test_a_round_past_the_sample_cache_budget_decodes_the_rest_again(
    kafka_settings, group_id, winnow_topics, digits: Digits, tmp_path: Path
) -> None:
    """``WINNOW_TRAINER_SAMPLE_CACHE_MB`` bounds the decoded frames the trainer holds
    (unbounded they grow with the labels, 150 KB each at 224 x 224 RGB, until the pod's
    memory limit). Catches the setting not reaching the cache, and the metrics not
    showing it."""
    frame = 16 * 16  # bytes of a frame's pixels under loop_settings' model
    budget_mb = 10.5 * frame / 2**20
    settings = _manual_rounds(kafka_settings, group_id, tmp_path, sample_cache_mb=budget_mb)
    async with Trainer(settings) as trainer:
        assert trainer.spec is not None and tuple(trainer.spec.input_size) == (16, 16)
        _store_labels(trainer, digits, range(40))
        report = await trainer.run_round()
        assert report is not None and report.new_labels == 40
        value = trainer.metrics.registry.get_sample_value
        assert value("winnow_trainer_sample_cache_bytes") == 10 * frame
        again = value("winnow_trainer_frames_decoded_again_total")
        assert again is not None and again >= 30  # each frame past the budget at least once


async def test_rounds_train_in_a_round_worker_when_asked(
    kafka_settings, group_id, winnow_topics, digits: Digits, tmp_path: Path
) -> None:
    """WINNOW_TRAINER_ROUND_WORKER_ROUNDS: rounds train in a child process, replaced after
    that many rounds, counted on /metrics; off by default. Catches the setting not reaching
    the rounds, and a worker that is never replaced."""
    assert loop_settings(kafka_settings, group_id, tmp_path).round_worker_rounds == 0
    settings = _manual_rounds(kafka_settings, group_id, tmp_path, round_worker_rounds=2)
    async with Trainer(settings) as trainer:
        assert trainer.round_worker is not None
        for start in (0, 30, 40):
            _store_labels(trainer, digits, range(start, start + 30 if start == 0 else start + 10))
            report = await trainer.run_round()
            assert report is not None and report.new_labels == (30 if start == 0 else 10)
        assert trainer.round_worker.started == 2  # the first, and one after two rounds
        started = trainer.metrics.registry.get_sample_value
        name = "winnow_trainer_round_workers_started_total"
        assert started(name, {"reason": "first"}) == started(name, {"reason": "recycled"}) == 1


async def test_torch_work_runs_on_the_trainers_own_two_threads(
    trainer: Trainer, digits: Digits, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rounds on one thread, head refits on another, whatever asyncio's executor holds."""
    readers: list[str] = []
    images = trainer.store.images

    def recorded(frame_ids: Iterable[str]) -> dict[str, bytes]:
        readers.append(threading.current_thread().name)
        return images(frame_ids)

    monkeypatch.setattr(trainer.store, "images", recorded)
    _store_labels(trainer, digits, range(30))
    await trainer.run_round()
    assert readers and {name.rsplit("_", 1)[0] for name in readers} == {"winnow-rounds"}
    readers.clear()
    _store_labels(trainer, digits, range(30, 36))
    assert await trainer.refit_head() is not None
    assert readers and {name.rsplit("_", 1)[0] for name in readers} == {"winnow-heads"}


async def test_cold_start_release_then_rounds_that_learn(
    kafka_settings, group_id, winnow_topics, digits, tmp_path: Path
) -> None:
    pngs, targets = digits
    settings = loop_settings(kafka_settings, group_id, tmp_path)
    test_ids = range(1500, 1797)
    async with Trainer(settings) as trainer:
        first = manifests(
            await read_json(
                kafka_settings, winnow_topics.models, lambda out: len(manifests(out)) >= 1
            )
        )
        assert first[0]["spec"]["labels_trained"] == 0
        initial = trainer.model
        spec = trainer.spec
        test = [decode_sample(f"t{i}", pngs[i], int(targets[i]), spec) for i in test_ids]
        initial_acc = accuracy(initial, test, trainer.device)
        # Two batches of labels, each joined and then learned from: rounds run as labels
        # come, and one more round takes what is left under round_min_labels (a round the
        # gate rejects still uses them). Two batches make at least two rounds, however the
        # intake's polls fall against the round loop's counts.
        for labels in (range(0, 150), range(150, 300)):
            await feed(kafka_settings, winnow_topics, pngs, targets, labels)
            async with asyncio.timeout(240):
                while len(trainer.store.trainable()) < labels.stop:  # noqa: ASYNC110 - polls
                    await asyncio.sleep(0.2)
                while trainer.store.untrained_count():
                    await trainer.run_round()
        released = [r for r in trainer.reports if r.released]
        published = manifests(
            await read_json(
                kafka_settings,
                winnow_topics.models,
                lambda out: len(manifests(out)) >= 1 + len(released),
            )
        )
        final_acc = accuracy(trainer.model, test, trainer.device)
        report = trainer.reports[-1]
    versions = [m["version"] for m in published]
    assert len(set(versions)) == len(versions) >= 3
    latest = published[-1]["spec"]
    assert latest["parent_version"] == published[-2]["version"]
    assert "holdout_accuracy" in latest["metrics"] and report.holdout > 0
    assert final_acc > initial_acc + 0.3, (initial_acc, final_acc)


async def _fed_and_stored(
    trainer: Trainer, kafka_settings, topics, digits: Digits, count: int
) -> None:
    """Labels for digits 0 to ``count`` on the broker, once the trainer has stored them all."""
    pngs, targets = digits
    await feed(kafka_settings, topics, pngs, targets, range(0, count))
    async with asyncio.timeout(60):
        while trainer.store.untrained_count() < count:  # noqa: ASYNC110 - polls the store
            await asyncio.sleep(0.1)


async def test_labels_survive_a_restart_and_train_in_the_next_round(
    kafka_settings, group_id, winnow_topics, digits, tmp_path: Path
) -> None:
    settings = loop_settings(kafka_settings, group_id, tmp_path, round_min_labels=10_000)
    async with Trainer(settings) as trainer:
        await _fed_and_stored(trainer, kafka_settings, winnow_topics, digits, 40)
        cold_version = trainer.spec.version
    # a new trainer on the same data directory: same model lineage, labels still there
    async with Trainer(settings) as again:
        assert again.spec.version == cold_version
        assert again.store.untrained_count() == 40
        report = await again.run_round()
        assert report is not None and report.released and report.new_labels == 40
        assert again.store.untrained_count() == 0
        metrics = generate_latest(again.metrics.registry).decode()
        assert 'winnow_trainer_rounds_total{result="released"} 1.0' in metrics
        assert 'winnow_trainer_releases_total{result="published"} 1.0' in metrics
        assert "winnow_trainer_prequential_accuracy" in metrics
    models = manifests(
        await read_json(kafka_settings, winnow_topics.models, lambda out: len(manifests(out)) >= 2)
    )
    assert [m["spec"]["labels_trained"] for m in models] == [0, report.labels_trained]


async def test_a_changed_precision_takes_effect_at_the_next_full_release(
    kafka_settings, group_id, winnow_topics, digits, tmp_path: Path
) -> None:
    """The failure it catches: ``WINNOW_TRAINER_PRECISION`` ignored by a trainer that resumes
    from a checkpoint, or a release whose spec says fp16 while its graph computes in float32."""
    settings = loop_settings(kafka_settings, group_id, tmp_path, round_min_labels=10_000)
    async with Trainer(settings) as trainer:
        await _fed_and_stored(trainer, kafka_settings, winnow_topics, digits, 40)
        assert trainer.spec.precision == "fp32"
    async with Trainer(settings.model_copy(update={"precision": "fp16"})) as again:
        assert again.spec.precision == "fp32"  # the checkpoint's, until the next release
        report = await again.run_round()
        assert report is not None and report.released
        assert again.spec.precision == "fp16"
        version = again.spec.version
    records = await read_json(
        kafka_settings, winnow_topics.models, lambda out: len(manifests(out)) >= 2
    )
    manifest = manifests(records)[-1]
    assert (manifest["version"], manifest["spec"]["precision"]) == (version, "fp16")
    chunks = sorted(
        (ModelChunk.model_validate(r) for r in records if r.get("kind") == "chunk"),
        key=lambda c: c.index,
    )
    artifact = b"".join(c.data for c in chunks if c.version == version)
    weights = onnx.load_from_string(artifact).graph.initializer
    assert {w.data_type for w in weights if np.prod(w.dims) > 16} == {onnx.TensorProto.FLOAT16}
    model = OnnxModel.load(artifact, "cpu")
    probabilities, _ = model.run(np.zeros((2, 1, 16, 16), dtype=np.float32))
    assert probabilities.dtype == np.float32 and model.spec.precision == "fp16"


async def test_topics_are_created_when_missing(kafka_settings, tmp_path: Path) -> None:
    from aiokafka.admin import AIOKafkaAdminClient

    from infra.kafka.connection import client_kwargs

    settings = loop_settings(kafka_settings, "g", tmp_path)
    await ensure_trainer_topics(settings)
    await ensure_trainer_topics(settings)  # idempotent
    admin = AIOKafkaAdminClient(**client_kwargs(settings.kafka))
    await admin.start()
    try:
        existing = set(await admin.list_topics())
    finally:
        await admin.close()
    topics = settings.kafka.topics
    wanted = {topics.label_requests, topics.labels, topics.models, topics.dead_letter}
    assert wanted <= existing


def test_a_trainer_keeps_only_its_latest_reports(kafka_settings, group_id, tmp_path: Path) -> None:
    """The failure it catches: a long-running trainer's report lists growing without end
    (a soak's trainer made 550 releases an hour); the metrics still count every refit."""
    trainer = Trainer(loop_settings(kafka_settings, group_id, tmp_path))
    for i in range(REPORTS_KEPT + 5):
        report = HeadReport(f"v{i}", True, i, 0, None, None, 0.0, "released")
        trainer._account_head(report, 0.0)
    assert len(trainer.head_reports) == REPORTS_KEPT
    assert [trainer.head_reports[0].version, trainer.head_reports[-1].version] == [
        "v5",
        f"v{REPORTS_KEPT + 4}",
    ]
    exposition = generate_latest(trainer.metrics.registry).decode()
    assert f'winnow_trainer_head_refits_total{{result="released"}} {REPORTS_KEPT + 5}.0' in (
        exposition
    )


async def test_blas_runs_one_thread_while_a_trainer_runs(
    kafka_settings, group_id, winnow_topics, tmp_path: Path
) -> None:
    """Catches a trainer whose head refits run numpy's products on every core: beside a busy
    scorer that made them several times slower, and each BLAS thread's buffer kept pages
    in step with the labels (``infra/blas.py``)."""
    from threadpoolctl import threadpool_info, threadpool_limits

    def threads() -> set[int]:
        return {lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas"}

    if not threads():
        pytest.skip("numpy has no BLAS that threadpoolctl can see")
    with threadpool_limits(limits=2, user_api="blas"):
        async with Trainer(_manual_rounds(kafka_settings, group_id, tmp_path)):
            assert threads() == {1}
        assert threads() == {2}  # the limit found before, back after the stop
