"""Decode and validate frame bytes, and turn them into model input (the scorer's hot path).

Only JPEG and PNG are accepted. Every way a record can be bad maps to a
``PoisonRecord`` reason (see ``schemas.dead_letter``):

- ``empty``: no value, or zero bytes;
- ``too_large``: more bytes than ``DecodeLimits.max_bytes``;
- ``unsupported_type``: a ``content-type`` header other than JPEG/PNG, or
  bytes of another known image format (GIF, BMP, WebP, TIFF, ...);
- ``undecodable``: bytes that are not an image;
- ``truncated``: a JPEG or PNG that is cut short (Pillow is never told to
  accept truncated files; a PNG must reach its ``IEND`` chunk, which Pillow
  itself does not check);
- ``too_many_pixels``: width x height over ``DecodeLimits.max_pixels``, read
  from the header before any pixel is decoded (decompression bombs).

A JPEG is decoded at a reduced DCT scale (``Image.draft``) when the model
input is much smaller than the frame, which makes big camera frames several
times cheaper to decode. The scorer's batches decode JPEGs with libjpeg-turbo
through ``simplejpeg`` at the scale and in the colour space ``Image.draft``
would choose: the same library and settings as Pillow's, so the same pixels.
On the throughput bench's camera frames (crops of 640x427, one thread, 2-core
CPU machine) the decode itself takes 0.61 ms instead of 0.93 ms; the copy into
Pillow's storage for the resize takes back 0.17 ms, so a frame becomes model
input in 1.74 ms instead of 1.84 ms. A JPEG simplejpeg will not decode exactly as
Pillow would (CMYK, or any libjpeg warning on damaged data) goes to Pillow,
which decides whether it is poison.

A PNG of 8-bit grey or RGB samples (what cameras and most encoders write) is
decoded by libspng through ``pyspng`` once every chunk's CRC has been checked,
without Pillow's ``Image.open``: the same pixels as Pillow's. A digits frame (8x8
grey PNG) becomes model input in 7 µs instead of 29 µs, or 21 µs instead of 37 µs
when it is resized to 16x16 (``prepare_batch`` in batches of 16). Small frames of a
batch are then resized together (``schemas.resize``: Pillow's arithmetic as matrix
products, the same pixels), so that resize no longer pays Pillow's cost per image:
11.4 to 11.8 µs a digits frame into 16x16 instead of 24.8 (three runs each, one thread,
the machine quiet). libspng itself
skips the CRCs, so a frame corrupted in transit would decode to garbage; with the
check, anything damaged goes to Pillow, which decides whether it is poison, as do
other PNGs (palette, 16-bit, alpha, under 8 bits).
"""

import asyncio
import io
import struct
import warnings
import zlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyspng
import simplejpeg
from PIL import Image

from schemas.frames import ContentType
from schemas.media import ALIASES, other_format, sniff
from schemas.model_spec import ModelSpec
from schemas.pixels import image_pixels, normalize, normalize_batch
from schemas.resize import agrees_with_pillow, resize_bilinear
from service.errors import PoisonRecord

_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_PIL_FORMATS: dict[ContentType, str] = {"image/jpeg": "JPEG", "image/png": "PNG"}
# JPEG start-of-frame markers: C0-CF except DHT (C4), JPG (C8) and DAC (CC).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}

Item = tuple[bytes | None, str | None]
"""A frame's value and declared content type."""


@dataclass(frozen=True)
class DecodeLimits:
    """Limits that protect the scorer from hostile or broken frames.

    Attributes:
        max_bytes: the largest encoded frame accepted.
        max_pixels: the largest width x height accepted.
    """

    max_bytes: int
    max_pixels: int

    def __post_init__(self) -> None:
        if self.max_bytes <= 0 or self.max_pixels <= 0:
            raise ValueError("decode limits must be positive")


def decode_image(
    value: bytes | None, content_type: str | None, limits: DecodeLimits
) -> Image.Image:
    """Validates and fully decodes a JPEG or PNG frame.

    Raises:
        PoisonRecord: the frame can never be decoded (see the module docstring).
    """
    image = _open(value, content_type, limits)
    _load(image)
    return image


