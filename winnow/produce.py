"""``winnow produce``: stream a directory, a video file or a live camera into ``winnow.frames``.

Sources:

* a directory: its JPEG and PNG files in name order (other files are skipped
  with a warning), sent as they are unless ``--size`` asks for a re-encode;
  ``--loop`` starts over at the end; paced at ``--fps`` (default 10);
* a video file: frames sampled at ``--fps`` of video time (every frame when
  ``--fps`` is not given or above the native rate), JPEG-encoded at
  ``--quality``, optionally resized to ``--size WxH``; paced to real time;
* a live camera: ``/dev/videoN``, a bare index (``0``) or an ``rtsp://`` /
  ``http(s)://`` URL, read through OpenCV; the camera sets the pace and
  ``--fps`` drops frames down to that rate.

``--fast`` sends as fast as possible instead of pacing. Every record carries the
source id as key and the ``frame-id``, ``captured-at`` and ``content-type``
headers (``schemas.frames``). Ctrl-C (or SIGTERM) stops reading, waits for the
acknowledgement of everything sent, prints a summary and exits 0.
"""

import argparse
import asyncio
import contextlib
import logging
import math
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, TextIO

from aiokafka.errors import KafkaError

from infra.kafka.admin import ensure_topics, wait_for_broker
from infra.kafka.settings import KafkaSettings
from service.errors import BrokerError, ConfigError
from winnow.client import (
    EncodedFrame,
    FrameEncodingError,
    FrameProducer,
    ImageFormat,
    encode_image,
    sniff_content_type,
)

log = logging.getLogger(__name__)

DEFAULT_BOOTSTRAP = "127.0.0.1:9092"
"""Where ``winnow serve`` and ``winnow broker`` listen by default."""

DIRECTORY_FPS = 10.0
"""Pace of a directory when ``--fps`` is not given."""

SourceKind = Literal["directory", "video", "camera"]


class SourceError(Exception):
    """A source that cannot be opened or read."""


@dataclass(frozen=True)
class ProduceOptions:
    """What to stream, and how. Mirrors the command-line flags."""

    source: str
    source_id: str | None = None
    topic: str | None = None
    fps: float | None = None
    fast: bool = False
    loop: bool = False
    quality: int = 90
    size: tuple[int, int] | None = None
    image_format: ImageFormat = "jpeg"
    max_frames: int | None = None
    quiet: bool = False
    connect_timeout_s: float = 10.0


@dataclass
class ProduceStats:
    """What a run sent; ``elapsed_s`` runs from the first frame to the last acknowledgement."""

    sent: int = 0
    acked: int = 0
    failed: int = 0
    bytes_sent: int = 0
    elapsed_s: float = 0.0
    skipped: list[str] = field(default_factory=list)
    interrupted: bool = False

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class SourceFrame:
    """One frame from a source; ``captured_at`` is None where the send time is the best guess."""

    frame: EncodedFrame
    captured_at: datetime | None = None


class FrameSource:
    """Frames of one source, and the pace at which they should be sent.

    Attributes:
        kind: directory, video or camera.
        rate: frames per second to pace to; None: the source paces itself (a camera).
    """

    kind: SourceKind
    rate: float | None

    def frames(self) -> Iterator[SourceFrame]:
        raise NotImplementedError

    def close(self) -> None:
        """Releases the device or file."""


def source_kind(source: str) -> SourceKind:
    """Whether ``source`` names a directory, a camera (device, index, URL) or a video file."""
    if "://" in source or source.isdigit() or source.startswith("/dev/video"):
        return "camera"
    path = Path(source)
    if path.is_dir():
        return "directory"
    if path.is_file():
        return "video"
    raise SourceError(f"{source}: no such directory, video file, camera device or URL")


def open_source(options: ProduceOptions) -> FrameSource:
    """Opens the source named by ``options.source``.

    Raises:
        SourceError: it does not exist, cannot be opened, or has no frames.
    """
    kind = source_kind(options.source)
    if kind == "directory":
        return DirectorySource(Path(options.source), options)
    return VideoSource(options.source, options, live=kind == "camera")


