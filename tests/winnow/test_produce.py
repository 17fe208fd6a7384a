"""`winnow produce` against the real broker: pacing, sampling, keys, headers, Ctrl-C."""

import asyncio
import io
import re
import signal
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import cv2
import numpy as np
import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.structs import ConsumerRecord
from PIL import Image

from infra.kafka.connection import client_kwargs
from infra.kafka.settings import KafkaSettings
from schemas.frames import FrameHeaders
from schemas.topics import TopicNames
from winnow.produce import ProduceOptions, SourceError, produce_frames

VIDEO_FPS = 20
VIDEO_FRAMES = 30


async def read_records(
    settings: KafkaSettings, topic: str, count: int, within: float = 30, settle: float = 0.5
) -> list[ConsumerRecord]:
    """Every record of ``topic`` once ``count`` arrived (and ``settle`` s passed without more)."""
    consumer = AIOKafkaConsumer(
        topic, group_id=None, auto_offset_reset="earliest", **client_kwargs(settings)
    )
    await consumer.start()
    out: list[ConsumerRecord] = []
    try:
        async with asyncio.timeout(within):
            while len(out) < count:
                for records in (await consumer.getmany(timeout_ms=200)).values():
                    out.extend(records)
        for records in (await consumer.getmany(timeout_ms=int(settle * 1000))).values():
            out.extend(records)
    finally:
        await consumer.stop()
    return sorted(out, key=lambda r: FrameHeaders.from_kafka(r.headers).captured_at)


def _grey(value: bytes) -> float:
    return float(np.asarray(Image.open(io.BytesIO(value)).convert("L")).mean())