def check_frame(value: bytes | None, content_type: str | None, limits: DecodeLimits) -> str:
    """Every check of a frame that needs no pixel decoded; Pillow's format name (``JPEG`` or
    ``PNG``) when it passes.

    Raises:
        PoisonRecord: ``empty``, ``too_large``, ``unsupported_type``, ``undecodable`` (an
            unknown signature or a broken header), ``truncated`` (cut short before its size,
            or a PNG without its end) or ``too_many_pixels``.
    """
    return _check(value, content_type, limits)[1]


def preprocess(image: Image.Image, spec: ModelSpec) -> np.ndarray:
    """Turns a frame into model input: float32 C x H x W, ``(x / 255 - mean) / std``.

    An image straight from ``_open`` (not yet loaded) is decoded here, at a
    reduced scale when it is a JPEG much larger than the model input. The rest
    is the model contract's ``image_to_input`` (``image_pixels``, then
    ``normalize``), which the trainer uses too.

    Raises:
        PoisonRecord: a not-yet-loaded image turns out to be truncated or broken.
    """
    return normalize(_input_pixels(image, spec), spec)


def _frame_pixels(
    value: bytes | None,
    content_type: str | None,
    spec: ModelSpec,
    limits: DecodeLimits,
    *,
    defer_resize: bool = False,
) -> np.ndarray:
    """A frame's uint8 pixels at the input size (``image_pixels``): an intact 8-bit grey
    or RGB PNG by libspng, without Pillow's ``Image.open``; anything else by Pillow.

    Args:
        defer_resize: a libspng frame of the model's colours that ``schemas.resize``
            resizes as Pillow does comes back at its own size, for the caller to resize
            with the other frames of its batch (``resize_bilinear``).
    """
    value, fmt, size = _check(value, content_type, limits)
    decoded = _spng_decode(value) if fmt == "PNG" else None
    if decoded is None:
        return _input_pixels(_open_checked(value, fmt, size, limits), spec, value)
    pixels, mode = decoded
    if mode == _mode(spec):
        if pixels.shape[:2] == spec.input_size:
            return pixels
        if defer_resize and agrees_with_pillow(pixels.shape[:2], spec.input_size, spec.channels):
            return pixels
    return image_pixels(Image.fromarray(pixels, mode), spec)


def _input_pixels(image: Image.Image, spec: ModelSpec, value: bytes | None = None) -> np.ndarray:
    """uint8 pixels at the input size (``image_pixels``), decoding a not-yet-loaded JPEG
    at a reduced scale when it is much larger than the input (with simplejpeg when its
    bytes are given)."""
    height, width = spec.input_size
    if image.format == "JPEG":
        turbo = _turbo_decode(value, image, spec) if value is not None else None
        if turbo is not None:
            return image_pixels(turbo, spec)
        image.draft(_mode(spec), (width, height))  # no-op once loaded
    _load(image)
    return image_pixels(image, spec)


def _mode(spec: ModelSpec) -> str:
    return "L" if spec.channels == 1 else "RGB"


_SPNG_COLOUR_TYPES = {0: "L", 2: "RGB"}
"""PNG colour types libspng decodes here, with the Pillow mode each opens as."""


def _spng_decode(value: bytes) -> tuple[np.ndarray, str] | None:
    """The pixels of an intact 8-bit grey or RGB PNG as Pillow would decode them (H x W or
    H x W x 3, uint8) with Pillow's mode for them, by libspng; None for any other PNG, or
    one libspng refuses.

    ``value`` passed ``_check`` as a PNG (signature, IHDR first, an IEND chunk).
    """
    mode = _SPNG_COLOUR_TYPES.get(value[25])
    if value[24] != 8 or mode is None or not _chunks_intact(value):
        return None
    try:
        pixels = pyspng.load(value, format=mode)
    except Exception:  # libspng refuses: Pillow decides what the frame is
        return None
    width, height = struct.unpack_from(">II", value, 16)
    if pixels.dtype != np.uint8 or pixels.shape[:2] != (height, width):
        return None
    return pixels, mode


