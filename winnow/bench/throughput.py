"""``winnow bench throughput``: the scorer against bare ONNX Runtime and a naive loop.

For each case, on one model, batch size and set of encoded frames, in one run:

- ``bare_fps``: ``OnnxModel.run`` on already-preprocessed batches, after warm-up:
  the ceiling for this model on this machine;
- ``scorer_fps``: the whole scorer through the broker (fetch, decode, batch,
  infer, score, decide, produce and await acks, commit), from a preloaded
  frames topic, until every decision has been read back from the predictions
  topic by a separate consumer;
- ``naive_fps``: one record at a time: consume, decode, infer a batch of one,
  produce the prediction, await its ack, commit;
- ``p50_ms`` / ``p99_ms``: capture-to-decision latency in a second, paced run
  at about half of ``scorer_fps``;
- ``scorer_cpu_ms_per_frame``: the host cost, the scorer process's own CPU time
  (user + system, from the OS) per frame over the ``scorer_fps`` window, and
  ``stages_cpu_ms_per_frame``, that time by stage from a sampling profile
  (:mod:`winnow.bench.host_cost`); the scorer runs in a process of its own
  (:mod:`winnow.bench.scorer_process`) so the broker, the frames' producer and
  the reader are not in its figure;
- ``by_batch_size``: the scorer's speed and host cost again at batch sizes 16 and 64.

The goals (camera ``efficiency`` >= 0.8, digits ``speedup_vs_naive`` >= 5, both
at the batch size asked for) are printed next to the figures, never enforced.
"""

import argparse
import asyncio
import json
import logging
import os
import platform
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import SecretStr

from infra import blas
from infra.kafka.admin import ensure_topics, topic_partitions
from infra.kafka.broker import EmbeddedBroker
from infra.kafka.consumer import create_consumer
from infra.kafka.producer import create_producer
from infra.kafka.settings import KafkaSettings
from schemas.model_spec import Precision
from schemas.predictions import Prediction
from service.config import PolicySettings, ScorerSettings
from service.model.inference import OnnxModel
from service.pipeline.batching import Batch, InboundFrame
from service.pipeline.decode import DecodeLimits, decode_and_preprocess, prepare_batch
from service.pipeline.records import batch_records
from service.scoring.engine import ScoringEngine
from service.selection.policy import QueryPolicy
from service.workers.serve import worker_cpu_threads
from winnow.bench.host_cost import STAGES

CASES = ("camera", "digits")
DEFAULT_FRAMES = {"camera": 320, "digits": 6000}
GOALS = {"camera": ("efficiency", 0.8), "digits": ("speedup_vs_naive", 5.0)}
CASE_KEYS = (
    "model",
    "device",
    "batch_size",
    "frames",
    "bare_fps",
    "scorer_fps",
    "naive_fps",
    "efficiency",
    "speedup_vs_naive",
    "p50_ms",
    "p99_ms",
    "scorer_cpu_ms_per_frame",
    "stages_cpu_ms_per_frame",
    "by_batch_size",
    "notes",
)
BARE_MIN_SECONDS = 2.0
BARE_FRAMES = 1024
"""Frames decoded for bare ONNX Runtime (its batches repeat), so a large run decodes no more."""
LATENCY_SECONDS = 5.0
WAIT_TIMEOUT_S = 600.0
_JOIN_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class CaseSpec:
    """A benchmark case: a model to build and frames to feed it."""

    name: str
    arch: str
    input_size: int
    channels: int
    classes: list[str]
    make_frames: Callable[[int], list[bytes]]
    content_type: str


@dataclass
class BenchConfig:
    cases: Sequence[str] = CASES
    frames: int | None = None
    batch_size: int = 16
    batch_sizes: Sequence[int] = (16, 64)
    """Batch sizes the scorer's speed and host cost are measured at too (``by_batch_size``)."""
    device: str = "auto"
    workers: Sequence[int] = (1,)
    """Scorer processes in one consumer group (``winnow serve --workers``); the first count is
    the main run's, every count is measured at every batch size (``by_workers``)."""
    frame_size: tuple[int, int] | None = None
    """The camera case's frames resized to (width, height); None: crops of the photos."""
    naive: bool = True
    """Whether to measure the one-record-at-a-time loop (slow for large frames)."""
    precision: Precision = "fp32"
    """The arithmetic inside the models' graphs (``trainer.export``), bare and scorer alike."""
    decoder: str = "cpu"
    """The scorer's ``WINNOW_SCORER_DECODER`` (``cpu``, ``dali``, ``dali-cpu``)."""
    partitions: int = 3
    latency_seconds: float = LATENCY_SECONDS
    bare_min_seconds: float = BARE_MIN_SECONDS
    kafka: KafkaSettings | None = None
    """Where the broker is; None: ``WINNOW_KAFKA_*``, else an embedded broker."""
    progress: Callable[[str], None] = field(default=lambda message: None)


# -- frames -----------------------------------------------------------------------------------


DISTINCT_SIZED_FRAMES = 128
"""Distinct frames made at a ``--frame-size``; the stream cycles through them (every frame
keeps its own id and is decided; only the selection filters see repeats)."""


def camera_frames(count: int, seed: int = 0, size: tuple[int, int] | None = None) -> list[bytes]:
    """JPEG frames (quality 90) cut from scikit-learn's two 640x427 photos.

    Each frame is a random crop (60-100 % of each side), maybe mirrored, with
    its brightness scaled by 0.7-1.3. With ``size`` (width, height) each crop is
    resized to it, and at most :data:`DISTINCT_SIZED_FRAMES` distinct frames are
    made and cycled (encoding a 1920x1080 frame takes tens of milliseconds).
    """
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from winnow.datasets import encode_jpeg

    photos = load_sample_images().images
    rng = np.random.default_rng(seed)
    distinct = count if size is None else min(count, DISTINCT_SIZED_FRAMES)
    out = []
    for i in range(distinct):
        photo = photos[i % len(photos)]
        height, width = photo.shape[:2]
        h = int(height * rng.uniform(0.6, 1.0))
        w = int(width * rng.uniform(0.6, 1.0))
        top = int(rng.integers(0, height - h + 1))
        left = int(rng.integers(0, width - w + 1))
        crop = photo[top : top + h, left : left + w].astype(np.float32)
        if rng.random() < 0.5:
            crop = crop[:, ::-1]
        crop = np.clip(crop * rng.uniform(0.7, 1.3), 0, 255).astype(np.uint8)
        if size is not None:
            crop = np.asarray(Image.fromarray(np.ascontiguousarray(crop)).resize(size))
        out.append(encode_jpeg(np.ascontiguousarray(crop), quality=90))
    return [out[i % distinct] for i in range(count)]


