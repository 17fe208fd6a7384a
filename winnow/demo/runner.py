"""The demo's orchestration: start everything, stream, watch, summarize."""

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, cast

import numpy as np
import uvicorn

from infra.kafka.admin import ensure_winnow_topics
from infra.kafka.broker import EmbeddedBroker
from infra.kafka.producer import create_producer
from infra.kafka.settings import KafkaSettings
from schemas.frames import FrameHeaders
from service.config import PolicySettings, Settings
from service.drift.monitor import DriftMonitor
from service.http.api import create_app
from service.pipeline.scorer import Scorer
from service.runtime import ScorerRuntime
from trainer.config import TrainerSettings
from trainer.loop import Trainer
from winnow.datasets import ImageDataset, encode_png, load_dataset
from winnow.demo.evaluation import Point, full_label_accuracy, onnx_accuracy, plot, test_inputs
from winnow.demo.labeler import SimulatedLabelers


@dataclass
class Progress:
    sent: int = 0
    versions: list[str] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    unlearned: list[int] = field(default_factory=list)
    """The trainer's count of answered labels the serving model has not learned, sampled."""


def run_demo(args: argparse.Namespace) -> int:
    return asyncio.run(_demo(args))


async def _demo(args: argparse.Namespace) -> int:
    if not args.verbose:  # the demo prints its own story; logs only for trouble
        logging.getLogger().setLevel(logging.WARNING)
    data = load_dataset(args.dataset)
    with (
        tempfile.TemporaryDirectory(prefix="winnow-demo-") as tmp,
        _Broker(KafkaSettings()) as kafka,
    ):
        # One KafkaSettings for the scorer, the trainer and the labelers.
        settings = _scorer_settings(kafka, args)
        await ensure_winnow_topics(kafka)
        async with Trainer(_trainer_settings(kafka, data, args, Path(tmp))) as trainer:
            started: asyncio.Future[ScorerRuntime] = asyncio.get_running_loop().create_future()
            app = create_app(settings, on_started=started.set_result)
            server = uvicorn.Server(
                uvicorn.Config(app, host="127.0.0.1", port=args.http_port, log_level="warning")
            )
            serving = asyncio.create_task(server.serve())
            while not server.started:
                if serving.done():
                    return 1
                await asyncio.sleep(0.05)
            port = server.servers[0].sockets[0].getsockname()[1]
            print(
                f"winnow demo: {data.name} ({len(data.train_images)} frames to stream), broker "
                f"{kafka.bootstrap}, scorer API http://127.0.0.1:{port}/v1/status, policy "
                f"{settings.policy.name} at budget {args.budget:.0%}",
                flush=True,
            )
            try:
                runtime = await started
                summary = await _run(runtime.scorer, trainer, settings, data, args, runtime.drift)
            finally:
                server.should_exit = True
                await serving
    _finish(summary, args)
    return 0


async def _run(
    scorer: Scorer,
    trainer: Trainer,
    settings: Settings,
    data: ImageDataset,
    args: argparse.Namespace,
    drift: DriftMonitor | None = None,
) -> dict:
    order = np.random.default_rng(0).permutation(len(data.train_images))
    if args.max_frames:
        order = order[: args.max_frames]
    labelers = SimulatedLabelers(
        settings.kafka,
        lambda frame_id: _truth(data, frame_id),
        delay_s=args.label_delay,
        rate=args.label_rate,
    )
    progress = Progress()
    inputs = await asyncio.to_thread(test_inputs, data, scorer.model.spec)
    started = time.monotonic()
    await labelers.start()
    watch = asyncio.create_task(_watch(scorer, trainer, inputs, data.test_labels, progress))
    report = asyncio.create_task(_report(scorer, trainer, labelers, progress, started))
    alarms = asyncio.create_task(_alarms(drift, started))
    try:
        await _produce(
            settings.kafka, data, order, args.rate, progress, getattr(args, "inject_shift", None)
        )
        await _settle(scorer, labelers, progress)
        final = await trainer.run_round()  # learn from the last labels too
        if final is not None and final.released:
            await _until(lambda: scorer.model.version == final.version, 60)
        await asyncio.sleep(0.5)  # let the watcher score the last swap
    finally:
        for task in (watch, report, alarms):
            task.cancel()
        await asyncio.gather(watch, report, alarms, return_exceptions=True)
        await labelers.stop()
    full = await asyncio.to_thread(full_label_accuracy, data, scorer.model.spec)
    seconds = time.monotonic() - started
    return _summary(data, args, progress, labelers, scorer, trainer, full, seconds)


def policy_settings(args: argparse.Namespace) -> PolicySettings:
    """The demo's policy: ``--policy`` if given, else the scorer's own (``WINNOW_POLICY_*``,
    or its defaults), at ``--budget``. Raises pydantic's ValidationError on a bad value."""
    chosen = {"name": args.policy} if args.policy else {}
    return PolicySettings(**chosen, budget=args.budget, seed=0)