@pytest.fixture(scope="module")
def video(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 frames, 64x48, at 20 fps; frame i is flat grey at level 8 i."""
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, (64, 48))
    assert writer.isOpened()
    for i in range(VIDEO_FRAMES):
        writer.write(np.full((48, 64, 3), 8 * i, np.uint8))
    writer.release()
    return path


@pytest.fixture
def image_dir(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    for name, fmt in (("a.png", "PNG"), ("b.jpg", "JPEG"), ("c.png", "PNG")):
        buffer = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buffer, fmt)
        (tmp_path / name).write_bytes(buffer.getvalue())
    (tmp_path / "notes.txt").write_text("not an image")
    return tmp_path


def _check_frame_records(records: list[ConsumerRecord], key: bytes, content_type: str) -> None:
    ids = set()
    for record in records:
        assert record.key == key
        headers = FrameHeaders.from_kafka(record.headers)
        assert headers.content_type == content_type
        assert headers.frame_id and headers.frame_id not in ids
        assert isinstance(headers.captured_at, datetime) and headers.captured_at.tzinfo
        ids.add(headers.frame_id)


async def test_video_is_sampled_at_fps_and_paced(
    video: Path, kafka_settings: KafkaSettings, winnow_topics: TopicNames
) -> None:
    options = ProduceOptions(
        str(video), source_id="cam-v", fps=10, max_frames=10, size=(32, 24), quiet=True
    )
    stats = await produce_frames(options, kafka_settings)
    assert (stats.sent, stats.acked, stats.failed) == (10, 10, 0)
    assert stats.elapsed_s >= 0.85  # 10 frames at 10 fps: 9 intervals of 0.1 s
    records = await read_records(kafka_settings, winnow_topics.frames, 10)
    assert len(records) == 10
    _check_frame_records(records, b"cam-v", "image/jpeg")
    # Every other frame of the 20 fps clip (levels 0, 16, 32, ...), resized to 32x24.
    assert Image.open(io.BytesIO(records[0].value)).size == (32, 24)
    levels = [_grey(r.value) for r in records]
    assert levels == pytest.approx([16 * k for k in range(10)], abs=6)
    times = [FrameHeaders.from_kafka(r.headers).captured_at for r in records]
    assert (times[-1] - times[0]).total_seconds() >= 0.85


async def test_native_rate_is_real_time_and_fast_is_not(
    video: Path, kafka_settings: KafkaSettings, winnow_topics: TopicNames
) -> None:
    paced = await produce_frames(
        ProduceOptions(str(video), source_id="cam-n", max_frames=10, quiet=True), kafka_settings
    )
    assert paced.sent == 10 and paced.elapsed_s >= 0.45  # 10 frames at the native 20 fps
    fast = await produce_frames(
        ProduceOptions(str(video), source_id="cam-f", fast=True, quiet=True), kafka_settings
    )
    assert (fast.sent, fast.acked) == (VIDEO_FRAMES, VIDEO_FRAMES)
    assert fast.elapsed_s < 0.45  # 30 frames, unpaced, faster than 10 paced ones
    records = await read_records(kafka_settings, winnow_topics.frames, 10 + VIDEO_FRAMES)
    assert len(records) == 10 + VIDEO_FRAMES
    _check_frame_records([r for r in records if r.key == b"cam-f"], b"cam-f", "image/jpeg")
    levels = [_grey(r.value) for r in records if r.key == b"cam-f"]
    assert levels == pytest.approx([8 * i for i in range(VIDEO_FRAMES)], abs=6)


async def test_directory_sends_images_as_they_are_and_skips_the_rest(
    image_dir: Path,
    kafka_settings: KafkaSettings,
    winnow_topics: TopicNames,
    caplog: pytest.LogCaptureFixture,
) -> None:
    options = ProduceOptions(str(image_dir), source_id="dir-1", fast=True, quiet=True)
    stats = await produce_frames(options, kafka_settings)
    assert (stats.sent, stats.acked, stats.skipped) == (3, 3, ["notes.txt"])
    assert any("notes.txt" in m and "skipping" in m for m in caplog.messages)
    records = await read_records(kafka_settings, winnow_topics.frames, 3)
    assert len(records) == 3
    files = {(image_dir / n).read_bytes(): n for n in ("a.png", "b.jpg", "c.png")}
    assert sorted(files[r.value] for r in records) == ["a.png", "b.jpg", "c.png"]
    for record in records:
        headers = FrameHeaders.from_kafka(record.headers)
        expected = "image/jpeg" if files[record.value].endswith(".jpg") else "image/png"
        assert record.key == b"dir-1" and headers.content_type == expected and headers.frame_id


async def test_directory_loop_starts_over_at_the_set_pace(
    image_dir: Path, kafka_settings: KafkaSettings, winnow_topics: TopicNames
) -> None:
    options = ProduceOptions(str(image_dir), loop=True, fps=40, max_frames=8, quiet=True)
    stats = await produce_frames(options, kafka_settings)
    assert stats.sent == 8 and stats.elapsed_s >= 7 / 40 - 0.01
    records = await read_records(kafka_settings, winnow_topics.frames, 8)
    order = [(image_dir / n).read_bytes() for n in ("a.png", "b.jpg", "c.png")]
    assert [r.value for r in records] == [order[i % 3] for i in range(8)]
    assert {r.key for r in records} == {image_dir.name.encode()}  # default source id


def test_a_missing_source_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SourceError):
        asyncio.run(produce_frames(ProduceOptions(str(tmp_path / "nope.mp4")), KafkaSettings()))


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "winnow.cli", "produce", *args]


def test_cli_reports_an_unreachable_broker(image_dir: Path) -> None:
    done = subprocess.run(
        _cli(str(image_dir), "--bootstrap", "127.0.0.1:1", "--connect-timeout", "1"),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert "cannot reach Kafka at 127.0.0.1:1" in done.stderr
    assert "winnow broker" in done.stderr


async def test_cli_ctrl_c_stops_with_everything_acknowledged(
    image_dir: Path, kafka_settings: KafkaSettings, winnow_topics: TopicNames
) -> None:
    command = _cli(
        str(image_dir), "--loop", "--fps", "50", "--source-id", "cam-c",
        "--bootstrap", kafka_settings.bootstrap or "", "--topic", winnow_topics.frames,
    )  # fmt: skip
    process = await asyncio.create_subprocess_exec(*command, stderr=subprocess.PIPE)
    await read_records(kafka_settings, winnow_topics.frames, 11, settle=0)  # it is streaming
    process.send_signal(signal.SIGINT)
    async with asyncio.timeout(30):
        _, raw = await process.communicate()
    stderr = raw.decode()
    assert process.returncode == 0, stderr
    summary = re.search(r"(\d+) frames to .* \((\d+) acknowledged, 0 failed", stderr)
    assert summary, stderr
    sent, acked = int(summary[1]), int(summary[2])
    assert sent == acked > 10
    assert "stopped" in stderr and "frames/s" in stderr
    records = await read_records(kafka_settings, winnow_topics.frames, sent, settle=1.0)
    assert len(records) == sent and {r.key for r in records} == {b"cam-c"}


async def test_cli_progress_line_and_summary(
    video: Path, kafka_settings: KafkaSettings, winnow_topics: TopicNames
) -> None:
    start = time.monotonic()
    done = await asyncio.to_thread(
        subprocess.run,
        _cli(
            str(video),
            "--fast",
            "--bootstrap",
            kafka_settings.bootstrap or "",
            "--topic",
            winnow_topics.frames,
        ),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert time.monotonic() - start < 30
    assert re.search(rf"sent {VIDEO_FRAMES} frames \({VIDEO_FRAMES} acknowledged\)", done.stderr)
    assert f"{VIDEO_FRAMES} frames to {winnow_topics.frames}" in done.stderr
    records = await read_records(kafka_settings, winnow_topics.frames, VIDEO_FRAMES)
    assert {r.key for r in records} == {b"clip"}  # the file name is the default source id