def digits_frames(count: int) -> list[bytes]:
    """scikit-learn's 8x8 digits as PNG, cycling through all 1,797 images."""
    from winnow.datasets import encode_png, load_digits_dataset

    data = load_digits_dataset()
    images = np.concatenate([data.train_images, data.test_images])
    return [encode_png(images[i % len(images)]) for i in range(count)]


def case_spec(name: str, frame_size: tuple[int, int] | None = None) -> CaseSpec:
    if name == "camera":

        def frames(count: int) -> list[bytes]:
            return camera_frames(count, size=frame_size)

        return CaseSpec("camera", "resnet18", 224, 3, ["a", "b", "c"], frames, "image/jpeg")
    if name == "digits":
        return CaseSpec(
            "digits", "small-cnn", 16, 1, [str(d) for d in range(10)], digits_frames, "image/png"
        )
    raise ValueError(f"unknown case '{name}'; choose from {', '.join(CASES)}")


# -- Kafka helpers ----------------------------------------------------------------------------


def _now_header() -> bytes:
    return datetime.now(UTC).isoformat().encode()


def _frame_headers(frame_id: str, content_type: str) -> list[tuple[str, bytes]]:
    return [
        ("frame-id", frame_id.encode()),
        ("captured-at", _now_header()),
        ("content-type", content_type.encode()),
    ]


async def _fresh_topics(base: KafkaSettings, partitions: int, tag: str) -> KafkaSettings:
    """A settings copy with a topic prefix nobody used, and its topics created."""
    kafka = base.model_copy(
        update={
            "topic_prefix": f"bench-{tag}-{uuid.uuid4().hex[:10]}.",
            "partitions": partitions,
        }
    )
    await ensure_topics(kafka, kafka.topics.all())
    return kafka


async def _preload(kafka: KafkaSettings, frames: list[bytes], content_type: str, tag: str) -> None:
    """Produces every frame to the frames topic and waits for all acks."""
    producer = create_producer(kafka, linger_ms=20)
    await producer.start()
    try:
        futures = []
        for i, value in enumerate(frames):
            futures.append(
                await producer.send(
                    kafka.topics.frames,
                    value,
                    key=f"cam{i % 4}".encode(),
                    headers=_frame_headers(f"{tag}-{i}", content_type),
                )
            )
        await asyncio.gather(*futures)
    finally:
        await producer.stop()


class PredictionReader:
    """Reads a predictions topic from the start, noting when each record arrives.

    Values are kept raw while timing and parsed afterwards, so the reader adds
    as little CPU as possible to the run it measures.
    """

    def __init__(self, kafka: KafkaSettings, topic: str) -> None:
        self._kafka = kafka
        self._consumer = create_consumer(kafka, group_id=None, fetch_max_wait_ms=10)
        self._topic = topic
        self._task: asyncio.Task[None] | None = None
        self.arrivals: list[tuple[float, float, bytes]] = []  # (perf_counter, epoch, value)
        self._target = 0
        self._reached = asyncio.Event()

    async def start(self) -> None:
        await self._consumer.start()
        assignment = await topic_partitions(self._kafka, self._topic)
        self._consumer.assign(assignment)
        await self._consumer.seek_to_beginning(*assignment)
        self._task = asyncio.create_task(self._read(), name="bench-prediction-reader")

    async def _read(self) -> None:
        while True:
            polled = await self._consumer.getmany(timeout_ms=100)
            now, wall = time.perf_counter(), time.time()
            for records in polled.values():
                self.arrivals.extend((now, wall, r.value) for r in records)
            if self._target and len(self.arrivals) >= self._target:
                self._reached.set()

    async def wait_for(self, count: int, watch: "asyncio.Task[Any] | None") -> None:
        """Waits until ``count`` records arrived; raises if ``watch`` (the scorer) fails first."""
        self._target = count
        if len(self.arrivals) >= count:
            return
        assert self._task is not None, "start() first"
        reached = asyncio.create_task(self._reached.wait())
        waiting: set[asyncio.Task[Any]] = {reached, self._task} | ({watch} if watch else set())
        try:
            done, _ = await asyncio.wait(
                waiting, timeout=WAIT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            reached.cancel()
        if reached in done:
            return
        for task in done:
            if task is not reached and not task.cancelled() and task.exception() is not None:
                raise RuntimeError(f"{task.get_name()} failed") from task.exception()
        arrived = f"only {len(self.arrivals)} of {count} predictions arrived"
        if done:  # the reader or the scorer ended first, without an error of its own
            raise RuntimeError(f"{arrived} before {', '.join(t.get_name() for t in done)} ended")
        raise RuntimeError(f"{arrived} in {WAIT_TIMEOUT_S:g} s")

    def predictions(self) -> list[dict[str, Any]]:
        return [json.loads(value) for _, _, value in self.arrivals]

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        await self._consumer.stop()


async def _wait_assigned(assigned: Callable[[], Any], watch: "asyncio.Task[Any] | None") -> None:
    deadline = time.monotonic() + _JOIN_TIMEOUT_S
    while not assigned():
        if watch is not None and watch.done():
            await watch  # raises the stage failure
            raise RuntimeError("the scorer stopped before joining its group")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no partitions assigned within {_JOIN_TIMEOUT_S:g} s")
        await asyncio.sleep(0.002)


# -- the three measurements -------------------------------------------------------------------


def measure_bare(
    model: OnnxModel, inputs: np.ndarray, batch_size: int, min_seconds: float
) -> float:
    """Frames per second of ``model.run`` on preprocessed batches (passes repeat to min_seconds)."""
    batches = [inputs[i : i + batch_size] for i in range(0, len(inputs), batch_size)]
    for batch in batches[:2]:  # warm-up: allocations, kernel selection
        model.run(batch)
    done, started = 0, time.perf_counter()
    while True:
        for batch in batches:
            model.run(batch)
            done += len(batch)
        elapsed = time.perf_counter() - started
        if elapsed >= min_seconds:
            return done / elapsed


@dataclass
class ScorerRun:
    batch_size: int
    fps: float
    fps_with_join: float
    join_s: float
    hook_count: int
    topic_count: int
    distinct: int
    cpu_s: float
    """The scorer process's user + system time from assignment to the last decision read back,
    less the profiler's thread."""
    profiler_cpu_s: float
    stages_cpu_s: dict[str, float]
    threads_cpu_s: dict[str, float]
    samples: int
    workers: int = 1
    all_joined_s: float = 0.0
    """From the first scorer process owning partitions to the last one owning them."""
    steady_fps: float | None = None
    """Decisions a second between 10 % and 90 % of the frames read back."""
    gpu: dict[str, float] | None = None

    def host_cost(self, frames: int) -> dict[str, Any]:
        """The JSON figures of this run: speed, CPU time per frame, and its stages."""
        per_frame = 1000 / frames
        return {
            "batch_size": self.batch_size,
            "workers": self.workers,
            "scorer_fps": round(self.fps, 2),
            "scorer_fps_steady": None if self.steady_fps is None else round(self.steady_fps, 2),
            "all_joined_s": round(self.all_joined_s, 3),
            "gpu": self.gpu,
            "scorer_cpu_ms_per_frame": round(self.cpu_s * per_frame, 4),
            "scorer_cpu_cores": round(self.cpu_s * self.fps / frames, 3),
            "stages_cpu_ms_per_frame": {
                stage: round(seconds * per_frame, 4) for stage, seconds in self.stages_cpu_s.items()
            },
            "threads_cpu_ms_per_frame": {
                name: round(seconds * per_frame, 4) for name, seconds in self.threads_cpu_s.items()
            },
            "profiler_cpu_ms_per_frame": round(self.profiler_cpu_s * per_frame, 4),
            "profile_samples": self.samples,
        }


def _kafka_env(kafka: KafkaSettings) -> dict[str, str]:
    """``kafka`` as the ``WINNOW_KAFKA_*`` variables that rebuild it in another process."""
    env = {}
    for name, value in kafka.model_dump().items():
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"WINNOW_KAFKA_{name.upper()}"] = str(value)
    return env


