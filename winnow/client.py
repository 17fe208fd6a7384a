"""A small Python client that publishes frames to ``winnow.frames``.

Each frame is a plain Kafka record that follows the frame contract
(``schemas.frames``): the key is the source id, the value the JPEG or PNG bytes,
and the headers carry ``frame-id``, ``captured-at`` and ``content-type``.
Nothing here is needed to take part (any Kafka client can produce frames); it
saves encoding images, building headers and waiting for acknowledgements.

Async::

    import numpy as np
    from winnow.client import FrameProducer

    async with FrameProducer(bootstrap="127.0.0.1:9092", source_id="cam-1") as producer:
        frame_id = await producer.send(np.zeros((480, 640, 3), np.uint8))  # RGB, JPEG-encoded
        ids = await producer.send_many([open("a.png", "rb").read(), open("b.jpg", "rb").read()])

Without asyncio (a background thread runs the event loop)::

    from winnow.client import SyncFrameProducer

    with SyncFrameProducer(bootstrap="127.0.0.1:9092", source_id="cam-1") as producer:
        frame_id = producer.send(jpeg_bytes)

``send`` returns once the broker has acknowledged the record (``acks=all``).
For throughput, ``submit`` only enqueues and returns the frame id with a future
for the acknowledgement; ``flush`` waits for everything submitted.
"""

import asyncio
import threading
import uuid
from collections.abc import Coroutine, Iterable
from concurrent.futures import Future
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, Self, TypeVar

import numpy as np
from aiokafka import AIOKafkaProducer
from aiokafka.structs import RecordMetadata

from infra.kafka.producer import create_producer
from infra.kafka.settings import KafkaSettings
from schemas.frames import ContentType, FrameHeaders
from schemas.media import other_format, sniff

ImageFormat = Literal["jpeg", "png"]
ChannelOrder = Literal["rgb", "bgr"]
Image = Any  # bytes | numpy array | PIL image; Any keeps the public signature readable

_T = TypeVar("_T")


class FrameEncodingError(ValueError):
    """An image that cannot become a frame: not JPEG/PNG bytes, or an unusable array."""


@dataclass(frozen=True)
class EncodedFrame:
    """A frame ready for Kafka: the encoded bytes and their media type."""

    data: bytes
    content_type: str


def sniff_content_type(data: bytes) -> ContentType:
    """``image/jpeg`` or ``image/png`` from the leading bytes (:func:`schemas.media.sniff`).

    Raises:
        FrameEncodingError: the bytes are neither JPEG nor PNG.
    """
    content_type = sniff(data)
    if content_type is not None:
        return content_type
    name = other_format(data)
    what = f"a {name} image" if name else "unknown signature"
    raise FrameEncodingError(f"{len(data)} bytes that are not a JPEG or PNG image ({what})")


def encode_image(
    image: Image,
    image_format: ImageFormat = "jpeg",
    quality: int = 90,
    channels: ChannelOrder = "rgb",
) -> EncodedFrame:
    """Turns an image into frame bytes.

    Args:
        image: encoded JPEG/PNG ``bytes`` (sent as they are, type sniffed); a
            ``uint8`` numpy array, H x W (grey), H x W x 3 or H x W x 4; or a
            PIL image.
        image_format: how arrays and PIL images are encoded. An array with an
            alpha channel is always PNG (JPEG has no alpha).
        quality: JPEG quality, 1..100.
        channels: the order of an array's colour channels (OpenCV gives BGR).

    Raises:
        FrameEncodingError: bytes that are not JPEG/PNG, or an array of the
            wrong dtype or shape.
    """
    if isinstance(image, bytes | bytearray | memoryview):
        data = bytes(image)
        return EncodedFrame(data, sniff_content_type(data))
    if not isinstance(image, np.ndarray):
        if not hasattr(image, "mode"):  # not a PIL image either
            raise FrameEncodingError(f"cannot send a {type(image).__name__} as a frame")
        image = np.asarray(image.convert("RGBA" if "A" in image.mode else "RGB"))
        channels = "rgb"
    return _encode_array(image, image_format, quality, channels)


