"""HTTP ingest: ``POST /v1/frames`` writes frames into ``winnow.frames``.

For cameras and apps that speak HTTP rather than Kafka. A request carries one
image as its raw body (``Content-Type: image/jpeg`` or ``image/png``), or one
or many images as ``multipart/form-data`` file parts; ``source_id`` (the record
key) and optional ``captured_at`` (ISO 8601 or epoch ms) come as query
parameters or form fields. Every image passes the scorer's own checks
(``service.pipeline.decode``) before it is produced, so a bad one is refused here with
its reason instead of landing on the dead-letter topic later.

The answer is 201 with the frame ids only once Kafka has acknowledged every
frame (``acks=all``; a transient broker error resends them, see
``infra.kafka.delivery``). Errors are JSON ``{"detail": {"error": ..., "message": ...}}``
(``schemas.ingest``): 401/403 (token), 413 (body or image too large, checked
while the body streams in), 415 (not JPEG/PNG), 422 (a broken image, with the
decoder's reason), 429 (rate limit, with ``Retry-After``), 503 (Kafka did not
acknowledge). Each is raised as a typed refusal that carries its status
(``service.http.ingest_errors``), and the router's route class turns it into the
answer.

Writes need a bearer token: one of ``WINNOW_INGEST_TOKENS`` (comma-separated)
or ``WINNOW_ADMIN_TOKEN``; with neither configured, ingest is refused (403).
Each token has a token bucket (``service.http.rate_limit``) of
``WINNOW_INGEST_RATE`` frames per second and ``WINNOW_INGEST_BURST`` frames.

The router carries its own lifespan (the producer), which FastAPI merges into
the app's, so ``create_app`` only has to include it.
"""

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Annotated

from aiokafka.errors import KafkaError
from fastapi import APIRouter, Depends, FastAPI, Query, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException
from starlette.types import Message

from infra.kafka.delivery import Delivery, OutRecord
from infra.kafka.producer import MAX_REQUEST_BYTES, create_producer
from schemas.frames import FrameHeaders, parse_timestamp
from schemas.ingest import IngestedFrame, IngestReceipt
from schemas.media import ALIASES, sniff
from service.config import Settings
from service.errors import PoisonRecord
from service.http.ingest_errors import (
    ERROR_RESPONSES,
    BadRequest,
    Forbidden,
    IngestRefused,
    IngestRoute,
    RateLimited,
    TooLarge,
    Unauthorized,
    Unavailable,
    Unprocessable,
    UnsupportedMedia,
    decoder_refusal,
)
from service.http.rate_limit import TokenBuckets
from service.http.tokens import matching
from service.pipeline.decode import DecodeLimits, decode_image

log = logging.getLogger(__name__)
_bearer = HTTPBearer(auto_error=False)

_GENERIC_PART_TYPES = ("", "application/octet-stream")
_RECORD_OVERHEAD = 64 * 1024
"""Room left in a produce request for key, headers and batch framing."""


@dataclass
class _Frame:
    data: bytes
    content_type: str
    filename: str | None = None


