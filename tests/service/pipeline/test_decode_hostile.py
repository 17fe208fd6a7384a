"""Arbitrary bytes through the frame decoder and the record parsers (hypothesis).

Whatever a producer writes, the only way out of the decoder is a ``PoisonRecord``
(the dead-letter path) or a decoded frame, and a dead letter can always be built
and serialized for it; every consumer's parser turns garbage into its own
refusal, never an exception that would stop a consume loop.
"""

import io
import json
import struct
import zlib

import numpy as np
import pytest
from aiokafka import TopicPartition
from aiokafka.structs import ConsumerRecord
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydantic import ValidationError

from infra.kafka.settings import KafkaSettings
from schemas.dead_letter import DeadLetter
from schemas.label_requests import LabelRequest
from schemas.labels import Label
from schemas.model_spec import ModelSpec
from service.config import LabelAppSettings
from service.errors import PoisonRecord
from service.labeling.queue import LabelQueue
from service.model.assembler import ReleaseAssembler
from service.pipeline.batching import InboundFrame
from service.pipeline.decode import (
    DecodeLimits,
    decode_and_preprocess,
    decode_image,
    prepare_batch,
    preprocess,
)
from service.pipeline.records import dead_letter_of

LIMITS = DecodeLimits(max_bytes=64 * 1024, max_pixels=512 * 512)
SPEC = ModelSpec(
    version="v",
    arch="small-cnn",
    classes=["a", "b"],
    input_size=(16, 16),
    channels=1,
    mean=[0.5],
    std=[0.5],
    embedding_dim=4,
)
FAST = settings(
    max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


def _encoded(fmt: str) -> bytes:
    pixels = (np.arange(24 * 20 * 3) % 251).astype(np.uint8).reshape(20, 24, 3)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


SEEDS = [_encoded("PNG"), _encoded("JPEG"), _encoded("GIF"), _encoded("BMP")]
CONTENT_TYPES = st.one_of(
    st.none(),
    st.sampled_from(["image/jpeg", "image/png", "IMAGE/PNG; q=1", "image/gif", "", " "]),
    st.text(max_size=40),
)


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A real image with bytes flipped, cut, inserted or its header sizes overwritten."""
    data = bytearray(draw(st.sampled_from(SEEDS)))
    for _ in range(draw(st.integers(1, 6))):
        action = draw(st.sampled_from(["flip", "cut", "insert", "size"]))
        at = draw(st.integers(0, max(0, len(data) - 1)))
        if action == "flip" and data:
            data[at] ^= draw(st.integers(1, 255))
        elif action == "cut":
            del data[at:]
        elif action == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=16))
        elif len(data) > 24:  # PNG IHDR width/height or a JPEG SOF's, roughly
            data[16:24] = draw(st.binary(min_size=8, max_size=8))
    return bytes(data)


FRAME_BYTES = st.one_of(st.binary(max_size=256), mutated())


@settings(FAST, max_examples=500)
@given(value=st.one_of(st.none(), FRAME_BYTES), content_type=CONTENT_TYPES)
def test_any_bytes_decode_or_raise_only_poison_record(
    value: bytes | None, content_type: str | None
) -> None:
    """Catches any exception other than PoisonRecord escaping the decoder (a Pillow error,
    a struct error on a short header, a ZeroDivisionError...), which would stop the
    partition instead of dead-lettering the frame."""
    for decode in (
        lambda: decode_image(value, content_type, LIMITS),
        lambda: decode_and_preprocess(value, content_type, SPEC, LIMITS),
    ):
        try:
            decode()
        except PoisonRecord as error:
            assert error.reason and error.detail


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


@st.composite
def intact_pngs(draw: st.DrawFn) -> tuple[bytes, tuple[int, int]]:
    """A PNG whose every chunk has a right CRC, with its size: mostly a plain 8-bit grey or
    RGB one, or anything inside (any colour type and bit depth, bad compression or filter
    fields, interlace, bad row filters, too few or too many bytes, extra chunks)."""
    width, height = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    colour = draw(st.sampled_from([0, 2, 0, 2, 3, 4, 6]))
    depth = draw(st.sampled_from([8, 8, 8, 8, 8, 1, 2, 4, 16]))
    odd = draw(st.sampled_from([0] * 8 + [1]))
    fields = [draw(st.sampled_from([0] * 8 + [1])) for _ in range(2)]
    interlace = draw(st.sampled_from([0, 0, 0, 1, 2]))
    samples = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour]
    row = (width * samples * depth + 7) // 8
    filters = [0, 1, 2, 3, 4] + ([5, 255] if odd else [])
    rows = b"".join(
        bytes([draw(st.sampled_from(filters))]) + draw(st.binary(min_size=row, max_size=row))
        for _ in range(height)
    )
    cut = draw(st.sampled_from(["", "", "", "", "short", "long"]))
    if cut == "short":
        rows = rows[: draw(st.integers(0, len(rows) - 1))]
    elif cut == "long":
        rows += draw(st.binary(min_size=1, max_size=8))
    extra = draw(
        st.sampled_from(
            [b"", b"", _chunk(b"gAMA", struct.pack(">I", 45455)), _chunk(b"sRGB", b"\x00"),
             _chunk(b"tRNS", b"\x00\x01" * (3 if colour == 2 else 1)), _chunk(b"PLTE", bytes(30)),
             _chunk(b"tEXt", b"Comment\x00hostile")]
        )
    )  # fmt: skip
    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, *fields, interlace)
    value = (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", ihdr)
        + extra
        + _chunk(b"IDAT", zlib.compress(rows))
        + _chunk(b"IEND", b"")
    )
    return value, (height, width)


@settings(FAST, max_examples=400)
@given(png=intact_pngs(), channels=st.sampled_from([1, 3]), own_size=st.booleans())
def test_libspng_and_pillow_agree_on_every_intact_png(
    png: tuple[bytes, tuple[int, int]], channels: int, own_size: bool
) -> None:
    """The scorer decodes 8-bit grey and RGB PNGs with libspng and the rest with Pillow;
    the trainer and the contract use Pillow. Catches a PNG libspng decodes that Pillow
    refuses or decodes otherwise (a frame scored that should be dead-lettered, or pixels
    the model never trained on), and a refusal with another reason; at the frame's own
    size (no resize) and at another."""
    value, size = png
    spec = SPEC.model_copy(
        update={"channels": channels, "input_size": size if own_size else (8, 8),
                "mean": [0.5] * channels, "std": [0.5] * channels}
    )  # fmt: skip
    try:
        want = preprocess(decode_image(value, "image/png", LIMITS), spec)
    except PoisonRecord as error:
        with pytest.raises(PoisonRecord) as caught:
            decode_and_preprocess(value, "image/png", spec, LIMITS)
        assert caught.value.reason == error.reason
    else:
        assert np.array_equal(decode_and_preprocess(value, "image/png", spec, LIMITS), want)
        # in a batch, where small frames are resized together (schemas.resize)
        inputs, good, _ = prepare_batch([(value, "image/png")] * 2, spec, LIMITS)
        assert good == [0, 1] and np.array_equal(inputs, np.stack([want, want]))


@FAST
@given(values=st.lists(st.tuples(FRAME_BYTES, CONTENT_TYPES), min_size=1, max_size=4))
def test_a_batch_of_garbage_never_raises_and_accounts_for_every_frame(values) -> None:
    """Catches prepare_batch raising on one bad frame (losing the batch) or losing a frame:
    every index is either scored or dead-lettered, once."""
    inputs, good, poison = prepare_batch(values, SPEC, LIMITS)
    assert sorted(good + [i for i, _ in poison]) == list(range(len(values)))
    assert inputs.shape == (len(good), 1, 16, 16) and np.isfinite(inputs).all()


HEADER_NAMES = st.sampled_from(["frame-id", "captured-at", "content-type", "x-other", ""])


@FAST
@given(
    key=st.one_of(st.none(), st.binary(max_size=32)),
    value=st.one_of(st.none(), FRAME_BYTES),
    headers=st.lists(
        st.tuples(HEADER_NAMES, st.one_of(st.none(), st.binary(max_size=40))), max_size=5
    ),
)
def test_any_frame_record_parses_and_dead_letters_cleanly(key, value, headers) -> None:
    """Catches a frame record whose key, headers (a captured-at of 10**30 ms, invalid
    UTF-8) or value break the header parser or the dead letter, so that a poison frame
    could not even be dead-lettered."""
    sizes = len(key or b""), len(value or b"")
    record = ConsumerRecord("winnow.frames", 0, 7, 0, 0, key, value, None, *sizes, tuple(headers))
    frame = InboundFrame.from_record(record)
    assert frame.frame_id and (frame.source_id is None or isinstance(frame.source_id, str))
    try:
        decode_image(frame.value, frame.headers.content_type, LIMITS)
        error = PoisonRecord("undecodable", "a stand-in reason for a frame that decoded")
    except PoisonRecord as refused:
        error = refused
    letter = dead_letter_of(frame, error, 1024, frame.headers.captured_at or _now())
    assert DeadLetter.model_validate_json(letter.model_dump_json()) == letter


def _now():
    from datetime import UTC, datetime

    return datetime.now(UTC)


JSONISH = st.one_of(
    st.binary(max_size=200),
    st.recursive(
        st.none() | st.booleans() | st.floats() | st.text(max_size=20) | st.integers(),
        lambda inner: (
            st.lists(inner, max_size=4)
            | st.dictionaries(
                st.sampled_from(["frame_id", "label", "status", "kind", "index", "data", "x"]),
                inner,
                max_size=5,
            )
        ),
        max_leaves=12,
    ).map(lambda v: json.dumps(v).encode()),
)


@FAST
@given(value=JSONISH)
def test_labels_and_label_requests_refuse_garbage_with_validation_errors_only(
    value: bytes,
) -> None:
    """Catches a label or label request that raises something other than ValidationError
    (which the scorer, trainer and label app catch and skip or dead-letter)."""
    for model in (Label, LabelRequest):
        try:
            model.model_validate_json(value)
        except ValidationError:
            pass


@pytest.fixture(scope="module")
def label_queue() -> LabelQueue:
    settings = LabelAppSettings(team_token="t", group_id="g")  # type: ignore[arg-type]
    return LabelQueue(KafkaSettings(bootstrap="127.0.0.1:1"), settings)  # never started


@FAST
@given(value=st.one_of(st.none(), JSONISH))
def test_the_label_queue_marks_an_unreadable_request_done(label_queue, value) -> None:
    """Catches an unreadable label request raising out of the label app's consume loop or
    holding back its partition's commits (it must be done at once)."""
    tp = TopicPartition("winnow.label-requests", 0)
    label_queue.offsets.forget({tp})
    label_queue._add(tp, 3, value)
    assert label_queue.offsets.committable().get(tp) == 4 or len(label_queue.pool) == 1
    label_queue.pool.forget({tp})


@FAST
@given(values=st.lists(st.one_of(st.none(), JSONISH), max_size=8))
def test_the_release_assembler_ignores_garbage(values) -> None:
    """Catches a models-topic record that raises out of the assembler (and so out of the
    scorer's release watcher) instead of being logged and ignored."""
    assembler = ReleaseAssembler()
    for offset, value in enumerate(values):
        assert assembler.feed(value, "winnow.models", 0, offset) is None