class DirectorySource(FrameSource):
    """JPEG and PNG files of a directory, in name order."""

    kind: SourceKind = "directory"

    def __init__(self, path: Path, options: ProduceOptions) -> None:
        self.options = options
        self.rate = options.fps or DIRECTORY_FPS
        self.skipped: list[str] = []
        self.files: list[tuple[Path, str]] = []
        for file in sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")):
            with file.open("rb") as handle:
                head = handle.read(8)
            try:
                self.files.append((file, sniff_content_type(head)))
            except FrameEncodingError:
                log.warning("skipping %s: not a JPEG or PNG image", file)
                self.skipped.append(file.name)
        if not self.files:
            raise SourceError(f"{path}: no JPEG or PNG files")

    def frames(self) -> Iterator[SourceFrame]:
        while True:
            for path, _content_type in self.files:
                data = path.read_bytes()
                if self.options.size is not None:
                    yield SourceFrame(self._reencode(path, data))
                else:
                    try:
                        yield SourceFrame(encode_image(data))
                    except FrameEncodingError:  # replaced since it was listed
                        log.warning("skipping %s: no longer a JPEG or PNG image", path)
            if not self.options.loop:
                return

    def _reencode(self, path: Path, data: bytes) -> EncodedFrame:
        import cv2
        import numpy as np

        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
        if image is None:
            raise SourceError(f"{path}: OpenCV cannot decode it")
        return _encode(image, self.options)


class VideoSource(FrameSource):
    """A video file, or a live camera or stream, read through OpenCV."""

    def __init__(self, source: str, options: ProduceOptions, *, live: bool) -> None:
        import cv2

        self.options = options
        self.kind = "camera" if live else "video"
        if live and source.isdigit():
            capture = cv2.VideoCapture(int(source))
        elif live and "://" in source:
            capture = cv2.VideoCapture(source, cv2.CAP_FFMPEG)
        else:
            capture = cv2.VideoCapture(source)
        if not capture.isOpened():
            capture.release()
            raise SourceError(f"{source}: OpenCV cannot open it as a {self.kind}")
        self.capture = capture
        native = capture.get(cv2.CAP_PROP_FPS)
        self.native_fps = native if native and math.isfinite(native) and native > 0 else None
        if live:
            self.rate = None
        else:
            native_fps = self.native_fps or 25.0
            self.rate = min(options.fps, native_fps) if options.fps else native_fps

    def frames(self) -> Iterator[SourceFrame]:
        if self.kind == "camera":
            yield from self._live_frames()
        else:
            yield from self._file_frames()

    def _file_frames(self) -> Iterator[SourceFrame]:
        import cv2

        assert self.rate is not None
        native = self.native_fps or self.rate
        step = 1.0 / self.rate
        while True:
            index, next_t = 0, 0.0
            while True:
                ok, image = self.capture.read()
                if not ok:
                    break
                video_t = index / native
                index += 1
                if video_t + 1e-6 < next_t:
                    continue  # sampled down to --fps
                next_t += step
                yield SourceFrame(_encode(image, self.options))
            if not self.options.loop or index == 0:
                return
            self.capture.set(cv2.CAP_PROP_POS_FRAMES, 0)

    def _live_frames(self) -> Iterator[SourceFrame]:
        step = 1.0 / self.options.fps if self.options.fps else 0.0
        next_slot = 0.0
        while True:
            ok, image = self.capture.read()
            if not ok:
                log.warning("the camera %s returned no frame; stopping", self.options.source)
                return
            captured_at = datetime.now(UTC)
            now = time.monotonic()
            if now < next_slot:
                continue
            next_slot = max(next_slot + step, now) if next_slot else now + step
            yield SourceFrame(_encode(image, self.options), captured_at)

    def close(self) -> None:
        self.capture.release()


def _encode(image: Any, options: ProduceOptions) -> EncodedFrame:
    import cv2

    if options.size is not None and (image.shape[1], image.shape[0]) != options.size:
        image = cv2.resize(image, options.size, interpolation=cv2.INTER_AREA)
    return encode_image(image, options.image_format, options.quality, channels="bgr")


