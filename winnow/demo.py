"""``winnow demo``: the embedded broker, the scorer and a camera replaying digits.

Everything runs in one process on loopback: a Tansu broker, ``winnow serve``'s
app (scorer + HTTP API), a producer that streams scikit-learn's digits as PNG
frames (with a few corrupted ones to show the dead-letter path), and a viewer
that reads ``winnow.predictions`` and ``winnow.label-requests`` like any client
would and prints what happens.
"""

import argparse
import asyncio
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import uvicorn
from aiokafka import AIOKafkaConsumer

from schemas.frames import FrameHeaders
from schemas.label_requests import LabelRequest
from schemas.predictions import Prediction
from service.api import create_app
from service.config import KafkaSettings, PolicySettings, Settings
from service.kafka.broker import EmbeddedBroker
from service.kafka.connection import client_kwargs
from service.kafka.producer import create_producer
from winnow.datasets import encode_png, load_digits_dataset

log = logging.getLogger(__name__)


@dataclass
class DemoProgress:
    sent: int = 0
    corrupted: int = 0
    scored: set[str] = field(default_factory=set)
    requested: set[str] = field(default_factory=set)
    dead_letters: int = 0
    producing_done: bool = False
    complete: asyncio.Event = field(default_factory=asyncio.Event)

    def check(self) -> None:
        """Sets ``complete`` once every frame sent has a prediction or a dead letter."""
        expected = self.sent - self.corrupted
        if (
            self.producing_done
            and len(self.scored) >= expected
            and (self.dead_letters >= self.corrupted)
        ):
            self.complete.set()


def run_demo(args: argparse.Namespace) -> int:
    return asyncio.run(_demo(args))


