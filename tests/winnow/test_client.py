"""FrameProducer and SyncFrameProducer against the real broker."""

import asyncio
import gc
import io
import socket
import threading
import warnings
from datetime import UTC, datetime

import numpy as np
import pytest
from aiokafka.errors import KafkaConnectionError
from PIL import Image

from infra.kafka.settings import KafkaSettings
from schemas.frames import FrameHeaders
from schemas.topics import TopicNames
from tests.winnow.test_produce import read_records
from winnow.client import (
    FrameEncodingError,
    FrameProducer,
    SyncFrameProducer,
    encode_image,
)


def _png(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, "PNG")
    return buffer.getvalue()


def _red_rgb() -> np.ndarray:
    image = np.zeros((48, 64, 3), np.uint8)
    image[..., 0] = 255
    return image


async def test_frame_producer_sends_arrays_and_bytes_with_key_and_headers(
    kafka_settings: KafkaSettings, winnow_topics: TopicNames
) -> None:
    png = _png(np.arange(48 * 64, dtype=np.uint8).reshape(48, 64))
    when = datetime(2024, 5, 1, 12, 0, 0, tzinfo=UTC)
    async with FrameProducer(
        bootstrap=kafka_settings.bootstrap, kafka=kafka_settings, source_id="cam-1"
    ) as producer:
        assert producer.topic == winnow_topics.frames
        jpeg_id = await producer.send(_red_rgb(), captured_at=when)
        png_id = await producer.send(png, source_id="cam-2", frame_id="my-frame")
        many = await producer.send_many([png, _red_rgb(), png])
    assert png_id == "my-frame"
    assert len(set([jpeg_id, *many])) == 4

    records = await read_records(kafka_settings, winnow_topics.frames, 5)
    by_id = {FrameHeaders.from_kafka(r.headers).frame_id: r for r in records}
    assert set(by_id) == {jpeg_id, png_id, *many}

    jpeg = by_id[jpeg_id]
    headers = FrameHeaders.from_kafka(jpeg.headers)
    assert jpeg.key == b"cam-1" and headers.content_type == "image/jpeg"
    assert headers.captured_at == when
    r, g, b = np.asarray(Image.open(io.BytesIO(jpeg.value)).convert("RGB")).mean(axis=(0, 1))
    assert r > 240 and g < 15 and b < 15  # RGB in, red out: no channel swap

    sent_png = by_id[png_id]
    assert sent_png.key == b"cam-2" and sent_png.value == png  # bytes go as they are
    assert FrameHeaders.from_kafka(sent_png.headers).content_type == "image/png"
    assert [by_id[i].key for i in many] == [b"cam-1"] * 3
    assert [FrameHeaders.from_kafka(by_id[i].headers).content_type for i in many] == [
        "image/png", "image/jpeg", "image/png"
    ]  # fmt: skip
    # The same key keeps one partition, so a source's frames stay in order.
    assert len({by_id[i].partition for i in [jpeg_id, *many]}) == 1


async def test_submit_then_flush_acknowledges_everything(
    kafka_settings: KafkaSettings, winnow_topics: TopicNames
) -> None:
    async with FrameProducer(
        kafka=kafka_settings, source_id="burst", image_format="png"
    ) as producer:
        submitted = [await producer.submit(_red_rgb()) for _ in range(50)]
        await producer.flush()
        assert all(ack.done() and not ack.exception() for _, ack in submitted)
    records = await read_records(kafka_settings, winnow_topics.frames, 50)
    assert len(records) == 50
    assert all(FrameHeaders.from_kafka(r.headers).content_type == "image/png" for r in records)


def test_encode_image_rejects_what_cannot_be_a_frame() -> None:
    with pytest.raises(FrameEncodingError, match="not a JPEG or PNG"):
        encode_image(b"GIF89a....")
    with pytest.raises(FrameEncodingError, match="uint8"):
        encode_image(np.zeros((4, 4), np.float32))
    with pytest.raises(FrameEncodingError, match="H x W"):
        encode_image(np.zeros((4, 4, 2), np.uint8))
    assert encode_image(np.zeros((4, 4, 4), np.uint8)).content_type == "image/png"  # alpha
    bgr = encode_image(_red_rgb()[..., ::-1].copy(), channels="bgr")
    assert np.asarray(Image.open(io.BytesIO(bgr.data)))[..., 0].mean() > 240
    from_pil = encode_image(Image.fromarray(_red_rgb()), image_format="png")
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(from_pil.data))), _red_rgb())


async def test_sync_frame_producer_works_without_an_event_loop(
    kafka_settings: KafkaSettings, winnow_topics: TopicNames
) -> None:
    png = _png(np.zeros((8, 8), np.uint8))

    def plain_code() -> tuple[str, list[str], str]:
        # A thread of its own: no running event loop, as in a plain script.
        with SyncFrameProducer(kafka=kafka_settings, source_id="sync-cam") as producer:
            one = producer.send(_red_rgb())
            many = producer.send_many([png, png])
            queued = producer.submit(png)
            producer.flush()
        return one, many, queued

    result: list[tuple[str, list[str], str]] = []
    thread = threading.Thread(target=lambda: result.append(plain_code()))
    thread.start()
    await asyncio.to_thread(thread.join, 60)
    assert result, "the SyncFrameProducer did not finish"
    one, many, queued = result[0]
    records = await read_records(kafka_settings, winnow_topics.frames, 4)
    assert [FrameHeaders.from_kafka(r.headers).frame_id for r in records] == [one, *many, queued]
    assert {r.key for r in records} == {b"sync-cam"}
    assert not any(t.name == "winnow-frame-producer" for t in threading.enumerate())


def test_sync_frame_producer_must_be_started() -> None:
    with pytest.raises(RuntimeError, match="not started"):
        SyncFrameProducer(bootstrap="127.0.0.1:1").send(b"\xff\xd8\xff")


async def test_a_frame_producer_can_start_again_after_a_failed_start_and_after_stop(
    kafka_settings: KafkaSettings, winnow_topics: TopicNames
) -> None:
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    unreachable = FrameProducer(bootstrap=f"127.0.0.1:{port}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(2):  # each try really tries: a failed start is not "started"
            with pytest.raises(KafkaConnectionError):
                await unreachable.start()
        gc.collect()
    assert not [w for w in caught if "Unclosed AIOKafkaProducer" in str(w.message)]
    with pytest.raises(RuntimeError, match="not started"):
        await unreachable.send(b"\xff\xd8\xff")

    producer = FrameProducer(kafka=kafka_settings, source_id="again")
    png = _png(np.zeros((8, 8), np.uint8))
    async with producer:
        first = await producer.send(png)
    async with producer:  # a stopped producer connects again
        second = await producer.send(png)
    records = await read_records(kafka_settings, winnow_topics.frames, 2)
    assert [FrameHeaders.from_kafka(r.headers).frame_id for r in records] == [first, second]