def _encode_array(
    array: np.ndarray, image_format: ImageFormat, quality: int, channels: ChannelOrder
) -> EncodedFrame:
    import cv2

    if array.dtype != np.uint8:
        raise FrameEncodingError(f"an image array must be uint8, not {array.dtype}")
    if array.ndim == 3 and array.shape[2] == 1:
        array = array[:, :, 0]
    if array.ndim == 3 and array.shape[2] in (3, 4):
        if channels == "rgb":
            code = cv2.COLOR_RGB2BGR if array.shape[2] == 3 else cv2.COLOR_RGBA2BGRA
            array = cv2.cvtColor(array, code)
        if array.shape[2] == 4:
            image_format = "png"
    elif array.ndim != 2:
        raise FrameEncodingError(
            f"an image array must be H x W, H x W x 3 or H x W x 4, not {array.shape}"
        )
    if image_format == "jpeg":
        if not 1 <= quality <= 100:
            raise FrameEncodingError(f"JPEG quality must be 1..100, not {quality}")
        ok, buffer = cv2.imencode(".jpg", array, [cv2.IMWRITE_JPEG_QUALITY, quality])
        content_type = "image/jpeg"
    else:
        ok, buffer = cv2.imencode(".png", array)
        content_type = "image/png"
    if not ok:
        raise FrameEncodingError(f"OpenCV could not encode a {array.shape} array")
    return EncodedFrame(buffer.tobytes(), content_type)


def new_frame_id() -> str:
    """A fresh, globally unique frame id."""
    return uuid.uuid4().hex


class FrameProducer:
    """Publishes frames of one source to the frames topic.

    Args:
        bootstrap: ``host:port[,host:port]``; None takes ``WINNOW_KAFKA_BOOTSTRAP``.
        topic: the frames topic; None takes ``<WINNOW_KAFKA_TOPIC_PREFIX>frames``.
        source_id: the record key (camera id); can be overridden per frame.
        kafka: full connection settings (TLS, SASL); ``bootstrap`` overrides
            its address. None reads ``WINNOW_KAFKA_*`` from the environment.
        image_format: how arrays are encoded (``jpeg`` or ``png``).
        quality: JPEG quality for arrays.
        channels: colour order of arrays (``rgb``, or ``bgr`` for OpenCV).
        **producer_options: ``AIOKafkaProducer`` arguments (``linger_ms``, ...).

    Example::

        async with FrameProducer(bootstrap="127.0.0.1:9092", source_id="cam-1") as p:
            frame_id = await p.send(rgb_array, captured_at=datetime.now(UTC))
    """

    def __init__(
        self,
        bootstrap: str | None = None,
        topic: str | None = None,
        source_id: str = "",
        *,
        kafka: KafkaSettings | None = None,
        image_format: ImageFormat = "jpeg",
        quality: int = 90,
        channels: ChannelOrder = "rgb",
        **producer_options: Any,
    ) -> None:
        settings = kafka if kafka is not None else KafkaSettings()
        if bootstrap is not None:
            settings = settings.model_copy(update={"bootstrap": bootstrap})
        self.settings = settings
        self.topic = topic or settings.topics.frames
        self.source_id = source_id
        self.image_format: ImageFormat = image_format
        self.quality = quality
        self.channels: ChannelOrder = channels
        self._options = producer_options
        self._producer: AIOKafkaProducer | None = None
        self._pending: set[asyncio.Future[RecordMetadata]] = set()

    async def start(self) -> None:
        """Connects to the cluster; a second call does nothing.

        A producer can be started again after :meth:`stop`, or after a start
        that failed (a camera retries until the cluster is up).

        Raises:
            ConfigError: the connection settings are inconsistent.
            KafkaError: the cluster cannot be reached.
        """
        if self._producer is not None:
            return
        producer = create_producer(self.settings, **self._options)
        try:
            await producer.start()
        except BaseException:
            await producer.stop()  # a half-started client still holds its connections
            raise
        self._producer = producer

    async def stop(self) -> None:
        """Waits for outstanding acknowledgements, then disconnects. Idempotent."""
        producer, self._producer = self._producer, None
        if producer is None:
            return
        try:
            await producer.flush()
        finally:
            await producer.stop()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def submit(
        self,
        image: Image,
        *,
        source_id: str | None = None,
        captured_at: datetime | None = None,
        frame_id: str | None = None,
    ) -> tuple[str, asyncio.Future[RecordMetadata]]:
        """Enqueues one frame without waiting for its acknowledgement.

        Waits only while the producer's buffer is full. Arrays are encoded in a
        worker thread so the event loop keeps moving bytes.

        Args:
            image: JPEG/PNG bytes, a uint8 numpy array or a PIL image.
            source_id: the key; the producer's ``source_id`` if None.
            captured_at: the ``captured-at`` header; now (UTC) if None.
            frame_id: the ``frame-id`` header; a fresh UUID if None.

        Returns:
            The frame id and a future that resolves to the record's metadata
            (partition, offset) once the broker acknowledges it.

        Raises:
            FrameEncodingError: the image cannot be encoded.
            RuntimeError: the producer is not started.
        """
        if isinstance(image, bytes | bytearray | memoryview):
            encoded = encode_image(image)
        else:
            encoded = await asyncio.to_thread(
                encode_image, image, self.image_format, self.quality, self.channels
            )
        return await self.submit_encoded(
            encoded, source_id=source_id, captured_at=captured_at, frame_id=frame_id
        )

    async def submit_encoded(
        self,
        frame: EncodedFrame,
        *,
        source_id: str | None = None,
        captured_at: datetime | None = None,
        frame_id: str | None = None,
    ) -> tuple[str, asyncio.Future[RecordMetadata]]:
        """As :meth:`submit`, for a frame that is already encoded."""
        if self._producer is None:
            raise RuntimeError("the FrameProducer is not started: use `async with` or start()")
        frame_id = frame_id or new_frame_id()
        headers = FrameHeaders(
            frame_id=frame_id,
            captured_at=captured_at or datetime.now(UTC),
            content_type=frame.content_type,
        )
        key = source_id if source_id is not None else self.source_id
        future = await self._producer.send(
            self.topic, frame.data, key=key.encode() if key else None, headers=headers.to_kafka()
        )
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return frame_id, future

    async def send(
        self,
        image: Image,
        *,
        source_id: str | None = None,
        captured_at: datetime | None = None,
        frame_id: str | None = None,
    ) -> str:
        """Sends one frame and waits until the broker acknowledges it.

        Args: as :meth:`submit`.

        Returns:
            The frame id.

        Raises:
            FrameEncodingError: the image cannot be encoded.
            KafkaError: the broker did not acknowledge the record.
        """
        frame_id, ack = await self.submit(
            image, source_id=source_id, captured_at=captured_at, frame_id=frame_id
        )
        await ack
        return frame_id

    async def send_many(
        self, images: Iterable[Image], *, source_id: str | None = None
    ) -> list[str]:
        """Sends frames in order and waits for all their acknowledgements.

        Returns:
            The frame ids, in the order of ``images``.
        """
        submitted = [await self.submit(image, source_id=source_id) for image in images]
        await asyncio.gather(*(ack for _, ack in submitted))
        return [frame_id for frame_id, _ in submitted]

    async def flush(self) -> None:
        """Waits until every submitted frame is acknowledged.

        Raises:
            KafkaError: a record was not acknowledged.
        """
        if self._producer is not None:
            await self._producer.flush()
        if self._pending:
            await asyncio.gather(*list(self._pending))


