"""The scorer end to end on the real broker: predictions, requests, dead letters, commits."""

import asyncio
import functools
import gc
import io
import logging
import struct
import threading
import time
import zlib
from collections import Counter
from collections.abc import Collection
from typing import Any

import numpy as np
import pytest
from PIL import Image

from schemas.api import PolicyUpdate
from schemas.dead_letter import DeadLetter
from schemas.label_requests import LabelRequest
from schemas.predictions import Prediction
from service.config import PolicySettings, Settings
from service.model.inference import OnnxModel
from service.pipeline import scorer as scorer_module
from service.pipeline.run_place import RunPlace
from service.pipeline.scorer import Scorer
from service.scoring.engine import Forward, ScoringEngine
from service.selection.policy import QueryPolicy
from tests.kafka_helpers import committed_offsets, end_offsets, produce, read_json


def _headers(frame_id: str) -> list[tuple[str, bytes]]:
    return [
        ("frame-id", frame_id.encode()),
        ("content-type", b"image/png"),
        ("captured-at", b"2026-11-22T10:00:00Z"),
    ]


async def test_every_frame_gets_a_prediction_and_a_budgeted_share_is_requested(
    scorer_settings, digits_model_path, digit_pngs, winnow_topics
) -> None:
    settings = scorer_settings(name="random", budget=0.2, window=300)
    frames = [
        (f"cam-{i % 3}".encode(), png, _headers(f"f{i}")) for i, png in enumerate(digit_pngs[:300])
    ]
    await produce(settings.kafka, winnow_topics.frames, frames)
    model = OnnxModel.load(digits_model_path, device="cpu")
    async with Scorer(settings, model) as scorer:
        predictions = await read_json(
            settings.kafka,
            winnow_topics.predictions,
            lambda out: len({p["frame_id"] for p in out}) >= 300,
        )
    by_id = {p["frame_id"]: Prediction.model_validate(p) for p in predictions}
    assert set(by_id) == {f"f{i}" for i in range(300)}
    assert {p["_key"] for p in predictions} == {b"cam-0", b"cam-1", b"cam-2"}
    first = by_id["f0"]
    assert first.source_id == "cam-0" and first.model_version == model.version
    assert abs(sum(first.probabilities.values()) - 1) < 1e-4
    selected = {fid for fid, p in by_id.items() if p.decision.selected}
    # an untrained model (labels_trained == 0) samples at random: AIFT's cold start
    assert {by_id[fid].decision.reason for fid in selected} == {"cold_start"}
    assert 0 < len(selected) <= 0.2 * 300
    requests = await read_json(
        settings.kafka,
        winnow_topics.label_requests,
        lambda out: len(out) >= len(selected),
        within=20,
    )
    assert {r["frame_id"] for r in requests} == selected
    request = LabelRequest.model_validate(requests[0])
    assert requests[0]["_key"] == request.frame_id.encode()
    assert request.image == digit_pngs[int(request.frame_id[1:])]
    assert request.classes == [str(d) for d in range(10)]
    assert scorer.accounting.counts["selected"] == len(selected)
    committed = await committed_offsets(
        settings.kafka, winnow_topics.frames, settings.scorer.group_id
    )
    assert sum(committed.values()) == 300


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge image: a decompression bomb's calling card."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        body = kind + data
        return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 64)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def _jpeg() -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.full((64, 64, 3), 128, np.uint8)).save(buffer, format="JPEG")
    return buffer.getvalue()