def _scorer_settings(kafka: KafkaSettings, args: argparse.Namespace) -> Settings:
    """The scorer's settings for a short demo stream: quick batches, a short drift warm-up."""
    base = Settings(kafka=kafka, policy=policy_settings(args))
    # The drift monitor runs when a shift is injected: on a stream of a few thousand frames
    # its per-source tracks and small reference make false alarms (and budget boosts) likely.
    drift = {
        "warmup_frames": 400,
        "statistic_every": 200,
        "enabled": getattr(args, "inject_shift", None) is not None,
    }
    return base.model_copy(
        update={
            "scorer": base.scorer.model_copy(update={"max_wait_ms": 10}),
            "drift": base.drift.model_copy(update=drift),
        }
    )


def _trainer_settings(
    kafka: KafkaSettings, data: ImageDataset, args: argparse.Namespace, tmp: Path
) -> TrainerSettings:
    return TrainerSettings(
        data_dir=tmp / "trainer",
        classes=data.classes,
        arch="small-cnn",
        input_size=args.input_size or (16 if data.name == "digits" else 28),
        channels=cast(Literal[1, 3], data.channels),
        device="auto",
        round_min_labels=args.round_labels,
        round_max_seconds=args.round_seconds,
        holdout_fraction=0.15,
        metrics_port=0,
        kafka=kafka,  # as given: TLS and SASL included; the trainer names itself winnow-trainer
    )


def _truth(data: ImageDataset, frame_id: str) -> str | None:
    prefix, _, index = frame_id.partition("-")
    if prefix != "train" or not index.isdigit():
        return None
    return data.classes[int(data.train_labels[int(index)])]