def _cpu_env(workers: int) -> dict[str, str]:
    """Several scorer processes' ONNX Runtime threads, as ``winnow serve --workers`` sets
    them (the environment's ``WINNOW_SCORER_CPU_THREADS``, else each one's share)."""
    if workers <= 1:
        return {}
    return {"WINNOW_SCORER_CPU_THREADS": str(worker_cpu_threads(ScorerSettings(), workers))}


class _ScorerProcess:
    """``winnow.bench.scorer_process`` as a child: its events on stdout, its log in a file."""

    def __init__(self, process: asyncio.subprocess.Process, log: Any) -> None:
        self._process = process
        self._log = log
        self.exited = asyncio.create_task(process.wait(), name="scorer")

    @classmethod
    async def spawn(cls, args: list[str], env: dict[str, str]) -> "_ScorerProcess":
        log = tempfile.TemporaryFile()
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "winnow.bench.scorer_process",
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=log,
            env={**os.environ, **env},
        )
        return cls(process, log)

    async def event(self, name: str) -> dict[str, Any]:
        """The next event, which must be ``name``; raises with the child's log if it exits."""
        assert self._process.stdout is not None
        line = await asyncio.wait_for(self._process.stdout.readline(), WAIT_TIMEOUT_S)
        if not line:
            await self.exited
            self._log.seek(0)
            tail = self._log.read().decode(errors="replace")[-4000:]
            raise RuntimeError(
                f"the scorer process exited ({self._process.returncode}) before '{name}':\n{tail}"
            )
        event: dict[str, Any] = json.loads(line)
        if event.get("event") != name:
            raise RuntimeError(f"the scorer process said {event} where '{name}' was expected")
        return event

    async def tell_stop(self) -> None:
        assert self._process.stdin is not None
        self._process.stdin.write(b"stop\n")
        await self._process.stdin.drain()

    async def close(self) -> None:
        if self._process.returncode is None:
            try:
                await asyncio.wait_for(asyncio.shield(self.exited), 60)
            except TimeoutError:
                self._process.kill()
        await asyncio.gather(self.exited, return_exceptions=True)
        self._log.close()


class GpuMonitor:
    """The GPU's utilisation while a run lasts, sampled by ``nvidia-smi`` every 100 ms.

    Started only where the model runs on CUDA and ``nvidia-smi`` is on the PATH;
    :meth:`summary` is None otherwise.
    """

    def __init__(self, enabled: bool) -> None:
        self._command = shutil.which("nvidia-smi") if enabled else None
        self._process: asyncio.subprocess.Process | None = None
        self._task: asyncio.Task[None] | None = None
        self.samples: list[tuple[float, float, float]] = []  # (perf_counter, util %, MiB used)

    async def start(self) -> None:
        if self._command is None:
            return
        self._process = await asyncio.create_subprocess_exec(
            self._command,
            "--query-gpu=utilization.gpu,memory.used",
            "--format=csv,noheader,nounits",
            "-lms",
            "100",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.DEVNULL,
        )
        self._task = asyncio.create_task(self._read(), name="bench-gpu-monitor")

    async def _read(self) -> None:
        assert self._process is not None and self._process.stdout is not None
        async for line in self._process.stdout:
            parts = line.decode(errors="replace").split(",")
            try:
                self.samples.append((time.perf_counter(), float(parts[0]), float(parts[1])))
            except (ValueError, IndexError):
                continue  # a header or a note, not a sample

    async def stop(self) -> None:
        if self._process is None:
            return
        if self._process.returncode is None:
            self._process.terminate()
        await self._process.wait()
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)

    def summary(self, begin: float, end: float) -> dict[str, float] | None:
        """Mean and highest utilisation, and the most memory used, between two clock readings."""
        window = [(util, mib) for at, util, mib in self.samples if begin <= at <= end]
        if not window:
            return None
        utils = [util for util, _ in window]
        return {
            "util_percent_mean": round(float(np.mean(utils)), 1),
            "util_percent_max": round(max(utils), 1),
            "memory_mib_max": round(max(mib for _, mib in window), 1),
            "samples": len(window),
        }


