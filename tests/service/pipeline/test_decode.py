"""Decoding frames: every kind of poison gets its reason; good frames become model input."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from schemas.model_spec import ModelSpec
from schemas.pixels import image_pixels
from service.errors import PoisonRecord
from service.pipeline import decode
from service.pipeline.decode import (
    DecodeLimits,
    decode_and_preprocess,
    decode_image,
    prepare_batch,
    preprocess,
)

LIMITS = DecodeLimits(max_bytes=5_000_000, max_pixels=20_000_000)


def _encode(pixels: np.ndarray, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _spec(channels: int, size: tuple[int, int]) -> ModelSpec:
    mean, std = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]) if channels == 3 else ([0.5], [0.5])
    return ModelSpec(
        version="t",
        arch="small-cnn",
        classes=["a", "b"],
        input_size=size,
        channels=channels,
        mean=mean,
        std=std,
        embedding_dim=8,
    )


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    from sklearn.datasets import load_sample_images

    return load_sample_images().images[0]  # 427 x 640 x 3, uint8


@pytest.fixture(scope="module")
def digit() -> np.ndarray:
    from sklearn.datasets import load_digits

    return np.round(load_digits().images[0] * (255 / 16)).astype(np.uint8)  # 8 x 8


@pytest.fixture(scope="module")
def photo_jpeg(photo: np.ndarray) -> bytes:
    return _encode(photo, "JPEG", quality=90)


@pytest.fixture(scope="module")
def photo_png(photo: np.ndarray) -> bytes:
    return _encode(photo, "PNG")


def _png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR claiming a size, one empty IDAT and IEND: no pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"")
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _reason(value: bytes | None, content_type: str | None = None, limits=LIMITS) -> str:
    with pytest.raises(PoisonRecord) as caught:
        decode_image(value, content_type, limits)
    detail = caught.value.detail
    assert detail[0].isupper() and detail.endswith("."), detail  # a sentence for operators
    return caught.value.reason


def test_empty(photo_jpeg: bytes) -> None:
    assert _reason(None) == "empty"
    assert _reason(b"") == "empty"


def test_too_large(photo_jpeg: bytes) -> None:
    limits = DecodeLimits(max_bytes=len(photo_jpeg) - 1, max_pixels=LIMITS.max_pixels)
    assert _reason(photo_jpeg, limits=limits) == "too_large"
    decode_image(photo_jpeg, None, DecodeLimits(len(photo_jpeg), LIMITS.max_pixels))


@pytest.mark.parametrize("content_type", ["image/gif", "application/json", "text/plain"])
def test_unsupported_content_type(photo_jpeg: bytes, content_type: str) -> None:
    assert _reason(photo_jpeg, content_type) == "unsupported_type"


@pytest.mark.parametrize("fmt", ["GIF", "BMP", "WEBP", "TIFF"])
def test_other_image_formats_are_unsupported(digit: np.ndarray, fmt: str) -> None:
    assert _reason(_encode(digit, fmt)) == "unsupported_type"


def test_random_bytes_are_undecodable() -> None:
    rng = np.random.default_rng(0)
    assert _reason(b"\x00" + rng.bytes(4000)) == "undecodable"
    assert _reason(b'{"not": "an image"}', "image/png") == "undecodable"


@pytest.mark.parametrize("cut", [0.5, 0.9])
def test_truncated_jpeg(photo_jpeg: bytes, cut: float) -> None:
    value = photo_jpeg[: int(len(photo_jpeg) * cut)]
    assert _reason(value) == "truncated"
    with pytest.raises(PoisonRecord, match="truncated"):  # also on the reduced-scale path
        decode_and_preprocess(value, None, _spec(3, (32, 32)), LIMITS)


def test_truncated_png(photo_png: bytes) -> None:
    assert _reason(photo_png[: len(photo_png) // 2]) == "truncated"
    assert (
        _reason(photo_png[:-12]) == "truncated"
    )  # only the end chunk missing: Pillow alone accepts it


def test_decompression_bomb_is_refused_from_the_header() -> None:
    bomb = _png_header_only(100_000, 100_000)
    assert len(bomb) < 100
    assert _reason(bomb) == "too_many_pixels"
    # Under Pillow's own limit but over ours: still refused, before decoding.
    assert _reason(_png_header_only(5000, 5000)) == "too_many_pixels"


def test_jpeg_pixel_limit(photo_jpeg: bytes) -> None:
    assert (
        _reason(photo_jpeg, limits=DecodeLimits(LIMITS.max_bytes, 640 * 427 - 1))
        == "too_many_pixels"
    )


def test_rgb_jpeg_to_model_input(photo_jpeg: bytes, photo: np.ndarray) -> None:
    spec = _spec(3, (224, 224))
    x = decode_and_preprocess(photo_jpeg, "image/jpeg", spec, LIMITS)
    assert x.shape == (3, 224, 224) and x.dtype == np.float32 and x.flags.c_contiguous
    # the same picture resized by hand, normalized by the contract's formula
    resized = np.asarray(Image.fromarray(photo).resize((224, 224), Image.Resampling.BILINEAR))
    expected = (resized.transpose(2, 0, 1) / 255 - np.array(spec.mean)[:, None, None]) / np.array(
        spec.std
    )[:, None, None]
    # JPEG is lossy: compare on average, not pixel by pixel
    assert np.abs(x - expected).mean() < 0.1


def test_png_pixel_normalized_exactly(photo_png: bytes, photo: np.ndarray) -> None:
    spec = _spec(3, (427, 640))  # no resize: one pixel can be checked by hand
    x = decode_and_preprocess(photo_png, "image/png", spec, LIMITS)
    r, g, b = photo[10, 20]
    assert x[0, 10, 20] == pytest.approx((r / 255 - 0.485) / 0.229, abs=1e-5)
    assert x[1, 10, 20] == pytest.approx((g / 255 - 0.456) / 0.224, abs=1e-5)
    assert x[2, 10, 20] == pytest.approx((b / 255 - 0.406) / 0.225, abs=1e-5)


def test_gray_png_digit(digit: np.ndarray) -> None:
    spec = _spec(1, (8, 8))
    x = decode_and_preprocess(_encode(digit, "PNG"), None, spec, LIMITS)
    assert x.shape == (1, 8, 8) and x.dtype == np.float32
    np.testing.assert_allclose(x[0], (digit / 255 - 0.5) / 0.5, atol=1e-6)
    assert x.min() >= -1.0 and x.max() <= 1.0


def test_gray_jpeg_and_color_to_gray(digit: np.ndarray, photo_jpeg: bytes) -> None:
    big_digit = np.kron(digit, np.ones((8, 8), dtype=np.uint8))  # 64 x 64
    x = decode_and_preprocess(
        _encode(big_digit, "JPEG", quality=95), None, _spec(1, (16, 16)), LIMITS
    )
    assert x.shape == (1, 16, 16)
    assert np.abs(x[0] - ((digit.repeat(2, 0).repeat(2, 1) / 255 - 0.5) / 0.5)).mean() < 0.1
    gray = decode_and_preprocess(photo_jpeg, None, _spec(1, (28, 28)), LIMITS)
    assert gray.shape == (1, 28, 28)


def test_large_jpeg_decodes_at_reduced_scale(photo: np.ndarray) -> None:
    frame = np.asarray(Image.fromarray(photo).resize((1920, 1280)))
    image = decode_image(_encode(frame, "JPEG", quality=90), None, LIMITS)
    assert image.size == (1920, 1280)  # full decode when asked for the image
    lazy = Image.open(io.BytesIO(_encode(frame, "JPEG", quality=90)))
    x = preprocess(lazy, _spec(3, (224, 224)))
    assert lazy.size == (480, 320)  # draft: decoded at 1/4 scale (still >= 224), not 1920 x 1280
    assert x.shape == (3, 224, 224)


def test_rgba_palette_and_16_bit_png() -> None:
    spec = _spec(3, (8, 8))
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[..., 0] = 255
    x = decode_and_preprocess(_encode(rgba, "PNG"), None, spec, LIMITS)
    assert x[0, 0, 0] == pytest.approx((1 - 0.485) / 0.229, abs=1e-5)
    palette = Image.fromarray(rgba[..., :3]).convert("P")
    palette.info["transparency"] = 0
    buffer = io.BytesIO()
    palette.save(buffer, format="PNG", transparency=0)
    assert decode_and_preprocess(buffer.getvalue(), None, spec, LIMITS).shape == (3, 8, 8)
    wide = np.full((8, 8), 65535, dtype=np.uint16)
    x16 = decode_and_preprocess(_encode(wide, "PNG"), None, _spec(1, (8, 8)), LIMITS)
    np.testing.assert_allclose(x16, 1.0, atol=1e-6)  # white stays white, not clipped garbage


def test_prepare_batch_sets_poison_aside(photo_jpeg: bytes, digit: np.ndarray) -> None:
    spec = _spec(3, (32, 32))
    items = [(photo_jpeg, "image/jpeg"), (None, None), (_encode(digit, "PNG"), None), (b"xx", None)]
    inputs, good, poison = prepare_batch(items, spec, LIMITS)
    assert inputs.shape == (2, 3, 32, 32) and inputs.dtype == np.float32
    assert good == [0, 2]
    assert [(i, e.reason) for i, e in poison] == [(1, "empty"), (3, "undecodable")]
    empty, good, poison = prepare_batch([(None, None)], spec, LIMITS)
    assert empty.shape == (0, 3, 32, 32) and good == [] and len(poison) == 1


@pytest.mark.parametrize("channels", [1, 3])
def test_prepare_batch_is_preprocess_frame_by_frame_bit_for_bit(
    channels: int, photo_jpeg: bytes, photo_png: bytes, digit: np.ndarray
) -> None:
    """The batch is normalized at once; every frame must still be what the contract makes."""
    spec = _spec(channels, (24, 32))
    rgba = np.dstack(
        [np.kron(digit, np.ones((4, 4), np.uint8))] * 3 + [np.full((32, 32), 9, np.uint8)]
    )
    values = [photo_jpeg, _encode(digit, "PNG"), b"xx", photo_png, _encode(rgba, "PNG")]
    inputs, good, _ = prepare_batch([(v, None) for v in values], spec, LIMITS)
    assert good == [0, 1, 3, 4]
    expected = np.stack([_per_frame(values[i], spec) for i in good])
    assert inputs.dtype == expected.dtype and inputs.shape == expected.shape
    assert np.array_equal(inputs, expected)
    assert inputs.flags.c_contiguous


@pytest.mark.parametrize("channels", [1, 3])
def test_small_frames_of_several_sizes_resized_together_are_pillows(
    channels: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The failure it catches: small PNGs resized a batch at a time (``schemas.resize``)
    coming out other than Pillow makes them, or in the wrong slots of the batch, when sizes
    mix: 8x8 and 12x10 frames grow to 16x16 in batches, a 16x16 one needs no resize, and
    40x40 and 20x28 ones shrink both ways, which Pillow does itself."""
    rng = np.random.default_rng(channels)
    sizes = [(8, 8), (40, 40), (12, 10), (8, 8), (16, 16), (12, 10), (20, 28), (8, 8)]
    shape = () if channels == 1 else (3,)
    frames = [rng.integers(0, 256, (*size, *shape), dtype=np.uint8) for size in sizes]
    values = [_encode(frame, "PNG") for frame in frames]
    spec = _spec(channels, (16, 16))
    resized: list[tuple[int, ...]] = []
    original = decode.resize_bilinear

    def spy(pixels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
        resized.append(pixels.shape[:3])
        return original(pixels, size)

    monkeypatch.setattr(decode, "resize_bilinear", spy)
    inputs, good, poison = prepare_batch([(v, "image/png") for v in values], spec, LIMITS)
    assert good == list(range(len(values))) and not poison
    assert sorted(resized) == [(2, 12, 10), (3, 8, 8)]  # one resize per size; the rest Pillow's
    expected = np.stack([_per_frame(v, spec) for v in values])
    assert np.array_equal(inputs, expected)


def _per_frame(value: bytes, spec: ModelSpec) -> np.ndarray:
    """One frame as the scorer made it before batches were normalized at once."""
    image = Image.open(io.BytesIO(value))
    if image.format == "JPEG":
        image.draft("L" if spec.channels == 1 else "RGB", (spec.input_size[1], spec.input_size[0]))
    pixels = image_pixels(image, spec)
    if pixels.ndim == 2:
        pixels = pixels[:, :, None]
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    out = np.empty((spec.channels, *pixels.shape[:2]), dtype=np.float32)
    np.multiply(pixels.transpose(2, 0, 1), (1.0 / (255.0 * std))[:, None, None], out=out)
    out -= (mean / std)[:, None, None]
    return out


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(224, 224), (100, 150), (50, 60), (16, 16)])
def test_jpegs_decode_to_pillows_pixels_at_every_draft_scale(
    channels: int, size: tuple[int, int], photo_jpeg: bytes, photo: np.ndarray
) -> None:
    """simplejpeg decodes the batch's JPEGs; it must give Pillow's pixels at the DCT scale
    draft picks (1, 1/2, 1/4, 1/8 here), colour or gray, into colour or gray models."""
    spec = _spec(channels, size)
    gray_jpeg = _encode(np.asarray(Image.fromarray(photo).convert("L")), "JPEG", quality=85)
    values = [photo_jpeg, gray_jpeg]
    inputs, good, _ = prepare_batch([(v, "image/jpeg") for v in values], spec, LIMITS)
    assert good == [0, 1]
    assert np.array_equal(inputs, np.stack([_per_frame(v, spec) for v in values]))