def create_ingest_router(settings: Settings) -> APIRouter:
    """The ``POST /v1/frames`` router, with a lifespan that runs its Kafka producer.

    Args:
        settings: ``ingest`` (tokens, limits), ``admin_token``, ``kafka`` (the
            cluster and topic prefix) and ``scorer`` (the image limits).
    """
    ingest = settings.ingest
    topic = settings.kafka.topics.frames
    limits = DecodeLimits(
        max_bytes=min(settings.scorer.max_frame_bytes, MAX_REQUEST_BYTES - _RECORD_OVERHEAD),
        max_pixels=settings.scorer.max_pixels,
    )
    buckets = TokenBuckets(ingest.rate, ingest.burst)
    delivery: Delivery | None = None

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        nonlocal delivery
        # No linger: a request waits for its own acks; concurrent requests batch anyway.
        started = create_producer(settings.kafka, linger_ms=0)
        await started.start()
        delivery = Delivery(started, what="ingested frames")
        try:
            yield
        finally:
            delivery = None
            await started.stop()  # sends what is buffered first

    def require_token(
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    ) -> str:
        allowed = ingest.token_list()
        if settings.admin_token is not None:
            allowed.append(settings.admin_token.get_secret_value())
        if not allowed:
            raise Forbidden(
                "ingest_disabled",
                "HTTP ingest is disabled: set WINNOW_INGEST_TOKENS (or WINNOW_ADMIN_TOKEN)",
            )
        matched = matching(credentials.credentials if credentials else "", allowed)
        if matched is None:
            raise Unauthorized(
                "unauthorized",
                "a valid ingest bearer token is needed (Authorization: Bearer <token>)",
            )
        return matched

    router = APIRouter(tags=["ingest"], lifespan=lifespan, route_class=IngestRoute)

    @router.post(
        "/v1/frames",
        status_code=status.HTTP_201_CREATED,
        response_model=IngestReceipt,
        responses=ERROR_RESPONSES,
        openapi_extra={"requestBody": _REQUEST_BODY_DOC},
    )
    async def post_frames(
        request: Request,
        token: Annotated[str, Depends(require_token)],
        source_id: Annotated[str | None, Query(max_length=256)] = None,
        captured_at: Annotated[str | None, Query()] = None,
    ) -> IngestReceipt:
        """Writes one image (raw body) or many (multipart) to the frames topic."""
        media = _media_type(request.headers.get("content-type"))
        if media not in ALIASES and media != "multipart/form-data":
            raise UnsupportedMedia(
                "unsupported_type",
                f"Content-Type {media or '(none)'!r} is not accepted: send image/jpeg, "
                "image/png, or multipart/form-data with image parts",
            )
        wait = buckets.admit(token)
        if wait > 0:
            raise RateLimited(
                "rate_limited",
                f"this token may send {ingest.rate:g} frames/s (burst {ingest.burst:g}); "
                f"retry in {wait:.2f} s",
                retry_after_s=wait,
            )
        body = await _read_body(request, ingest.max_body_bytes)
        if media == "multipart/form-data":
            frames, fields = await _multipart(request, body, ingest.max_frames_per_request)
            source_id = fields.get("source_id") or source_id
            captured_at = fields.get("captured_at") or captured_at
        else:
            frames = [_Frame(data=body, content_type=ALIASES[media])]
        buckets.charge(token, len(frames) - 1)
        if not source_id:
            raise Unprocessable(
                "missing_source_id",
                "source_id is required (query parameter or form field): the camera or app id",
            )
        headers = FrameHeaders(captured_at=_captured_at(captured_at))
        await asyncio.gather(*(asyncio.to_thread(_validate, frame, limits) for frame in frames))
        written = await _produce(delivery, topic, source_id, headers, frames, ingest.ack_timeout_s)
        return IngestReceipt(
            topic=topic,
            source_id=source_id,
            frame_ids=[frame.frame_id for frame in written],
            frames=written,
        )

    return router