def _steady_fps(arrivals: list[tuple[float, float, bytes]], count: int) -> float | None:
    """Decisions a second between the 10th and the 90th percentile of ``count`` read back."""
    first, last = int(count * 0.1), int(count * 0.9) - 1
    if last <= first:
        return None
    elapsed = arrivals[last][0] - arrivals[first][0]
    return (last - first) / elapsed if elapsed > 0 else None


def _child_args(
    model_path: Path, batch_size: int, device: str, group: str, sample_ms: float
) -> list[str]:
    return [
        "--model",
        str(model_path),
        "--batch-size",
        str(batch_size),
        "--device",
        device,
        "--group-id",
        group,
        "--sample-ms",
        str(sample_ms),
    ]


async def _start_children(
    model_path: Path,
    kafka: KafkaSettings,
    batch_size: int,
    device: str,
    workers: int,
    sample_ms: float,
    decoder: str = "cpu",
) -> tuple[list["_ScorerProcess"], float, float, float]:
    """``workers`` scorer processes in one new group; returns them, when the first began
    joining, when the first owned partitions and when the last did."""
    group = f"bench-{uuid.uuid4().hex[:10]}"
    args = _child_args(model_path, batch_size, device, group, sample_ms)
    env = {**_kafka_env(kafka), **_cpu_env(workers), "WINNOW_SCORER_DECODER": decoder}
    children = [await _ScorerProcess.spawn(args, env) for _ in range(workers)]

    async def joined(child: "_ScorerProcess") -> tuple[float, float]:
        await child.event("starting")
        began = time.perf_counter()
        await child.event("assigned")
        return began, time.perf_counter()

    try:
        times = await asyncio.gather(*(joined(child) for child in children))
    except BaseException:
        await asyncio.gather(*(child.close() for child in children), return_exceptions=True)
        raise
    return (
        children,
        min(began for began, _ in times),
        min(at for _, at in times),
        max(at for _, at in times),
    )


async def _stop_children(children: list["_ScorerProcess"]) -> list[dict[str, Any]]:
    """Asks every child for its result and waits for it to exit."""
    try:
        for child in children:
            await child.tell_stop()
        return [await child.event("result") for child in children]
    finally:
        await asyncio.gather(*(child.close() for child in children), return_exceptions=True)


async def measure_scorer(
    base: KafkaSettings,
    model_path: Path,
    frames: list[bytes],
    spec: CaseSpec,
    batch_size: int,
    partitions: int,
    device: str,
    sample_ms: float = 2.0,
    workers: int = 1,
    gpu: bool = False,
    decoder: str = "cpu",
) -> ScorerRun:
    """The whole scorer on a preloaded frames topic, until every decision is read back.

    The scorer runs in processes of its own (``winnow.bench.scorer_process``), ``workers``
    of them in one consumer group, which report their CPU time over the same window and
    a profile of it by stage; their figures are summed. The clock starts when the first
    of them owns partitions, so the others' joins (and the group's rebalances) count.
    """
    kafka = await _fresh_topics(base, partitions, f"{spec.name}-scorer")
    await _preload(kafka, frames, spec.content_type, "s")
    reader = PredictionReader(kafka, kafka.topics.predictions)
    await reader.start()
    monitor = GpuMonitor(gpu)
    await monitor.start()
    try:
        children, started, assigned, all_assigned = await _start_children(
            model_path, kafka, batch_size, device, workers, sample_ms, decoder
        )
        await _wait_decided(reader, len(frames), children)
        results = await _stop_children(children)
    finally:
        await monitor.stop()
        await reader.stop()
    finished = reader.arrivals[len(frames) - 1][0]
    ids = {p["frame_id"] for p in reader.predictions()}
    return ScorerRun(
        batch_size=batch_size,
        fps=len(frames) / (finished - assigned),
        fps_with_join=len(frames) / (finished - started),
        join_s=assigned - started,
        hook_count=sum(r["delivered"] for r in results),
        topic_count=len(reader.arrivals),
        distinct=len(ids),
        cpu_s=sum(r["cpu_s"] for r in results),
        profiler_cpu_s=sum(r["profiler_cpu_s"] for r in results),
        stages_cpu_s={s: sum(r["stages_cpu_s"][s] for r in results) for s in STAGES},
        threads_cpu_s=_summed([r["threads_cpu_s"] for r in results]),
        samples=sum(r["samples"] for r in results),
        workers=workers,
        all_joined_s=all_assigned - assigned,
        steady_fps=_steady_fps(reader.arrivals, len(frames)),
        gpu=monitor.summary(assigned, finished),
    )


def _summed(parts: list[dict[str, float]]) -> dict[str, float]:
    total: dict[str, float] = {}
    for part in parts:
        for key, value in part.items():
            total[key] = total.get(key, 0.0) + value
    return total


async def _wait_decided(
    reader: PredictionReader, count: int, children: list["_ScorerProcess"]
) -> None:
    """Waits for ``count`` decisions; a child that exits first fails the run with its log.

    On any failure every child is closed (killed if it does not exit).
    """
    watch = asyncio.create_task(
        asyncio.wait([child.exited for child in children], return_when=asyncio.FIRST_COMPLETED),
        name="a scorer process",
    )
    try:
        try:
            await reader.wait_for(count, watch)
        except RuntimeError:
            for child in children:
                if child.exited.done():
                    await child.event("result")  # raises, with the child's log
            raise
    except BaseException:
        await asyncio.gather(*(child.close() for child in children), return_exceptions=True)
        raise
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)