class SyncFrameProducer:
    """:class:`FrameProducer` for code without asyncio; its loop runs in a daemon thread.

    Takes the same arguments. Thread-safe: calls from several threads are
    serialized onto the one loop.

    Example::

        with SyncFrameProducer(bootstrap="127.0.0.1:9092", source_id="cam-1") as producer:
            for frame in frames:  # numpy arrays from anywhere
                producer.send(frame)
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._async = FrameProducer(*args, **kwargs)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def topic(self) -> str:
        return self._async.topic

    def start(self) -> None:
        """Starts the loop thread and connects; raises what :meth:`FrameProducer.start` raises."""
        if self._loop is not None:
            return
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=loop.run_forever, name="winnow-frame-producer", daemon=True
        )
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self._call(self._async.start())
        except BaseException:
            self._close_loop()
            raise

    def close(self) -> None:
        """Waits for outstanding acknowledgements, disconnects and ends the thread. Idempotent."""
        if self._loop is None:
            return
        try:
            self._call(self._async.stop())
        finally:
            self._close_loop()

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def send(self, image: Image, **kwargs: Any) -> str:
        """Sends one frame and waits for its acknowledgement; returns the frame id."""
        return self._call(self._async.send(image, **kwargs))

    def send_many(self, images: Iterable[Image], **kwargs: Any) -> list[str]:
        """Sends frames and waits for all acknowledgements; returns their ids in order."""
        return self._call(self._async.send_many(list(images), **kwargs))

    def submit(self, image: Image, **kwargs: Any) -> str:
        """Enqueues one frame; returns its id at once. :meth:`flush` waits for the acks."""
        frame_id, _ack = self._call(self._async.submit(image, **kwargs))
        return frame_id

    def flush(self) -> None:
        """Waits until every submitted frame is acknowledged."""
        self._call(self._async.flush())

    def _call(self, coro: Coroutine[Any, Any, _T]) -> _T:
        if self._loop is None:
            coro.close()
            raise RuntimeError("the SyncFrameProducer is not started: use `with` or start()")
        future: Future[_T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        return future.result()

    def _close_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is None:
            return
        loop.call_soon_threadsafe(loop.stop)
        if thread is not None:
            thread.join()
        loop.close()


__all__ = [
    "EncodedFrame",
    "FrameEncodingError",
    "FrameProducer",
    "SyncFrameProducer",
    "encode_image",
    "new_frame_id",
    "sniff_content_type",
]