async def _produce(
    kafka: KafkaSettings,
    data: ImageDataset,
    order: np.ndarray,
    rate: float,
    progress: Progress,
    shift: str | None = None,
) -> None:
    """Streams the frames; with ``shift``, the second half of the stream is shifted."""
    producer = create_producer(kafka)
    await producer.start()
    shifted = {}
    if shift is not None:
        from winnow.bench.drift_data import shift_images

        later = order[len(order) // 2 :]
        images = shift_images(shift, data.train_images[later], np.random.default_rng(0))
        shifted = dict(zip(later.tolist(), images, strict=True))
    try:
        period, next_at = (1 / rate if rate > 0 else 0.0), time.monotonic()
        for position, index in enumerate(order.tolist()):
            if shift is not None and position == len(order) // 2:
                print(f"  injecting a {shift} shift from frame {position} on", flush=True)
            headers = FrameHeaders(
                frame_id=f"train-{index}", captured_at=datetime.now(UTC), content_type="image/png"
            )
            await producer.send(
                kafka.topics.frames,
                encode_png(shifted.get(index, data.train_images[index])),
                key=f"camera-{index % 2}".encode(),
                headers=headers.to_kafka(),
            )
            progress.sent += 1
            if period:
                next_at += period
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await producer.flush()
    finally:
        await producer.stop()


async def _settle(scorer: Scorer, labelers: SimulatedLabelers, progress: Progress) -> None:
    """Waits until every frame is scored and every request answered."""
    await _until(lambda: sum(scorer.accounting.counts.values()) >= progress.sent, 120)
    await asyncio.sleep(1.0)  # the last requests reach the labelers
    await _until(lambda: labelers.pending == 0, 120)
    await asyncio.sleep(1.0)  # the last labels reach the trainer's store


async def _until(condition: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not condition() and time.monotonic() < deadline:  # noqa: ASYNC110 - polls state
        await asyncio.sleep(0.1)


async def _watch(
    scorer: Scorer, trainer: Trainer, inputs: np.ndarray, labels: np.ndarray, progress: Progress
) -> None:
    """Scores every model the scorer swaps in on the test split; samples the unlearned count."""
    while True:
        progress.unlearned.append(trainer.labels_unlearned)
        model = scorer.model
        if model.version not in progress.versions:
            progress.versions.append(model.version)
            acc = await asyncio.to_thread(onnx_accuracy, model, inputs, labels)
            heads = {r.version for r in trainer.head_reports if r.released}
            point = Point(model.version, model.spec.labels_trained, acc, model.version in heads)
            progress.points.append(point)
            kind = "head-only release" if point.head else "model"
            print(
                f"  {kind} {point.version} serving, learned from {point.labels} labels: "
                f"test accuracy {point.accuracy:.3f}",
                flush=True,
            )
        await asyncio.sleep(0.2)


async def _alarms(drift: DriftMonitor | None, started: float) -> None:
    """Prints the drift alarms as they happen, one line per detector and half second."""
    seen = 0
    while drift is not None:
        await asyncio.sleep(0.5)
        if drift.alarms > seen:
            fresh = drift.events[-min(len(drift.events), drift.alarms - seen) :]
            for detector in dict.fromkeys(e.detector for e in fresh):
                events = [e for e in fresh if e.detector == detector]
                last = events[-1]
                sources = sorted({e.source_id or "all" for e in events})
                print(
                    f"  [{time.monotonic() - started:5.1f}s] DRIFT ALARM {detector} x{len(events)} "
                    f"({', '.join(sources)}): statistic {last.statistic:.4g} > "
                    f"{last.threshold:.4g}, model {last.model_version}; label budget boosted",
                    flush=True,
                )
            seen = drift.alarms


async def _report(
    scorer: Scorer,
    trainer: Trainer,
    labelers: SimulatedLabelers,
    progress: Progress,
    started: float,
) -> None:
    while True:
        await asyncio.sleep(2.0)
        counts = scorer.accounting.counts
        scored = counts["selected"] + counts["not_selected"]
        accuracy = progress.points[-1].accuracy if progress.points else float("nan")
        print(
            f"[{time.monotonic() - started:5.1f}s] frames {progress.sent} sent, {scored} "
            f"scored | requests {counts['selected']} | labels {len(labelers.answered)}, "
            f"{trainer.labels_unlearned} not learned yet | model {scorer.model.version} | "
            f"test accuracy {accuracy:.3f}",
            file=sys.stderr,
            flush=True,
        )


def _summary(
    data: ImageDataset,
    args: argparse.Namespace,
    progress: Progress,
    labelers: SimulatedLabelers,
    scorer: Scorer,
    trainer: Trainer,
    full: float,
    seconds: float,
) -> dict:
    points, unlearned = progress.points, progress.unlearned or [0]
    return {
        "dataset": data.name,
        "frames": progress.sent,
        "label_requests": scorer.accounting.counts["selected"],
        "labels_used": len(labelers.answered),
        "labeled_fraction": round(len(labelers.answered) / max(1, progress.sent), 4),
        # the holdout share of the answers is never learned from: it judges releases
        "labels_learned": scorer.model.spec.labels_trained,
        "labels_unlearned_max": max(unlearned),
        "labels_unlearned_mean": round(float(np.mean(unlearned)), 2),
        "labels_unlearned_final": trainer.labels_unlearned,
        "head_releases": sum(1 for p in points if p.head),
        "model_versions": len(progress.versions),
        "initial_accuracy": points[0].accuracy if points else None,
        "final_accuracy": points[-1].accuracy if points else None,
        "full_accuracy": full,
        "budget": args.budget,
        "policy": scorer.settings.policy.name,
        "seconds": round(seconds, 1),
        "inject_shift": getattr(args, "inject_shift", None),
        "drift_alarms": scorer.metrics.drift_alarms_total(),
        "history": [asdict(p) for p in points],
        "rounds_rejected": [
            {"labels": r.labels_trained, "reason": r.reason}
            for r in trainer.reports
            if not r.released
        ],
    }


def _finish(summary: dict, args: argparse.Namespace) -> None:
    points = [Point(**p) for p in summary["history"]]
    plot(
        points,
        summary["full_accuracy"],
        args.plot,
        f"Winnow on {summary['dataset']}: {summary['labels_used']} labels of "
        f"{summary['frames']} frames",
    )
    print("\nwinnow demo summary")
    print(f"  {'model':<24} {'labels':>7} {'test accuracy':>14}")
    for point in points:  # head-only releases in between are on the plot
        if not point.head or point is points[-1]:
            print(f"  {point.version:<24} {point.labels:>7} {point.accuracy:>14.3f}")
    print(
        f"  {'all training labels':<24} {len(points) and summary['frames']:>7} "
        f"{summary['full_accuracy']:>14.3f}"
    )
    print(
        f"  labels used {summary['labels_used']} of {summary['frames']} frames "
        f"({summary['labeled_fraction']:.1%}); final accuracy {summary['final_accuracy']:.3f} "
        f"vs {summary['full_accuracy']:.3f} with every label"
    )
    print(
        f"  the final model learned from {summary['labels_learned']} of the "
        f"{summary['labels_used']} answers (the holdout share judges releases); "
        f"{summary['head_releases']} head-only releases in between; answered labels not yet "
        f"learned: at most {summary['labels_unlearned_max']}, "
        f"{summary['labels_unlearned_mean']:.1f} on average"
    )
    for rejected in summary["rounds_rejected"]:
        print(f"  a round was not released (the release gate): {rejected['reason']}")
    print(f"  plot: {args.plot}")
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"  summary: {args.json}")


class _Broker:
    """The configured cluster, or an embedded broker on a free loopback port.

    ``with _Broker(kafka) as settings`` gives the settings every part connects
    with: ``kafka`` itself when it has a bootstrap address, else a copy that
    points at the embedded broker.
    """

    def __init__(self, kafka: KafkaSettings) -> None:
        self._kafka = kafka
        self._embedded: EmbeddedBroker | None = None

    def __enter__(self) -> KafkaSettings:
        if self._kafka.bootstrap is not None:
            return self._kafka
        self._embedded = EmbeddedBroker(0)
        self._embedded.start()
        # Tansu completes a group join after about half the session timeout.
        return self._kafka.model_copy(
            update={
                "bootstrap": self._embedded.bootstrap,
                "session_timeout_ms": 2000,
                "heartbeat_interval_ms": 500,
            }
        )

    def __exit__(self, *exc: object) -> None:
        if self._embedded is not None:
            self._embedded.stop()