async def measure_naive(
    base: KafkaSettings,
    model: OnnxModel,
    frames: list[bytes],
    spec: CaseSpec,
    partitions: int,
) -> tuple[float, float]:
    """One record at a time: consume, decode, infer, produce, await the ack, commit.

    Returns ``(fps, join_s)``; timing starts once the consumer owns its partitions.
    """
    from aiokafka import TopicPartition

    kafka = await _fresh_topics(base, partitions, f"{spec.name}-naive")
    await _preload(kafka, frames, spec.content_type, "n")
    limits = DecodeLimits(max_bytes=20 * 1024 * 1024, max_pixels=50_000_000)
    policy = QueryPolicy.from_settings(PolicySettings())
    policy.on_model(model.spec.labels_trained)  # cold start as in the scorer
    engine = ScoringEngine.from_settings(PolicySettings())
    consumer = create_consumer(
        kafka, kafka.topics.frames, group_id=f"bench-naive-{uuid.uuid4().hex[:10]}"
    )
    producer = create_producer(kafka, linger_ms=0)  # linger would only slow the naive loop
    await producer.start()
    blas.acquire()  # as the scorer does: the same threads for the same policy
    try:
        started = time.perf_counter()
        await consumer.start()
        await _wait_assigned(consumer.assignment, None)
        assigned = time.perf_counter()
        for _ in range(len(frames)):
            record = await asyncio.wait_for(consumer.getone(), WAIT_TIMEOUT_S)
            frame = InboundFrame.from_record(record)
            pixels = decode_and_preprocess(
                frame.value, frame.headers.content_type, model.spec, limits
            )
            scored = engine.score(model, pixels[None], policy.needs)
            batch = Batch(
                frames=[frame],
                model=model,
                good=[0],
                probabilities=scored.probabilities,
                scores=scored.scores,
                decisions=policy.decide(scored.scores),
            )
            records, _ = batch_records(  # the same records the scorer builds
                batch,
                predictions_topic=kafka.topics.predictions,
                requests_topic=kafka.topics.label_requests,
                dead_letter_topic=kafka.topics.dead_letter,
                max_dead_letter_bytes=1024,
            )
            for out in records:
                await producer.send_and_wait(out.topic, out.value, key=out.key)
            await consumer.commit(
                {TopicPartition(record.topic, record.partition): record.offset + 1}
            )
        finished = time.perf_counter()
    finally:
        blas.release()
        await consumer.stop()
        await producer.stop()
    return len(frames) / (finished - assigned), assigned - started


@dataclass
class LatencyRun:
    rate: float
    sent: int
    sent_fps: float
    """The rate the producer kept (below ``rate`` where one producer cannot keep up)."""
    p50_ms: float
    p99_ms: float
    p50_decided_ms: float
    p99_decided_ms: float


async def measure_latency(
    base: KafkaSettings,
    model_path: Path,
    frames: list[bytes],
    spec: CaseSpec,
    batch_size: int,
    partitions: int,
    device: str,
    rate: float,
    seconds: float,
    workers: int = 1,
    decoder: str = "cpu",
) -> LatencyRun:
    """Frames produced at ``rate`` while the scorer runs; capture-to-decision per frame.

    The scorer runs as in :func:`measure_scorer` (``workers`` processes of its own, no
    profiler), all of them owning partitions before the first frame is sent.
    ``captured-at`` is stamped when each frame is handed to the producer (linger 0); a
    frame's decision time is when its prediction was read back from the predictions topic
    (``p50_decided_ms``: the prediction's own ``decided_at``).
    """
    kafka = await _fresh_topics(base, partitions, f"{spec.name}-latency")
    count = max(10, int(rate * seconds))
    reader = PredictionReader(kafka, kafka.topics.predictions)
    await reader.start()
    producer = create_producer(kafka, linger_ms=0)
    await producer.start()
    try:
        children, _, _, _ = await _start_children(
            model_path, kafka, batch_size, device, workers, sample_ms=0, decoder=decoder
        )
        try:
            await asyncio.sleep(0.5)  # let the group settle and the first fetches begin
            futures, begin = [], time.perf_counter()
            for i in range(count):
                delay = begin + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                futures.append(
                    await producer.send(
                        kafka.topics.frames,
                        frames[i % len(frames)],
                        key=f"cam{i % 4}".encode(),
                        headers=_frame_headers(f"l-{i}", spec.content_type),
                    )
                )
            sent_s = time.perf_counter() - begin
            await asyncio.gather(*futures)
        except BaseException:
            await asyncio.gather(*(child.close() for child in children), return_exceptions=True)
            raise
        await _wait_decided(reader, count, children)
        await _stop_children(children)
    finally:
        await producer.stop()
        await reader.stop()
    read_back, decided = [], []
    for (_, wall, _), prediction in zip(reader.arrivals, reader.predictions(), strict=True):
        p = Prediction.model_validate(prediction)
        if p.captured_at is None:
            continue
        captured = p.captured_at.timestamp()
        read_back.append((wall - captured) * 1000)
        decided.append((p.decided_at.timestamp() - captured) * 1000)
    return LatencyRun(
        rate=rate,
        sent=count,
        sent_fps=count / sent_s if sent_s > 0 else rate,
        p50_ms=float(np.percentile(read_back, 50)),
        p99_ms=float(np.percentile(read_back, 99)),
        p50_decided_ms=float(np.percentile(decided, 50)),
        p99_decided_ms=float(np.percentile(decided, 99)),
    )


# -- a case -----------------------------------------------------------------------------------


def build_model(
    spec: CaseSpec, path: Path, device: str, precision: Precision = "fp32"
) -> OnnxModel:
    """Writes the case's model (fixed seed) to ``path`` and loads it."""
    from trainer.model_init import init_model

    init_model(
        spec.classes,
        spec.input_size,
        spec.arch,
        path,
        channels=spec.channels,
        seed=0,
        precision=precision,
    )
    return OnnxModel.load(path, device)  # type: ignore[arg-type]