async def test_bad_input_goes_to_dead_letter_and_later_frames_are_scored(
    scorer_settings, digits_model_path, digit_pngs, winnow_topics
) -> None:
    settings = scorer_settings()
    tuned = settings.scorer.model_copy(update={"max_frame_bytes": 200_000})
    settings = settings.model_copy(update={"scorer": tuned})
    gif = bytes.fromhex(
        "47494638396101000100800000000000ffffff21f90400000000002c00000000010001000002024401003b"
    )
    bad = {
        "empty": b"",
        "too_large": b"\x89PNG" + b"\x00" * 300_000,
        "unsupported_type": gif,
        "undecodable": b"this is not an image at all",
        "truncated": digit_pngs[0][: len(digit_pngs[0]) // 2],
        "too_many_pixels": _png_claiming(100_000, 100_000),
    }
    records = [(b"cam", png, _headers(f"good-{i}")) for i, png in enumerate(digit_pngs[:5])]
    records += [(b"cam", value, [("frame-id", reason.encode())]) for reason, value in bad.items()]
    records.append((b"cam", _jpeg()[:200], [("frame-id", b"truncated-jpeg")]))
    records.append((b"cam", None, [("frame-id", b"null-value")]))
    records += [(b"cam", png, _headers(f"after-{i}")) for i, png in enumerate(digit_pngs[5:25])]
    await produce(settings.kafka, winnow_topics.frames, records)
    model = OnnxModel.load(digits_model_path, device="cpu")
    async with Scorer(settings, model) as scorer:
        letters = await read_json(
            settings.kafka, winnow_topics.dead_letter, lambda out: len(out) >= len(bad) + 2
        )
        predictions = await read_json(
            settings.kafka, winnow_topics.predictions, lambda out: len(out) >= 25
        )
    parsed = [DeadLetter.model_validate(d) for d in letters]
    by_id = {d.headers["frame-id"]: d for d in parsed}
    for reason in bad:
        assert by_id[reason].reason == reason, (reason, by_id[reason].detail)
    assert by_id["truncated-jpeg"].reason == "truncated"
    assert by_id["null-value"].reason == "empty"
    assert by_id["too_large"].value_size == len(bad["too_large"])
    assert all(d.origin.topic == winnow_topics.frames and d.role == "scorer" for d in parsed)
    assert sorted(d.origin.offset for d in parsed) == list(range(5, 5 + len(bad) + 2))
    assert all(d["_key"] == b"cam" for d in letters)
    scored = {p["frame_id"] for p in predictions}
    assert scored == {f"good-{i}" for i in range(5)} | {f"after-{i}" for i in range(20)}
    assert scorer.accounting.counts["invalid"] == len(bad) + 2
    committed = await committed_offsets(
        settings.kafka, winnow_topics.frames, settings.scorer.group_id
    )
    assert sum(committed.values()) == len(records)


async def test_frame_id_is_derived_from_origin_when_header_absent(
    scorer_settings, digits_model_path, digit_pngs, winnow_topics
) -> None:
    settings = scorer_settings()
    tuned = settings.scorer.model_copy(update={"publish_predictions": True})
    settings = settings.model_copy(update={"scorer": tuned})
    await produce(settings.kafka, winnow_topics.frames, [(None, digit_pngs[0], [])])
    async with Scorer(settings, OnnxModel.load(digits_model_path, device="cpu")):
        (prediction,) = await read_json(
            settings.kafka, winnow_topics.predictions, lambda out: len(out) >= 1
        )
    origin = prediction["origin"]
    assert prediction["frame_id"] == f"{origin['topic']}:{origin['partition']}:{origin['offset']}"
    assert prediction["source_id"] is None


async def test_restart_resumes_from_committed_offsets_without_rescoring(
    scorer_settings, digits_model_path, digit_pngs, winnow_topics
) -> None:
    settings = scorer_settings()
    model = OnnxModel.load(digits_model_path, device="cpu")
    first = [(b"cam", png, _headers(f"a{i}")) for i, png in enumerate(digit_pngs[:40])]
    await produce(settings.kafka, winnow_topics.frames, first)
    async with Scorer(settings, model):
        await read_json(settings.kafka, winnow_topics.predictions, lambda out: len(out) >= 40)
    second = [(b"cam", png, _headers(f"b{i}")) for i, png in enumerate(digit_pngs[40:60])]
    await produce(settings.kafka, winnow_topics.frames, second)
    async with Scorer(settings, model) as scorer:
        out = await read_json(settings.kafka, winnow_topics.predictions, lambda out: len(out) >= 60)
    counts = Counter(p["frame_id"] for p in out)
    assert set(counts) == {f"a{i}" for i in range(40)} | {f"b{i}" for i in range(20)}
    assert max(counts.values()) == 1, "a clean stop commits: nothing is scored twice"
    assert scorer.accounting.counts["selected"] + scorer.accounting.counts["not_selected"] == 20


async def test_predictions_can_be_turned_off(
    scorer_settings, digits_model_path, digit_pngs, winnow_topics
) -> None:
    settings = scorer_settings(name="random", budget=1.0)
    tuned = settings.scorer.model_copy(update={"publish_predictions": False})
    settings = settings.model_copy(update={"scorer": tuned})
    await produce(
        settings.kafka,
        winnow_topics.frames,
        [(b"cam", png, _headers(f"f{i}")) for i, png in enumerate(digit_pngs[:10])],
    )
    async with Scorer(settings, OnnxModel.load(digits_model_path, device="cpu")) as scorer:
        await read_json(settings.kafka, winnow_topics.label_requests, lambda out: len(out) >= 10)
    assert scorer.accounting.counts["selected"] == 10
    assert await end_offsets(settings.kafka, winnow_topics.predictions) == {0: 0, 1: 0, 2: 0}


def test_collaborators_hear_every_model_served(digits_model_path) -> None:
    model = OnnxModel.load(digits_model_path, device="cpu")
    trained = OnnxModel.load(digits_model_path, device="cpu")
    trained._spec = trained.spec.model_copy(update={"labels_trained": 50, "version": "trained"})
    heard: list[str] = []
    scorer = Scorer(Settings(), model, on_swap=[lambda m: heard.append(m.version)])
    assert heard == [model.version]  # the first model, at construction
    assert scorer.policy.cold_start and scorer.policy.needs == frozenset()
    scorer.swap_model(trained)
    assert heard == [model.version, "trained"] and scorer.model is trained
    assert not scorer.policy.cold_start and scorer.policy.needs == {"margin"}  # the default


async def test_a_new_model_re_embeds_the_frames_asked_for(digits_model_path) -> None:
    """The embedding strategies keep their memory across a model swap: before the first batch
    of the new model is decided, the frames asked for are embedded by it."""
    model = OnnxModel.load(digits_model_path, device="cpu")
    trained = OnnxModel.load(digits_model_path, device="cpu")
    trained._spec = trained.spec.model_copy(update={"labels_trained": 50, "version": "trained"})
    rebased: list[tuple[tuple[int, ...], tuple[int, ...] | None]] = []

    class _Recorded(QueryPolicy):
        def rebase(self, embeddings: np.ndarray, probabilities: np.ndarray | None = None) -> None:
            shape = None if probabilities is None else probabilities.shape
            rebased.append((embeddings.shape, shape))
            super().rebase(embeddings, probabilities)

    settings = PolicySettings(name="herding", budget=0.5, window=10, seed=0)
    policy = _Recorded.from_settings(settings)
    scorer = Scorer(Settings(), model, policy=policy)
    inputs = np.random.default_rng(0).normal(size=(6, 1, 16, 16)).astype(np.float32)
    await scorer._rebase(model, inputs)  # the first model: nothing to carry over
    scorer._exemplars.add(inputs[:4])
    await scorer._rebase(model, inputs)  # the same model again: nothing either
    assert rebased == []
    scorer.swap_model(trained)
    await scorer._rebase(trained, inputs)
    assert rebased == [((4, trained.spec.embedding_dim), (4, 10))]
    assert policy.memory == 256 and scorer._exemplars.capacity == 256
    head_only = OnnxModel.load(digits_model_path, device="cpu")
    head_only._spec = trained.spec.model_copy(
        update={"version": "head", "backbone_version": "trained"}
    )
    scorer.swap_model(head_only)
    await scorer._rebase(head_only, inputs)  # the same backbone: the same embeddings
    assert len(rebased) == 1


async def test_a_new_backbone_reaches_a_policy_that_remembers_no_frame(digits_model_path) -> None:
    """A policy whose strategies keep no frame (memory 0) is still told of a new backbone, so
    its filters drop the rows they kept of the old embedding space (dedup, density)."""
    model = OnnxModel.load(digits_model_path, device="cpu")
    trained = OnnxModel.load(digits_model_path, device="cpu")
    trained._spec = trained.spec.model_copy(update={"labels_trained": 50, "version": "trained"})
    rebased: list[tuple[int, ...]] = []

    class _Recorded(QueryPolicy):
        def rebase(self, embeddings: np.ndarray, probabilities: np.ndarray | None = None) -> None:
            rebased.append(embeddings.shape)
            super().rebase(embeddings, probabilities)

    settings = PolicySettings(
        name="variable", filters=["dedup", "density"], cold_start="random", seed=0
    )
    policy = _Recorded.from_settings(settings)
    assert policy.memory == 0
    scorer = Scorer(Settings(), model, policy=policy)
    inputs = np.random.default_rng(0).normal(size=(6, 1, 16, 16)).astype(np.float32)
    await scorer._rebase(model, inputs)
    scorer.swap_model(trained)
    await scorer._rebase(trained, inputs)
    assert rebased == [(0, 0)]


async def test_a_policy_change_during_inference_is_scored_again(digits_model_path) -> None:
    """A live PUT /v1/policy, while the batch's model run is under way, to a utility that run
    did not cover (AIFT's views): the batch is run again for it before it is decided."""
    model = OnnxModel.load(digits_model_path, device="cpu")
    policy = QueryPolicy.from_settings(PolicySettings(utility="entropy", cold_start_random=False))
    asked: list[set[str]] = []

    class _Engine(ScoringEngine):
        def forward(self, model: Any, inputs: np.ndarray, needs: Collection[str]) -> Forward:
            asked.append(set(needs))
            return super().forward(model, inputs, needs)

    engine = _Engine()
    scorer = Scorer(Settings(), model, policy=policy, engine=engine)
    inputs = np.zeros((3, model.spec.channels, *model.spec.input_size), dtype=np.float32)
    forward = engine.forward(model, inputs, policy.needs)
    policy.update(PolicyUpdate(utility="aift"))
    scored = await scorer._score(model, inputs, forward)
    assert asked == [{"entropy"}, {"aift"}] and "aift" in scored.scores
    assert len(policy.decide(scored.scores)) == 3


async def test_a_crashed_stage_fails_the_scorer_and_stop_does_not_wait_for_a_drain(
    scorer_settings, digits_model_path, digit_pngs, winnow_topics
) -> None:
    """Catches a stop that waits the whole drain timeout for stages a crash left blocked."""
    settings = scorer_settings()

    def broken_observer(_batch: object) -> None:
        raise RuntimeError("observer bug")

    scorer = Scorer(
        settings, OnnxModel.load(digits_model_path, device="cpu"), on_batch=[broken_observer]
    )
    await scorer.start()
    try:
        await produce(
            settings.kafka, winnow_topics.frames, [(b"cam", digit_pngs[0], _headers("x0"))]
        )
        with pytest.raises(RuntimeError, match="observer bug"):
            async with asyncio.timeout(60):
                await scorer.wait()
    finally:
        started = time.monotonic()
        await scorer.stop()
    assert time.monotonic() - started < 10
    committed = await committed_offsets(
        settings.kafka, winnow_topics.frames, settings.scorer.group_id
    )
    assert set(committed.values()) == {0}, "nothing undelivered is committed"


async def test_model_runs_a_failed_run_leaves_behind_are_settled_at_stop(
    scorer_settings, digits_model_path, digit_pngs, winnow_topics, caplog
) -> None:
    """Two batches run at once and both runs fail: the scorer fails with the first, and the
    second, which no stage takes any more, is settled at stop and said in one warning.
    Catches asyncio's "Task exception was never retrieved" with a traceback at exit (the
    second run's error, unread when its task was collected)."""
    caplog.set_level(logging.INFO)
    base = scorer_settings(name="random", budget=0.2, window=300)
    scorer_part = base.scorer.model_copy(
        update={"max_batch_size": 4, "cpu_threads": 2, "cpu_parallelism": "batches"}
    )
    settings = base.model_copy(update={"scorer": scorer_part})

    class _Engine(ScoringEngine):
        def forward(self, model: Any, inputs: np.ndarray, needs: Collection[str]) -> Forward:
            time.sleep(0.2)  # long enough for the next batch's run to start beside it
            raise RuntimeError("model run failed")

    frames = [(b"cam", png, _headers(f"f{i}")) for i, png in enumerate(digit_pngs[:16])]
    await produce(settings.kafka, winnow_topics.frames, frames)
    model = OnnxModel.load(digits_model_path, device="cpu", intra_op_threads=1)
    scorer = Scorer(settings, model, engine=_Engine())
    await scorer.start()
    try:
        with pytest.raises(RuntimeError, match="model run failed"):
            async with asyncio.timeout(60):
                await scorer.wait()
        await asyncio.sleep(0.5)  # the second run ends meanwhile, its error unread
    finally:
        await scorer.stop()
    unread: list[str] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, ctx: unread.append(ctx["message"]))
    del scorer  # its failed stage's traceback holds the queue with the second run
    gc.collect()
    await asyncio.sleep(0.05)
    assert not unread, unread
    messages = [r.getMessage() for r in caplog.records]
    assert [m for m in messages if "left behind" in m and "model run failed" in m], messages
    committed = await committed_offsets(
        settings.kafka, winnow_topics.frames, settings.scorer.group_id
    )
    assert set(committed.values()) <= {0}, "nothing undecided is committed"