def test_jpegs_simplejpeg_will_not_decode_go_to_pillow(
    photo: np.ndarray, photo_jpeg: bytes
) -> None:
    """CMYK (no libjpeg conversion to RGB) and damaged data (a libjpeg warning) are Pillow's to
    decode or refuse, with the reasons it always gave."""
    spec = _spec(3, (32, 32))
    buffer = io.BytesIO()
    Image.fromarray(photo).convert("CMYK").save(buffer, format="JPEG")
    cmyk = buffer.getvalue()
    flipped = bytearray(photo_jpeg)
    flipped[len(flipped) // 2] ^= 0xFF  # entropy-coded data damaged: libjpeg warns
    values = [cmyk, bytes(flipped), photo_jpeg[: len(photo_jpeg) // 2]]
    inputs, good, poison = prepare_batch([(v, None) for v in values], spec, LIMITS)
    expected_good, expected_poison = [], []
    for index, value in enumerate(values):
        try:
            expected_good.append(preprocess(Image.open(io.BytesIO(value)), spec))
        except PoisonRecord as error:
            expected_poison.append((index, error.reason))
    assert [(i, e.reason) for i, e in poison] == expected_poison
    assert (2, "truncated") in expected_poison and 0 in good
    assert np.array_equal(inputs, np.stack(expected_good))


def _spng_calls(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the PNGs that libspng decodes, and how many of them it decoded."""
    import service.pipeline.decode as decode

    calls: list[int] = []
    real = decode.pyspng.load

    def load(value: bytes, format: str | None = None) -> np.ndarray:
        calls.append(len(value))
        return real(value, format=format)

    monkeypatch.setattr(decode.pyspng, "load", load)
    return calls


def _pillow_verdicts(values: list[bytes], spec: ModelSpec) -> tuple[list, list]:
    good, poison = [], []
    for index, value in enumerate(values):
        try:
            good.append(decode_and_preprocess_by_pillow(value, spec))
        except PoisonRecord as error:
            poison.append((index, error.reason))
    return good, poison


def decode_and_preprocess_by_pillow(value: bytes, spec: ModelSpec) -> np.ndarray:
    """A PNG as the scorer decoded it before libspng: Pillow's ``image.load``."""
    image = decode_image(value, None, LIMITS)
    return preprocess(image, spec)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("size", [(8, 8), (24, 32)])
def test_pngs_libspng_decodes_give_pillows_pixels(
    channels: int,
    size: tuple[int, int],
    digit: np.ndarray,
    photo: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Grey and RGB, interlaced, with gamma and a transparent colour (which Pillow ignores
    for L and RGB), into grey and colour models, at and off the input size: the pixels are
    Pillow's, and libspng decoded each of them (not a silent fall-back to Pillow)."""
    spec = _spec(channels, size)
    crop = photo[:64, :80]
    values = [
        _encode(digit, "PNG"),
        _encode(crop, "PNG"),
        _encode(crop, "PNG", interlace=1),
        _encode(digit, "PNG", transparency=0, gamma=0.4),  # Pillow writes gAMA from info only
        _encode(crop, "PNG", transparency=(0, 0, 0)),
    ]
    calls = _spng_calls(monkeypatch)
    inputs, good, poison = prepare_batch([(v, "image/png") for v in values], spec, LIMITS)
    assert good == list(range(len(values))) and not poison
    assert len(calls) == len(values)
    assert np.array_equal(inputs, np.stack([_per_frame(v, spec) for v in values]))


def test_pngs_libspng_does_not_decode_go_to_pillow(
    digit: np.ndarray, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Palette, 16-bit, grey with alpha and 1-bit PNGs are Pillow's alone."""
    spec = _spec(1, (8, 8))
    images = [
        Image.fromarray(digit).convert("P"),
        Image.fromarray(digit.astype(np.uint16) * 257),
        Image.fromarray(np.dstack([digit, digit])),
        Image.fromarray(digit > 100),
    ]
    values = []
    for image in images:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        values.append(buffer.getvalue())
    assert [Image.open(io.BytesIO(v)).mode for v in values] == ["P", "I;16", "LA", "1"]
    calls = _spng_calls(monkeypatch)
    inputs, good, _ = prepare_batch([(v, "image/png") for v in values], spec, LIMITS)
    assert calls == []
    assert np.array_equal(inputs, np.stack([_per_frame(values[i], spec) for i in good]))


def test_a_png_damaged_in_transit_is_judged_by_pillow_not_decoded_to_garbage(
    photo: np.ndarray,
) -> None:
    """libspng skips the chunks' CRCs; without the check, a bit flipped in the image data
    decoded to wrong pixels where Pillow refuses the frame as poison."""
    spec = _spec(3, (16, 16))
    value = _encode(photo[:48, :64], "PNG")
    idat = value.index(b"IDAT") + 4
    flipped = []
    for offset in range(0, 400, 7):
        damaged = bytearray(value)
        damaged[idat + offset] ^= 0x10
        flipped.append(bytes(damaged))
    inputs, good, poison = prepare_batch([(v, "image/png") for v in flipped], spec, LIMITS)
    expected_good, expected_poison = _pillow_verdicts(flipped, spec)
    assert [(i, e.reason) for i, e in poison] == expected_poison
    assert len(expected_poison) > len(flipped) // 2
    assert len(good) == len(expected_good)
    assert all(np.array_equal(a, b) for a, b in zip(inputs, expected_good, strict=True))


def test_sizes_the_installed_pillow_resizes_otherwise_are_left_to_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The failure it catches: the scorer resizing a batch its own way where the installed
    Pillow (and so the trainer) makes other pixels (simulated: ``schemas.resize`` told that
    Pillow disagrees on 8x8 to 16x16); every frame must then be Pillow's own resize."""
    monkeypatch.setattr(decode, "agrees_with_pillow", lambda source, target, channels: False)
    called: list[int] = []
    monkeypatch.setattr(decode, "resize_bilinear", lambda pixels, size: called.append(1))
    rng = np.random.default_rng(5)
    values = [_encode(rng.integers(0, 256, (8, 8), dtype=np.uint8), "PNG") for _ in range(4)]
    spec = _spec(1, (16, 16))
    inputs, good, _ = prepare_batch([(v, "image/png") for v in values], spec, LIMITS)
    assert good == [0, 1, 2, 3] and not called
    assert np.array_equal(inputs, np.stack([_per_frame(v, spec) for v in values]))


async def test_a_batch_of_small_frames_decodes_on_the_loop_and_large_ones_in_the_pool(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A hand-off to the pool costs more than decoding a few small frames (INLINE_BYTES);
    either way the batch comes out the same."""
    import threading

    threads: list[str] = []
    real = decode.prepare_batch

    def recorded(*args, **kwargs):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(decode, "prepare_batch", recorded)
    rng = np.random.default_rng(3)
    items = [
        (_encode(rng.integers(0, 256, (8, 8), dtype=np.uint8), "PNG"), "image/png")
        for _ in range(16)
    ]
    items.append((b"not an image", "image/png"))  # poison, on the loop as in the pool
    spec = _spec(1, (16, 16))
    decoder = decode.BatchDecoder(LIMITS, workers=2)
    try:
        inline = await decoder.decode(items, spec)
        assert threads == [threading.current_thread().name]
        threads.clear()
        monkeypatch.setattr(decode, "INLINE_BYTES", 1)  # the same batch through the pool
        pooled = await decoder.decode(items, spec)
        assert len(threads) == 2 and all(t.startswith("winnow-decode") for t in threads)
    finally:
        decoder.close()
    assert np.array_equal(inline[0], pooled[0]) and inline[1] == pooled[1] == list(range(16))
    assert [i for i, _ in inline[2]] == [i for i, _ in pooled[2]] == [16]