async def run_case(name: str, config: BenchConfig, kafka: KafkaSettings) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="winnow-bench-") as directory:
        return await _run_case(name, config, kafka, Path(directory))


async def _run_case(
    name: str, config: BenchConfig, kafka: KafkaSettings, directory: Path
) -> dict[str, Any]:
    spec = case_spec(name, config.frame_size if name == "camera" else None)
    say = config.progress
    count = config.frames or DEFAULT_FRAMES[name]
    batch = config.batch_size
    workers = list(dict.fromkeys(config.workers))
    main_workers = workers[0]
    partitions = max(config.partitions, max(workers))
    sizes = sorted(set(config.batch_sizes) | {batch})
    size_text = (
        ""
        if spec.name != "camera" or config.frame_size is None
        else (f" at {config.frame_size[0]}x{config.frame_size[1]}")
    )
    say(
        f"[{name}] building {spec.arch} ({spec.channels}x{spec.input_size}x{spec.input_size}, "
        f"{len(spec.classes)} classes) and {count} frames{size_text}"
    )
    model_path = directory / f"{spec.name}-{spec.arch}.onnx"
    model = await asyncio.to_thread(build_model, spec, model_path, config.device, config.precision)
    gpu = model.provider == "CUDAExecutionProvider"
    frames = await asyncio.to_thread(spec.make_frames, count)
    limits = DecodeLimits(max_bytes=20 * 1024 * 1024, max_pixels=50_000_000)
    items = [(f, spec.content_type) for f in frames[:BARE_FRAMES]]
    decode_started = time.perf_counter()
    inputs, _, poison = await asyncio.to_thread(prepare_batch, items, model.spec, limits)
    decode_fps = len(items) / (time.perf_counter() - decode_started)
    if poison:
        raise RuntimeError(f"[{name}] {len(poison)} generated frames do not decode: {poison[0]}")
    model.warm_up(batch)

    say(f"[{name}] bare ONNX Runtime, batches of {batch}")
    bare = await asyncio.to_thread(measure_bare, model, inputs, batch, config.bare_min_seconds)
    say(f"[{name}] bare {bare:.1f} fps; scorer through the broker ({count} frames)")

    async def scorer_run(size: int, n: int) -> ScorerRun:
        return await measure_scorer(
            kafka,
            model_path,
            frames,
            spec,
            size,
            partitions,
            config.device,
            workers=n,
            gpu=gpu,
            decoder=config.decoder,
        )

    async def latency_run(rate: float, n: int) -> LatencyRun:
        return await measure_latency(
            kafka,
            model_path,
            frames,
            spec,
            batch,
            partitions,
            config.device,
            rate,
            config.latency_seconds,
            workers=n,
            decoder=config.decoder,
        )

    scorer = await scorer_run(batch, main_workers)
    say(
        f"[{name}] scorer {scorer.fps:.1f} fps, {scorer.cpu_s * 1000 / count:.3f} ms CPU a "
        f"frame" + (f"; naive loop ({count} frames)" if config.naive else "")
    )
    naive: float | None = None
    naive_join = 0.0
    if config.naive:
        naive, naive_join = await measure_naive(kafka, model, frames, spec, partitions)
    rate = scorer.fps / 2
    naive_text = "" if naive is None else f"naive {naive:.1f} fps; "
    say(
        f"[{name}] {naive_text}paced latency run at {rate:.1f} fps for {config.latency_seconds:g} s"
    )
    latency = await latency_run(rate, main_workers)
    say(f"[{name}] p50 {latency.p50_ms:.1f} ms, p99 {latency.p99_ms:.1f} ms; bare again")
    bare_after = await asyncio.to_thread(
        measure_bare, model, inputs, batch, config.bare_min_seconds
    )
    bare_before, bare = bare, max(bare, bare_after)
    bare_by_size = {batch: bare}
    runs: dict[tuple[int, int], ScorerRun] = {(main_workers, batch): scorer}
    latencies: dict[int, LatencyRun] = {main_workers: latency}
    for size in sizes:
        if size not in bare_by_size:
            bare_by_size[size] = await asyncio.to_thread(
                measure_bare, model, inputs, size, config.bare_min_seconds
            )
        for n in workers:
            if (n, size) in runs:
                continue
            say(f"[{name}] batches of {size}, {n} scorer process(es)")
            runs[(n, size)] = run = await scorer_run(size, n)
            say(
                f"[{name}] batch {size}, workers {n}: scorer {run.fps:.1f} fps, "
                f"bare {bare_by_size[size]:.1f} fps"
            )
    for n in workers:
        if n in latencies:
            continue
        half = runs[(n, batch)].fps / 2
        say(f"[{name}] workers {n}: paced latency run at {half:.1f} fps")
        latencies[n] = await latency_run(half, n)
    for run in runs.values():
        if run.hook_count < count or run.distinct != count:
            raise RuntimeError(
                f"[{name}] decisions missing at batch {run.batch_size}, workers {run.workers}: "
                f"{count} frames, {run.hook_count} through the hook, {run.distinct} distinct "
                f"on the topic"
            )
    by_batch = {size: (bare_by_size[size], runs[(main_workers, size)]) for size in sizes}
    notes = [
        f"bare_fps: OnnxModel.run on {len(inputs)} frames decoded and preprocessed beforehand, in "
        f"batches of {batch}, after warm-up, repeated for at least {config.bare_min_seconds:g} s; "
        f"measured before the scorer runs ({bare_before:.1f} fps) and after them "
        f"({bare_after:.1f} fps), the better one is reported (the ceiling; a gap between the "
        f"two means something else was using the CPU).",
        f"scorer_fps: {count} frames preloaded into a fresh frames topic ({partitions} "
        f"partitions), then Scorer(max_batch_size={batch}) started in {main_workers} "
        f"process(es) of one consumer group; the clock stops when a "
        f"separate consumer has read the last of the {count} decisions back from the "
        f"predictions topic (the on_predictions hook counted {scorer.hook_count} and is only a "
        f"cross-check: it fires before downstream can see the record). The consumer-group "
        f"join ({scorer.join_s:.2f} s, from start() until partitions were assigned) is "
        f"excluded: the clock starts when the first process owns partitions, so fetching "
        f"committed offsets, the first fetch and the other processes' joins are included. "
        f"With the join: {scorer.fps_with_join:.1f} fps. scorer_fps_steady: between 10 % and "
        f"90 % of the decisions read back. The scorer runs in processes of its own "
        f"(winnow.bench.scorer_process); their figures are summed.",
        f"scorer_cpu_ms_per_frame: that process's user + system time (getrusage) over the "
        f"same window (assignment to the last decision read back), per frame; the broker, the "
        f"frames' producer and the reader run in other processes. stages_cpu_ms_per_frame "
        f"shares it by stage: each thread's CPU time (/proc schedstat) split by where a "
        f"sampling profiler ({scorer.samples} samples, every 2 ms) found it busy; onnxruntime's "
        f"own threads count as infer. The profiler's thread "
        f"({scorer.profiler_cpu_s * 1000 / count:.3f} ms a frame) is left out. by_batch_size: "
        f"bare and scorer again at each of {', '.join(map(str, sorted(by_batch)))}.",
        (
            f"naive_fps: getone, decode, run a batch of one, score and decide, produce the "
            f"prediction with linger 0 and await its ack, commit that offset; own topic and "
            f"group; clock starts at partition assignment (join {naive_join:.2f} s excluded); "
            f"BLAS limited to one thread as in the scorer (infra.blas)."
            if naive is not None
            else "naive_fps: not measured (--no-naive)."
        ),
        f"p50_ms/p99_ms: a second scorer run, paced at {rate:.1f} fps (half of scorer_fps; "
        f"the producer kept {latency.sent_fps:.1f}) "
        f"for {config.latency_seconds:g} s ({latency.sent} frames), so latency is not the "
        f"queueing of a preloaded backlog; from the captured-at header (stamped at produce "
        f"time) to the decision being read back from the predictions topic. To the "
        f"prediction's decided_at instead: p50 {latency.p50_decided_ms:.1f} ms, "
        f"p99 {latency.p99_decided_ms:.1f} ms.",
        f"by_workers: the scorer at every batch size in "
        f"{', '.join(map(str, workers))} process(es), with p50/p99 at half of each count's "
        f"speed at batch {batch}; efficiency against one bare session."
        + (" gpu: nvidia-smi's utilisation every 100 ms over the scorer's window." if gpu else ""),
    ]
    return {
        "case": name,
        "model": f"{spec.arch} {spec.channels}x{spec.input_size}x{spec.input_size} "
        f"{len(spec.classes)} classes ({model.version})",
        "precision": model.spec.precision,
        "decoder": config.decoder,
        "device": "cuda" if model.provider == "CUDAExecutionProvider" else "cpu",
        "provider": model.provider,
        "batch_size": batch,
        "frames": count,
        "partitions": partitions,
        "frame_size": list(config.frame_size)
        if spec.name == "camera" and config.frame_size
        else None,
        "bare_fps": round(bare, 2),
        "bare_fps_before_after": [round(bare_before, 2), round(bare_after, 2)],
        "decode_fps_one_thread": round(decode_fps, 2),
        "scorer_fps": round(scorer.fps, 2),
        "scorer_fps_with_join": round(scorer.fps_with_join, 2),
        "scorer_join_s": round(scorer.join_s, 3),
        "naive_fps": _rounded(naive),
        "efficiency": round(scorer.fps, 2) / round(bare, 2),
        "speedup_vs_naive": _ratio(scorer.fps, naive),
        "p50_ms": round(latency.p50_ms, 2),
        "p99_ms": round(latency.p99_ms, 2),
        "p50_decided_ms": round(latency.p50_decided_ms, 2),
        "p99_decided_ms": round(latency.p99_decided_ms, 2),
        "latency_rate_fps": round(latency.rate, 2),
        "latency_sent_fps": round(latency.sent_fps, 2),
        **{
            key: value
            for key, value in scorer.host_cost(count).items()
            if key not in ("batch_size", "scorer_fps")
        },
        "by_batch_size": [
            {
                **run.host_cost(count),
                "bare_fps": round(bare_size, 2),
                "efficiency": round(run.fps, 2) / round(bare_size, 2),
                "speedup_vs_naive": _ratio(run.fps, naive),
            }
            for size, (bare_size, run) in sorted(by_batch.items())
        ],
        "by_workers": [
            {
                **run.host_cost(count),
                "bare_fps": round(bare_by_size[size], 2),
                "efficiency": round(run.fps, 2) / round(bare_by_size[size], 2),
                **(
                    {
                        "p50_ms": round(latencies[n].p50_ms, 2),
                        "p99_ms": round(latencies[n].p99_ms, 2),
                        "latency_rate_fps": round(latencies[n].rate, 2),
                        "latency_sent_fps": round(latencies[n].sent_fps, 2),
                    }
                    if size == batch
                    else {}
                ),
            }
            for (n, size), run in sorted(runs.items())
        ],
        "notes": " ".join(notes),
    }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _ratio(fps: float, naive: float | None) -> float | None:
    """The speed-up over the naive loop, as the table shows it (None: not measured)."""
    return None if naive is None else round(fps, 2) / round(naive, 2)