def _chunks_intact(value: bytes) -> bool:
    """Whether every chunk up to ``IEND`` is whole and matches its CRC."""
    pos, end = 8, len(value)
    while pos + 12 <= end:
        (length,) = struct.unpack_from(">I", value, pos)
        crc_at = pos + 8 + length
        if crc_at + 4 > end:
            return False
        (crc,) = struct.unpack_from(">I", value, crc_at)
        if zlib.crc32(memoryview(value)[pos + 4 : crc_at]) != crc:
            return False
        if value[pos + 4 : pos + 8] == b"IEND":
            return True
        pos = crc_at + 4
    return False


def _turbo_decode(value: bytes, image: Image.Image, spec: ModelSpec) -> Image.Image | None:
    """The JPEG as Pillow would decode it after ``image.draft``, decoded by simplejpeg; None
    where simplejpeg cannot match Pillow (a mode other than L or RGB) or refuses the data.

    ``image`` is fresh from ``_open`` (header read, nothing decoded).
    """
    if image.mode not in ("L", "RGB"):
        return None
    gray = spec.channels == 1 or image.mode == "L"
    height, width = spec.input_size
    full_width, full_height = image.size
    ratio = min(full_width // width, full_height // height)
    scale = next(s for s in (8, 4, 2, 1) if ratio >= s)  # as JpegImageFile.draft chooses
    size = (-(-full_height // scale), -(-full_width // scale))
    try:
        pixels = simplejpeg.decode_jpeg(
            value,
            colorspace="GRAY" if gray else "RGB",
            min_factor=scale,
            min_height=size[0],
            min_width=size[1],
            strict=True,  # a libjpeg warning: Pillow decides what the frame is
        )
    except ValueError:
        return None
    if pixels.shape[:2] != size:
        return None
    return Image.fromarray(pixels[:, :, 0] if gray else pixels, "L" if gray else "RGB")


def decode_and_preprocess(
    value: bytes | None, content_type: str | None, spec: ModelSpec, limits: DecodeLimits
) -> np.ndarray:
    """``decode_image`` then ``preprocess``, decoding a JPEG only once and at reduced scale."""
    return normalize(_frame_pixels(value, content_type, spec, limits), spec)


def prepare_batch(
    items: Sequence[Item], spec: ModelSpec, limits: DecodeLimits
) -> tuple[np.ndarray, list[int], list[tuple[int, PoisonRecord]]]:
    """Decodes and preprocesses many frames; poison ones are set aside, not raised.

    Each frame's uint8 pixels go into one array and are normalized at once
    (``normalize_batch``), exactly as ``preprocess`` would one by one.

    Args:
        items: ``(value, content_type)`` per frame.

    Returns:
        The stacked inputs of the good frames (N x C x H x W, N may be 0), the
        indices of the good frames in ``items``, and ``(index, error)`` for
        each poison frame.
    """
    shape = (*spec.input_size, spec.channels)
    pixels = np.empty((len(items), *shape), dtype=np.uint8)
    good: list[int] = []
    poison: list[tuple[int, PoisonRecord]] = []
    small: dict[tuple[int, ...], list[tuple[int, np.ndarray]]] = {}  # by size: slot, pixels
    for index, (value, content_type) in enumerate(items):
        try:
            frame = _frame_pixels(value, content_type, spec, limits, defer_resize=True)
        except PoisonRecord as exc:
            poison.append((index, exc))
            continue
        if frame.shape[:2] == spec.input_size:
            pixels[len(good)] = frame.reshape(shape)
        else:
            small.setdefault(frame.shape, []).append((len(good), frame))
        good.append(index)
    for frames in small.values():  # the batch's small frames, a resize per size
        slots = [slot for slot, _ in frames]
        resized = resize_bilinear(np.stack([frame for _, frame in frames]), spec.input_size)
        pixels[slots] = resized.reshape(len(slots), *shape)
    return normalize_batch(pixels[: len(good)], spec), good, poison


INLINE_BYTES = 16 * 1024
"""A batch with fewer encoded bytes than this is decoded on the calling thread (the event
loop), not handed to the pool. Handing a batch over costs each part a thread wake-up and
a return through the loop, and the threads then trade the interpreter lock with it; for
small frames that is more than the decode. 16 of scikit-learn's digits as PNG are 2 KB
and decode in 0.2 ms; decoded on the loop, the digits scorer at batch 16 took 0.182-0.192
ms of CPU a frame against 0.201-0.212 through the pool, and decided 5,400-5,600 frames/s
against 4,600-4,900 (``winnow bench throughput --cases digits --batch-sizes 16,64``, 3
runs each, interleaved; at batch 64 0.129-0.137 against 0.140-0.143). Camera frames (a
640x480 JPEG is 30 to 80 KB) always go to the pool. The pause it can cause the loop is
bounded by the bytes: the worst case, a flat frame that deflate packs about 1,000:1, is
one 4096x4096 PNG in 16 KB, 20 ms to decode here."""


class BatchDecoder:
    """Runs :func:`prepare_batch` over a batch in a thread pool, one contiguous part per worker
    (a batch under :data:`INLINE_BYTES` on the calling thread).

    Args:
        limits: the decode limits.
        workers: decode threads (and parts per batch).
    """

    def __init__(self, limits: DecodeLimits, workers: int) -> None:
        self._limits = limits
        self._workers = workers
        self._pool = ThreadPoolExecutor(workers, "winnow-decode")

    async def decode(
        self, items: Sequence[Item], spec: ModelSpec
    ) -> tuple[np.ndarray, list[int], list[tuple[int, PoisonRecord]]]:
        """As :func:`prepare_batch`, with the parts decoded in parallel."""
        if sum(len(value) for value, _ in items if value is not None) < INLINE_BYTES:
            return prepare_batch(items, spec, self._limits)
        loop = asyncio.get_running_loop()
        size = max(1, -(-len(items) // self._workers))
        starts = range(0, max(1, len(items)), size)
        results = await asyncio.gather(
            *(
                loop.run_in_executor(
                    self._pool, prepare_batch, items[start : start + size], spec, self._limits
                )
                for start in starts
            )
        )
        if len(results) == 1:
            return results[0]
        inputs: list[np.ndarray] = []
        good: list[int] = []
        poison: list[tuple[int, PoisonRecord]] = []
        for start, (part_inputs, part_good, part_poison) in zip(starts, results, strict=True):
            inputs.append(part_inputs)
            good.extend(start + i for i in part_good)
            poison.extend((start + i, error) for i, error in part_poison)
        return np.concatenate(inputs), good, poison

    def close(self) -> None:
        """Stops the threads; parts not yet started are dropped."""
        self._pool.shutdown(wait=False, cancel_futures=True)


def _open(value: bytes | None, content_type: str | None, limits: DecodeLimits) -> Image.Image:
    """Checks everything that can be checked without decoding pixels, then opens lazily."""
    return _open_checked(*_check(value, content_type, limits), limits)


def _open_checked(
    value: bytes, fmt: str, size: tuple[int, int] | None, limits: DecodeLimits
) -> Image.Image:
    """Opens a frame that passed ``_check`` lazily; Pillow's size is checked too."""
    image = _pil_open(value, fmt, size)
    _check_pixels(image.size, limits)
    return image


def _check(
    value: bytes | None, content_type: str | None, limits: DecodeLimits
) -> tuple[bytes, str, tuple[int, int] | None]:
    """The value, Pillow's format name and the size from the header, once every check that
    needs no pixel passes (the size is None for a JPEG whose frame header was not found)."""
    if not value:
        raise PoisonRecord("empty", "The record has no value, so there is no image to decode.")
    if len(value) > limits.max_bytes:
        raise PoisonRecord(
            "too_large",
            f"The image is {len(value)} bytes, more than the limit of {limits.max_bytes} bytes.",
        )
    _check_content_type(content_type)
    fmt = _sniff(value)
    size = _jpeg_size(value) if fmt == "JPEG" else _png_size(value)
    if size is not None:
        _check_pixels(size, limits)
    if fmt == "PNG" and value.rfind(_PNG_IEND) < 0:
        raise PoisonRecord("truncated", "The PNG image is cut short: it has no end (IEND) chunk.")
    return value, fmt, size


def _check_content_type(content_type: str | None) -> None:
    if not content_type:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media not in ALIASES:
        raise PoisonRecord(
            "unsupported_type",
            f"The content type '{content_type}' is not supported; send image/jpeg or image/png.",
        )


def _sniff(value: bytes) -> str:
    """Pillow's format name of a JPEG or PNG; PoisonRecord for anything else."""
    content_type = sniff(value)
    if content_type is not None:
        return _PIL_FORMATS[content_type]
    name = other_format(value)
    if name is not None:
        raise PoisonRecord(
            "unsupported_type", f"The bytes are a {name} image; only JPEG and PNG are supported."
        )
    raise PoisonRecord(
        "undecodable", f"The {len(value)} bytes are not a JPEG or PNG image (unknown signature)."
    )


def _png_size(value: bytes) -> tuple[int, int] | None:
    """Width and height from the IHDR chunk, which the PNG standard puts first."""
    if len(value) < 24:
        raise PoisonRecord("truncated", "The PNG image is cut short inside its header.")
    if value[12:16] != b"IHDR":
        raise PoisonRecord("undecodable", "The PNG image does not start with an IHDR chunk.")
    width, height = struct.unpack(">II", value[16:24])
    return width, height


def _jpeg_size(value: bytes) -> tuple[int, int] | None:
    """Width and height from the first start-of-frame segment, walking the segments."""
    pos, end = 2, len(value)
    while pos + 4 <= end:
        if value[pos] != 0xFF:
            return None  # not a segment boundary: let Pillow judge the file
        marker = value[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, *range(0xD0, 0xD8)):  # segments without a length
            pos += 2
            continue
        if marker in (0xD9, 0xDA):  # end of image, or scan data before any frame header
            return None
        length = (value[pos + 2] << 8) | value[pos + 3]
        if marker in _SOF_MARKERS:
            if pos + 9 > end:
                break
            height, width = struct.unpack(">HH", value[pos + 5 : pos + 9])
            return width, height
        pos += 2 + length
    raise PoisonRecord("truncated", "The JPEG image is cut short before its frame header.")


def _check_pixels(size: tuple[int, int], limits: DecodeLimits) -> None:
    width, height = size
    if width * height > limits.max_pixels:
        raise PoisonRecord(
            "too_many_pixels",
            f"The image is {width}x{height} = {width * height} pixels, "
            f"more than the limit of {limits.max_pixels} pixels.",
        )
    if width == 0 or height == 0:
        raise PoisonRecord("undecodable", f"The image header claims a size of {width}x{height}.")


def _pil_open(value: bytes, fmt: str, size: tuple[int, int] | None) -> Image.Image:
    try:
        pil_limit = Image.MAX_IMAGE_PIXELS
        if size is not None and pil_limit is not None and size[0] * size[1] > pil_limit:
            # Our own limit allowed it; keep Pillow's bomb warning from
            # becoming an error where warnings are errors. Rare, so the
            # process-wide warnings state is touched only here.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                return Image.open(io.BytesIO(value), formats=[fmt])
        return Image.open(io.BytesIO(value), formats=[fmt])
    except Image.DecompressionBombError as exc:
        raise PoisonRecord(
            "too_many_pixels", f"The image has more pixels than the decoder allows: {exc}."
        ) from exc
    except Exception as exc:  # Pillow raises many kinds on malformed headers
        if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
            raise PoisonRecord(
                "truncated", f"The {fmt} image is cut short inside its header: {exc}."
            ) from exc
        raise PoisonRecord(
            "undecodable", f"The {fmt} header cannot be read: {exc or type(exc).__name__}."
        ) from exc


def _load(image: Image.Image) -> None:
    try:
        image.load()
    except (OSError, EOFError) as exc:
        if "truncated" in str(exc).lower() or isinstance(exc, EOFError):
            raise PoisonRecord(
                "truncated", f"The {image.format} image is cut short: {exc}."
            ) from exc
        raise PoisonRecord(
            "undecodable", f"The {image.format} image data is broken: {exc}."
        ) from exc
    except Exception as exc:  # Pillow raises many kinds on malformed data
        raise PoisonRecord(
            "undecodable",
            f"The {image.format} image data is broken: {exc or type(exc).__name__}.",
        ) from exc