class Pacer:
    """Holds frame k until ``start + k / rate``; catches up without bursts after a stall."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self._next: float | None = None

    async def wait(self) -> None:
        if not self.interval:
            return
        now = time.monotonic()
        if self._next is None:
            self._next = now
        delay = self._next - now
        if delay > 0:
            await asyncio.sleep(delay)
        self._next = max(self._next, now - self.interval) + self.interval


class Progress:
    """A progress line on stderr: rewritten in place on a terminal, every 5 s otherwise."""

    def __init__(self, stream: TextIO, quiet: bool) -> None:
        self.stream = stream
        self.quiet = quiet
        self.tty = stream.isatty()
        self.interval = 0.5 if self.tty else 5.0
        self._last = time.monotonic()

    def update(self, stats: ProduceStats, start: float, force: bool = False) -> None:
        now = time.monotonic()
        if self.quiet or (not force and now - self._last < self.interval):
            return
        self._last = now
        elapsed = max(now - start, 1e-9)
        line = (
            f"sent {stats.sent} frames ({stats.acked} acknowledged), "
            f"{stats.sent / elapsed:.1f} frames/s, {_megabytes(stats.bytes_sent)}"
        )
        self.stream.write(f"\r{line}\x1b[K" if self.tty else f"{line}\n")
        self.stream.flush()

    def finish(self) -> None:
        if self.tty and not self.quiet:
            self.stream.write("\n")


def _megabytes(count: int) -> str:
    return f"{count / 1e6:.1f} MB"


async def produce_frames(
    options: ProduceOptions,
    kafka: KafkaSettings,
    *,
    stop: asyncio.Event | None = None,
    stderr: TextIO | None = None,
) -> ProduceStats:
    """Streams the source into the frames topic until it ends, ``max_frames``, or ``stop``.

    Args:
        options: the source and how to send it.
        kafka: the cluster (``bootstrap`` must be set) and the topic prefix.
        stop: set it to end the run; everything sent is still acknowledged.
        stderr: where the progress line goes (``sys.stderr`` if None).

    Returns:
        What was sent and acknowledged.

    Raises:
        SourceError: the source cannot be opened.
        BrokerError: the cluster does not answer within ``connect_timeout_s``.
        ConfigError: the connection settings are inconsistent.
    """
    source = open_source(options)
    try:
        return await _produce(source, options, kafka, stop or asyncio.Event(), stderr)
    finally:
        source.close()


async def _produce(
    source: FrameSource,
    options: ProduceOptions,
    kafka: KafkaSettings,
    stop: asyncio.Event,
    stderr: TextIO | None,
) -> ProduceStats:
    topic = options.topic or kafka.topics.frames
    await wait_for_broker(kafka, timeout_s=options.connect_timeout_s)
    try:
        await ensure_topics(kafka, [topic])
    except BrokerError as error:  # e.g. no rights to create topics: the topic may exist anyway
        log.warning("could not make sure %s exists (%s); producing anyway", topic, error)
    stats = ProduceStats(skipped=list(getattr(source, "skipped", [])))
    progress = Progress(stderr or sys.stderr, options.quiet)
    pacer = Pacer(None if options.fast else source.rate)
    source_id = options.source_id if options.source_id is not None else _default_source_id(options)

    def on_ack(future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            stats.failed += 1
            if stats.failed == 1:
                log.error("the broker did not acknowledge a frame: %r", future.exception())
        else:
            stats.acked += 1

    reader = _ReadAhead(source)
    start = time.monotonic()
    async with FrameProducer(kafka=kafka, topic=topic, source_id=source_id) as producer:
        try:
            while not stop.is_set() and (
                options.max_frames is None or stats.sent < options.max_frames
            ):
                item = await reader.next()
                if item is None:
                    break
                await pacer.wait()
                if stats.sent == 0:
                    start = time.monotonic()
                _, ack = await producer.submit_encoded(item.frame, captured_at=item.captured_at)
                ack.add_done_callback(on_ack)
                stats.sent += 1
                stats.bytes_sent += len(item.frame.data)
                progress.update(stats, start)
        finally:
            await reader.close()
        stats.interrupted = stop.is_set()
        with contextlib.suppress(KafkaError):  # counted per frame by on_ack
            await producer.flush()
    await asyncio.sleep(0)  # let the last ack callbacks run
    stats.elapsed_s = time.monotonic() - start
    progress.update(stats, start, force=True)
    progress.finish()
    return stats


class _ReadAhead:
    """Reads and encodes frames in a worker thread, a few ahead of the sender.

    So decoding and encoding the next frame overlaps with producing this one.
    A camera gets a short queue: frames waiting in it only grow stale.
    """

    def __init__(self, source: FrameSource) -> None:
        depth = 2 if source.kind == "camera" else 16
        self._frames = source.frames()
        self._queue: asyncio.Queue[SourceFrame | Exception | None] = asyncio.Queue(depth)
        self._closed = False
        self._task = asyncio.create_task(self._run())

    async def _run(self) -> None:
        try:
            while not self._closed:
                item = await asyncio.to_thread(next, self._frames, None)
                await self._queue.put(item)
                if item is None:
                    return
        except Exception as error:  # handed to the reader of the queue
            await self._queue.put(error)

    async def next(self) -> SourceFrame | None:
        """The next frame; None at the end of the source.

        Raises:
            Exception: what reading the source raised.
        """
        item = await self._queue.get()
        if isinstance(item, Exception):
            raise item
        return item

    async def close(self) -> None:
        """Stops reading and waits for the worker, so the source can be released safely."""
        self._closed = True
        while not self._task.done():
            while not self._queue.empty():
                self._queue.get_nowait()  # unblocks a pending put
            await asyncio.wait({self._task}, timeout=0.05)


def _default_source_id(options: ProduceOptions) -> str:
    source = options.source.rstrip("/")
    return Path(source).stem if "://" not in source else source.split("://", 1)[1].split("/")[0]


def run_produce(args: argparse.Namespace) -> int:
    """``winnow produce``.

    Returns:
        0 when the source ended or Ctrl-C stopped it (all sent acknowledged), 1
        when Kafka cannot be reached or a frame was not acknowledged, 2 for a
        bad source or flag.
    """
    if args.fps is not None and args.fps <= 0:
        print("winnow produce: --fps must be positive", file=sys.stderr)
        return 2
    if not 1 <= args.quality <= 100:
        print("winnow produce: --quality must be 1..100", file=sys.stderr)
        return 2
    env = KafkaSettings()
    kafka = env.model_copy(
        update={"bootstrap": args.bootstrap or env.bootstrap or DEFAULT_BOOTSTRAP}
    )
    options = ProduceOptions(
        source=args.source,
        source_id=args.source_id,
        topic=args.topic,
        fps=args.fps,
        fast=args.fast,
        loop=args.loop,
        quality=args.quality,
        size=args.size,
        image_format=args.image_format,
        max_frames=args.max_frames,
        quiet=args.quiet,
        connect_timeout_s=args.connect_timeout,
    )
    try:
        stats = asyncio.run(_main(options, kafka))
    except SourceError as error:
        print(f"winnow produce: {error}", file=sys.stderr)
        return 2
    except (BrokerError, KafkaError, OSError) as error:
        print(
            f"winnow produce: cannot reach Kafka at {kafka.bootstrap}: {error}\n"
            "Start one with `winnow broker` (or `winnow serve`), or point --bootstrap / "
            "WINNOW_KAFKA_BOOTSTRAP at a running cluster.",
            file=sys.stderr,
        )
        return 1
    except ConfigError as error:
        print(f"winnow produce: {error}", file=sys.stderr)
        return 2
    except asyncio.CancelledError:  # a second Ctrl-C
        print("winnow produce: stopped without waiting for acknowledgements", file=sys.stderr)
        return 130
    print(
        f"winnow produce: {stats.sent} frames to {options.topic or kafka.topics.frames} "
        f"({stats.acked} acknowledged, {stats.failed} failed, {_megabytes(stats.bytes_sent)}) "
        f"in {stats.elapsed_s:.2f} s, {stats.rate:.1f} frames/s"
        + (" — stopped" if stats.interrupted else ""),
        file=sys.stderr,
    )
    return 1 if stats.failed else 0


async def _main(options: ProduceOptions, kafka: KafkaSettings) -> ProduceStats:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    installed: list[signal.Signals] = []

    def on_signal() -> None:
        if stop.is_set() and task is not None:
            task.cancel()  # a second Ctrl-C: give up on the flush
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signum, on_signal)
            installed.append(signum)
    try:
        return await produce_frames(options, kafka, stop=stop)
    finally:
        for signum in installed:
            loop.remove_signal_handler(signum)