@pytest.mark.parametrize(("parallelism", "at_once"), [("batches", 2), ("operators", 1)])
async def test_batches_inferred_at_once_are_decided_in_stream_order(
    scorer_settings, digits_model_path, digit_pngs, winnow_topics, parallelism: str, at_once: int
) -> None:
    """On the CPU with two threads, ``batches`` runs two batches' models at once and
    ``operators`` one; runs that end out of order (the first made slow) are still decided,
    sent and committed in stream order, every frame once."""
    base = scorer_settings(name="random", budget=0.2, window=300)
    scorer_part = base.scorer.model_copy(
        update={"max_batch_size": 4, "cpu_threads": 2, "cpu_parallelism": parallelism}
    )
    settings = base.model_copy(update={"scorer": scorer_part})
    running, most = 0, 0
    lock = threading.Lock()
    delays = iter([0.4] + [0.02] * 1000)  # the first run outlasts the ones after it

    class _Engine(ScoringEngine):
        def forward(self, model: Any, inputs: np.ndarray, needs: Collection[str]) -> Forward:
            nonlocal running, most
            with lock:
                running += 1
                most = max(most, running)
                delay = next(delays)
            time.sleep(delay)
            try:
                return super().forward(model, inputs, needs)
            finally:
                with lock:
                    running -= 1

    decided: list[tuple[int, int]] = []  # (partition, offset) in the order batches are decided
    frames = [(b"cam", png, _headers(f"f{i}")) for i, png in enumerate(digit_pngs[:40])]
    await produce(settings.kafka, winnow_topics.frames, frames)
    model = OnnxModel.load(digits_model_path, device="cpu", intra_op_threads=1)

    def observer(batch: Any) -> None:
        decided.extend((f.origin.partition, f.origin.offset) for f in batch.frames)

    async with Scorer(settings, model, engine=_Engine(), on_batch=[observer]) as scorer:
        predictions = await read_json(
            settings.kafka, winnow_topics.predictions, lambda out: len(out) >= 40
        )
        assert scorer._concurrency == at_once
    assert most == at_once
    assert sorted(decided) == sorted(set(decided)) and len(decided) == 40
    assert decided == sorted(decided)  # one key: one partition, decided in offset order
    assert [p["frame_id"] for p in predictions] == [f"f{i}" for i in range(40)]
    committed = await committed_offsets(
        settings.kafka, winnow_topics.frames, settings.scorer.group_id
    )
    assert sum(committed.values()) == 40