async def _demo(args: argparse.Namespace) -> int:
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    settings = Settings(policy=PolicySettings(name=args.policy, budget=args.budget, seed=0))
    settings.scorer.max_wait_ms = 10
    with tempfile.TemporaryDirectory(prefix="winnow-demo-") as tmp, _broker(settings) as broker:
        model_path = Path(tmp) / "digits-init.onnx"
        _init_model(model_path)
        settings.scorer.model_path = model_path
        settings.http.port = args.http_port
        app = create_app(settings)
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
            f"winnow demo: broker {broker}, scorer API http://127.0.0.1:{port}/v1/status, "
            f"policy {args.policy} at budget {args.budget:.0%}",
            flush=True,
        )
        progress = DemoProgress()
        summary = await _stream(settings, args, progress)
        server.should_exit = True
        await serving
    _print_summary(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
        print(f"summary written to {args.json}")
    return (
        0 if summary["frames_scored"] == summary["frames_sent"] - summary["frames_corrupted"] else 1
    )


class _broker:
    """The configured cluster, or an embedded broker on a free loopback port."""

    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._embedded: EmbeddedBroker | None = None

    def __enter__(self) -> str:
        if self._settings.kafka.bootstrap is None:
            self._embedded = EmbeddedBroker(0)
            self._embedded.start()
            # Tansu completes a group join after about half the session timeout.
            self._settings.kafka = KafkaSettings(
                bootstrap=self._embedded.bootstrap,
                session_timeout_ms=2000,
                heartbeat_interval_ms=500,
            )
        return str(self._settings.kafka.bootstrap)

    def __exit__(self, *exc: object) -> None:
        if self._embedded is not None:
            self._embedded.stop()


def _init_model(path: Path) -> None:
    from trainer.model_init import init_model

    init_model(
        classes=[str(d) for d in range(10)],
        input_size=16,
        arch="small-cnn",
        out=path,
        channels=1,
        seed=0,
    )


async def _stream(settings: Settings, args: argparse.Namespace, progress: DemoProgress) -> dict:
    started = time.monotonic()
    producing = asyncio.create_task(_produce(settings, args, progress))
    viewer = asyncio.create_task(_view(settings, progress))
    reporter = asyncio.create_task(_report(progress, started))
    await producing
    progress.producing_done = True
    progress.check()
    try:
        await asyncio.wait_for(progress.complete.wait(), timeout=60)
    except TimeoutError:
        print("winnow demo: not every frame was scored within 60 s", file=sys.stderr)
    for task in (viewer, reporter):
        task.cancel()
    await asyncio.gather(viewer, reporter, return_exceptions=True)
    elapsed = time.monotonic() - started
    return {
        "frames_sent": progress.sent,
        "frames_corrupted": progress.corrupted,
        "frames_scored": len(progress.scored),
        "dead_letters": progress.dead_letters,
        "label_requests": len(progress.requested),
        "requested_fraction": len(progress.requested) / max(1, len(progress.scored)),
        "budget": args.budget,
        "policy": args.policy,
        "seconds": round(elapsed, 2),
        "frames_per_second": round(progress.sent / elapsed, 1),
    }


async def _produce(settings: Settings, args: argparse.Namespace, progress: DemoProgress) -> None:
    data = load_digits_dataset()
    images = list(data.train_images) + list(data.test_images)
    limit = len(images) if args.max_frames is None else min(args.max_frames, len(images))
    producer = create_producer(settings.kafka)
    await producer.start()
    try:
        period = 1 / args.rate if args.rate > 0 else 0.0
        next_at = time.monotonic()
        for index in range(limit):
            value = encode_png(images[index])
            if args.corrupt_every and index % args.corrupt_every == args.corrupt_every - 1:
                value = value[: len(value) // 2]  # a truncated PNG: must be dead-lettered
                progress.corrupted += 1
            headers = FrameHeaders(
                frame_id=f"digits-{index}", captured_at=datetime.now(UTC), content_type="image/png"
            )
            await producer.send(
                settings.kafka.topics.frames,
                value,
                key=f"digits-cam-{index % 2}".encode(),
                headers=headers.to_kafka(),
            )
            progress.sent += 1
            if period:
                next_at += period
                await asyncio.sleep(max(0.0, next_at - time.monotonic()))
        await producer.flush()
    finally:
        await producer.stop()


async def _view(settings: Settings, progress: DemoProgress) -> None:
    topics = settings.kafka.topics
    consumer = AIOKafkaConsumer(
        topics.predictions,
        topics.label_requests,
        topics.dead_letter,
        group_id=None,
        auto_offset_reset="earliest",
        **client_kwargs(settings.kafka),
    )
    await consumer.start()
    try:
        async for record in consumer:
            if record.topic == topics.predictions:
                progress.scored.add(Prediction.model_validate_json(record.value).frame_id)
            elif record.topic == topics.label_requests:
                request = LabelRequest.model_validate_json(record.value)
                if request.frame_id not in progress.requested:
                    progress.requested.add(request.frame_id)
                    print(
                        f"  label request {request.frame_id:<12} predicted {request.label} "
                        f"({request.confidence:.2f})  {request.decision.reason}, "
                        f"entropy {request.scores.entropy:.2f}",
                        flush=True,
                    )
            else:
                progress.dead_letters += 1
                letter = json.loads(record.value)
                print(
                    f"  dead letter  offset {letter['origin']['offset']}: {letter['reason']} "
                    f"({letter['detail']})",
                    flush=True,
                )
            progress.check()
    finally:
        await consumer.stop()


async def _report(progress: DemoProgress, started: float) -> None:
    while True:
        await asyncio.sleep(2.0)
        elapsed = time.monotonic() - started
        scored = len(progress.scored)
        print(
            f"[{elapsed:5.1f}s] sent {progress.sent}  scored {scored}  "
            f"label requests {len(progress.requested)} "
            f"({len(progress.requested) / max(1, scored):.1%})  dead letters "
            f"{progress.dead_letters}",
            file=sys.stderr,
            flush=True,
        )


def _print_summary(summary: dict) -> None:
    print("\nwinnow demo summary")
    for key, value in summary.items():
        print(f"  {key:<20} {value}")