def machine_info(providers: Sequence[str] = ()) -> dict[str, Any]:
    import onnxruntime as ort

    return {
        "cpu_count": os.cpu_count(),
        "load_average_1m_after": round(os.getloadavg()[0], 2),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "provider": ",".join(dict.fromkeys(providers)) or None,
        "available_providers": ort.get_available_providers(),
    }


async def run_bench(config: BenchConfig) -> dict[str, Any]:
    """Runs every case of ``config``; returns the JSON-ready result."""
    for name in config.cases:
        case_spec(name)  # fail before any work on an unknown case
    load_before = round(os.getloadavg()[0], 2)
    if load_before > 0.5:
        config.progress(
            f"warning: load average {load_before} before the run: other processes "
            f"share the CPU and the figures will be noisy"
        )
    base = config.kafka or KafkaSettings()
    broker: EmbeddedBroker | None = None
    if base.bootstrap is None:
        config.progress("starting an embedded broker")
        broker = EmbeddedBroker(0)
        await asyncio.to_thread(broker.start)
        base = base.model_copy(update={"bootstrap": broker.bootstrap})
    try:
        cases = [await run_case(name, config, base) for name in config.cases]
    finally:
        if broker is not None:
            await asyncio.to_thread(broker.stop)
    goals = []
    for case in cases:
        if case["case"] in GOALS:
            metric, target = GOALS[case["case"]]
            if case[metric] is None:
                continue  # not measured in this run (--no-naive)
            case["goal"] = {"metric": metric, "target": target, "met": case[metric] >= target}
            goals.append({"case": case["case"], **case["goal"], "value": case[metric]})
    return {
        "machine": {
            **machine_info([c["provider"] for c in cases]),
            "load_average_1m_before": load_before,
        },
        "kafka": "embedded Tansu (memory only)" if broker is not None else base.bootstrap,
        "created_at": datetime.now(UTC).isoformat(),
        "cases": cases,
        "goals": goals,
    }