_REQUEST_BODY_DOC = {
    "required": True,
    "content": {
        "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
        "image/png": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "source_id": {"type": "string"},
                    "captured_at": {"type": "string"},
                },
            }
        },
    },
}


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 as soon as it is known to pass ``limit`` bytes."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise TooLarge(
            "too_large", f"the body is {int(declared)} bytes, more than the limit of {limit} bytes"
        )
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge("too_large", f"the body is more than the limit of {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _media_type(header: str | None) -> str:
    """The media type of a ``Content-Type`` header, without parameters, lower case."""
    return (header or "").split(";", 1)[0].strip().lower()


async def _multipart(
    request: Request, body: bytes, max_files: int
) -> tuple[list[_Frame], dict[str, str]]:
    """File parts as frames, and the text fields; the body was read (and size-checked) already."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=max_files, max_fields=100)
    except MultiPartException as error:
        raise BadRequest("bad_multipart", str(error)) from error
    except StarletteHTTPException as error:  # starlette's own answer to a broken form
        raise BadRequest("bad_multipart", str(error.detail)) from error
    frames: list[_Frame] = []
    fields: dict[str, str] = {}
    try:
        for name, value in form.multi_items():
            if isinstance(value, str):
                fields.setdefault(name, value)
                continue
            frames.append(await _part_frame(value))
    finally:
        await form.close()
    if not frames:
        raise Unprocessable(
            "no_image", "the multipart body has no file part: attach one or more images"
        )
    return frames, fields


async def _part_frame(part: UploadFile) -> _Frame:
    media = _media_type(part.content_type)
    if media not in ALIASES and media not in _GENERIC_PART_TYPES:
        raise UnsupportedMedia(
            "unsupported_type",
            f"part {part.filename!r} is {media!r}: only image/jpeg and image/png are accepted",
            filename=part.filename,
        )
    return _Frame(
        data=await part.read(), content_type=ALIASES.get(media, ""), filename=part.filename
    )


def _validate(frame: _Frame, limits: DecodeLimits) -> None:
    """The scorer's checks; sets the content type from the bytes when the part had none.

    Raises:
        IngestRefused: the scorer would refuse the image; bytes without a JPEG or
            PNG signature at all (a text file sent as image/jpeg) are the wrong
            media (415), not a broken image (422).
    """
    try:
        decode_image(frame.data, frame.content_type or None, limits)
    except PoisonRecord as error:
        raise decoder_refusal(error, frame.data, frame.filename) from error
    detected = sniff(frame.data)
    assert detected is not None, "decode_image accepts JPEG and PNG signatures only"
    if frame.content_type and frame.content_type != detected:
        raise UnsupportedMedia(
            "unsupported_type",
            f"the body is declared {frame.content_type} but is {detected}",
            filename=frame.filename,
        )
    frame.content_type = detected


def _captured_at(text: str | None) -> datetime | None:
    if not text:
        return None
    parsed = parse_timestamp(text.strip())
    if parsed is None:
        raise Unprocessable(
            "bad_captured_at",
            f"captured_at {text!r} is neither ISO 8601 nor milliseconds since the epoch",
        )
    return parsed


async def _produce(
    delivery: Delivery | None,
    topic: str,
    source_id: str,
    headers: FrameHeaders,
    frames: list[_Frame],
    timeout_s: float,
) -> list[IngestedFrame]:
    """Sends every frame and waits for all acknowledgements (all or an error).

    Raises:
        Unavailable: ingest is not running, or Kafka did not acknowledge every
            frame within ``timeout_s`` (transient errors are retried until then).
    """
    if delivery is None:
        raise Unavailable("not_ready", "ingest is not running")
    ids = [uuid.uuid4().hex for _ in frames]
    records = [
        OutRecord(
            topic,
            source_id.encode(),
            frame.data,
            tuple(
                headers.model_copy(
                    update={"frame_id": frame_id, "content_type": frame.content_type}
                ).to_kafka()
            ),
        )
        for frame_id, frame in zip(ids, frames, strict=True)
    ]
    try:
        async with asyncio.timeout(timeout_s):
            metadata = await delivery.send_all(records)
    except (KafkaError, TimeoutError) as error:
        log.warning(
            "ingest: Kafka did not acknowledge %d frames on %s: %r", len(frames), topic, error
        )
        raise Unavailable(
            "kafka_unavailable",
            f"Kafka did not acknowledge the frames: {error!r}; nothing is promised, retry",
            retry_after_s=1,
        ) from error
    return [
        IngestedFrame(
            frame_id=frame_id,
            partition=meta.partition,
            offset=meta.offset,
            content_type=frame.content_type,
            bytes=len(frame.data),
            filename=frame.filename,
        )
        for frame_id, frame, meta in zip(ids, frames, metadata, strict=True)
    ]


__all__ = [
    "IngestReceipt",
    "IngestRefused",
    "IngestedFrame",
    "TokenBuckets",
    "create_ingest_router",
]