async def test_a_model_that_runs_in_a_blink_runs_on_the_event_loop_after_its_first_run(
    scorer_settings, digits_model_path, digit_pngs, winnow_topics, monkeypatch
) -> None:
    """The digits model's runs of 8 frames take well under the limit: the first runs go
    to the infer pool (nothing is known of the model yet), the rest run on the loop, every
    frame decided once and in order; made slow (10 times the limit a run), its runs go back
    to the pool after the first slow one.

    The limit is 20 ms here instead of the scorer's 2 ms (``INLINE_RUN_S``), the slow runs
    200 ms instead of 20: the same proportions, so the same choices, but a run of 8 digits
    (about 0.3 ms) preempted on a busy machine (the suite beside benchmarks on 2 cores
    failed this at 2 ms) still counts as fast."""
    monkeypatch.setattr(scorer_module, "RunPlace", functools.partial(RunPlace, limit_s=0.02))
    base = scorer_settings(name="random", budget=0.2, window=300)
    settings = base.model_copy(
        update={"scorer": base.scorer.model_copy(update={"max_batch_size": 8})}
    )
    threads: list[str] = []
    slow = False

    class _Engine(ScoringEngine):
        def forward(self, model: Any, inputs: np.ndarray, needs: Collection[str]) -> Forward:
            threads.append(threading.current_thread().name)
            if slow:
                time.sleep(0.2)
            return super().forward(model, inputs, needs)

    frames = [(b"cam", png, _headers(f"f{i}")) for i, png in enumerate(digit_pngs[:120])]
    model = OnnxModel.load(digits_model_path, device="cpu", intra_op_threads=1)
    async with Scorer(settings, model, engine=_Engine()):
        await produce(settings.kafka, winnow_topics.frames, frames[:80])
        await read_json(settings.kafka, winnow_topics.predictions, lambda out: len(out) >= 80)
        fast, threads[:] = list(threads), []
        slow = True
        await produce(settings.kafka, winnow_topics.frames, frames[80:])
        predictions = await read_json(
            settings.kafka, winnow_topics.predictions, lambda out: len(out) >= 120
        )
    main = threading.current_thread().name
    known = next(i for i, name in enumerate(fast) if name == main)  # the first run on the loop
    assert known >= 1 and all(n.startswith("winnow-infer") for n in fast[:known]), fast
    assert fast[known:].count(main) >= max(3, len(fast[known:]) - 1), fast  # a hiccup aside
    assert len(threads) >= 3 and threads.count(main) <= 1, threads  # slow: back to the pool
    assert [p["frame_id"] for p in predictions] == [f"f{i}" for i in range(120)]