def format_table(result: dict[str, Any]) -> str:
    columns = [
        ("case", "case", "{}"),
        ("device", "device", "{}"),
        ("batch", "batch_size", "{}"),
        ("frames", "frames", "{}"),
        ("bare fps", "bare_fps", "{:.1f}"),
        ("scorer fps", "scorer_fps", "{:.1f}"),
        ("naive fps", "naive_fps", "{:.1f}"),
        ("efficiency", "efficiency", "{:.2f}"),
        ("vs naive", "speedup_vs_naive", "{:.1f}x"),
        ("p50 ms", "p50_ms", "{:.1f}"),
        ("p99 ms", "p99_ms", "{:.1f}"),
    ]
    rows = [[title for title, _, _ in columns]]
    for case in result["cases"]:
        rows.append([_cell(fmt, case[key]) for _, key, fmt in columns])
    lines = _aligned(rows)
    lines.append("")
    lines.append("scorer CPU time, ms a frame (its own process), and its stages from a profile:")
    cost = [["case", "batch", "scorer fps", "vs naive", "cpu ms", *STAGES]]
    for case in result["cases"]:
        for run in case["by_batch_size"]:
            stages = run["stages_cpu_ms_per_frame"]
            cost.append(
                [
                    case["case"],
                    str(run["batch_size"]),
                    f"{run['scorer_fps']:.1f}",
                    _cell("{:.1f}x", run["speedup_vs_naive"]),
                    f"{run['scorer_cpu_ms_per_frame']:.3f}",
                    *(f"{stages[stage]:.3f}" for stage in STAGES),
                ]
            )
    lines.extend(_aligned(cost))
    if any(len({run["workers"] for run in case["by_workers"]}) > 1 for case in result["cases"]):
        lines.append("")
        lines.append("scorer processes (--workers), p50/p99 at half of each one's speed:")
        grid = [
            [
                *["case", "workers", "batch", "scorer fps", "steady fps", "efficiency", "cpu ms"],
                *["p50 ms", "p99 ms", "gpu util %"],
            ]
        ]
        for case in result["cases"]:
            for run in case["by_workers"]:
                gpu = run["gpu"]
                grid.append(
                    [
                        case["case"],
                        str(run["workers"]),
                        str(run["batch_size"]),
                        f"{run['scorer_fps']:.1f}",
                        _cell("{:.1f}", run["scorer_fps_steady"]),
                        f"{run['efficiency']:.2f}",
                        f"{run['scorer_cpu_ms_per_frame']:.3f}",
                        _cell("{:.1f}", run.get("p50_ms")),
                        _cell("{:.1f}", run.get("p99_ms")),
                        _cell("{:.0f}", None if gpu is None else gpu["util_percent_mean"]),
                    ]
                )
        lines.extend(_aligned(grid))
    machine = result["machine"]
    lines.append("")
    lines.append(
        f"{machine['cpu_count']} CPUs, onnxruntime {machine['onnxruntime']}, "
        f"{machine['provider']}, kafka: {result['kafka']}, load average "
        f"{machine['load_average_1m_before']} before / {machine['load_average_1m_after']} after"
    )
    for goal in result["goals"]:
        verdict = "met" if goal["met"] else "MISSED"
        lines.append(
            f"goal {goal['case']}: {goal['metric']} {goal['value']:.2f} "
            f">= {goal['target']:g}: {verdict}"
        )
    return "\n".join(lines)


def _cell(fmt: str, value: Any) -> str:
    """``value`` formatted, or a dash where it was not measured."""
    return "-" if value is None else fmt.format(value)


def _aligned(rows: list[list[str]]) -> list[str]:
    """Right-aligned columns, a rule under the first row."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def run_throughput_bench(args: argparse.Namespace) -> int:
    """The ``winnow bench throughput`` command."""

    def progress(message: str) -> None:
        print(f"bench: {message}", file=sys.stderr, flush=True)

    config = BenchConfig(
        cases=[c.strip() for c in args.cases.split(",") if c.strip()],
        frames=args.frames,
        batch_size=args.batch_size,
        device=args.device,
        workers=args.workers,
        batch_sizes=args.batch_sizes,
        frame_size=args.frame_size,
        naive=not args.no_naive,
        precision=args.precision,
        decoder=args.decoder,
        progress=progress,
    )
    quiet = (
        {}
        if getattr(args, "verbose", False)
        else {name: logging.getLogger(name).level for name in ("service", "trainer", "aiokafka")}
    )
    for name in quiet:  # the scorer's per-run INFO lines would bury the progress lines
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        result = asyncio.run(run_bench(config))
    finally:
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)
    print(format_table(result))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    progress(f"wrote {args.json}")
    return 0
